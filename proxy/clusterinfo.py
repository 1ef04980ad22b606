"""CLUSTER NODES / SLOTS / SHARDS / INFO rendered from a routing table, as Redis formats them."""
from __future__ import annotations

from core.slots import SLOT_COUNT, slot_count

from .routing import NodeInfo, RoutingTable, format_ranges


def cluster_nodes(table: RoutingTable) -> str:
    lines = []
    for n in table.nodes:
        flags = ("myself," if n.myself else "") + ("slave" if n.master_id else "master") \
            + (",fail" if n.failed else "")
        fields = [n.node_id, f"{n.host}:{n.port}", flags, n.master_id or "-", "0", "0", str(table.epoch),
                  "disconnected" if n.failed else "connected", *format_ranges(n.ranges)]
        lines.append(" ".join(fields) + "\n")
    return "".join(lines)


def _masters(table: RoutingTable) -> list[NodeInfo]:
    return [n for n in table.nodes if not n.master_id]


def _replicas_of(table: RoutingTable, master: NodeInfo) -> list[NodeInfo]:
    """The live replicas: clients that read from replicas must not be sent to a dead one."""
    return [n for n in table.nodes if n.master_id == master.node_id and not n.failed]


def cluster_slots(table: RoutingTable) -> list:
    rows: list[list] = []
    for master in _masters(table):
        members = [master, *_replicas_of(table, master)]
        for start, end in master.ranges:
            rows.append([start, end, *([n.host, n.port, n.node_id] for n in members)])
    rows.sort(key=lambda r: r[0])
    return rows


def cluster_shards(table: RoutingTable) -> list:
    shards = []
    for master in _masters(table):
        nodes = []
        for n in (master, *_replicas_of(table, master)):
            nodes.append({"id": n.node_id, "port": n.port, "ip": n.host, "endpoint": n.host,
                          "role": "replica" if n.master_id else "master",
                          "replication-offset": 0, "health": "online"})
        slots = [bound for r in master.ranges for bound in r]
        shards.append({"slots": slots, "nodes": nodes})
    return shards


def cluster_info(table: RoutingTable) -> str:
    assigned = sum(slot_count(n.ranges) for n in _masters(table))
    me = table.myself
    fields = {
        "cluster_state": "ok" if assigned == SLOT_COUNT else "fail",
        "cluster_slots_assigned": assigned,
        "cluster_slots_ok": assigned,
        "cluster_slots_pfail": 0,
        "cluster_slots_fail": 0,
        "cluster_known_nodes": len(table.nodes),
        "cluster_size": sum(1 for m in _masters(table) if m.ranges),
        "cluster_current_epoch": table.epoch,
        "cluster_my_epoch": table.epoch if me else 0,
        "cluster_stats_messages_sent": 0,
        "cluster_stats_messages_received": 0,
        "total_cluster_links_buffer_limit_exceeded": 0,
    }
    return "".join(f"{k}:{v}\r\n" for k, v in fields.items())
