"""Failure detection state. Pure: what was seen and `now` in, what is known out.

Two counters live here. The leader's: since when each node has been alive or dead by the
leader's own clock (`HealthTracker`; `failover.plan_failover` acts only after a grace of
continuous death). The agent's: since when the checks of its backend fail (`Checks`;
the node reports its Redis dead at once when nothing listens, after a while when it stalls).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from core.nodes import NodeStatus

from .failover import Health

# when the leader stops trusting a node its probes cannot reach (mesh/prober.py)
SUSPECT_REFUSED = 0.15  # seconds of refused connections (two probes at least)
SUSPECT_SILENT = 3.0  # seconds without a reply: a 1 s pause (SIGSTOP, GC) is no failover


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
          unsynced: Iterable[str] = (), registered: Iterable[str] | None = None
          ) -> dict[str, Health]:
    """The health of every node after one observation at `now`. `since` moves only when a
    node changes between alive and dead, `gone_since` when its lease is first seen gone; a
    node no longer seen at all counts as dead and unregistered. `registered` None: every
    node in `alive` is."""
    writable, unsynced = set(writable), set(unsynced)
    holds = set(alive) if registered is None else set(registered)
    state: dict[str, Health] = {}
    for node, ok in alive.items():
        before = previous.get(node)
        since = before.since if before is not None and before.alive == ok else now
        is_registered = node in holds
        gone_since = before.gone_since if before is not None and not before.registered \
            and not is_registered else now
        state[node] = Health(ok, since, offsets.get(node, 0), node in writable,
                             node not in unsynced, is_registered, gone_since)
    for node, before in previous.items():
        if node not in alive:
            since = before.since if not before.alive else now
            gone_since = before.gone_since if not before.registered else now
            state[node] = Health(False, since, before.repl_offset, registered=False,
                                 gone_since=gone_since)
    return state


class HealthTracker:
    """Since when each node has been alive or dead, by the leader's clock. A new leader starts
    with no history: a lease it finds gone counts as gone from that moment, so it waits a
    whole LEASE_GONE_WAIT before replacing that node."""

    def __init__(self) -> None:
        self.state: dict[str, Health] = {}

    def update(self, alive: Mapping[str, bool], offsets: Mapping[str, int], now: float,
               writable: Iterable[str] = (), unsynced: Iterable[str] = (),
               registered: Iterable[str] | None = None) -> dict[str, Health]:
        self.state = track(self.state, alive, offsets, now, writable, unsynced, registered)
        return self.state


@dataclass(frozen=True, slots=True)
class Checks:
    """Repeated checks of a process (a node's Redis by its agent, a node's proxy by the
    leader): since when they fail (any success starts over), and whether the latest found
    nothing listening at its address (a refused connection: the process is gone)."""

    failing_since: float | None = None
    refused: bool = False

    def record(self, ok: bool, now: float, refused: bool = False) -> Checks:
        if ok:
            return Checks()
        if self.failing_since is None:
            return Checks(now, refused)
        # a refusal stays the verdict until a check passes (a restarted Redis answers -LOADING
        # or times out before it serves)
        return Checks(self.failing_since, refused or self.refused)

    def dead(self, now: float, stall_limit: float, refused_limit: float = 0.0) -> bool:
        """Failing for `refused_limit` with nothing listening now, or for `stall_limit`
        whatever the reason: a process that stops answering (a slow command, a fork, a
        SIGSTOP) is not dead until much later than one whose port is closed."""
        if self.failing_since is None:
            return False
        failing = now - self.failing_since
        return (self.refused and failing >= refused_limit) or failing >= stall_limit


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
