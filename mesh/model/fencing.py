"""The write fence rule (DESIGN.md section 8; the argument is in docs/architecture.md, "The
fence rule"). Pure: what the lease keeper knows and `now` in; until when the node may serve
keys out. The agent's fence guard (mesh/fence.py) carries it out.

A node serves keys until FENCE_AFTER past the moment it sent its last keepalive that etcd
answered with the lease alive. Nothing else keeps it serving: not peers' opinions, not a
keepalive in flight, not etcd having no leader.

Why that is enough (the leader's side is mesh/model/failover.py): a master is replaced only
once its lease is gone, by expiry or by the leader's revocation, and at least
LEASE_GONE_WAIT (> FENCE_AFTER) has passed since the leader saw it gone. A keepalive sent
after the lease was gone cannot succeed, so the node's last successful one was sent before
that, and its writes ended FENCE_AFTER later, before the promotion. etcd leaders of an older
term may still answer keepalives for a while after a newer leader revoked the lease; the
leader allows for that by waiting STALE_TERM_WINDOW after it first saw the current term.

Assumption: this host's clock (CLOCK_BOOTTIME) and the leader's run at rates that differ by
less than LEASE_GONE_MARGIN / FENCE_AFTER (20%) over a few seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

# seconds; a node nobody revoked leaves the pool this long after its last keepalive (its
# writes stopped long before). etcd's minimum is 1.5 x its election timeout.
LEASE_TTL = 3
FENCE_AFTER = 1.0  # seconds past the last successful keepalive's sending that writes stop
KEEPALIVE_INTERVAL = 0.2  # seconds between keepalives: several chances inside FENCE_AFTER
LEASE_GONE_MARGIN = 0.2  # clock rates and the view's way to the nodes
# the leader replaces a master this long after it saw its lease gone (or revoked it)
LEASE_GONE_WAIT = FENCE_AFTER + LEASE_GONE_MARGIN
# how long an etcd leader that lost its quorum may still answer keepalives: etcd steps it down
# within two election timeouts (1 s by default: --election-timeout)
ETCD_ELECTION_TIMEOUT = 1.0
STALE_TERM_WINDOW = 2 * ETCD_ELECTION_TIMEOUT
NEVER = float("-inf")


@dataclass(frozen=True, slots=True)
class Lease:
    """What the lease keeper knows, read at one instant."""

    renewed_at: float  # when the last keepalive etcd answered "alive" was sent (core.clock)
    expired: bool = False  # etcd said the lease is gone

    @property
    def writes_until(self) -> float:
        """Until when (core.clock) the node may serve keys; a past time means fence now."""
        return NEVER if self.expired else self.renewed_at + FENCE_AFTER


NO_LEASE = Lease(renewed_at=NEVER)
