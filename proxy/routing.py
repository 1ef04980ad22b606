"""The immutable routing snapshot a proxy serves from, and how it is built. Pure.

A command reads `server.table` once; applying new metadata builds a whole new table off to the
side and swaps one reference, so no command sees half of one epoch and half of another.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from mesh.model.slots import SLOT_COUNT, SlotRange, format_range

from mesh.model.view import ClusterView, hash_password

from .umctl import ClusterMeta

SLOT_NOT_SERVED = b"-CLUSTERDOWN Hash slot not served\r\n"


def node_id(cluster: str, address: str) -> str:
    """A stable 40-character node id: the cluster name padded to 20, then a hash of the address."""
    digest = hashlib.blake2b(address.encode(), digest_size=8).hexdigest()
    return cluster[:20].ljust(20, "_") + digest.ljust(20, "_")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    address: str  # the proxy address clients connect to
    myself: bool
    ranges: tuple[SlotRange, ...]
    master_id: str | None = None  # set for a replica

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


@dataclass(frozen=True, slots=True)
class RoutingTable:
    cluster: str
    epoch: int
    nodes: tuple[NodeInfo, ...]
    # per slot: None when this proxy serves it, else the complete redirect/error reply
    routes: tuple[bytes | None, ...] = field(repr=False)
    config: tuple[tuple[str, str], ...] = ()
    password_hash: str | None = None

    @property
    def myself(self) -> NodeInfo | None:
        return next((n for n in self.nodes if n.myself), None)

    @property
    def configured(self) -> bool:
        return bool(self.cluster)


def empty_table() -> RoutingTable:
    return RoutingTable(cluster="", epoch=0, nodes=(), routes=(SLOT_NOT_SERVED,) * SLOT_COUNT)


def table_from_meta(meta: ClusterMeta, my_address: str) -> RoutingTable:
    """Build the table for this proxy (`my_address` is its announced address)."""
    routes: list[bytes | None] = [SLOT_NOT_SERVED] * SLOT_COUNT
    ranges_by_owner: dict[str, list[SlotRange]] = {}
    for owner, ranges in meta.owned():
        ranges_by_owner.setdefault(owner, []).extend(ranges)
        for start, end in ranges:
            if owner:
                for slot in range(start, end + 1):
                    routes[slot] = b"-MOVED %d %s\r\n" % (slot, owner.encode())
            else:
                routes[start : end + 1] = [None] * (end - start + 1)
    nodes = [NodeInfo(node_id(meta.cluster, my_address), my_address, True,
                      tuple(sorted(ranges_by_owner.pop("", []))))]
    for entry in meta.peers:
        if entry.address not in {n.address for n in nodes}:
            nodes.append(NodeInfo(node_id(meta.cluster, entry.address), entry.address, False,
                                  tuple(sorted(ranges_by_owner.get(entry.address, [])))))
    config = dict(meta.config)
    password_hash = config.pop("password_hash", None)
    if "password" in config:
        password_hash = hash_password(config.pop("password"))
    return RoutingTable(cluster=meta.cluster, epoch=meta.epoch, nodes=tuple(nodes),
                        routes=tuple(routes), config=tuple(sorted(config.items())),
                        password_hash=password_hash)


def format_ranges(ranges: tuple[SlotRange, ...]) -> list[str]:
    return [format_range(r) for r in ranges]


def table_from_view(view: ClusterView, me: str) -> RoutingTable:
    """Build the table node `me` serves from a validated cluster view.

    A shard's slots are served by its master's proxy; a replica's proxy redirects to it.
    """
    routes: list[bytes | None] = [SLOT_NOT_SERVED] * SLOT_COUNT
    nodes: list[NodeInfo] = []
    for shard in view.shards:
        master_proxy = view.address_of(shard.master).proxy
        master_id = node_id(view.cluster, shard.master)
        nodes.append(NodeInfo(master_id, master_proxy, shard.master == me, shard.slots))
        for replica in shard.replicas:
            nodes.append(NodeInfo(node_id(view.cluster, replica), view.address_of(replica).proxy,
                                  replica == me, (), master_id))
        for start, end in shard.slots:
            if shard.master == me:
                routes[start : end + 1] = [None] * (end - start + 1)
            else:
                for slot in range(start, end + 1):
                    routes[slot] = b"-MOVED %d %s\r\n" % (slot, master_proxy.encode())
    return RoutingTable(cluster=view.cluster, epoch=view.epoch, nodes=tuple(nodes),
                        routes=tuple(routes), password_hash=view.config.password_hash)
