"""The write fence rule (DESIGN.md section 8; the argument is in docs/architecture.md, "The
fence rule"). Pure: the lease, what etcd's members answered and `now` in; until when the node
may take writes out. The agent's fence guard (mesh/fence.py) asks and carries it out.

A node takes writes until its lease deadline: the moment it sent its last successful keepalive
plus the TTL etcd answered, minus FENCE_HARD. etcd cannot expire the lease before that, so no
leader can see the node dead and promote anyone for its slots before it either. Past the
deadline the node takes writes only while a majority of the etcd members answer it directly
that they have no leader: then no lease can expire and no view can be written until a leader is
elected, and a new etcd leader extends every lease by at least its TTL. Each such answer grants
NO_LEADER_GRACE from the moment the question was sent, and no more.

Nothing else keeps writes going: not peers' opinions (nodes cut off together vouch for each
other while the leader, outside the cut, promotes their replicas), not a keepalive in flight.

Assumption: this host's clock (CLOCK_BOOTTIME) runs no more than FENCE_HARD / TTL (10% of a 5 s
lease) slower than the etcd leader's.
"""
from __future__ import annotations

from dataclasses import dataclass

FENCE_MARGIN = 1.5  # seconds before the deadline that the node starts asking etcd's members
FENCE_HARD = 0.5  # seconds before the deadline that writes stop (clock rate differences)
# writes granted past the moment a majority of etcd's members was asked and said "no leader";
# must stay below the leader's failover grace (mesh/model/failover.DEFAULT_GRACE, 2 s)
NO_LEADER_GRACE = 1.0
NEVER = float("-inf")


@dataclass(frozen=True, slots=True)
class Lease:
    """What the lease keeper knows, read at one instant."""

    deadline: float  # before this (core.clock) etcd cannot expire the lease
    expired: bool = False  # etcd said the lease is gone

    @property
    def write_deadline(self) -> float:
        return NEVER if self.expired else self.deadline - FENCE_HARD

    def at_risk(self, now: float) -> bool:
        """Close enough to the deadline that etcd's members should be asked."""
        return self.expired or now >= self.deadline - FENCE_MARGIN


NO_LEASE = Lease(deadline=NEVER)


@dataclass(frozen=True, slots=True)
class MemberPoll:
    """The answers of etcd's members, asked directly (not through the etcd leader)."""

    asked_at: float  # when the questions were sent (core.clock)
    members: int  # how many members the cluster has (the configured endpoints at least)
    leaderless: int  # how many answered that they have no leader

    @property
    def no_leader(self) -> bool:
        """A majority has no leader: nothing can be committed, no lease can expire."""
        return self.leaderless * 2 > self.members


def writes_until(lease: Lease, poll: MemberPoll | None) -> float:
    """Until when (core.clock) the node may take writes; a past time means fence now."""
    until = lease.write_deadline
    if until == NEVER:  # no lease, or etcd said it is gone: nothing to extend
        return NEVER
    if poll is not None and poll.no_leader:
        until = max(until, poll.asked_at + NO_LEADER_GRACE)
    return until
