"""The backend check: PING the node's Redis every BACKEND_CHECK_INTERVAL, keep its role as
the view says, track its replication offset and the node's migration progress in the status.

A Redis that refuses connections (its process is gone), or has failed its checks for
BACKEND_STALL_LIMIT, fences the node's writes (commands
already at Redis are cut off, proxy/context.py) before the status says so: the leader
promotes a replica past a master that still holds its lease only on that word (mesh/leader.py
compares the status it read in the failover's transaction). When the Redis answers again, the
node first writes "healthy" (a failover planned on the old status then fails its comparison),
reads the views afresh and lifts the fence only if the newest view is applied.
"""
from __future__ import annotations

import anyio
import structlog

from core import clock
from core.nodes import MigrationProgress
from proxy.control import FENCED_BACKEND, FENCED_LEAVING, ControlPort

from .model.health import Checks, Synced
from .redisctl import RedisCtl, RedisCtlError
from .status import StatusReporter
from .store.etcd import StoreError
from .views import BACKEND_TIMEOUT, ViewApplier

log = structlog.get_logger("mesh.backend_check")

BACKEND_CHECK_INTERVAL = 0.2
# seconds of failed checks (timeouts, errors) before the node reports a Redis that still
# accepts connections dead: a slow command, a fork or a short stall is not a failover
BACKEND_STALL_LIMIT = 3.0
LASTING_FENCES = frozenset({FENCED_BACKEND, FENCED_LEAVING})


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
        checks = Checks()
        while True:
            ok, refused, offset = True, False, self.status.status.repl_offset
            try:
                with anyio.fail_after(BACKEND_TIMEOUT):
                    await self._ping()
                    replication = await self.ctl.replication()
                    offset = replication.offset
                    self.synced = self.synced.seen(replication.master, replication.link_up)
                    await self.applier.keep_role()
            except (RedisCtlError, TimeoutError) as exc:
                ok, refused = False, getattr(exc, "refused", False)
                if checks.failing_since is None:  # log changes, not every check
                    log.warning("backend_check_failed", node=self.status.status.node_id,
                                error=str(exc) or type(exc).__name__)
            checks = checks.record(ok, clock.now(), refused)
            healthy = not checks.dead(clock.now(), BACKEND_STALL_LIMIT)
            fenced_here = FENCED_BACKEND in self.control.fenced_for
            if not healthy and not fenced_here:
                self.control.fence(FENCED_BACKEND)
                log.warning("fenced", reason="the backend refuses connections" if refused
                            else "the backend failed its checks",
                            node=self.status.status.node_id)
            elif ok and fenced_here:  # a check that passed: -LOADING is no recovery
                await self._recovered()
            await self.applier.reconcile()  # retries an apply that failed; a no-op otherwise
            progress = {mid: MigrationProgress.from_dict(p)
                        for mid, p in self.control.migration_progress().items()}
            # "fenced" is the node's word that lets the leader replace it at once: only for
            # fences lifted by publishing first (a lease fence lifts on a read, unannounced)
            self.status.set(backend_ok=healthy,
                            fenced=bool(self.control.fenced_for & LASTING_FENCES),
                            repl_offset=offset,
                            synced=self.synced.synced, migrations=progress,
                            finished_migrations={
                                mid: MigrationProgress.from_dict(p) for mid, p
                                in self.control.finished_migrations().items()})
            await anyio.sleep(BACKEND_CHECK_INTERVAL)

    async def _ping(self) -> None:
        """PING; a connection that broke (the Redis died under it) is tried once more at once,
        so a dead Redis shows as refused in this check, not the next."""
        try:
            await self.ctl.call("PING")
        except RedisCtlError as exc:
            if exc.refused:
                raise
            await self.ctl.call("PING")

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
