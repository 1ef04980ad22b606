"""Failure detection state. Pure: what was seen and `now` in, what is known out.

Two counters live here. The leader's: since when each node has been alive or dead by the
leader's own clock (`HealthTracker`; `failover.plan_failover` acts only after a grace of
continuous death). The agent's: how many checks of its backend failed in a row (`Misses`; the
node reports its Redis dead after a few).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from core.nodes import NodeStatus

from .failover import Health


def liveness(members: Iterable[str], registered: Iterable[str],
             statuses: Mapping[str, NodeStatus]) -> dict[str, bool]:
    """Alive: registered (its lease holds), its status says its Redis answers, and it is not
    shutting down. Judged for every cluster member and every registered node."""
    registered = set(registered)
    alive = {}
    for node in set(members) | registered:
        status = statuses.get(node)
        alive[node] = node in registered and status is not None and status.backend_ok \
            and not status.leaving
    return alive


def may_write(registered: Iterable[str], statuses: Mapping[str, NodeStatus]) -> set[str]:
    """Nodes that may still take writes: their lease holds and they have not said they
    fenced. The leader never replaces a master in this set (mesh/model/failover.py)."""
    return {n for n in registered if not (n in statuses and statuses[n].fenced)}


def track(previous: Mapping[str, Health], alive: Mapping[str, bool],
          offsets: Mapping[str, int], now: float, writable: Iterable[str] = (),
          unsynced: Iterable[str] = ()) -> dict[str, Health]:
    """The health of every node after one observation at `now`. `since` moves only when a
    node changes between alive and dead; a node no longer seen at all counts as dead."""
    writable, unsynced = set(writable), set(unsynced)
    state: dict[str, Health] = {}
    for node, ok in alive.items():
        before = previous.get(node)
        since = before.since if before is not None and before.alive == ok else now
        state[node] = Health(ok, since, offsets.get(node, 0), node in writable,
                             node not in unsynced)
    for node, before in previous.items():
        if node not in alive:
            since = before.since if not before.alive else now
            state[node] = Health(False, since, before.repl_offset)
    return state


class HealthTracker:
    """Since when each node has been alive or dead, by the leader's clock. A new leader starts
    with no history, so it waits a whole grace before acting: blips are never failovers."""

    def __init__(self) -> None:
        self.state: dict[str, Health] = {}

    def update(self, alive: Mapping[str, bool], offsets: Mapping[str, int], now: float,
               writable: Iterable[str] = (), unsynced: Iterable[str] = ()) -> dict[str, Health]:
        self.state = track(self.state, alive, offsets, now, writable, unsynced)
        return self.state


@dataclass(frozen=True, slots=True)
class Misses:
    """Consecutive failed checks of a backend; any success starts over."""

    count: int = 0

    def record(self, ok: bool) -> Misses:
        return Misses(0 if ok else self.count + 1)

    def healthy(self, limit: int) -> bool:
        """Fewer than `limit` failures in a row: one slow PING is not a dead Redis."""
        return self.count < limit


@dataclass(frozen=True, slots=True)
class Synced:
    """Whether this node's Redis holds a copy of the master it follows now: it finished a sync
    with that master at some point (the link may be down since). A replica that never did is
    empty or half-loaded, and the leader never promotes it (mesh/model/failover.py)."""

    master: str | None = None  # None: a master, which holds its own data
    synced: bool = True

    def seen(self, master: str | None, link_up: bool) -> Synced:
        if master is None:
            return Synced()
        if master != self.master:
            return Synced(master, link_up)
        return Synced(master, self.synced or link_up)
