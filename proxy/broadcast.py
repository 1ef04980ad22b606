"""PUBLISH to the whole cluster, as Redis Cluster's bus does: every subscriber of the cluster,
on every node, gets the message once.

Theory of operation. Each shard's master Redis publishes the message once: this node's own
Redis when this node is a master, and every other master's through its proxy (`UMCTL
PUBLISH`, a peer call, proxy/local.py). A replica's Redis gets it from its master by
replication (a Redis that is not in cluster mode propagates PUBLISH to its replicas), so a
replica node publishes on no Redis of its own and its subscribers still get it exactly once.

Order: this node's Redis runs the PUBLISH on the client's own connection, after the client's
earlier commands, and the peers are sent the message only once it has; so a subscriber
anywhere that gets the message can already read what the client wrote here before it (as on
Redis Cluster, where a node propagates a PUBLISH after running it). One client's messages
reach each peer over one connection, in the order it sent them.

The reply counts the subscribers of the masters' Redis that answered within
`PUBLISH_DEADLINE` (replicas' subscribers are not counted: Redis Cluster counts the receiving
node's alone). A peer that is down answers at once (not sent); one that does not answer in
time is not waited for again until it answers one of the messages it was sent, so a stopped
peer costs one deadline, not one per PUBLISH. A peer with too much unanswered is skipped.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from .backend import BackendConnection, Pending
from .peers import PeerPool
from .resp import encode_command
from .routing import RoutingTable

__all__ = ["MAX_PEER_BACKLOG", "MAX_PEER_BUFFER", "PUBLISH_DEADLINE", "Targets",
           "publish", "publish_reply", "publish_targets"]

log = structlog.get_logger("proxy.broadcast")

# How long a PUBLISH waits for the other masters' counts. Peers answer in well under a
# millisecond; a peer that takes this long is stopped or overloaded, and the client gets
# the count of those that answered (the message still goes to the late one).
PUBLISH_DEADLINE = 0.5
# A peer with this many messages unanswered, or this many bytes not yet written to it, is not
# sent more until it catches up: what it is sent waits in this process's memory.
MAX_PEER_BACKLOG = 10_000
MAX_PEER_BUFFER = 64 * 1024 * 1024

UNANSWERED = (b"-UNCERTAIN %d master(s) did not answer within the PUBLISH deadline; the "
              b"message may have reached their subscribers\r\n")
PEER_BACKLOG_FULL = b"-CLUSTERDOWN this peer has too many messages unanswered\r\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Targets:
    """Where a PUBLISH goes."""

    local: bool  # this node's own Redis (a master, or a node of no cluster)
    peers: tuple[str, ...]  # the proxies of the other masters


def publish_targets(table: RoutingTable) -> Targets:
    """Every master publishes once; a replica's Redis gets it from its master."""
    me = table.myself
    return Targets(local=me is None or me.master_id is None,
                   peers=tuple(n.address for n in table.nodes
                               if n.master_id is None and not n.myself))


def publish_reply(parts: Sequence[bytes | None]) -> bytes:
    """The client's reply from the masters' raw replies (None: no answer in time).

    The sum of the counts when any master counted; otherwise -UNCERTAIN when a master may
    have published it (it did not answer, or its link dropped after the send), else the
    first error (nothing was published: a cluster client may retry).
    """
    total = 0
    counted = False
    unanswered = 0
    first_error = None
    for part in parts:
        if part is None or part.startswith(b"-UNCERTAIN"):
            unanswered += 1
        elif part[:1] == b":":
            total += int(part[1:-2])
            counted = True
        elif first_error is None:
            first_error = part
    if counted:
        return b":%d\r\n" % total
    if unanswered:
        return UNANSWERED % unanswered
    return first_error if first_error is not None else b":0\r\n"


class Client(Protocol):
    def replies_arrived(self) -> None: ...


def publish(client: Client, reply: Pending, conn: BackendConnection, peers: PeerPool,
            stalled: set[str], table: RoutingTable, channel: bytes, message: bytes) -> None:
    """Publish `message` on `channel` cluster-wide and fill `reply` (a slot in `client`'s
    replies) with the count. `conn`: the client's connection to this node's Redis;
    `stalled`: the peers not waited for (kept by the caller, shared by every PUBLISH)."""
    _Broadcast(client, reply, peers, stalled, table, channel, message).start(conn)


class _Broadcast:
    """One PUBLISH on its way: this node's Redis first, then the other masters; the reply
    slot of every part points here (a ReplySink)."""

    __slots__ = ("client", "reply", "peers", "stalled", "targets", "tenant", "channel",
                 "message", "local", "parts", "sent", "done", "started", "timer")

    def __init__(self, client: Client, reply: Pending, peers: PeerPool, stalled: set[str],
                 table: RoutingTable, channel: bytes, message: bytes) -> None:
        self.client, self.reply, self.peers, self.stalled = client, reply, peers, stalled
        self.targets = publish_targets(table)
        self.tenant = table.tenant.encode()
        self.channel, self.message = channel, message
        self.local: Pending | None = None
        # (peer address, its reply slot, waited for)
        self.parts: list[tuple[str, Pending, bool]] = []
        self.sent = False  # the peers have been sent the message
        self.done = False  # the client's reply is filled
        self.started = False  # start() returned: the client must be told of its reply
        self.timer: asyncio.TimerHandle | None = None

    def start(self, conn: BackendConnection) -> None:
        if self.targets.local:
            self.local = Pending()
            conn.queue(encode_command([b"PUBLISH", self.channel, self.message]), self.local,
                       self)
        if self.local is None or self.local.data is not None:
            self._send_to_peers()
        self.started = True

    def _send_to_peers(self) -> None:
        self.sent = True
        command = encode_command([b"UMCTL", b"PUBLISH", self.tenant, self.channel,
                                  self.message])
        for address in self.targets.peers:
            conn = self.peers.get(address, False)
            pending = Pending()
            transport = conn.transport
            if conn.inflight >= MAX_PEER_BACKLOG or (
                    transport is not None and transport.get_write_buffer_size() > MAX_PEER_BUFFER):
                pending.data = PEER_BACKLOG_FULL
            else:
                conn.queue(command, pending, self)
            self.parts.append((address, pending, address not in self.stalled))
        if self._complete():
            self._finish()
        else:
            self.timer = asyncio.get_running_loop().call_later(PUBLISH_DEADLINE, self._expire)

    def replies_arrived(self) -> None:
        for address, pending, _ in self.parts:
            if pending.data is not None and pending.data is not PEER_BACKLOG_FULL:
                self.stalled.discard(address)  # it answers again: wait for it from now on
        if self.done:
            return
        if not self.sent:
            if self.local is None or self.local.data is None:
                return
            self._send_to_peers()
        elif self._complete():
            self._finish()

    def _complete(self) -> bool:
        return all(pending.data is not None for _, pending, waited in self.parts if waited)

    def _expire(self) -> None:
        self.timer = None
        if self.done:
            return
        for address, pending, waited in self.parts:
            if waited and pending.data is None:
                self.stalled.add(address)
                log.warning("publish_peer_stalled", peer=address, deadline=PUBLISH_DEADLINE)
        self._finish()

    def _finish(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        parts = [pending.data for _, pending, _ in self.parts]
        if self.local is not None:
            parts.insert(0, self.local.data)
        self.reply.data = publish_reply(parts)
        if self.started:  # else the session writes it after the command that started it
            self.client.replies_arrived()
