"""The backend check: PING the node's Redis every second, keep its role as the view says,
track its replication offset and the node's migration progress in the status.

A Redis that fails BACKEND_FAIL_LIMIT checks in a row fences the node's writes (commands
already at Redis are cut off, proxy/context.py) before the status says so: the leader
promotes a replica past a master that still holds its lease only on that word (mesh/leader.py
compares the status it read in the failover's transaction). When the Redis answers again, the
node first writes "healthy" (a failover planned on the old status then fails its comparison),
reads the views afresh and lifts the fence only if the newest view is applied.
"""
from __future__ import annotations

import anyio
import structlog

from core.nodes import MigrationProgress
from proxy.control import FENCED_BACKEND, ControlPort

from .model.health import Misses, Synced
from .redisctl import RedisCtl, RedisCtlError
from .status import StatusReporter
from .store.etcd import StoreError
from .views import BACKEND_TIMEOUT, ViewApplier

log = structlog.get_logger("mesh.backend_check")

BACKEND_CHECK_INTERVAL = 1.0
BACKEND_FAIL_LIMIT = 3  # consecutive failed checks before the node reports its Redis dead


class BackendChecker:
    def __init__(self, ctl: RedisCtl, applier: ViewApplier, status: StatusReporter,
                 control: ControlPort) -> None:
        self.ctl = ctl
        self.applier = applier
        self.status = status
        self.control = control
        # whether the Redis holds a copy of its master's data outlives a lease: a replica
        # whose agent restarts while its master is down still has that copy
        self.synced = Synced(synced=False)  # nothing seen yet

    async def run(self) -> None:
        """One lease's worth of checks (the agent keeps one checker across leases)."""
        misses = Misses()
        while True:
            ok, offset = True, self.status.status.repl_offset
            try:
                with anyio.fail_after(BACKEND_TIMEOUT):
                    await self.ctl.call("PING")
                    replication = await self.ctl.replication()
                    offset = replication.offset
                    self.synced = self.synced.seen(replication.master, replication.link_up)
                    await self.applier.keep_role()
            except (RedisCtlError, TimeoutError) as exc:
                ok = False
                log.warning("backend_check_failed", node=self.status.status.node_id,
                            error=str(exc) or type(exc).__name__)
            misses = misses.record(ok)
            healthy = misses.healthy(BACKEND_FAIL_LIMIT)
            fenced_here = FENCED_BACKEND in self.control.fenced_for
            if not healthy and not fenced_here:
                self.control.fence(FENCED_BACKEND)
                log.warning("fenced", reason="the backend failed its checks",
                            node=self.status.status.node_id, misses=misses.count)
            elif healthy and fenced_here:
                await self._recovered()
            await self.applier.reconcile()  # retries an apply that failed; a no-op otherwise
            progress = {mid: MigrationProgress.from_dict(p)
                        for mid, p in self.control.migration_progress().items()}
            self.status.set(backend_ok=healthy, fenced=self.control.fenced, repl_offset=offset,
                            synced=self.synced.synced, migrations=progress)
            await anyio.sleep(BACKEND_CHECK_INTERVAL)

    async def _recovered(self) -> None:
        try:
            self.status.set(backend_ok=True)
            await self.status.publish()
            await self.applier.read_all()
        except StoreError as exc:
            log.warning("backend_back_fence_kept", error=str(exc))
            return
        if self.applier.current():
            self.control.unfence(FENCED_BACKEND, self.control.permission.deadline)
            log.warning("unfenced", reason="the backend answers again",
                        node=self.status.status.node_id,
                        still_fenced_for=sorted(self.control.fenced_for))
