"""One client connection: parse, route, forward, and write replies back in request order.

Runs in asyncio protocol callbacks. Every command appends one `Pending` to `replies`; a
backend fills it later or the proxy fills it at once; `_write_ready` writes the resolved head
of the queue, so replies always leave in request order, whichever path made them.
"""
from __future__ import annotations

import asyncio
import itertools
from binascii import crc_hqx
from time import monotonic
from collections import deque
from typing import TYPE_CHECKING

import structlog

from mesh.model.slots import SLOT_COUNT, SLOT_MASK, key_slot

from . import clusterinfo, commands, policy
from .backend import BackendConnection, Batch, Pending
from .policy import Kind
from .resp import (OK, PONG, Err, RequestError, RequestParser, bulk, encode, encode_command,
                   error, integer)
from .migration import TRYAGAIN, SlotGate
from .routing import MigratingSlots, RoutingTable, hash_password
from .umctl import UmctlError, parse_setcluster

if TYPE_CHECKING:
    from .server import ProxyServer

log = structlog.get_logger("proxy.session")

# Replies queued but not yet written before the proxy stops reading this client's commands.
MAX_INFLIGHT_REPLIES = 4096
# Bytes the client has not read yet before it is disconnected (Redis: client-output-buffer-limit).
MAX_CLIENT_OUTPUT_BYTES = 256 * 1024 * 1024
CLIENT_WRITE_HIGH_WATER = 4 * 1024 * 1024
REDIS_COMPAT_VERSION = "7.0.0"

CROSSSLOT = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
NOAUTH = b"-NOAUTH Authentication required.\r\n"
EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
FENCED = (b"-CLUSTERDOWN this node lost contact with the mesh and refuses writes until it "
          b"rejoins\r\n")

# Answered without AUTH (as Redis does); everything else needs it when a password is set.
NO_AUTH_NEEDED = frozenset({b"AUTH", b"HELLO", b"QUIT", b"RESET", b"UMCTL"})
# UMCTL's read-only probes (readiness, epoch) work without AUTH; the rest needs it.
UMCTL_WITHOUT_AUTH = frozenset({b"READY", b"GETEPOCH", b"AUTHPEER", b"LEASEOK"})
# The proxy's own commands that take effect at once even inside MULTI.
RUN_INSIDE_MULTI = frozenset({b"QUIT", b"RESET", b"UMCTL"})
# ... and those Redis can queue and answer in EXEC's reply.
QUEUE_INSIDE_MULTI = frozenset({b"PING", b"ECHO"})
UNSUBSCRIBE_KINDS = {b"UNSUBSCRIBE": b"unsubscribe", b"PUNSUBSCRIBE": b"punsubscribe",
                     b"SUNSUBSCRIBE": b"sunsubscribe"}

_session_ids = itertools.count(1)


NOREPLICAS = b"-NOREPLICAS Not enough good replicas to write.\r\n"


class SyncedWrite(Pending):
    """Synchronous mode: the client's reply slot for a write sent with a WAIT behind it. It
    gets the write's reply once WAIT says enough replicas have it, else -NOREPLICAS."""

    __slots__ = ("session", "command", "write", "ack", "replicas", "wait")

    def __init__(self, session: Session, command: bytes, replicas: int, timeout_ms: int) -> None:
        super().__init__()
        self.session, self.command, self.replicas = session, command, replicas
        self.write, self.ack = Pending(), Pending()
        self.wait = encode_command([b"WAIT", b"%d" % replicas, b"%d" % timeout_ms])

    def queue_on(self, conn: BackendConnection) -> None:
        conn.queue(self.command, self.write, None)  # type: ignore[arg-type]
        conn.queue(self.wait, self.ack, self)
        if self.ack.data is not None:  # the connection is down
            self.replies_arrived()

    def replies_arrived(self) -> None:
        written, ack = self.write.data or b"", self.ack.data or b""
        if written[:1] == b"-" or ack[:1] != b":":
            self.data = written if written[:1] == b"-" else ack
        else:
            self.data = written if int(ack[1:-2]) >= self.replicas else NOREPLICAS
        self.session.replies_arrived()


class Rewrite(Pending):
    """A reply slot whose bytes are transformed before they are written."""

    __slots__ = ("fn",)

    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn


def _build_dispatch() -> dict[bytes, tuple[Kind, commands.CommandSpec]]:
    table = {name: (policy.kind_of(name.decode()), spec)
             for name, spec in commands.COMMANDS.items()}
    # the proxy's own command, unknown to Redis
    table[b"UMCTL"] = (Kind.LOCAL, commands.CommandSpec(
        name=b"UMCTL", arity=-2, flags=frozenset(), first_key=0, last_key=0, key_step=0,
        movable=False, min_argc=2, max_argc=1 << 31,
        arity_error="ERR wrong number of arguments for 'umctl' command"))
    return table


DISPATCH = _build_dispatch()


def write_refusal(server: ProxyServer) -> bytes | None:
    """The reply to a write this node may not take now, or None when it may."""
    if server.fenced or monotonic() > server.write_deadline:
        return FENCED
    if server.handing_over:  # a graceful failover is switching masters: retry soon
        return TRYAGAIN
    return None


def _build_plain() -> dict[bytes, tuple[int, int, bool]]:
    """Commands of one key at argv[1] that need nothing but routing (GET, SET, HSET, ...):
    name as clients usually spell it -> (min argc, max argc, is a write)."""
    plain = {}
    for name, (kind, spec) in DISPATCH.items():
        if (kind is Kind.KEYED and spec.subcommands is None and not spec.movable
                and spec.first_key == spec.last_key == 1):
            entry = (spec.min_argc, spec.max_argc, "write" in spec.flags)
            plain[name] = plain[name.lower()] = entry
    return plain


PLAIN = _build_plain()
# A client's batch of plain commands is forwarded as the bytes it sent while fewer than this
# many replies are queued for it; past that, the per-command path bounds its depth.
MAX_QUEUED_BATCHES = 64
# A read of more commands than this runs over several event-loop turns, this many per turn.
MAX_COMMANDS_PER_TURN = 64
# ... and a read of plain commands goes to the fast path up to this many (each costs a
# fraction of a per-command one, so a turn stays as short)
MAX_PLAIN_PER_TURN = 256
# A read this big goes over one of the backend's bulk connections (when the client has no
# reply outstanding), away from clients sending a few commands at a time.
BULK_BATCH_BYTES = 16 * 1024


class Session(asyncio.Protocol):
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.id = next(_session_ids)
        self.parser = RequestParser()
        self.replies: deque[Pending] = deque()
        self.transport: asyncio.Transport | None = None
        self.resp3 = False
        self.conn: BackendConnection = server.pool.pick(False)
        self.dedicated: BackendConnection | None = None
        self.owned: list[BackendConnection] = []  # every dedicated connection, closed with us
        self.barrier: Pending | None = None  # commands wait until this reply has arrived
        self.held: list[tuple[bytes, Pending | None]] = []  # None: a raw (pub/sub) command
        self.auth_hash: str | None = None  # the password hash this client authenticated against
        self.subscribed = False  # a RESP2 client in subscribe mode: everything goes raw
        self.asking = False
        self.asked = False
        self.readonly = False  # READONLY: reads of a replica's slots are served here
        self.in_multi = False
        self.multi_failed = False
        self.name = b""
        self.closing = False
        self.paused_for_depth = False
        self.paused_for_output = False
        self.backlog: list[list[bytes]] | None = None  # commands read but not run yet
        self.backlog_pos = 0
        self.backlog_error: RequestError | None = None  # to answer once the backlog has run

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self.server.sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.sessions.discard(self)
        self.dedicated = None
        for conn in self.owned:
            conn.raw_sink = None
            conn.close()
        self.owned.clear()

    def pause_writing(self) -> None:
        self.paused_for_output = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.paused_for_output = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if (len(data) > BULK_BATCH_BYTES) is not self.conn.bulk and not self.replies \
                and self.dedicated is None and self.barrier is None:
            self.conn = self.server.pool.pick(self.resp3, not self.conn.bulk)
        parser = self.parser
        try:
            batch = parser.feed(data)
            bad = None
        except RequestError as exc:
            batch, bad = exc.commands, exc
        else:
            if parser.whole and batch and len(batch) <= MAX_PLAIN_PER_TURN \
                    and self.backlog is None and self._forward_plain(batch, data):
                self.server.commands_processed += len(batch)
                return
        if len(batch) > MAX_COMMANDS_PER_TURN or self.backlog is not None:
            self._defer(batch, bad)
        else:
            self._run(batch, bad)

    def _run(self, batch: list[list[bytes]], bad: RequestError | None) -> None:
        handle = self.handle
        for argv in batch:
            handle(argv)
            if self.closing:
                break
        if bad is not None and not self.closing:
            self.reply(error(str(bad)))
            self.closing = True
        self.server.commands_processed += len(batch)
        self._write_ready()
        if len(self.replies) > MAX_INFLIGHT_REPLIES and not self.paused_for_depth:
            self.paused_for_depth = True
            self._update_reading()

    def _defer(self, batch: list[list[bytes]], bad: RequestError | None) -> None:
        """Run a long batch over several event-loop turns, a slice per turn, so that one
        client's deep pipeline does not hold up every other client's commands; reading from
        this client waits until it is done."""
        if self.backlog is None:
            self.backlog, self.backlog_pos = batch, 0
            asyncio.get_running_loop().call_soon(self._run_backlog)
            self._update_reading()
        else:
            self.backlog += batch
        self.backlog_error = bad

    def _run_backlog(self) -> None:
        backlog, pos = self.backlog, self.backlog_pos
        if backlog is None or self.transport is None or self.closing:
            self.backlog = None
            return
        end = pos + MAX_COMMANDS_PER_TURN
        if end < len(backlog):
            self.backlog_pos = end
            asyncio.get_running_loop().call_soon(self._run_backlog)
            self._run(backlog[pos:end], None)
        else:
            self.backlog = None
            self._update_reading()
            self._run(backlog[pos:], self.backlog_error)

    # -- replies -----------------------------------------------------------------------------
    def replies_arrived(self) -> None:
        if self.barrier is not None and self.barrier.data is not None:
            self._release_held()
        self._write_ready()

    def slot_scan_done(self, pending: Pending, keys: list[bytes] | Err, count: int | None) -> None:
        if isinstance(keys, Err):
            pending.data = error(keys)
        else:
            pending.data = encode(len(keys) if count is None else keys[:count], self.resp3)
        self.replies_arrived()

    def raw_arrived(self, data: bytes) -> None:
        self.replies.append(Pending(data))
        self._write_ready()

    def raw_closed(self) -> None:
        self.closing = True
        self._write_ready()

    def _write_ready(self) -> None:
        replies = self.replies
        transport = self.transport
        if transport is None:
            replies.clear()
            return
        if replies:
            out = []
            while replies and replies[0].data is not None:
                p = replies.popleft()
                if p.__class__ is Rewrite:
                    out.append(p.fn(p.data))
                else:
                    if p.__class__ is Batch and p.parts:
                        out += p.parts
                    out.append(p.data)
            if replies and replies[0].__class__ is Batch and replies[0].parts:
                out += replies[0].parts
                replies[0].parts = []
            if out:
                transport.write(out[0] if len(out) == 1 else b"".join(out))
                if transport.get_write_buffer_size() > MAX_CLIENT_OUTPUT_BYTES:
                    log.warning("client_output_limit", client=self.id)
                    transport.abort()
                    return
        if self.paused_for_depth and len(replies) < MAX_INFLIGHT_REPLIES // 2:
            self.paused_for_depth = False
            self._update_reading()
        if self.closing and not replies:
            transport.close()

    def _update_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.paused_for_depth or self.paused_for_output or self.backlog is not None:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def reply(self, data: bytes) -> None:
        self.replies.append(Pending(data))

    def reply_value(self, value: object) -> None:
        self.replies.append(Pending(encode(value, self.resp3)))

    # -- dispatch ----------------------------------------------------------------------------
    def _forward_plain(self, batch: list[list[bytes]], data: bytes) -> bool:
        """The fast path: when every command of `batch` is plain and served here, send `data`
        unchanged and take all their replies as one. False: nothing was done."""
        server = self.server
        table = server.table
        conn = self.conn
        if (self.barrier is not None or self.subscribed or self.in_multi or self.asking
                or self.auth_hash != table.password_hash or table.min_replicas_ack
                or conn.raw_sink is not None or len(self.replies) >= MAX_QUEUED_BATCHES):
            return False
        routes = None if table.serves_all else table.routes
        writable = None
        for argv in batch:
            entry = PLAIN.get(argv[0])
            if entry is None or not entry[0] <= len(argv) <= entry[1]:
                return False
            if routes is not None:
                key = argv[1]
                if routes[key_slot(key) if b"{" in key else crc_hqx(key, 0) & SLOT_MASK] \
                        is not None:
                    return False
            if entry[2] and writable is None:
                writable = write_refusal(server) is None
                if not writable:
                    return False
        self.asked = False
        pending = Pending() if len(batch) == 1 else Batch()
        self.replies.append(pending)
        conn.queue(data, pending, self, len(batch))
        if pending.data is not None:  # the backend is down: answered already
            self._write_ready()
        return True

    def handle(self, argv: list[bytes]) -> None:
        name = argv[0].upper()
        self.asked = self.asking  # ASKING covers the one command after it
        self.asking = False
        if self.subscribed and name != b"RESET":
            # RESP2 subscribe mode: Redis itself answers (and refuses) what comes now
            self._send(self.conn, encode_command(argv), None)
            return
        entry = DISPATCH.get(name)
        if entry is None:
            self._unknown(argv)
            return
        kind, spec = entry
        if spec.subcommands is not None and len(argv) > 1 and kind is not Kind.LOCAL:
            sub = spec.subcommands.get(argv[1].upper())
            if sub is not None:
                spec = sub
                kind = policy.kind_of(spec.name.decode())
            elif name == b"CLIENT":
                self._client_subcommand(argv)
                return
        if not spec.min_argc <= len(argv) <= spec.max_argc:
            self.reply(error(commands.arity_error(spec)))
            self._fail_multi()
            return
        table = self.server.table
        if self.auth_hash != table.password_hash and name not in NO_AUTH_NEEDED:
            self.reply(NOAUTH)
            self._fail_multi()
            return
        if "write" in spec.flags:
            refusal = write_refusal(self.server)
            if refusal is not None:
                self.reply(refusal)
                self._fail_multi()
                return
        if kind is Kind.KEYED:
            if (spec.first_key or spec.movable) and not self._route(spec, argv, table):
                return
            if table.min_replicas_ack and "write" in spec.flags:
                self._forward_synced(argv, table)
            else:
                self._forward(argv)
        elif kind is Kind.LOCAL:
            if self.in_multi and name not in RUN_INSIDE_MULTI:
                self._local_inside_multi(name, argv)
            else:
                getattr(self, "cmd_" + spec.name.decode().replace("|", "_").replace("-", "_"))(argv)
        elif kind is Kind.DEDICATED:
            self._dedicated(spec, argv, table)
        elif kind is Kind.SUBSCRIBE:
            self._subscribe(spec, argv, table)
        else:
            self.reply(error(policy.refusal(spec.name.decode())))
            self._fail_multi()

    def _local_inside_multi(self, name: bytes, argv: list[bytes]) -> None:
        if name in QUEUE_INSIDE_MULTI:
            self._forward(argv)  # Redis queues it and answers it in EXEC's reply
        else:
            self.reply(error(f"ERR {name.decode()} inside MULTI is not supported through "
                             "moonmesh"))
            self._fail_multi()

    def _client_subcommand(self, argv: list[bytes]) -> None:
        sub = argv[1].upper()
        if sub == b"SETINFO":  # Redis 7.2's, sent by new clients; nothing to keep
            self.reply(OK)
        else:
            self.reply(error(f"ERR unknown or unsupported subcommand '{sub.decode(errors='replace')}'"
                             " of CLIENT through moonmesh"))

    def _route(self, spec: commands.CommandSpec, argv: list[bytes], table: RoutingTable,
               gated: bool = True) -> bool:
        """True when this node serves the command's keys now; else the reply is taken care of
        (a redirect, an error, or the migration gate). `gated`: the command may go through the
        gate of a migrating slot; otherwise such a slot answers -TRYAGAIN on the source."""
        if spec.movable or spec.last_key != spec.first_key:
            try:
                positions = commands.key_indices(spec, argv)
            except commands.CommandArgsError as exc:
                self.reply(error(str(exc)))
                return False
            if not positions:
                positions = commands.shard_channel_indices(spec, argv)
                if not positions:
                    return True
            slot = key_slot(argv[positions[0]])
            for i in positions[1:]:
                if key_slot(argv[i]) != slot:
                    self.reply(CROSSSLOT)
                    self._fail_multi()
                    return False
        else:
            positions = None
            slot = key_slot(argv[spec.first_key])
        route = table.routes[slot]
        if route is None:
            return True
        if route.__class__ is bytes:
            if self.readonly and table.readable and table.readable[slot] \
                    and "readonly" in spec.flags:
                return True  # READONLY: a replica serves reads of its master's slots
            self.reply(route)  # type: ignore[arg-type]
            self._fail_multi()
            return False
        return self._migrating(route, slot, argv, positions or [spec.first_key], gated)  # type: ignore[arg-type]

    def _migrating(self, route: MigratingSlots, slot: int, argv: list[bytes],
                   positions: list[int], gated: bool) -> bool:
        if not route.source:  # the target serves a migrating slot only after ASKING
            if not self.asked:
                self.reply(route.moved(slot))
                self._fail_multi()
                return False
            if len(positions) == 1 or not gated:
                return True
        elif not gated:
            self.reply(TRYAGAIN)
            self._fail_multi()
            return False
        gate = self.server.gates.get(route.migration_id)
        if gate is None:
            self.reply(TRYAGAIN)
            return False
        pending = Pending()
        self.replies.append(pending)
        keys = [argv[i] for i in positions]
        if self.barrier is None:  # what this client sent before must have run first
            for p in reversed(self.replies):
                if p is not pending and p.data is None:
                    self.barrier = p
                    break
        if self.barrier is not None:
            self.held.append((gate, (argv, keys, slot), pending))  # type: ignore[arg-type]
        else:
            gate.submit(self, argv, keys, slot, pending)
            if pending.data is None:
                self.barrier = pending
        return False

    def _forward(self, argv: list[bytes], pending: Pending | None = None) -> None:
        pending = pending or Pending()
        self.replies.append(pending)
        if self.barrier is None:
            self.conn.queue(encode_command(argv), pending, self)
        else:
            self.held.append((self.conn, encode_command(argv), pending))

    def _forward_synced(self, argv: list[bytes], table: RoutingTable) -> None:
        pending = SyncedWrite(self, encode_command(argv), table.min_replicas_ack,
                              table.ack_timeout_ms)
        self.replies.append(pending)
        if self.barrier is None:
            pending.queue_on(self.conn)
        else:
            self.held.append((self.conn, b"", pending))

    def _send(self, conn: BackendConnection, command: bytes, pending: Pending | None) -> None:
        """Queue `command` on `conn`; pending None: its replies come back as raw pub/sub bytes."""
        if self.barrier is not None:
            self.held.append((conn, command, pending))
        elif pending is None:
            conn.send_unmatched(command)
        else:
            conn.queue(command, pending, self)

    def _fail_multi(self) -> None:
        if self.in_multi:
            self.multi_failed = True

    def _unknown(self, argv: list[bytes]) -> None:
        shown = " ".join(f"'{a.decode(errors='replace')[:128]}'" for a in argv[1:21])
        self.reply(error(f"ERR unknown command '{argv[0].decode(errors='replace')[:128]}', "
                         f"with args beginning with: {shown}"))
        self._fail_multi()

    # -- dedicated connections ---------------------------------------------------------------
    def _switch_to(self, conn: BackendConnection) -> None:
        """Send later commands on `conn`, only after everything already sent has replied."""
        if self.barrier is None:  # with a barrier up, held entries already name their conn
            for p in reversed(self.replies):
                if p.data is None:
                    self.barrier = p
                    break
        self.conn = conn

    def _release_held(self) -> None:
        """Send held commands, one connection's run at a time: a run waits for the last."""
        self.barrier = None
        held = self.held
        sent_to = None
        last: Pending | None = None
        for i, (conn, command, pending) in enumerate(held):
            if conn is not sent_to and last is not None and last.data is None:
                self.barrier = last
                del held[:i]
                return
            if conn.__class__ is SlotGate:
                conn.submit(self, *command, pending)  # type: ignore[union-attr]
                if pending.data is None:  # type: ignore[union-attr]
                    self.barrier = pending
                    del held[: i + 1]
                    return
                sent_to = last = None
                continue
            sent_to = conn
            if pending is None:
                conn.send_unmatched(command)
            elif pending.__class__ is SyncedWrite:
                pending.queue_on(conn)  # type: ignore[union-attr]
                last = pending
            else:
                conn.queue(command, pending, self)
                last = pending
        held.clear()

    def _ensure_dedicated(self) -> BackendConnection:
        if self.dedicated is None:
            self.dedicated = self.server.pool.dedicated(self.resp3)
            self.owned.append(self.dedicated)
            self.server.open_dedicated(self, self.dedicated)
            self._switch_to(self.dedicated)
        return self.dedicated

    def _dedicated(self, spec: commands.CommandSpec, argv: list[bytes],
                   table: RoutingTable) -> None:
        name = spec.name
        if name == b"EXEC" and self.multi_failed:
            self._ensure_dedicated()
            self.in_multi = self.multi_failed = False
            self._forward([b"DISCARD"], Rewrite(lambda _data: EXECABORT))
            return
        if (spec.first_key or spec.movable) and not self._route(spec, argv, table, gated=False):
            return
        self._ensure_dedicated()
        if name == b"MULTI":
            self.in_multi = True
        elif name in (b"EXEC", b"DISCARD"):
            self.in_multi = self.multi_failed = False
        self._forward(argv)

    def _subscribe(self, spec: commands.CommandSpec, argv: list[bytes],
                   table: RoutingTable) -> None:
        if (spec.first_key or spec.movable) and not self._route(spec, argv, table, gated=False):
            return
        unsubscribe = spec.name in UNSUBSCRIBE_KINDS
        if unsubscribe and (self.dedicated is None or self.dedicated.raw_sink is None):
            # not subscribed to anything: answer as Redis would, without a connection
            kind = UNSUBSCRIBE_KINDS[spec.name]
            head = b">3\r\n" if self.resp3 else b"*3\r\n"
            for channel in argv[1:] or [None]:
                self.reply(head + bulk(kind) + (bulk(channel) if channel is not None
                                                 else (b"_\r\n" if self.resp3 else b"$-1\r\n"))
                           + b":0\r\n")
            return
        conn = self._ensure_dedicated()
        conn.raw_sink = self
        if not self.resp3:
            self.subscribed = True
        self._send(conn, encode_command(argv), None)

    # -- commands answered by the proxy ------------------------------------------------------
    def cmd_PING(self, argv: list[bytes]) -> None:
        self.reply(PONG if len(argv) == 1 else bulk(argv[1]))

    def cmd_ECHO(self, argv: list[bytes]) -> None:
        self.reply(bulk(argv[1]))

    def cmd_SELECT(self, argv: list[bytes]) -> None:
        if argv[1] == b"0":
            self.reply(OK)
        else:
            self.reply(error("ERR SELECT is not allowed in cluster mode"))

    def cmd_QUIT(self, argv: list[bytes]) -> None:
        self.reply(OK)
        self.closing = True

    def cmd_RESET(self, argv: list[bytes]) -> None:
        old = self.dedicated
        if old is not None and old.raw_sink is not None:
            old.raw_sink = None  # subscriptions end with their connection
            old.close()
            self.owned.remove(old)
            self.reply(b"+RESET\r\n")
        elif old is not None:
            # let what is queued on it finish; RESET's own reply closes it
            def close_old(data: bytes) -> bytes:
                old.close()
                self.owned.remove(old)
                return data

            self._forward(argv, Rewrite(close_old))
        else:
            self.reply(b"+RESET\r\n")
        if old is not None or self.resp3:
            self.dedicated = None
            self._switch_to(self.server.pool.pick(False))
        self.resp3 = self.in_multi = self.multi_failed = self.asking = self.subscribed = False
        self.readonly = False
        self.auth_hash = None
        self.name = b""

    def cmd_ASKING(self, argv: list[bytes]) -> None:
        self.asking = True
        self.reply(OK)

    def cmd_READONLY(self, argv: list[bytes]) -> None:
        self.readonly = True
        self.reply(OK)

    def cmd_READWRITE(self, argv: list[bytes]) -> None:
        self.readonly = False
        self.reply(OK)

    def cmd_AUTH(self, argv: list[bytes]) -> None:
        if len(argv) > 3:
            self.reply(error("ERR syntax error"))
            return
        user = argv[1] if len(argv) == 3 else b"default"
        self._authenticate(user, argv[-1])

    def _authenticate(self, user: bytes, password: bytes) -> bool:
        expected = self.server.table.password_hash
        if expected is None:
            self.reply(error("ERR AUTH <password> called without any password configured for "
                             "the default user. Are you sure your configuration is correct?"))
            return False
        if user != b"default" or hash_password(password.decode(errors="replace")) != expected:
            self.reply(error("WRONGPASS invalid username-password pair or user is disabled."))
            return False
        self.auth_hash = expected
        self.reply(OK)
        return True

    def cmd_HELLO(self, argv: list[bytes]) -> None:
        protocol = 3 if self.resp3 else 2
        i = 1
        if len(argv) > 1:
            try:
                protocol = int(argv[1])
            except ValueError:
                self.reply(error("ERR Protocol version is not an integer or out of range"))
                return
            if protocol not in (2, 3):
                self.reply(error("NOPROTO unsupported protocol version"))
                return
            i = 2
        name = None
        while i < len(argv):
            opt = argv[i].upper()
            if opt == b"AUTH" and i + 2 < len(argv):
                if not self._authenticate(argv[i + 1], argv[i + 2]):
                    return
                self.replies.pop()  # the +OK of AUTH: HELLO answers with its map
                i += 3
            elif opt == b"SETNAME" and i + 1 < len(argv):
                name = argv[i + 1]
                i += 2
            else:
                self.reply(error(f"ERR Syntax error in HELLO option '{opt.decode(errors='replace')}'"))
                return
        if self.auth_hash != self.server.table.password_hash:
            self.reply(error("NOAUTH HELLO must be called with the client already authenticated, "
                             "otherwise the HELLO <proto> AUTH <user> <pass> option can be used "
                             "to authenticate the client and select the RESP protocol version "
                             "at the same time"))
            return
        if name is not None:
            self.name = name
        if (protocol == 3) != self.resp3:
            self.resp3 = protocol == 3
            if self.dedicated is None:
                self._switch_to(self.server.pool.pick(self.resp3))
            else:
                self.dedicated.resp3 = self.resp3
                self._forward([b"HELLO", str(protocol).encode()], Rewrite(lambda _d: b""))
        self.reply_value({"server": "redis", "version": REDIS_COMPAT_VERSION, "proto": protocol,
                          "id": self.id, "mode": "cluster", "role": "master", "modules": []})

    def cmd_CLIENT_SETNAME(self, argv: list[bytes]) -> None:
        self.name = argv[2]
        self.reply(OK)

    def cmd_CLIENT_GETNAME(self, argv: list[bytes]) -> None:
        self.reply_value(self.name or None)

    def cmd_CLIENT_ID(self, argv: list[bytes]) -> None:
        self.reply(integer(self.id))

    def cmd_CLIENT_SETINFO(self, argv: list[bytes]) -> None:
        self.reply(OK)

    def cmd_CLIENT_INFO(self, argv: list[bytes]) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        addr = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.reply(bulk(f"id={self.id} addr={addr} name={self.name.decode(errors='replace')} "
                        f"db=0 resp={3 if self.resp3 else 2}\n"))

    def cmd_CONFIG_SET(self, argv: list[bytes]) -> None:
        if len(argv) % 2:
            self.reply(error(commands.arity_error(commands.COMMANDS[b"CONFIG"].subcommands[b"SET"])))
            return
        for param in argv[2::2]:
            name = param.decode(errors="replace").lower()
            if name in policy.DANGEROUS_CONFIG:
                self.reply(error(f"ERR CONFIG SET {name} is not allowed through moonmesh: it "
                                 "would break the node's link, replication or persistence"))
                return
        self._forward(argv)

    def cmd_INFO(self, argv: list[bytes]) -> None:
        sections = {a.lower() for a in argv[1:]}
        extra = self.server.info_section()
        if sections == {b"proxy"}:
            self.reply(bulk(extra))
            return
        if sections and not sections & {b"proxy", b"all", b"everything", b"default"}:
            self._forward(argv)
            return

        def add_proxy_section(data: bytes) -> bytes:
            if data[:1] not in (b"$", b"="):
                return data
            header_end = data.index(b"\r\n")
            body = data[header_end + 2 : -2] + b"\r\n" + extra.encode()
            return b"%s%d\r\n%s\r\n" % (data[:1], len(body), body)

        self._forward([a for a in argv if a.lower() != b"proxy"], Rewrite(add_proxy_section))

    def cmd_UMCTL(self, argv: list[bytes]) -> None:
        sub = argv[1].upper() if len(argv) > 1 else b""
        server = self.server
        if self.auth_hash != server.table.password_hash and sub not in UMCTL_WITHOUT_AUTH:
            self.reply(NOAUTH)
            return
        if sub == b"SETCLUSTER":
            try:
                meta = parse_setcluster(argv[2:])
            except UmctlError as exc:
                self.reply(error(str(exc)))
                return
            self.reply(server.apply_setcluster(meta))
        elif sub == b"AUTHPEER":  # a peer proxy moving keys here proves it knows the cluster
            if len(argv) == 3 and server.table.password_hash is not None \
                    and argv[2].decode(errors="replace") == server.table.password_hash:
                self.auth_hash = server.table.password_hash
                self.reply(OK)
            else:
                self.reply(error("WRONGPASS invalid peer credentials"))
        elif sub == b"HANDOVER":  # UMCTL HANDOVER <host> <port> <timeout ms>: graceful failover
            if len(argv) != 5 or not argv[3].isdigit() or not argv[4].isdigit():
                self.reply(error("ERR usage: UMCTL HANDOVER <replica host> <port> <timeout ms>"))
                return
            pending = Pending()
            self.replies.append(pending)
            server.start_handover(self, pending, argv[2], argv[3], argv[4])
        elif sub == b"LEASEOK":  # asked by a peer deciding whether to fence itself
            self.reply(integer(1 if server.lease_ok else 0))
        elif sub == b"GETEPOCH":
            self.reply(integer(server.table.epoch))
        elif sub == b"READY":
            me = server.table.myself
            self.reply(integer(1 if me is not None and me.ranges and server.pool.healthy else 0))
        elif sub == b"INFO":
            self.reply_value(server.umctl_info())
        elif sub == b"LISTCLUSTER":
            self.reply_value([server.table.cluster] if server.table.configured else [])
        else:
            self.reply(error("ERR unknown UMCTL subcommand; try SETCLUSTER, GETEPOCH, INFO, "
                             "READY or LISTCLUSTER"))

    def cmd_CLUSTER(self, argv: list[bytes]) -> None:
        sub = argv[1].upper().decode(errors="replace") if len(argv) > 1 else "HELP"
        if sub not in policy.CLUSTER_LOCAL:
            self.reply(error(f"ERR CLUSTER {sub} is not allowed through moonmesh: the mesh "
                             "manages the cluster's topology"))
            return
        table = self.server.table
        if sub == "NODES":
            self.reply(bulk(clusterinfo.cluster_nodes(table)))
        elif sub == "SLOTS":
            self.reply_value(clusterinfo.cluster_slots(table))
        elif sub == "SHARDS":
            self.reply_value(clusterinfo.cluster_shards(table))
        elif sub == "INFO":
            self.reply(bulk(clusterinfo.cluster_info(table)))
        elif sub == "MYID":
            me = table.myself
            self.reply(bulk(me.node_id if me else ""))
        elif sub == "LINKS":
            self.reply_value([])
        elif sub in ("REPLICAS", "SLAVES"):
            if len(argv) != 3:
                self.reply(error(f"ERR wrong number of arguments for 'cluster|{sub.lower()}' command"))
                return
            master = argv[2].decode(errors="replace")
            if not any(n.node_id == master for n in table.nodes):
                self.reply(error(f"ERR Unknown node {master}"))
                return
            lines = clusterinfo.cluster_nodes(table).splitlines(keepends=True)
            self.reply_value([line for line in lines if f" {master} " in line])
        elif sub == "HELP":
            self.reply_value([f"CLUSTER {s}" for s in sorted(policy.CLUSTER_LOCAL)])
        elif sub == "KEYSLOT":
            if len(argv) != 3:
                self.reply(error("ERR wrong number of arguments for 'cluster|keyslot' command"))
                return
            self.reply(integer(key_slot(argv[2])))
        else:  # COUNTKEYSINSLOT slot / GETKEYSINSLOT slot count
            want = 3 if sub == "COUNTKEYSINSLOT" else 4
            if len(argv) != want:
                self.reply(error(f"ERR wrong number of arguments for 'cluster|{sub.lower()}' command"))
                return
            try:
                slot = int(argv[2])
                count = int(argv[3]) if want == 4 else None
            except ValueError:
                self.reply(error("ERR Invalid slot or number of keys"))
                return
            if not 0 <= slot < SLOT_COUNT or (count is not None and count < 0):
                self.reply(error("ERR Invalid slot or number of keys"))
                return
            pending = Pending()
            self.replies.append(pending)
            self.server.start_slot_scan(self, pending, slot, count)

