"""The fence guard: stops the proxy's writes before the node's lease can expire at etcd (then
the leader may promote a replica), by the rule in mesh/model/fencing.py."""
from __future__ import annotations

import anyio
import structlog

from core import clock
from proxy.control import FENCED_LEASE, ControlPort

from .model.fencing import NEVER, NO_LEASE, Lease, MemberPoll, writes_until
from .store.etcd import EtcdStore, LeaseKeeper
from .views import ViewApplier

log = structlog.get_logger("mesh.fence")

FENCE_POLL = 0.1  # seconds between two looks at the lease


def lease_of(keeper: LeaseKeeper | None) -> Lease:
    return NO_LEASE if keeper is None else Lease(keeper.deadline, keeper.expired)


class FenceGuard:
    """Runs for the agent's whole life, across leases: `keeper` is the current lease's keeper
    (None before the first). A fence it sets is lifted only by a later lease's view apply
    (mesh/views.py)."""

    def __init__(self, control: ControlPort, applier: ViewApplier, store: EtcdStore,
                 node_id: str) -> None:
        self.control = control
        self.applier = applier
        self.store = store
        self.node_id = node_id
        self.keeper: LeaseKeeper | None = None
        self.no_leader: MemberPoll | None = None  # the latest poll that found no etcd leader
        self.excused = False  # writes go on past the lease deadline: etcd has no leader
        self.log = log.bind(node=node_id)

    async def run(self) -> None:
        self.control.allow_writes_until(NEVER)  # no writes before the first lease
        while True:
            await self.check()
            await anyio.sleep(FENCE_POLL)

    async def check(self) -> None:
        if self.control.fenced:
            return
        lease = lease_of(self.keeper)
        poll = None
        if lease.at_risk(clock.now()) and lease.write_deadline != NEVER \
                and self.applier.applied is not None:
            poll = await self.ask_members()
            lease = lease_of(self.keeper)  # a keepalive may have landed meanwhile
            if poll.no_leader:
                self.no_leader = poll
        # the latest "no leader" answer counts until its grace ends, even if a later poll
        # went unanswered
        until = writes_until(lease, self.no_leader)
        excused = until > lease.write_deadline
        if excused != self.excused:
            self.excused = excused
            self.log.warning("writes_go_on_past_the_lease_deadline" if excused
                             else "lease_deadline_holds_again",
                             leaderless=poll and poll.leaderless, members=poll and poll.members)
        if clock.now() < until:
            self.control.allow_writes_until(until)
        elif self.applier.applied is not None:
            self.control.fence(FENCED_LEASE)
            self.log.warning("fenced", reason="etcd expired the lease" if lease.expired
                             else "the lease may have expired",
                             leaderless=poll.leaderless if poll else None,
                             members=poll.members if poll else None)
        else:
            self.control.allow_writes_until(NEVER)

    async def ask_members(self) -> MemberPoll:
        asked_at = clock.now()
        members, leaderless = await self.store.ask_members()
        return MemberPoll(asked_at, members, leaderless)
