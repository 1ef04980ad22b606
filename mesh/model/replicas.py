"""How the leader keeps each cluster's declared replica count. Pure: a view, what is seen of
its nodes and the free pool, and `now` in; the next view (or None) out.

Per shard whose master is alive (a dead master is failover's business) and which is not
migrating all its slots away:

- a replica counts until it has been dead for `replace_after(view)` (the cluster's
  `reassign_after`): a node that restarts comes back to its place, and nothing replaces it
  meanwhile;
- fewer counted replicas than declared: free nodes join as replicas, preferring a host that
  none of the shard's members is on;
- a replica dead longer than that leaves the view once the shard has as many synced live
  replicas as declared without it (a node gone for good is replaced, never before its
  replacement holds the data);
- more counted replicas than declared (`cluster scale --replicas` down): the surplus leaves,
  failed ones first, then dead, then unsynced, then the newest.

Removed replicas return to the pool (their assignment is deleted); claimed free nodes go
through the view commit's claim, as failover's reassignment does.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from core.nodes import NodeRecord, NodeStatus
from core.slots import slot_count
from core.view import ClusterView, NodeAddress, Shard, validate

from .failover import Health


@dataclass(frozen=True, slots=True)
class Seen:
    """What the leader knows of one node."""

    alive: bool
    since: float  # when `alive` last changed, by the leader's clock
    in_sync: bool = False  # serves this cluster as a replica whose Redis finished its sync
    host: str = ""  # its host tag ("" unknown)


@dataclass(frozen=True, slots=True)
class FreeNode:
    node_id: str
    address: NodeAddress
    host: str = ""


@dataclass(frozen=True, slots=True)
class ReplicaStep:
    view: ClusterView
    claimed: tuple[str, ...] = ()  # free nodes that joined as replicas
    released: tuple[str, ...] = ()  # replicas that left (back to the pool)
    what: str = ""


def replace_after(view: ClusterView) -> float:
    """REPLACE_REPLICA_AFTER: seconds a replica must have been dead before a free node takes
    its place. The cluster's `reassign_after`, the wait it already accepts for a dead shard."""
    return float(view.config.reassign_after)


def observe(view: ClusterView, health: Mapping[str, Health], nodes: Mapping[str, NodeRecord],
            statuses: Mapping[str, NodeStatus]) -> dict[str, Seen]:
    """What is seen of the view's members: the leader's health record (a node it has no
    record of counts as alive since now: a new leader waits the whole time again), whether
    each serves this cluster as a synced replica, and its host (from its registration, else
    the host of its proxy address)."""
    seen: dict[str, Seen] = {}
    for nid, address in view.nodes:
        h = health.get(nid)
        status = statuses.get(nid)
        in_sync = (nid in nodes and status is not None and status.serves(view.cluster, view.uid)
                   and status.role == "replica" and status.synced and status.backend_ok
                   and h is not None and h.alive)
        host = nodes[nid].host if nid in nodes and nodes[nid].host \
            else address.proxy.rpartition(":")[0]
        seen[nid] = Seen(h.alive if h is not None else True,
                         h.since if h is not None else float("inf"), in_sync, host)
    return seen


def free_nodes(nodes: Mapping[str, NodeRecord], assigned: Iterable[str],
               alive: Mapping[str, bool]) -> list[FreeNode]:
    """Registered, in no cluster (no assignment, held or not), alive."""
    assigned = set(assigned)
    return sorted((FreeNode(nid, NodeAddress(r.proxy, r.backend), r.host or
                            r.proxy.rpartition(":")[0])
                   for nid, r in nodes.items() if nid not in assigned and alive.get(nid)),
                  key=lambda f: f.node_id)


def plan_replicas(view: ClusterView, seen: Mapping[str, Seen], free: Sequence[FreeNode],
                  now: float) -> ReplicaStep | None:
    """The next view for one cluster, or None when every shard has what it declares."""
    want = view.config.replicas
    wait = replace_after(view)
    failed = set(view.failed)
    pool = list(free)
    leaving = _emptying(view)

    def alive(n: str) -> bool:
        return n in seen and seen[n].alive

    def dead_for(n: str) -> float:
        s = seen.get(n)
        return 0.0 if s is None or s.alive else now - s.since

    def in_sync(n: str) -> bool:
        return n in seen and seen[n].in_sync and n not in failed

    shards: list[Shard] = []
    claimed: list[str] = []
    released: list[str] = []
    notes: list[str] = []
    addresses = dict(view.nodes)
    for shard in view.shards:
        if not alive(shard.master) or shard.id in leaving:
            shards.append(shard)
            continue
        replicas = list(shard.replicas)
        expired = [r for r in replicas
                   if r in failed and not alive(r) and dead_for(r) >= wait]
        counted = [r for r in replicas if r not in expired]
        if len(counted) > want:
            order = sorted(counted, key=lambda r: (r not in failed, alive(r), in_sync(r),
                                                   -replicas.index(r)))
            drop = order[:len(counted) - want]
            replicas = [r for r in replicas if r not in drop]
            counted = [r for r in counted if r not in drop]
            released += drop
            notes.append(f"{shard.id}: removed surplus {', '.join(drop)}")
        if expired and sum(1 for r in counted if in_sync(r)) >= want:
            replicas = [r for r in replicas if r not in expired]
            released += expired
            notes.append(f"{shard.id}: removed {', '.join(expired)}, dead for over "
                         f"{wait:g}s and replaced")
        hosts = {seen[m].host for m in (shard.master, *replicas) if m in seen and seen[m].host}
        added = []
        for _ in range(want - len(counted)):
            if not pool:
                break
            pick = min(pool, key=lambda f: (f.host in hosts, f.node_id))
            pool.remove(pick)
            hosts.add(pick.host)
            addresses[pick.node_id] = pick.address
            added.append(pick.node_id)
        if added:
            replicas += added
            claimed += added
            notes.append(f"{shard.id}: added {', '.join(added)}")
        shards.append(replace(shard, replicas=tuple(replicas)))
    if not claimed and not released:
        return None
    members = {m for s in shards for m in s.members}
    new = view.next(shards=tuple(shards),
                    nodes=tuple(sorted((n, a) for n, a in addresses.items() if n in members)),
                    failed=tuple(n for n in view.failed if n in members))
    validate(new)
    return ReplicaStep(new, tuple(claimed), tuple(released),
                       f"{want} replicas per shard: {'; '.join(notes)}")


def _emptying(view: ClusterView) -> set[str]:
    """Shards whose every slot is migrating away (scaled in): their members leave with them."""
    out: dict[str, int] = {}
    for m in view.migrations:
        out[m.source] = out.get(m.source, 0) + slot_count(m.slots)
    return {s.id for s in view.shards if 0 < slot_count(s.slots) <= out.get(s.id, 0)}
