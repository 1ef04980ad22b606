"""The backend check: PING the node's Redis every second, keep its role as the view says,
track its replication offset and the node's migration progress in the status."""
from __future__ import annotations

import anyio

from core.nodes import MigrationProgress
from proxy.control import ControlPort

from .model.health import Misses
from .redisctl import RedisCtl, RedisCtlError
from .status import StatusReporter
from .views import BACKEND_TIMEOUT, ViewApplier

BACKEND_CHECK_INTERVAL = 1.0
BACKEND_FAIL_LIMIT = 3  # consecutive failed checks before the node reports its Redis dead


class BackendChecker:
    def __init__(self, ctl: RedisCtl, applier: ViewApplier, status: StatusReporter,
                 control: ControlPort) -> None:
        self.ctl = ctl
        self.applier = applier
        self.status = status
        self.control = control

    async def run(self) -> None:
        """The backend is reported dead after BACKEND_FAIL_LIMIT failures in a row."""
        misses = Misses()
        while True:
            ok, offset = True, self.status.status.repl_offset
            try:
                with anyio.fail_after(BACKEND_TIMEOUT):
                    await self.ctl.call("PING")
                    offset = await self.ctl.replication_offset()
                    await self.applier.keep_role()
            except (RedisCtlError, TimeoutError):
                ok = False
            misses = misses.record(ok)
            await self.applier.reconcile()  # retries an apply that failed; a no-op otherwise
            progress = {mid: MigrationProgress.from_dict(p)
                        for mid, p in self.control.migration_progress().items()}
            self.status.set(backend_ok=misses.healthy(BACKEND_FAIL_LIMIT), repl_offset=offset,
                            migrations=progress)
            await anyio.sleep(BACKEND_CHECK_INTERVAL)
