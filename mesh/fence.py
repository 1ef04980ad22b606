"""The fence guard: stops the proxy's writes before the node's lease can expire at etcd
(then the leader may promote a replica), by the rule in mesh/model/fencing.py."""
from __future__ import annotations

import time

import anyio
import structlog

from proxy.control import ControlPort

from .model.fencing import NO_ETCD_GRACE, NO_LEASE, Lease, Verdict, verdict
from .redisctl import RedisCtl, RedisCtlError
from .store.etcd import LeaseKeeper
from .views import ViewApplier

log = structlog.get_logger("mesh.fence")

FENCE_POLL = 0.1
PEER_TIMEOUT = 0.5


def lease_of(keeper: LeaseKeeper | None) -> Lease:
    if keeper is None:
        return NO_LEASE
    return Lease(not keeper.lost.is_set(), keeper.deadline, keeper.refreshing_since)


class FenceGuard:
    """Runs for the agent's whole life, across leases: `keeper` is the current lease's
    keeper (None before the first); the peers asked are those of the applied view."""

    def __init__(self, control: ControlPort, applier: ViewApplier, node_id: str) -> None:
        self.control = control
        self.applier = applier
        self.node_id = node_id
        self.keeper: LeaseKeeper | None = None
        self.log = log.bind(node=node_id)

    async def run(self) -> None:
        self.control.allow_writes_until(0.0)  # no writes before the first lease
        while True:
            await self.check()
            await anyio.sleep(FENCE_POLL)

    async def check(self) -> None:
        keeper = self.keeper
        lease = lease_of(keeper)
        now = time.monotonic()
        healthy = lease.healthy(now)
        self.control.lease_ok = lease.ok(now)
        if healthy and not self.control.fenced:
            self.control.allow_writes_until(lease.write_deadline)
        elif not healthy and not self.control.fenced and self.applier.applied is not None:
            peers = await self.peers_reach_etcd()
            # the keeper may have renewed the lease while the peers were asked
            now_lease = Lease(lease.alive, keeper.deadline if keeper else 0.0)
            decided = verdict(peers, now_lease, time.monotonic())
            if decided is Verdict.KEEP_WRITES:
                # nobody can be promoted while nobody reaches etcd: keep taking writes
                self.control.allow_writes_until(time.monotonic() + NO_ETCD_GRACE)
                self.log.warning("lease_at_risk_not_fencing", reason="no peer reaches etcd")
            elif decided is Verdict.FENCE:
                self.control.fence()
                self.log.warning("fenced", reason="lease may expire", peers_reach_etcd=peers)
            # Verdict.ASK_AGAIN: peers may still be noticing the outage

    async def peers_reach_etcd(self) -> bool | None:
        """True if a peer of this cluster holds a live lease, False if every peer that
        answered has none, None if no peer answered."""
        view = self.applier.applied
        peers = [a.proxy for n, a in view.nodes if n != self.node_id] if view else []
        answers: list[bool] = []

        async def ask(address: str) -> None:
            ctl = RedisCtl(address)
            try:
                with anyio.fail_after(PEER_TIMEOUT):
                    answers.append(await ctl.call("UMCTL", "LEASEOK") == 1)
            except (RedisCtlError, TimeoutError, OSError):
                pass
            finally:
                await ctl.aclose()

        async with anyio.create_task_group() as tg:
            for address in peers:
                tg.start_soon(ask, address)
        if not answers:
            return None
        return any(answers)
