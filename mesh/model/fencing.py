"""The write fence rule (DESIGN.md section 8). Pure: the lease's times and `now` in, what the
node must do out; the agent's fence guard asks the peers and carries it out.

Writes stop at the local lease deadline (last keepalive sent + TTL) minus FENCE_HARD; from
FENCE_MARGIN before it the node asks its cluster's peers whether they still reach etcd. If a
peer holds a live lease, etcd is reachable and this node is the one cut off: it fences. If
every peer that answers has lost etcd too, nobody can be promoted: it keeps taking writes. If
no peer answers, it fences. Assumption: the local monotonic clock runs no more than
FENCE_HARD / TTL (10% of a 5 s lease) slower than etcd's.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

FENCE_MARGIN = 1.5  # seconds before the lease may expire that the node asks its peers
FENCE_HARD = 0.5  # seconds before the lease may expire that writes stop unless excused
REFRESH_STUCK = 0.5  # a keepalive in flight this long means etcd is not answering
NO_ETCD_GRACE = 1.0  # writes granted at a time while no peer reaches etcd either


@dataclass(frozen=True, slots=True)
class Lease:
    """What the lease keeper knows, read at one instant."""

    alive: bool  # held (not yet declared lost)
    deadline: float  # when etcd may expire it (monotonic)
    refreshing_since: float | None = None  # a keepalive in flight since (monotonic)

    def healthy(self, now: float) -> bool:
        """Far enough from the deadline that nobody needs to be asked."""
        return self.alive and now < self.deadline - FENCE_MARGIN

    def stuck(self, now: float) -> bool:
        """A keepalive has been in flight too long: etcd does not answer this node."""
        return self.alive and self.refreshing_since is not None \
            and now - self.refreshing_since > REFRESH_STUCK

    def ok(self, now: float) -> bool:
        """What this node answers peers that ask `UMCTL LEASEOK`."""
        return self.healthy(now) and not self.stuck(now)

    @property
    def write_deadline(self) -> float:
        return self.deadline - FENCE_HARD


NO_LEASE = Lease(alive=False, deadline=0.0)


class Verdict(Enum):
    KEEP_WRITES = "keep-writes"  # nobody reaches etcd: nobody can be promoted
    ASK_AGAIN = "ask-again"  # peers may still be noticing the outage
    FENCE = "fence"


def verdict(peers_reach_etcd: bool | None, lease: Lease, now: float) -> Verdict:
    """What a node whose lease is at risk does, given its peers' answers: True if one holds a
    live lease, False if every one that answered has none, None if none answered."""
    if peers_reach_etcd is False:
        return Verdict.KEEP_WRITES
    if lease.alive and now < lease.write_deadline:
        return Verdict.ASK_AGAIN
    return Verdict.FENCE
