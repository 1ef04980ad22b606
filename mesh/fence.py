"""The fence guard: stops the proxy's keyed commands once the node's keepalives have not
succeeded for FENCE_AFTER (the rule: mesh/model/fencing.py), before the leader may promote a
replica for its slots."""
from __future__ import annotations

import anyio
import structlog

from core import clock
from proxy.control import FENCED_LEASE, ControlPort

from .model.fencing import NEVER, lease_of
from .store.etcd import LeaseKeeper
from .views import ViewApplier

log = structlog.get_logger("mesh.fence")

FENCE_POLL = 0.1  # seconds between two looks at the lease


class FenceGuard:
    """Runs for the agent's whole life, across leases: `keeper` is the current lease's keeper
    (None before the first). A fence it sets is lifted only by a view apply under a lease that
    holds (mesh/views.py). The data path compares every keyed command's time with the deadline
    this hands it, so a process frozen past it refuses keys the moment it wakes."""

    def __init__(self, control: ControlPort, applier: ViewApplier, node_id: str) -> None:
        self.control = control
        self.applier = applier
        self.keeper: LeaseKeeper | None = None
        self.log = log.bind(node=node_id)

    async def run(self) -> None:
        self.control.allow_writes_until(NEVER)  # no writes before the first lease
        while True:
            self.check()
            await anyio.sleep(FENCE_POLL)

    def check(self) -> None:
        if self.control.fenced:
            return
        lease = lease_of(self.keeper)
        until = lease.writes_until
        if clock.now() < until:
            self.control.allow_writes_until(until)
        elif self.applier.applied is not None:
            self.control.fence(FENCED_LEASE)
            self.log.warning("fenced", reason="etcd said the lease is gone" if lease.expired
                             else "no keepalive succeeded in time")
        else:
            self.control.allow_writes_until(NEVER)
