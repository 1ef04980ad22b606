"""The control port: the one way into the data path from the control plane.

The mesh agent (and, in standalone mode, `UMCTL SETCLUSTER`) changes what the proxy serves
only through this object. It holds the two snapshots every command is decided from, the
routing table and the write permission, and replaces each by swapping one reference, so a
command reads either the old value or the new one, never a mix.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from typing import Protocol

import structlog

from core import clock

from .admission import WritePermission
from .backend import Pending, ReplySink
from .routing import RoutingTable, empty_table

log = structlog.get_logger("proxy.control")


FENCED_LEASE = "lease"
FENCED_BACKEND = "backend"
FENCED_LEAVING = "leaving"  # shutting down after a handover that failed: never lifted
# how long a command that would be refused TRYAGAIN because of a graceful handover is held
# instead, waiting for the view that makes this node a replica (it then gets its MOVED): Redis
# FAILOVER waits for the replica's next once-a-second ACK, so a handover takes up to about
# 1.3 s, longer than the TRYAGAIN retries of cluster clients last (redis-py: about 0.4 s).
# Past it, TRYAGAIN as before
HANDOVER_HOLD = 2.0


class Applied(Enum):
    APPLIED = "applied"
    STALE = "stale"  # older than the table being served: epochs only move forward
    WRONG_CLUSTER = "wrong-cluster"  # another cluster's table, and the node is not joining it


class Migrations(Protocol):
    def reconcile(self, table: RoutingTable) -> None: ...
    def progress(self) -> dict[str, dict]: ...
    def finished(self) -> dict[str, dict]: ...


class ControlPort:
    def __init__(self, migrations: Migrations) -> None:
        self.table: RoutingTable = empty_table()  # read per command; replaced only by apply()
        # no writes until the control plane says so (standalone: it never needs to)
        self.permission = WritePermission()
        self.fenced_for: frozenset[str] = frozenset()  # why writes are fenced (see fence())
        self.managed = False  # views come from etcd, not from UMCTL SETCLUSTER
        self._migrations = migrations  # they follow the table (proxy/migration.py)
        # called with each table applied, after the swap (the clients: proxy/context.py)
        self.followers: list[Callable[[RoutingTable], None]] = []
        # called when writes become fenced, after the switch (proxy/context.py: commands
        # already at Redis are cut off, so none is acknowledged after the fence)
        self.on_fence: list[Callable[[], None]] = []
        # commands held while a handover runs: one barrier shared by the clients holding
        # them, lifted when the handover ends or HANDOVER_HOLD has passed (see hold_handover)
        self.handover_hold_until = 0.0
        self._handover_barrier: Pending | None = None
        self._handover_waiters: list[ReplySink] = []

    def apply(self, table: RoutingTable, *, joining: bool = False,
              force: bool = False) -> Applied:
        """Serve `table` from now on. The epoch check is made here, at the swap: a table
        older than the current one of the same cluster is refused (`force`: standalone
        SETCLUSTER FORCE), and so is another cluster's unless the node is `joining` it or
        leaving for none."""
        current = self.table
        if current.configured and table.cluster != current.cluster and table.configured \
                and not joining:
            return Applied.WRONG_CLUSTER
        if table.cluster == current.cluster and table.epoch < current.epoch and not force:
            return Applied.STALE
        self.table = table
        me = table.myself
        if self.permission.handing_over and (me is None or me.master_id is not None):
            self.end_handover()  # the view with the new master arrived
        self._migrations.reconcile(table)
        for follow in self.followers:
            follow(table)
        log.info("view_applied", cluster=table.cluster, epoch=table.epoch,
                 slots=[list(r) for r in me.ranges] if me else [], nodes=len(table.nodes))
        return Applied.APPLIED

    # -- write permission --------------------------------------------------------------------
    def allow_writes_until(self, deadline: float) -> None:
        """Take writes until core.clock.now() passes `deadline` (unless fenced)."""
        if not self.permission.fenced and self.permission.deadline != deadline:
            self.permission = replace(self.permission, deadline=deadline)

    def fence(self, reason: str) -> None:
        """No writes until every reason given is lifted by `unfence`. Reasons: FENCED_LEASE
        (the lease may have expired), FENCED_BACKEND (the Redis failed its checks: the leader
        may promote a replica once the node says it fenced), FENCED_LEAVING."""
        was_fenced, self.fenced_for = self.permission.fenced, self.fenced_for | {reason}
        self.permission = replace(self.permission, fenced=True)
        if not was_fenced:
            for hook in self.on_fence:
                hook()

    def unfence(self, reason: str, deadline: float) -> None:
        """Lift `reason`; writes resume (until `deadline`) when no other reason holds."""
        self.fenced_for = self.fenced_for - {reason}
        if self.fenced_for:
            return
        self.permission = replace(self.permission, fenced=False, deadline=deadline)

    @property
    def fenced(self) -> bool:
        return self.permission.fenced

    def start_handover(self) -> None:
        """Writes answer TRYAGAIN until a view shows this node a replica (or it failed);
        for the first HANDOVER_HOLD seconds they are held instead (`hold_handover`)."""
        self.permission = replace(self.permission, handing_over=True)
        self.handover_hold_until = clock.now() + HANDOVER_HOLD
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a unit test): nothing can be held then
            return
        loop.call_later(HANDOVER_HOLD, self._release_handover_waiters)

    def end_handover(self) -> None:
        self.permission = replace(self.permission, handing_over=False)
        self._release_handover_waiters()

    def hold_handover(self, waiter: ReplySink) -> Pending | None:
        """A barrier for a client's command refused because of the running handover: it
        falls (`waiter.replies_arrived()`) when the handover ends or the hold time is over,
        and the command is decided again. None when there is nothing to wait for."""
        if not self.permission.handing_over or clock.now() >= self.handover_hold_until:
            return None
        if self._handover_barrier is None:
            self._handover_barrier = Pending()
        self._handover_waiters.append(waiter)
        return self._handover_barrier

    def _release_handover_waiters(self) -> None:
        barrier, waiters = self._handover_barrier, self._handover_waiters
        self._handover_barrier, self._handover_waiters = None, []
        if barrier is None:
            return
        barrier.data = b""  # not a reply: it only lifts the barrier
        for waiter in waiters:
            waiter.replies_arrived()

    # -- reports -----------------------------------------------------------------------------
    def migration_progress(self) -> dict[str, dict]:
        """Each running migration this node moves keys for: its progress, for the status."""
        return self._migrations.progress()

    def finished_migrations(self) -> dict[str, dict]:
        """The final reports of migrations this node finished moving lately (for the
        operator's progress; the leader reads `migration_progress` only)."""
        return self._migrations.finished()
