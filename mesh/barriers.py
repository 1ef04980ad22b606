"""Migration barriers: a source node waits for its target's applied epoch (DESIGN.md section 7).

Start: the source gates a migration's slots (and moves keys) only once the target has applied
the view that started it; before that the target would not serve them. Commit: the source
gives the slots up only once the target has applied the commit; until then it keeps sending
the (now missing) keys there, so clients never bounce between the two. Both wait on events:
a new applied view here, a status change (from the status watch) there.
"""
from __future__ import annotations

from typing import Protocol

import anyio
import structlog

from core.view import ClusterView, Migration, MigrationState

from .notify import Changed, first_of
from .status import PeerStatuses

log = structlog.get_logger("mesh.barriers")

COMMIT_BARRIER_TIMEOUT = 5.0  # a source gives up its slots at most this long after the commit


def outgoing(view: ClusterView, node_id: str) -> list[Migration]:
    """The running migrations whose source shard this node is the master of."""
    masters = {s.id: s.master for s in view.shards}
    return [m for m in view.migrations if m.state is MigrationState.MIGRATING
            and masters[m.source] == node_id]


def peer_epoch(peers: PeerStatuses, view: ClusterView, shard_id: str) -> int:
    """The epoch of `view`'s cluster that the master of `shard_id` reports applied."""
    master = next(s.master for s in view.shards if s.id == shard_id)
    return peers.applied_epoch(master, view.cluster, view.uid)


async def wait_commit(peers: PeerStatuses, node_id: str, current: ClusterView,
                      target: ClusterView) -> None:
    """Before a source applies `target`, which ends migrations of `current`: wait (at most
    COMMIT_BARRIER_TIMEOUT) until each one's target has applied it."""
    ended = [m for m in outgoing(current, node_id)
             if m.id not in {x.id for x in target.migrations}]
    if not ended:
        return
    with anyio.move_on_after(COMMIT_BARRIER_TIMEOUT):
        for m in ended:
            if m.target not in {s.id for s in target.shards}:
                continue
            while True:
                changed = peers.changed.waiter()
                if peer_epoch(peers, target, m.target) >= target.epoch:
                    break
                await changed.wait()
    for m in ended:
        log.info("migration_committed", node=node_id, migration=m.id, epoch=target.epoch)


class Applier(Protocol):
    """What the start barrier needs of the view applier (mesh/views.py)."""

    @property
    def applied(self) -> ClusterView | None: ...
    @property
    def active(self) -> frozenset[str]: ...
    @property
    def changed(self) -> Changed: ...
    async def activate(self, view: ClusterView, migration: Migration) -> None: ...


class MigrationStarts:
    """The start barrier: for each outgoing migration of the applied view, wait for the
    target's applied epoch, then have the applier start gating its slots."""

    def __init__(self, peers: PeerStatuses, applier: Applier, node_id: str) -> None:
        self.peers = peers
        self.applier = applier
        self.node_id = node_id

    async def run(self) -> None:
        while True:
            applied, statuses = self.applier.changed.waiter(), self.peers.changed.waiter()
            view = self.applier.applied
            waiting = [m for m in (outgoing(view, self.node_id) if view else [])
                       if m.id not in self.applier.active]
            if view is None or not waiting:
                await applied.wait()  # a new view may bring migrations
                continue
            for m in waiting:
                if peer_epoch(self.peers, view, m.target) >= m.epoch:
                    await self.applier.activate(view, m)
            await first_of(applied, statuses)
