"""What runs on a client's own backend connection: transactions, blocking commands and
subscriptions, with the state each leaves on that connection in Redis.

Functions of the client session (proxy/session.py), which calls them when `decide()` says a
command needs a connection of its own, when pub/sub messages arrive and when a new routing
table is served.
"""
from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Protocol

import structlog

from core.slots import key_slot

from . import local
from .admission import TRYAGAIN, Dedicated, keeps_shard_channel
from .backend import BackendConnection, Pending
from .context import ProxyContext
from .jobs import run_dedicated
from .local import UNSUBSCRIBE_KINDS
from .replies import MAX_CLIENT_OUTPUT_BYTES, MAX_SUBSCRIBER_OUTPUT_BYTES, Rewrite, newest_unanswered
from .resp import bulk, encode_command
from .routing import RoutingTable

log = structlog.get_logger("proxy.dedicated")

CLIENT_ID = ([b"CLIENT", b"ID"],)  # a dedicated connection learns its id: to unblock it
UNSUBSCRIBE_TOKEN_BYTES = 16  # random bytes of the PING that follows an UNSUBSCRIBE
# Connections of clients' own (transactions, blocking commands, pub/sub) one proxy opens to
# its Redis, at most; the rest of Redis's maxclients (10000 by default) stays free for the
# shared connections, replication, the migration mover and the agent's checks.
MAX_DEDICATED_CONNECTIONS = 2000
TOO_MANY_DEDICATED = (b"-ERR max number of clients reached: this node has %d connections of "
                      b"clients' own (transactions, blocking commands, pub/sub)\r\n"
                      % MAX_DEDICATED_CONNECTIONS)
EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"


class Client(Protocol):
    """What these functions use of a client session."""

    id: int
    ctx: ProxyContext
    transport: asyncio.Transport | None
    resp3: bool
    tenant: str
    conn: BackendConnection
    dedicated: BackendConnection | None
    owned: list[BackendConnection]
    barrier: Pending | None
    replies: deque[Pending]
    in_multi: bool
    multi_failed: bool
    multi_slots: set[int]
    subscribed: bool
    output_limit: int
    unsubscribe_marker: tuple[bytes, bytes] | None
    blocked: tuple[int, Pending] | None
    unblocked_with: bytes | None

    def reply(self, data: bytes) -> None: ...
    def refuse(self, reply: bytes) -> None: ...
    def forward(self, argv: list[bytes], pending: Pending | None = None) -> None: ...
    def switch_to(self, conn: BackendConnection) -> None: ...
    def hold_again(self, argv: list[bytes]) -> None: ...
    def replies_arrived(self) -> None: ...
    def write_ready(self) -> None: ...
    def raw_arrived(self, messages: list[bytes]) -> None: ...
    def raw_closed(self) -> None: ...


def use_dedicated(s: Client, argv: list[bytes]) -> bool:
    """Make sure the client has its own connection; False when `argv` must wait for the
    replies still owed on the old one (it is held and decided again then), or when the
    node has no connection left for it (it is refused)."""
    if s.dedicated is None:
        if s.ctx.dedicated_open >= MAX_DEDICATED_CONNECTIONS:
            s.refuse(TOO_MANY_DEDICATED)
            return False
        s.dedicated = s.ctx.pool.dedicated(s.resp3, CLIENT_ID)
        s.owned.append(s.dedicated)
        s.ctx.dedicated_open += 1
        s.ctx.spawn(_own_connection, s, s.dedicated)
        s.switch_to(s.dedicated)
        if s.barrier is not None:
            s.hold_again(argv)
            return False
    return True


async def _own_connection(s: Client, conn: BackendConnection) -> None:
    try:
        await run_dedicated(s, conn)
    finally:
        s.ctx.dedicated_open -= 1


def run(s: Client, argv: list[bytes], outcome: Dedicated) -> None:
    if not use_dedicated(s, argv):
        return
    name = argv[0].upper()
    if name == b"EXEC" and s.multi_failed:
        end_transaction(s, EXECABORT)
        return
    if name == b"MULTI":
        s.in_multi = True
    elif name in (b"EXEC", b"DISCARD"):
        s.in_multi = s.multi_failed = False
        s.multi_slots.clear()
    if outcome.blocking:
        pending = Rewrite(lambda reply: unblocked(s, reply))
        s.replies.append(pending)
        s.conn.queue(encode_command(argv), pending, s)
        if pending.data is None:
            s.barrier = pending
            s.blocked = (outcome.slot, pending)
    else:
        s.forward(argv)


def end_transaction(s: Client, reply: bytes) -> None:
    """EXEC may not run: discard the transaction in Redis and answer `reply` instead."""
    s.in_multi = s.multi_failed = False
    s.multi_slots.clear()
    s.forward([b"DISCARD"], Rewrite(lambda _data: reply))


def table_changed(s: Client, table: RoutingTable) -> None:
    """A new table is served. The connections of a client of another tenant close (what
    it was blocked in, its transaction or subscriptions end; the client goes with them).
    A client blocked on a slot this node no longer serves is unblocked, as Redis Cluster
    does, and answered with the redirect."""
    if s.tenant != table.tenant:
        for own in s.owned:
            own.close()
        return
    leave_lost_shard_channels(s, table)
    blocked = s.blocked
    if blocked is None or blocked[0] < 0 or blocked[1].data is not None:
        return
    route = table.routes[blocked[0]]
    conn = s.dedicated
    if route is None or conn is None or not conn.handshake_replies:
        return
    client_id = conn.handshake_replies[-1].data
    if client_id is None or client_id[:1] != b":":
        return  # not connected yet: the command is not blocking in Redis either
    s.unblocked_with = route if isinstance(route, bytes) else TRYAGAIN
    s.ctx.pool.pick(False).queue(
        encode_command([b"CLIENT", b"UNBLOCK", client_id[1:-2], b"ERROR"]), Pending(), None)


def unblocked(s: Client, reply: bytes) -> bytes:
    """The reply of a blocking command, as the client gets it."""
    s.blocked = None
    if s.unblocked_with is not None and reply.startswith(b"-UNBLOCKED"):
        reply = s.unblocked_with
    s.unblocked_with = None
    return reply


def subscribe(s: Client, argv: list[bytes]) -> None:
    if argv[0].upper() in UNSUBSCRIBE_KINDS \
            and (s.dedicated is None or s.dedicated.raw_sink is None):
        # not subscribed to anything: answer as Redis would, without a connection
        s.reply(local.unsubscribed(argv, s.resp3))
        return
    if not use_dedicated(s, argv):
        return
    earlier = newest_unanswered(s.replies)
    if earlier is not None:  # the connection goes raw only once nothing is owed on it
        s.barrier = earlier
        s.hold_again(argv)
        return
    conn = s.dedicated
    assert conn is not None
    conn.raw_sink = s
    s.output_limit = MAX_SUBSCRIBER_OUTPUT_BYTES
    conn.send_unmatched(encode_command(argv))
    track_shard_channels(conn, argv)
    if not s.resp3:
        s.subscribed = True
        return
    # RESP3: the confirmations are pushes, out of band; what the client sends next waits
    # until they are out (a PING behind them, its answer swallowed), so replies keep order
    marker = Rewrite(lambda _data: b"")
    s.replies.append(marker)
    conn.queue(encode_command([b"PING"]), marker, s)
    if marker.data is None:
        s.barrier = marker


def send_subscribed(s: Client, argv: list[bytes]) -> None:
    """RESP2 subscribe mode: Redis itself answers (and refuses) what comes now. After an
    UNSUBSCRIBE the client may have left the mode: what it sends next waits until Redis
    answers a PING of ours, in a subscriber's form or an ordinary client's."""
    conn = s.conn
    conn.send_unmatched(encode_command(argv))
    track_shard_channels(conn, argv)
    if argv[0].upper() in UNSUBSCRIBE_KINDS:
        ask_subscribe_mode(s, conn)


def ask_subscribe_mode(s: Client, conn: BackendConnection) -> None:
    """RESP2: after an UNSUBSCRIBE-family command, a PING tells whether the connection is
    still subscribed; what the client sends meanwhile waits."""
    token = os.urandom(UNSUBSCRIBE_TOKEN_BYTES).hex().encode()
    conn.send_unmatched(encode_command([b"PING", token]))
    s.unsubscribe_marker = (b"*2\r\n$4\r\npong\r\n" + bulk(token), bulk(token))
    s.barrier = Pending()  # filled when the answer is seen (raw_arrived)


def track_shard_channels(conn: BackendConnection, argv: list[bytes]) -> None:
    """Keep `conn.shard_channels` as Redis does, from a subscribe-family command sent on it."""
    name = argv[0].upper()
    if name == b"SSUBSCRIBE":
        conn.shard_channels.update(argv[1:])
    elif name == b"SUNSUBSCRIBE":
        if len(argv) > 1:
            conn.shard_channels.difference_update(argv[1:])
        else:
            conn.shard_channels.clear()


def leave_lost_shard_channels(s: Client, table: RoutingTable) -> None:
    """The client's shard channels whose slot has left this node under `table` are left, as
    Redis Cluster does when it loses a slot: the client gets a `sunsubscribe` for each (its
    cue to subscribe again where the slot went), and no message of the new owner's would
    reach it here anyway."""
    conn = s.dedicated
    if conn is None or conn.raw_sink is None or not conn.shard_channels:
        return
    lost = sorted(ch for ch in conn.shard_channels if not keeps_shard_channel(table, key_slot(ch)))
    if not lost:
        return
    if s.subscribed and (s.unsubscribe_marker is not None or s.barrier is not None):
        return  # an UNSUBSCRIBE of the client's is being answered: checked again after it
    conn.shard_channels.difference_update(lost)
    # a RESP3 client gets the confirmations as pushes, out of band
    conn.send_unmatched(encode_command([b"SUNSUBSCRIBE", *lost]))
    if s.subscribed:  # RESP2: it may have left subscribe mode by that
        ask_subscribe_mode(s, conn)


def raw_arrived(s: Client, messages: list[bytes]) -> None:
    """Pub/sub messages (and RESP3 pushes) from the client's own connection."""
    marker = s.unsubscribe_marker
    if marker is not None:
        for i, message in enumerate(messages):
            if message in marker:
                subscribe_mode_known(s, messages, i, message == marker[1])
                return
    if s.subscribed:  # RESP2: what Redis sends is the reply stream itself
        s.replies.append(Pending(b"".join(messages)))
        s.write_ready()
        return
    # RESP3 pushes are out of band: they go out now, after the replies ready before them,
    # even while the client waits for a reply (a blocked command, say)
    s.write_ready()
    transport = s.transport
    if transport is not None and not transport.is_closing():
        transport.write(b"".join(messages))
        if transport.get_write_buffer_size() > s.output_limit:
            log.warning("client_output_limit", client=s.id, limit=s.output_limit)
            transport.abort()


def subscribe_mode_known(s: Client, messages: list[bytes], marker_at: int, left: bool) -> None:
    """Redis answered the PING sent after an UNSUBSCRIBE: the client left subscribe mode
    (`left`, the subscription count reached 0) or is still in it. Either way the commands
    held meanwhile are decided now, as an ordinary client's or as a subscriber's."""
    del messages[marker_at]  # our PING's answer is not the client's
    if messages:
        s.replies.append(Pending(b"".join(messages)))
    s.unsubscribe_marker = None
    if left:
        s.subscribed = False
        s.output_limit = MAX_CLIENT_OUTPUT_BYTES
        s.conn.raw_sink = None  # replies pair with commands again
        s.conn.shard_channels.clear()
    assert s.barrier is not None
    s.barrier.data = b""
    s.replies_arrived()
    if s.subscribed:  # a slot may have left while the PING was out
        leave_lost_shard_channels(s, s.ctx.control.table)
