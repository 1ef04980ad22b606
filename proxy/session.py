"""One client connection: the protocol shell, back-pressure, and carrying out decisions.

Runs in asyncio protocol callbacks. A command is decided by `admission.decide()` at the moment
it would be sent, never earlier: while a barrier is up (the client is switching backend
connections, or waits for a migration gate) its later commands are held as they were read and
each is decided when the barrier falls. Every command run appends one reply slot to `replies`
(proxy/replies.py), so replies always leave in request order, whichever path made them.
"""
from __future__ import annotations

import asyncio
import itertools
from collections import deque
from time import monotonic, perf_counter

import structlog

from core import clock

from . import dedicated, plain
from .admission import (
    TRYAGAIN,
    Dedicated,
    Disconnect,
    Forward,
    Gate,
    Local,
    Queue,
    Redirect,
    Refuse,
    decide,
    plain_batch,
)
from .backend import BackendConnection, Batch, Pending, keep_connected
from .context import ProxyContext
from .forward import redirect_target
from .local import HANDLERS
from .peers import peer_connection
from .replies import MAX_CLIENT_OUTPUT_BYTES, SyncedWrite, newest_unanswered, take_ready
from .resp import RequestError, RequestParser, encode, encode_command, error
from .routing import RoutingTable
from .stats import Sample

log = structlog.get_logger("proxy.session")

# Replies queued (or commands held) but not yet written before the proxy stops reading this
# client's commands.
MAX_INFLIGHT_REPLIES = 4096
# ... and bytes of commands held behind a barrier (a blocked client pipelining big writes)
MAX_HELD_BYTES = 64 * 1024 * 1024
CLIENT_WRITE_HIGH_WATER = 4 * 1024 * 1024
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


_session_ids = itertools.count(1)


class Session(asyncio.Protocol):
    def __init__(self, ctx: ProxyContext, plain: bool = False) -> None:
        self.ctx = ctx
        # a client of the plain listener: never redirected, its commands for other nodes'
        # slots are forwarded there (proxy/forward.py)
        self.plain = plain
        # a plain client's commands on their way to other nodes: slot -> {link: count}, and
        # how many were sent per slot while any is in flight (proxy/forward.py)
        self.hops: dict[int, dict[object, int]] = {}
        self.hop_seq: dict[int, int] = {}
        # its own links to peers for EVAL, BLPOP..., by (address, resp3)
        self.own_peers: dict[tuple[str, bool], BackendConnection] = {}
        self.notify_soon = False  # replies_arrived_soon() is due
        self.control = ctx.control  # the routing table and write permission, read per command
        self.id = next(_session_ids)
        self.parser = RequestParser()
        self.replies: deque[Pending] = deque()
        self.transport: asyncio.Transport | None = None
        self.resp3 = False
        self.conn: BackendConnection = ctx.pool.pick(False)
        self.dedicated: BackendConnection | None = None
        self.owned: list[BackendConnection] = []  # every dedicated connection, closed with us
        self.barrier: Pending | None = None  # commands wait until this reply has arrived
        self.held: list[list[bytes]] = []  # read while the barrier is up; decided when sent
        self.held_bytes = 0
        self.tenant = ctx.control.table.tenant  # whose client this is (decide() checks it)
        self.auth_hash: str | None = None
        self.admin = False  # proved the admin secret (UMCTL CHALLENGE/PROVE)
        self.challenge: bytes | None = None  # the password hash this client authenticated against
        self.subscribed = False  # a RESP2 client in subscribe mode: everything goes raw
        self.output_limit = MAX_CLIENT_OUTPUT_BYTES  # unread bytes before it is dropped
        # after an UNSUBSCRIBE in subscribe mode: the two answers Redis may give to our PING
        # (still subscribed, or not any more), which tell whether the client left the mode
        self.unsubscribe_marker: tuple[bytes, bytes] | None = None
        self.asking = False
        self.asked = False
        self.readonly = False  # READONLY: reads of a replica's slots are served here
        self.in_multi = False
        self.multi_failed = False
        self.multi_slots: set[int] = set()  # of the commands queued in this MULTI
        # a blocking command in flight: its slot and reply slot; and what to answer instead
        # of -UNBLOCKED when its slot left this node meanwhile
        self.blocked: tuple[int, Pending] | None = None
        self.unblocked_with: bytes | None = None
        self.name = b""
        self.closing = False
        self.paused_for_depth = False
        self.paused_for_output = False
        self.backlog: list[list[bytes]] | None = None  # commands read but not run yet
        self.backlog_pos = 0
        self.backlog_error: RequestError | None = None  # to answer once the backlog has run
        self.stats = ctx.stats  # the proxy's counters (proxy/stats.py)
        self.sample: Sample | None = None  # a timed read whose replies are not all out yet

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio passes a BaseTransport; a stream's is a Transport
        transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH_WATER)  # type: ignore[attr-defined]  # a Transport has it
        self.ctx.sessions.add(self)
        self.stats.clients_accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.ctx.sessions.discard(self)
        self.dedicated = None
        self.held.clear()
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
        bulk = len(data) > BULK_BATCH_BYTES
        if (bulk is not self.conn.bulk or self.conn.synced) and not self.replies \
                and self.dedicated is None and self.barrier is None:
            self.conn = self.ctx.pool.pick(self.resp3, bulk)
        parser = self.parser
        try:
            batch = parser.feed(data)
            bad = None
        except RequestError as exc:
            batch, bad = exc.commands, exc
        # statistics (proxy/stats.py): names counted per read, everything else sampled
        n = len(batch)
        timed = None
        if n:
            stats = self.stats
            counts = stats.commands
            name = batch[0][0]
            if n == 1 or batch[-1][0] == name:  # one kind of command (see proxy/stats.py)
                known = counts.get(name)
                if known is None:
                    stats.count_new(name, n)
                else:
                    counts[name] = known + n
            else:
                stats.count_each(batch)
            countdown = stats.countdown - n
            if countdown > 0:
                stats.countdown = countdown
            else:
                timed = self._sample(batch)
        if bad is None and parser.whole and batch and n <= MAX_PLAIN_PER_TURN \
                and self.backlog is None and self._forward_plain(batch, data):
            self.ctx.commands_processed += n
        elif n > MAX_COMMANDS_PER_TURN or self.backlog is not None:
            self._defer(batch, bad)
        else:
            self._run(batch, bad)
        if timed is not None:
            self._handled(timed)

    def _sample(self, batch: list[list[bytes]]) -> Sample | None:
        """This read holds sample points: their commands go to the hot keys and bytes in;
        the read is timed too when this client waits for no earlier reply (so what is written
        back until its last reply is its own). Only a client of the served tenant that passed its
        authentication gives samples: a stranger's keys are no hot keys of the cluster."""
        table = self.control.table
        if self.tenant != table.tenant or (self.auth_hash != table.password_hash
                                           and not self.admin):
            self.stats.skip(len(batch))
            return None
        name, slot, weight = self.stats.sample(batch, monotonic())
        if self.replies or self.sample is not None or self.backlog is not None:
            return None
        self.sample = Sample(perf_counter(), name, slot, weight, len(batch))
        return self.sample

    def _handled(self, sample: Sample) -> None:
        if self.backlog is not None:  # the read runs over several turns: not timed
            self.sample = None
            return
        sample.cpu = perf_counter() - sample.t0
        sample.last = self.replies[-1] if self.replies else True
        self._sample_done()

    def _sample_done(self) -> None:
        sample = self.sample
        if sample is None or sample.last is None:
            return
        last = sample.last
        if last is True or last.data is not None:  # type: ignore[attr-defined]  # a Pending
            self.sample = None
            self.stats.finish(sample, perf_counter() - sample.t0)

    def _run(self, batch: list[list[bytes]], bad: RequestError | None) -> None:
        handle = self.handle
        for argv in batch:
            handle(argv)
            if self.closing:
                break
        if bad is not None and not self.closing:
            self.reply(error(str(bad)))
            self.closing = True
        self.ctx.commands_processed += len(batch)
        self.write_ready()
        if (len(self.replies) + len(self.held) > MAX_INFLIGHT_REPLIES
                or self.held_bytes > MAX_HELD_BYTES) and not self.paused_for_depth:
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
        self.write_ready()

    def replies_arrived_soon(self) -> None:
        """`replies_arrived` once this event-loop turn is over: forwards answer one by one,
        and their replies leave in one write."""
        if not self.notify_soon:
            self.notify_soon = True
            asyncio.get_running_loop().call_soon(self._notify_now)

    def _notify_now(self) -> None:
        self.notify_soon = False
        self.replies_arrived()

    def raw_arrived(self, messages: list[bytes]) -> None:
        dedicated.raw_arrived(self, messages)

    def raw_closed(self) -> None:
        self.closing = True
        self.write_ready()

    def write_ready(self) -> None:
        replies = self.replies
        transport = self.transport
        if transport is None:
            replies.clear()
            return
        if replies:
            out = take_ready(replies)
            if out:
                transport.write(out[0] if len(out) == 1 else b"".join(out))
                if self.sample is not None:
                    self.sample.wrote += sum(map(len, out))
                    self._sample_done()
                if transport.get_write_buffer_size() > self.output_limit:
                    log.warning("client_output_limit", client=self.id, limit=self.output_limit)
                    transport.abort()
                    return
        if self.paused_for_depth and len(replies) + len(self.held) < MAX_INFLIGHT_REPLIES // 2 \
                and self.held_bytes < MAX_HELD_BYTES // 2:
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
        if data[:1] == b"-":  # an error the proxy answers itself
            self.stats.count_error(data)
        self.replies.append(Pending(data))

    def reply_value(self, value: object) -> None:
        self.replies.append(Pending(encode(value, self.resp3)))

    def reply_later(self) -> Pending:
        """A reply slot in order now, filled later (then call `replies_arrived`)."""
        pending = Pending()
        self.replies.append(pending)
        return pending

    def refuse(self, reply: bytes) -> None:
        """Answer an error instead of running the command; inside MULTI this dooms EXEC."""
        self.stats.count_error(reply)
        self.replies.append(Pending(reply))
        if self.in_multi:
            self.multi_failed = True

    # -- carrying out decisions --------------------------------------------------------------
    def _forward_plain(self, batch: list[list[bytes]], data: bytes) -> bool:
        """The fast path: when every command of `batch` is plain and served here, send `data`
        unchanged and take all their replies as one. False: nothing was done."""
        conn = self.conn
        if (self.barrier is not None or self.subscribed or self.in_multi or self.asking
                or conn.raw_sink is not None or len(self.replies) >= MAX_QUEUED_BATCHES
                or self.hops):
            return False
        control = self.control
        if not plain_batch(batch, control.table, self.tenant, self.auth_hash,
                           control.permission, clock.now()):
            return False
        self.asked = False
        pending = Pending() if len(batch) == 1 else Batch()
        self.replies.append(pending)
        conn.queue(data, pending, self, len(batch))
        if pending.data is not None:  # the backend is down: answered already
            self.write_ready()
        return True

    def handle(self, argv: list[bytes]) -> None:
        """Run one command now, or hold it until the barrier falls."""
        if self.barrier is not None:
            self.held.append(argv)
            self.held_bytes += sum(map(len, argv))
            return
        self.asked = self.asking  # ASKING covers the one command after it
        self.asking = False
        control = self.control
        if self.subscribed and argv[0].upper() != b"RESET" \
                and self.tenant == control.table.tenant:
            dedicated.send_subscribed(self, argv)
            return
        outcome = decide(argv, control.table, self, control.permission, clock.now())
        kind = outcome.__class__
        if self.plain and plain.handle(self, argv, outcome):
            return
        if kind is Forward:
            if outcome.synced:  # type: ignore[union-attr]  # the class test above
                self._forward_synced(argv)
            else:
                self.forward(argv)
        elif kind is Local:
            HANDLERS[outcome.name](self, argv)  # type: ignore[union-attr]  # the class test above
        elif kind is Queue:
            self.multi_slots.add(outcome.slot)  # type: ignore[union-attr]  # the class test above
            self.forward(argv)
        elif kind is Refuse or kind is Redirect:
            if outcome.reply is TRYAGAIN and self._hold_for_handover(argv):  # type: ignore[union-attr]  # the class test above
                return
            if self.in_multi and argv[0].upper() in (b"EXEC", b"DISCARD"):
                dedicated.end_transaction(self, outcome.reply)  # type: ignore[union-attr]  # the class test above
            else:
                self.refuse(outcome.reply)  # type: ignore[union-attr]  # the class test above
        elif kind is Gate:
            self._gate(argv, outcome)  # type: ignore[arg-type]  # the class test above
        elif kind is Dedicated:
            dedicated.run(self, argv, outcome)  # type: ignore[arg-type]  # the class test above
        elif kind is Disconnect:
            self.reply(outcome.reply)  # type: ignore[union-attr]  # the class test above
            self.closing = True
        elif self.admin and self.tenant:  # a peer's link is shared: it never subscribes
            self.refuse(error("ERR a peer link does not subscribe"))
        else:
            dedicated.subscribe(self, argv)

    def _hold_for_handover(self, argv: list[bytes]) -> bool:
        """A graceful handover runs (proxy/control.py HANDOVER_HOLD): hold `argv` until it
        ends, then decide it again (a MOVED to the new master, usually), instead of a TRYAGAIN
        that cluster clients retry for less time than a handover takes. Not inside MULTI,
        on a dedicated connection or subscribed: those get their TRYAGAIN."""
        if self.in_multi or self.dedicated is not None or self.subscribed:
            return False
        barrier = self.control.hold_handover(self)
        if barrier is None:
            return False
        earlier = newest_unanswered(self.replies)
        self.barrier = earlier if earlier is not None else barrier
        self.hold_again(argv)
        return True

    def hold_again(self, argv: list[bytes]) -> None:
        """A barrier went up while `argv` was being run: run it (decide it anew) after."""
        self.asking = self.asked
        self.held.append(argv)
        self.held_bytes += sum(map(len, argv))

    def forward(self, argv: list[bytes], pending: Pending | None = None) -> None:
        pending = pending or Pending()
        self.replies.append(pending)
        self.conn.queue(encode_command(argv), pending, self)

    def _forward_synced(self, argv: list[bytes]) -> None:
        # the WAIT behind the write holds its connection's stream: take one that only such
        # writes use (when nothing of this client's is in flight, so its order holds)
        if not self.conn.synced and not self.replies and self.dedicated is None:
            self.conn = self.ctx.pool.pick_synced(self.resp3)
        table = self.control.table
        pending = SyncedWrite(self, encode_command(argv), table.min_replicas_ack,
                              table.ack_timeout_ms)
        self.replies.append(pending)
        pending.queue_on(self.conn)

    def _gate(self, argv: list[bytes], route: Gate) -> None:
        gate = self.ctx.migrations.gates.get(route.migration_id)
        if gate is None:
            self.refuse(TRYAGAIN)
            return
        # the gate runs on connections of its own: what this client sent before runs first
        earlier = newest_unanswered(self.replies)
        if earlier is not None:
            self.barrier = earlier
            self.hold_again(argv)
            return
        pending = self.reply_later()
        gate.submit(self, argv, list(route.keys), route.slot, pending)
        if pending.data is None:
            self.barrier = pending

    def _release_held(self) -> None:
        """The barrier fell: run the held commands in order until one raises it again."""
        self.barrier = None
        held, self.held = self.held, []
        self.held_bytes = 0
        for argv in held:
            if self.closing:
                break
            self.handle(argv)  # with a barrier back up, this holds it again, in order

    # -- plain clients' forwards (proxy/forward.py) ------------------------------------------
    def peer_conn(self, address: str, argv: list[bytes]) -> BackendConnection:
        """The connection to the proxy at `address` for `argv`: a shared one, or for a
        command that takes a connection of its own there (a script, a blocking command)
        this client's own, so it never holds back other clients' commands."""
        if argv[0].upper() not in plain.OWN_CONNECTION:
            return self.ctx.peers.get(address, self.resp3)
        conn = self.own_peers.get((address, self.resp3))
        if conn is None or conn.closed:
            conn = self.own_peers[(address, self.resp3)] = peer_connection(
                address, self.resp3, self.ctx.admin_secret, self.tenant)
            conn.own = True
            self.owned.append(conn)
            self.ctx.spawn(keep_connected, conn)
        return conn

    def same_tenant(self) -> bool:
        return self.tenant == self.control.table.tenant

    def owner_of(self, slot: int) -> str | None:
        """The proxy that serves `slot` now (this one: its own cluster port), or None."""
        route = self.control.table.routes[slot]
        if route is None or route.__class__ is not bytes:
            return self.ctx.announce
        target = redirect_target(route)
        return target[1] if target is not None else None

    # -- dedicated connections ---------------------------------------------------------------
    def table_changed(self, table: RoutingTable) -> None:
        dedicated.table_changed(self, table)
        if self.own_peers and table.tenant != self.tenant:  # links for a cluster left
            for conn in self.own_peers.values():
                conn.close()
            self.own_peers.clear()

    def switch_to(self, conn: BackendConnection) -> None:
        """Send later commands on `conn`, only after everything already sent has replied."""
        if self.barrier is None:
            self.barrier = newest_unanswered(self.replies)
        self.conn = conn
