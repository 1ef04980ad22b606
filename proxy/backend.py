"""Pipelined connections to the backend Redis.

The data path runs in asyncio protocol callbacks (no task switch per command): a client
session queues a command with `queue()`, which also records where its reply must go; the
connection writes everything queued once per event-loop turn; `data_received` finds each
reply's end and hands the original bytes to the waiting `Pending`. Lifetimes (connect, reconnect,
close) are owned by anyio tasks in the server's task group.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import anyio
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential, wait_random

from core.address import Address
from core.outage import OutageLog, Say

from .resp import BackendProtocolError, ReplyScanner, encode_command

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

log = structlog.get_logger("proxy.backend")

CONNECT_TIMEOUT = 2.0
RECONNECT_MAX_WAIT = 2.0
SHORT_LINK = 1.0  # a link lost sooner than this after connecting is redialled after a pause
SHARED_CONNECTIONS_PER_PROTOCOL = 4
# ... and this many more for clients sending big batches, so that one client's deep pipeline
# never sits in the stream ahead of another client's single command
BULK_CONNECTIONS_PER_PROTOCOL = 2
# ... and this many for synchronous mode's writes: their WAIT holds the stream until replicas
# confirm, which must not hold back other clients' reads
SYNCED_CONNECTIONS_PER_PROTOCOL = 2
# not sent: the command did not run (cluster clients retry CLUSTERDOWN by themselves)
BACKEND_DOWN = b"-CLUSTERDOWN The backend of this node is unreachable\r\n"
# sent, and then the link was lost: it may have run, so no client should retry it blindly
MAYBE_RAN = (b"-UNCERTAIN the link to this node's Redis was lost after the command was sent; "
             b"it may have run\r\n")


class Pending:
    """A reply slot: `data` is None until the reply's bytes arrive."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data


class Batch(Pending):
    """The reply slot of several pipelined requests. Replies that arrived while the last
    has not are handed over early in `parts` (oldest first), so a deep batch of big replies
    streams to its client instead of piling up here; `data` is what came after them."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []


class ReplySink(Protocol):
    def replies_arrived(self) -> None: ...


class BackendConnection(asyncio.Protocol):
    """One connection to the backend; FIFO of reply slots; fails them all if the link drops."""

    def __init__(self, host: str, port: int, resp3: bool, password: str | None = None,
                 handshake: tuple[list[bytes], ...] = (),
                 prove: Callable[[bytes], list[bytes]] | None = None) -> None:
        self.host, self.port, self.resp3, self.password = host, port, resp3, password
        self.handshake = handshake  # more commands to send first
        # a peer proxy: answer its UMCTL CHALLENGE with this command before anything else
        self.prove = prove
        self.handshake_replies: list[Pending] = []  # theirs, in order, once connected
        self.transport: asyncio.Transport | None = None
        self.up = False
        self.down = False  # True once a connect failed or the link dropped: fail fast
        self.closed = False  # closed by its owner: never (re)connects
        self.raw_sink: RawSink | None = None  # pub/sub: every byte goes to one client
        # pub/sub: the shard channels subscribed on it (left when their slot leaves the node)
        self.shard_channels: set[bytes] = set()
        self.bulk = False  # one of the pool's connections for big batches
        self.synced = False  # one of the pool's connections for writes followed by WAIT
        self.own = False  # a plain client's own link to a peer (proxy/forward.py)
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._waiting: deque[tuple[Pending, ReplySink | None, int]] = deque()
        self._unsent = 0  # the newest entries of _waiting whose commands are not written yet
        self._got = 0  # replies of the head of _waiting already in _buf
        self._buf = bytearray()
        self._scanner = ReplyScanner()
        self.lost = anyio.Event()
        self.connects = 0  # links made (more than one: it reconnected)

    # -- used by sessions, synchronously --------------------------------------------------
    def queue(self, command: bytes, pending: Pending, sink: ReplySink | None,
              replies: int = 1) -> None:
        """Send `command`: one request, or `replies` requests for a `Batch`; `sink` (None:
        nobody waits) is told when the reply has arrived."""
        if self.down:
            pending.data = BACKEND_DOWN * replies
            return
        self._out.append(command)
        self._waiting.append((pending, sink, replies))
        self._unsent += 1
        if not self._flush_scheduled:
            self._schedule_flush()

    def send_unmatched(self, command: bytes) -> None:
        """Send a command whose replies go to `raw_sink` (pub/sub)."""
        if not self.down:
            self._out.append(command)
            if not self._flush_scheduled:
                self._schedule_flush()

    def _schedule_flush(self) -> None:
        # One write per event-loop turn carries the commands of every client that queued
        # on this connection in that turn.
        self._flush_scheduled = True
        asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.up:
            self.transport.write(b"".join(self._out))  # type: ignore[union-attr]  # connected: the transport is set
            self._out.clear()
            self._unsent = 0

    @property
    def inflight(self) -> int:
        return len(self._waiting)

    def oldest(self) -> Pending | None:
        """The reply slot of the oldest command still waiting, if any."""
        return self._waiting[0][0] if self._waiting else None

    # -- lifetime --------------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the link and send the handshake; raises OSError on failure."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        self.down = False
        self.lost = anyio.Event()
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                await loop.create_connection(lambda: self, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            self._go_down()
            raise OSError(f"cannot connect to backend {self.host}:{self.port}: {exc}") from None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.closed:  # its owner gave up on it while it was connecting
            transport.close()
            return
        self.connects += 1
        self.transport = transport  # type: ignore[assignment]  # asyncio passes a BaseTransport; a stream's is a Transport
        handshake = [encode_command(argv) for argv in self.handshake]
        if self.resp3 or self.password:
            args = [b"HELLO", b"3" if self.resp3 else b"2"]
            if self.password:
                args += [b"AUTH", b"default", self.password.encode()]
            handshake.insert(0, encode_command(args))
        self.handshake_replies = [Pending() for _ in self.handshake]
        entries: list[tuple[Pending, ReplySink | None, int]] = [
            (p, None, 1) for p in [Pending() for _ in range(len(handshake) - len(self.handshake))]
            + self.handshake_replies]
        if self.prove is not None:  # nothing else goes until the challenge is answered
            handshake.append(encode_command([b"UMCTL", b"CHALLENGE"]))
            challenge = _Challenge(self)
            entries.append((challenge.reply, challenge, 1))
            self._waiting.extendleft(reversed(entries))
            self.transport.write(b"".join(handshake))  # type: ignore[union-attr]  # connection_made set it
            return
        self._waiting.extendleft(reversed(entries))
        self._start(handshake)

    def _start(self, first: list[bytes]) -> None:
        self.transport.write(b"".join(first + self._out))  # type: ignore[union-attr]  # connection_made set it
        self._out.clear()
        self._unsent = 0
        self.up = True

    def _answer_challenge(self, nonce_reply: bytes) -> None:
        if self.transport is None or self.prove is None:
            return
        if nonce_reply[:1] != b"$":
            log.error("peer_challenge_failed", peer=f"{self.host}:{self.port}",
                      reply=nonce_reply[:200])
            self.transport.abort()
            return
        answer = encode_command(self.prove(nonce_reply.split(b"\r\n")[1]))
        self._waiting.appendleft((Pending(), None, 1))
        self._start([answer])

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        scanner = self._scanner
        waiting = self._waiting
        raw_sink = self.raw_sink
        raw: list[bytes] = []
        start = 0  # where the replies not yet handed over begin
        got = self._got
        last_end = 0
        sinks = set()
        try:
            while True:
                # a pub/sub connection looks at each reply: it may be a message, not an answer
                need = waiting[0][2] - got if waiting and raw_sink is None else 1
                found, end = scanner.next_ends(buf, need)
                if not found:
                    break
                if waiting and not (raw_sink is not None and self.resp3 and buf[start] == 62):
                    got += found
                    pending, sink, replies = waiting[0]
                    if got < replies:  # the bytes ran out in the middle of a batch
                        last_end = end
                        break
                    waiting.popleft()
                    pending.data = bytes(buf[start:end])
                    sinks.add(sink)
                    start = end
                    got = 0
                elif raw_sink is not None:  # pub/sub: messages, and RESP3 pushes
                    raw.append(bytes(buf[start:end]))
                    start = end
                else:
                    raise BackendProtocolError(b"a reply nobody asked for")
        except BackendProtocolError as exc:
            log.error("backend_protocol_error", backend=f"{self.host}:{self.port}", data=str(exc))
            self._notify(sinks)
            self.transport.abort()  # type: ignore[union-attr]  # data came in on it
            return
        self._got = got
        if got and last_end > start:  # a batch's first replies: hand them over now
            pending, sink, _ = waiting[0]
            pending.parts.append(bytes(buf[start:last_end]))  # type: ignore[attr-defined]  # only a Batch awaits several replies
            sinks.add(sink)
            start = last_end
        if start:
            del buf[:start]
            scanner.shift(start)
        if raw and raw_sink is not None:
            raw_sink.raw_arrived(raw)
        self._notify(sinks)

    @staticmethod
    def _notify(sinks: set) -> None:
        for sink in sinks:
            if sink is not None:
                sink.replies_arrived()

    def connection_lost(self, exc: Exception | None) -> None:
        self._go_down()
        self.lost.set()

    def _go_down(self) -> None:
        self.up = False
        self.down = True
        self.transport = None
        self._out.clear()
        self._buf.clear()
        self._scanner = ReplyScanner()
        handed_over, self._got = self._got, 0  # the head batch's replies already in its parts
        sent = len(self._waiting) - self._unsent
        self._unsent = 0
        sinks = set()
        while self._waiting:
            pending, sink, replies = self._waiting.popleft()
            pending.data = (MAYBE_RAN if sent > 0 else BACKEND_DOWN) * (replies - handed_over)
            sent -= 1
            handed_over = 0
            sinks.add(sink)
        self._notify(sinks)
        if self.raw_sink is not None:
            self.raw_sink.raw_closed()

    def abort(self) -> None:
        """Drop the link now if commands are in flight: they fail as not run or
        -UNCERTAIN; the keeper of the connection reconnects it."""
        if self.transport is not None and self._waiting:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.flush()
            self.transport.close()
        else:
            self._go_down()


class _Challenge:
    """Takes a peer's UMCTL CHALLENGE reply and sends the proof (BackendConnection.prove)."""

    __slots__ = ("conn", "reply")

    def __init__(self, conn: BackendConnection) -> None:
        self.conn = conn
        self.reply = Pending()

    def replies_arrived(self) -> None:
        if self.reply.data is not None:
            self.conn._answer_challenge(self.reply.data)


class RawSink(Protocol):
    def raw_arrived(self, messages: list[bytes]) -> None: ...  # whole messages, in order
    def raw_closed(self) -> None: ...


# Clients' commands run in Redis as this user, which every connection of the data path
# (re)creates when it connects, so a restarted Redis has it too. A script can call what the
# proxy refuses; these would reach another database or another Redis (the proxy answers
# SELECT 0 itself, the mover uses DUMP/RESTORE). The default user, the agent's, is untouched.
DATA_USER = b"moonmesh-data"
DATA_USER_RULES = (b"-migrate", b"-select", b"-move", b"-swapdb")


class BackendPool:
    """A few long-lived shared connections per RESP version, kept connected with backoff.

    A client session is bound to one connection while it waits for replies, so its commands
    run in order; with nothing in flight it may move (to or from a bulk connection).
    """

    def __init__(self, address: str, size: int = SHARED_CONNECTIONS_PER_PROTOCOL,
                 password: str | None = None) -> None:
        where = Address.parse(address)
        self.address = address
        self.host, self.port = where.host, where.port
        self.password = password
        secret = password.encode() if password else None
        self.data_user: tuple[list[bytes], ...] = (
            [b"ACL", b"SETUSER", DATA_USER, b"reset", b"on",
             b">" + secret if secret else b"nopass", b"~*", b"&*", b"+@all", *DATA_USER_RULES],
            [b"AUTH", DATA_USER, secret or b"-"])
        self.shared = {
            (resp3, bulk): [BackendConnection(self.host, self.port, resp3, password,
                                              self.data_user)
                            for _ in range(BULK_CONNECTIONS_PER_PROTOCOL if bulk else size)]
            for resp3 in (False, True) for bulk in (False, True)
        }
        # one line when the Redis goes and one when it is back, not one per connection and
        # reconnect attempt
        self.outage = OutageLog()
        for (_, bulk), conns in self.shared.items():
            for conn in conns:
                conn.bulk = bulk
        self.synced = {resp3: [BackendConnection(self.host, self.port, resp3, password,
                                                 self.data_user)
                               for _ in range(SYNCED_CONNECTIONS_PER_PROTOCOL)]
                       for resp3 in (False, True)}
        for conns in self.synced.values():
            for conn in conns:
                conn.synced = True
        self._next = 0

    def pick(self, resp3: bool, bulk: bool = False) -> BackendConnection:
        conns = self.shared[(resp3, bulk)]
        self._next += 1
        return conns[self._next % len(conns)]

    def pick_synced(self, resp3: bool) -> BackendConnection:
        conns = self.synced[resp3]
        self._next += 1
        return conns[self._next % len(conns)]

    def dedicated(self, resp3: bool, handshake: tuple[list[bytes], ...] = ()) -> BackendConnection:
        return BackendConnection(self.host, self.port, resp3, self.password,
                                 self.data_user + handshake)

    def connections(self) -> list[BackendConnection]:
        """Every pooled connection (shared, bulk and synced; not clients' own)."""
        return [c for conns in [*self.shared.values(), *self.synced.values()] for c in conns]

    @property
    def healthy(self) -> bool:
        return any(c.up for conns in self.shared.values() for c in conns)

    def drop_in_flight(self) -> None:
        for conns in [*self.shared.values(), *self.synced.values()]:
            for conn in conns:
                conn.abort()

    async def run(self, tg: TaskGroup) -> None:
        for conns in [*self.shared.values(), *self.synced.values()]:
            for conn in conns:
                tg.start_soon(keep_connected, conn, True, self.outage)


async def keep_connected(conn: BackendConnection, close_on_exit: bool = True,
                         outage: OutageLog | None = None) -> None:
    """Connect `conn` and reconnect it with backoff whenever it drops, until cancelled.
    `outage`: shared by the connections of one pool, which then log the Redis going and
    coming back once between them (None: this connection logs each failure)."""
    address = str(Address(conn.host, conn.port))

    def failed(event: str, **fields: object) -> None:
        if outage is None:
            log.warning(event, backend=address, **fields)
            return
        said = outage.failed(anyio.current_time())
        if said is Say.LOST:
            log.warning(event, backend=address, **fields)
        elif said is Say.STILL:
            log.warning("backend_still_unreachable", backend=address,
                        failures=outage.failures, **fields)

    try:
        while not conn.closed:  # closed by its owner: it never connects again
            async for attempt in AsyncRetrying(
                wait=wait_exponential(multiplier=0.05, max=RECONNECT_MAX_WAIT)
                + wait_random(0, 0.05),
                retry=retry_if_exception_type(OSError), stop=stop_never, sleep=anyio.sleep,
                before_sleep=lambda state: failed(
                    "backend_connect_failed", attempt=state.attempt_number,
                    error=str(state.outcome.exception() if state.outcome else None)),
            ):
                with attempt:
                    await conn.connect()
            log.debug("backend_connected", backend=address, resp3=conn.resp3)
            away = outage.succeeded(anyio.current_time()) if outage is not None else None
            if away is not None:
                log.warning("backend_reachable_again", backend=address, after_sec=round(away, 1))
            connected = anyio.current_time()
            await conn.lost.wait()
            failed("backend_connection_lost")
            if anyio.current_time() - connected < SHORT_LINK:
                # closed at once (a peer refusing our handshake, say): no redial storm
                await anyio.sleep(RECONNECT_MAX_WAIT)
    finally:
        if close_on_exit:
            conn.close()


class _Waiter:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = anyio.Event()

    def replies_arrived(self) -> None:
        self.event.set()


async def request(conn: BackendConnection, argv: list[bytes]) -> bytes:
    """Send one command and wait for its raw reply (control-path helper, not per command)."""
    return (await request_many(conn, [argv]))[0]


async def request_many(conn: BackendConnection, commands: list[list[bytes]]) -> list[bytes]:
    """Pipeline `commands` and wait for all their raw replies, in order."""
    waiter = _Waiter()
    pendings = [Pending() for _ in commands]
    for argv, pending in zip(commands, pendings):
        conn.queue(encode_command(argv), pending, waiter)
    conn.flush()
    while pendings[-1].data is None:
        await waiter.event.wait()
        waiter.event = anyio.Event()
    return [p.data for p in pendings]  # type: ignore[misc]  # every slot is filled: the loop waited for the last
