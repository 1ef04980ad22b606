"""The node's status key (`status/<id>`): what it has applied and observes, on its lease."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import anyio

from core.nodes import NodeStatus

from .notify import Changed
from .store.etcd import StoreError
from .store.repo import MeshRepo

STATUS_HEARTBEAT = 3.0  # the status key is rewritten at least this often
# fields that change all the time under load (checked every 0.2 s): written at most this often;
# a change of any other field (health, fence, epoch, role) is written at once
NOISY_FIELDS = frozenset({"repl_offset", "migrations"})
NOISY_INTERVAL = 1.0


class StatusReporter:
    """Holds the node's current status; `run` publishes it on every change (and at least
    every STATUS_HEARTBEAT) for one lease."""

    def __init__(self, repo: MeshRepo, node_id: str) -> None:
        self.repo = repo
        self.status = NodeStatus(node_id)
        self.changed = Changed()
        self.dirty = False  # a noisy field changed since the last write
        self.lease: int | None = None  # the current lease (set by run)
        self.publishing = anyio.Lock()

    def set(self, **changes: Any) -> None:
        new = replace(self.status, **changes)
        if new == self.status:
            return
        urgent = any(getattr(new, f) != getattr(self.status, f)
                     for f in changes if f not in NOISY_FIELDS) \
            or any(p.done and not self.status.progress(mid).done  # the leader commits on it
                   for mid, p in new.migrations.items())
        self.status = new
        if urgent:
            self.changed.notify()
        else:
            self.dirty = True

    async def run(self, lease: int) -> None:
        self.lease = lease
        while True:
            changed = self.changed.waiter()
            self.dirty = False
            await self.publish()
            with anyio.move_on_after(STATUS_HEARTBEAT):
                while True:  # an urgent change at once, noisy ones NOISY_INTERVAL apart
                    with anyio.move_on_after(NOISY_INTERVAL):
                        await changed.wait()
                    if changed.is_set() or self.dirty:
                        break

    async def publish(self) -> None:
        """Write the status now (on the current lease); returns once etcd has it. One put at a
        time, each of the status as it is when its turn comes: an older put retried late can
        never land after a newer one (the backend fence's recovery relies on it)."""
        async with self.publishing:
            if self.lease is None:
                raise StoreError("no lease yet to write the status on")
            await self.repo.put_status(replace(self.status, updated=time.time()), self.lease)


class PeerStatuses:
    """Every node's status as etcd has it, kept current by a watch while `run` runs (one
    lease): migration barriers wait on `changed` for a peer's applied epoch instead of
    polling etcd for it."""

    def __init__(self, repo: MeshRepo) -> None:
        self.repo = repo
        self.statuses: dict[str, NodeStatus] = {}
        self.changed = Changed()

    async def run(self) -> None:
        self.statuses = {}  # nothing from an earlier lease counts
        revision = await self._read()
        await self.repo.watch_statuses(revision + 1, self._on_change, self._read)

    async def _read(self) -> int:
        self.statuses, revision = await self.repo.read_statuses()
        self.changed.notify()
        return revision

    async def _on_change(self, node_id: str, status: NodeStatus | None) -> None:
        if status is None:
            self.statuses.pop(node_id, None)
        else:
            self.statuses[node_id] = status
        self.changed.notify()

    def applied_epoch(self, node_id: str, cluster: str, uid: str) -> int:
        """The epoch of that cluster (name and creation uid) the node reports applied (0: none,
        or another cluster's)."""
        status = self.statuses.get(node_id)
        return status.applied(cluster, uid) if status is not None else 0
