"""What the leader does about dead nodes. Pure: views, liveness and `now` in; a new view out.

A member is dead when it has no registration (its lease expired or the leader revoked it) or
its status says its Redis is down. A dead master is replaced only once it cannot write
(`replaceable`): its status says it fenced itself (the leader then commits the new view only if
that status is still as read: `FailoverStep.replaced`), or its lease has been gone for
LEASE_GONE_WAIT, past which the node's own fence has stopped it (mesh/model/fencing.py).

A dead master hands its shard to the live replica with the highest replication offset and
becomes a (failed) replica itself, so when it comes back it resyncs from the new master and
never serves as a second one. A shard with no live member for the cluster's `reassign_after`
(60 s by default) gets a free node (empty: its data is reported lost) or, with no free node,
its slots go to the other shards; the cluster's `failover: manual` and synchronous mode forbid
both.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from core.slots import normalize, slot_count
from core.view import ClusterView, NodeAddress, Shard, validate

from .fencing import LEASE_GONE_WAIT

DEFAULT_GRACE = 1.0  # seconds a replica must stay dead before it is marked failed


@dataclass(frozen=True, slots=True)
class Health:
    alive: bool  # registered, and its Redis answers
    since: float  # when it last changed (the leader's clock)
    repl_offset: int = 0
    may_write: bool = False  # registered and not fenced by its own word
    synced: bool = True  # its Redis finished a sync with the master it follows now
    registered: bool = True  # its lease holds
    gone_since: float = 0.0  # when the leader first saw its lease gone (if not registered)


@dataclass(frozen=True, slots=True)
class FailoverStep:
    view: ClusterView
    claimed: tuple[str, ...] = ()  # free nodes taken into the cluster
    released: tuple[str, ...] = ()  # nodes that leave it (their data is gone)
    what: str = ""
    replaced: str | None = None  # the master replaced: its status must be as read


def dead(node: str, health: dict[str, Health], now: float, grace: float) -> bool:
    h = health.get(node)
    return h is None or (not h.alive and now - h.since >= grace)


def replaceable(node: str, health: dict[str, Health], now: float) -> bool:
    """The node is dead and cannot write any more: it said it fenced, or its lease has been
    gone LEASE_GONE_WAIT since the leader saw it gone (mesh/model/fencing.py)."""
    h = health.get(node)
    if h is None or h.alive:
        return False
    if h.registered:
        return not h.may_write  # fenced by its own word; else it will, or it comes back
    return now >= h.gone_since + LEASE_GONE_WAIT


def plan_failover(view: ClusterView, health: dict[str, Health], now: float,
                  free: list[tuple[str, NodeAddress]], grace: float = DEFAULT_GRACE
                  ) -> FailoverStep | None:
    """The next step for one cluster, or None when every shard has a live master."""
    failed = set(view.failed)
    recovered = {n for n in failed if health.get(n) and health[n].alive}
    for shard in view.shards:
        if not replaceable(shard.master, health, now):
            continue
        # a replica that never finished its sync is empty or half-loaded: promoting it
        # would lose what the master had; the shard waits for its master instead
        live = [r for r in shard.replicas if r not in failed and not dead(r, health, now, grace)
                and health[r].alive and health[r].synced]
        if not live and any(health.get(r) and health[r].alive for r in shard.replicas
                            if r not in failed):
            continue
        if live:
            best = max(live, key=lambda r: (health[r].repl_offset, -shard.replicas.index(r)))
            replicas = tuple(r for r in shard.replicas if r != best) + (shard.master,)
            new_shard = replace(shard, master=best, replicas=replicas)
            new = _with(view, shard, new_shard, failed=(failed | {shard.master}) - recovered)
            return FailoverStep(new, what=f"promoted {best} in {shard.id} "
                                          f"(master {shard.master} dead)",
                                replaced=shard.master)
        # giving the slots away loses the shard's data: only after a long outage (a partition
        # of a few seconds must not cost a shard), and never where writes were promised safe
        if view.config.failover == "manual" or view.config.min_replicas_ack > 0 \
                or not all(dead(m, health, now, view.config.reassign_after)
                           for m in shard.members):
            continue
        return replace(_reassign(view, shard, free, now), replaced=shard.master)
    # replicas that died or came back
    now_failed = {m for s in view.shards for m in s.replicas if dead(m, health, now, grace)}
    wanted = (failed | now_failed) - recovered
    if wanted != failed:
        new = view.next(failed=tuple(sorted(wanted)))
        validate(new)
        return FailoverStep(new, what=f"failed replicas now {sorted(wanted)}")
    return None


def _with(view: ClusterView, old: Shard, new: Shard, failed: set[str]) -> ClusterView:
    shards = tuple(new if s.id == old.id else s for s in view.shards)
    result = view.next(shards=shards, failed=tuple(sorted(failed)))
    validate(result)
    return result


def _reassign(view: ClusterView, shard: Shard, free: list[tuple[str, NodeAddress]],
              now: float) -> FailoverStep:
    slots = slot_count(shard.slots)
    gone = shard.members
    # keys of slots migrating into the dead shard that had already moved were there too
    moving_in = [r for m in view.migrations if m.target == shard.id for r in m.slots]
    also = (f", and the keys already moved to it of slots "
            f"{', '.join(f'{a}-{b}' for a, b in moving_in)}") if moving_in else ""
    nodes = [(n, a) for n, a in view.nodes if n not in gone]
    failed = tuple(n for n in view.failed if n not in gone)
    if free:
        node, address = sorted(free)[0]
        note = (f"epoch {view.epoch + 1}: shard {shard.id} lost every node; {node} took over "
                f"its {slots} slots EMPTY: their data is lost{also}")
        new = view.next(shards=tuple(replace(s, master=node, replicas=()) if s.id == shard.id
                                     else s for s in view.shards),
                        nodes=tuple(sorted(nodes + [(node, address)])), failed=failed,
                        lost=view.lost + (note,))
        validate(new)
        return FailoverStep(new, claimed=(node,), released=gone, what=note)
    others = [s for s in view.shards if s.id != shard.id]
    if not others:
        raise ValueError("the cluster's only shard is dead and the pool has no free node")
    ranges = [r for r in shard.slots]
    shares: dict[str, list] = {s.id: list(s.slots) for s in others}
    for i, r in enumerate(ranges):  # spread the ranges round-robin
        shares[others[i % len(others)].id].append(r)
    note = (f"epoch {view.epoch + 1}: shard {shard.id} lost every node and the pool had no "
            f"free node; its {slots} slots went to {', '.join(s.id for s in others)} EMPTY: "
            f"their data is lost{also}")
    new = view.next(shards=tuple(replace(s, slots=normalize(shares[s.id])) for s in others),
                    nodes=tuple(nodes), failed=failed, lost=view.lost + (note,),
                    migrations=tuple(m for m in view.migrations
                                     if shard.id not in (m.source, m.target)))
    validate(new)
    return FailoverStep(new, released=gone, what=note)
