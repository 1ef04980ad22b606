"""The write fence rule (DESIGN.md section 8; the argument is in docs/architecture.md, "The
fence rule"). Pure: what the lease keeper knows and `now` in; until when the node may serve
keys out. The agent's fence guard (mesh/fence.py) carries it out.

A node serves keys until FENCE_AFTER past the moment it sent the last linearizable read that
found its registration still on its lease (mesh/store/etcd.py, LeaseKeeper). Nothing else keeps
it serving: not peers' opinions, not a read in flight, not etcd having no leader.

Why that is enough (the leader's side is mesh/model/failover.py): a master is replaced only
once its lease is gone, by expiry or by the leader's revocation, and at least LEASE_GONE_WAIT
(> FENCE_AFTER) has passed since the leader saw it gone. etcd answers a linearizable read only
after its leader confirmed its leadership with a quorum, from state holding every entry
committed before the read: a read sent after the revocation (or expiry) was committed cannot
find the key. So the node's last confirming read was sent before the leader saw the lease gone,
and its keys stopped FENCE_AFTER later, before the promotion. A keepalive answer would not
prove as much on etcd 3.5.1: a deposed or lagging etcd leader may answer one after the
revocation.

Assumption: this host's clock (CLOCK_BOOTTIME) and the leader's run at rates that differ by
less than LEASE_GONE_MARGIN / FENCE_AFTER (20%) over a few seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# seconds; a node nobody revoked leaves the pool this long after its last keepalive (its
# writes stopped long before). etcd's minimum is 1.5 x its election timeout.
LEASE_TTL = 3
FENCE_AFTER = 1.0  # seconds past the last confirming read's sending that keys stop
CONFIRM_INTERVAL = 0.2  # seconds between two confirming reads: several chances in FENCE_AFTER
KEEPALIVE_EVERY = 3  # a keepalive every this many reads (0.6 s: five inside the TTL)
LEASE_GONE_MARGIN = 0.2  # clock rates and the view's way to the nodes
# the leader replaces a master this long after it saw its lease gone (or revoked it)
LEASE_GONE_WAIT = FENCE_AFTER + LEASE_GONE_MARGIN
NEVER = float("-inf")


@dataclass(frozen=True, slots=True)
class Lease:
    """What the lease keeper knows, read at one instant."""

    renewed_at: float  # when the last read that found the lease alive was sent (core.clock)
    expired: bool = False  # etcd said the lease is gone

    @property
    def writes_until(self) -> float:
        """Until when (core.clock) the node may serve keys; a past time means fence now."""
        return NEVER if self.expired else self.renewed_at + FENCE_AFTER


NO_LEASE = Lease(renewed_at=NEVER)


class KeeperState(Protocol):
    """What a lease keeper (mesh/store/etcd.py) shows of its lease."""

    @property
    def renewed_at(self) -> float: ...
    @property
    def expired(self) -> bool: ...


def lease_of(keeper: KeeperState | None) -> Lease:
    """The keeper's lease read at one instant (NO_LEASE before the first)."""
    return NO_LEASE if keeper is None else Lease(keeper.renewed_at, keeper.expired)
