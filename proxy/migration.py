"""Slot migration on the data path: the gate that serializes clients against the key mover
(proxy/mover.py), and `Migrations`, which follows the routing table.

Every command on a migrating slot, on the source, goes through the gate: it asks the backend
whether the command's keys are here (`EXISTS`), then runs it here, forwards it to the target
proxy after ASKING (none are here: they moved, or never existed), or answers `-TRYAGAIN`
(some are). Forwarding instead of answering `-ASK` is deliberate: redis-py 8 fails with an
AttributeError on an ASK to a node missing from its slot map, which a new shard always is.
The mover moves a batch of keys only while no client command on those keys is between its
check and its reply, and clients that arrive for keys being moved wait for the batch. That
is the whole race of DESIGN.md section 7.4: a key is either here and served here, or gone and
served at the target, never both, and a delete here can never be undone by a late copy.

On the target, a multi-key command after ASKING runs only when all its keys are there.

The source gates a migration's slots from the first table it serves them with (after a
restart, a promotion or a cancel too). Until the start barrier has passed it forwards and
moves nothing: commands whose keys are all here run here, those with missing keys wait for
the barrier (GATE_BARRIER_WAIT, then -TRYAGAIN). Nothing runs until the mover has read the
journal (its keys may have a copy at the target: they stay held until the mover settles them).
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from enum import Enum
from typing import Protocol

import anyio
import structlog
from anyio.abc import TaskGroup

from .admission import DISPATCH, TRYAGAIN
from .backend import BackendConnection, BackendPool, Pending, keep_connected, request
from .link import Link
from .mover import (
    DirectCopy,
    MigrationProgress,
    Pacer,
    ProxyCopy,
    Side,
    direct_target,
    move_all,
    probe_direct,
    read_journal,
    settle,
)
from .peers import peer_connection
from .replies import SyncedWrite
from .resp import encode_command
from .routing import MigratingSlots, RoutingTable
from .stats import ProxyStats

FINISHED_KEPT = 60.0  # seconds a finished migration's last report stays in the status
log = structlog.get_logger("proxy.migration")

_ASKING = encode_command([b"ASKING"])
MOVE_RETRY_WAIT = 0.5  # after a failed attempt (the target unreachable, say)
GATE_DRAIN_TIMEOUT = 5.0  # an ended migration waits this long for gated commands in flight
# a command whose keys are missing on a source whose start barrier has not passed waits this
# long for it (they may be at the target), then gets TRYAGAIN
GATE_BARRIER_WAIT = 5.0


class Client(Protocol):
    """The session a gated command came from: its protocol, and where to say it is done."""

    resp3: bool
    stats: ProxyStats  # the gate's TRYAGAINs are counted there (proxy/stats.py)

    def replies_arrived(self) -> None: ...


class Checked(Enum):
    """What the gate does with a command once it knows how many of its keys are here."""

    RUN = "run"  # all here: run it here
    FORWARD = "forward"  # none here, on the source: the target has them (or nobody)
    WAIT = "wait"  # none here, on a source whose barrier has not passed: wait for it
    TRYAGAIN = "tryagain"  # split between the two sides


def after_check(present: int, keys: int, source: bool, ready: bool) -> Checked:
    """The gate's decision for a command with `present` of its `keys` here."""
    if present == keys:
        return Checked.RUN
    if present == 0 and source:
        return Checked.FORWARD if ready else Checked.WAIT
    return Checked.TRYAGAIN


def is_write(argv: list[bytes]) -> bool:
    """Redis flags the command (or its subcommand) as a write."""
    entry = DISPATCH.get(argv[0].upper())
    if entry is None:
        return False
    spec = entry[1]
    if spec.subcommands is not None and len(argv) > 1:
        spec = spec.subcommands.get(argv[1].upper(), spec)
    return "write" in spec.flags


class _Request:
    __slots__ = ("gate", "session", "argv", "keys", "slot", "pending", "check", "synced")

    def __init__(self, gate: SlotGate, session: Client, argv: list[bytes], keys: list[bytes],
                 slot: int, pending: Pending) -> None:
        self.gate, self.session, self.argv, self.keys = gate, session, argv, keys
        self.slot, self.pending = slot, pending
        self.check: Pending | None = Pending()
        self.synced: SyncedWrite | None = None  # synchronous mode: the write and its WAIT

    def replies_arrived(self) -> None:  # the backend answered the EXISTS, or ran the command
        if self.check is not None:
            self.gate._checked(self)
        else:
            if self.synced is not None:
                self.pending.data = self.synced.data
            self.gate._finished(self)


class SlotGate:
    """Check-then-run for the keys of one migration, ordered against the mover.

    `conns` reach the local backend and `forwards` the target proxy, one per RESP version so a
    client gets replies in its own protocol. On the source, nothing runs until the mover has
    read the journal (`load`): the keys in it may have a copy at the target and stay held
    until the mover settles them.
    """

    def __init__(self, marker: MigratingSlots, conns: dict[bool, BackendConnection],
                 forwards: dict[bool, BackendConnection],
                 refusal: Callable[[], bytes | None] = lambda: None) -> None:
        self.marker = marker
        # the node's fence, asked again when a command is about to run here: it was decided
        # when submitted, but may have waited (for the mover, or at a stalled Redis) since
        self.refusal = refusal
        self.conns = conns
        self.forwards = forwards
        self.moving: set[bytes] = set()
        self.busy: Counter[bytes] = Counter()
        self.waiting: list[_Request] = []
        self.unready: list[_Request] = []  # keys missing here, before the barrier passed
        self.quiet = anyio.Event()  # set when a busy key is released
        self.ready = anyio.Event()  # the barrier passed: forward, move
        if marker.ready:
            self.ready.set()
        self.loaded = not marker.source  # the journal was read (the target has none)
        self.closed = False

    def submit(self, session: Client, argv: list[bytes], keys: list[bytes], slot: int,
               pending: Pending) -> None:
        req = _Request(self, session, argv, keys, slot, pending)
        if self.closed:
            self._answer(req, TRYAGAIN)
        elif not self.loaded or self.moving.intersection(keys):
            self.waiting.append(req)
        else:
            self._start(req)

    def update(self, marker: MigratingSlots) -> None:
        """A new table with the same migration, peer and side: replica counts, readiness."""
        self.marker = marker
        if marker.ready and not self.ready.is_set():
            self.ready.set()
            unready, self.unready = self.unready, []
            for req in unready:
                self._start(req)

    def load(self, journal: list[bytes]) -> None:
        """The mover read the journal: hold its keys (they may be at the target too) and
        let the other commands run."""
        self.moving.update(journal)
        self.loaded = True
        self.release([])

    def _start(self, req: _Request) -> None:
        req.check = Pending()
        for k in req.keys:
            self.busy[k] += 1
        self.conns[req.session.resp3].queue(encode_command([b"EXISTS", *req.keys]), req.check, req)
        if req.check.data is not None:  # the connection is down: answered at once
            self._checked(req)

    def _checked(self, req: _Request) -> None:
        reply = req.check.data if req.check is not None else None
        req.check = None  # None marks the check answered
        if reply is None or reply[:1] != b":":  # the check failed: the command did not run
            self._finish(req, TRYAGAIN)
            return
        resp3 = req.session.resp3
        marker = self.marker
        decision = after_check(int(reply[1:-2]), len(req.keys), marker.source, marker.ready)
        if decision is Checked.RUN and (refused := self.refusal()) is not None:
            self._finish(req, refused)
        elif decision is Checked.RUN:
            conn = self.conns[resp3]
            if marker.min_replicas_ack and is_write(req.argv):
                req.synced = SyncedWrite(req, encode_command(req.argv), marker.min_replicas_ack,
                                         marker.ack_timeout_ms)
                req.synced.queue_on(conn)  # calls back once WAIT answered
                return
            conn.queue(encode_command(req.argv), req.pending, req)
            if req.pending.data is not None:
                self._finished(req)
        elif decision is Checked.FORWARD:
            forward = self.forwards[resp3]
            forward.queue(_ASKING, Pending(), None)
            forward.queue(encode_command(req.argv), req.pending, req)
            if req.pending.data is not None:
                self._finished(req)
        elif decision is Checked.WAIT:
            self._unbusy(req)
            self.unready.append(req)
            asyncio.get_running_loop().call_later(GATE_BARRIER_WAIT, self._barrier_late, req)
        else:
            self._finish(req, TRYAGAIN)

    def _barrier_late(self, req: _Request) -> None:
        if req in self.unready:
            self.unready.remove(req)
            self._answer(req, TRYAGAIN)

    def _finish(self, req: _Request, reply: bytes) -> None:
        req.pending.data = reply
        if reply is TRYAGAIN:
            req.session.stats.count_error(reply)
        self._finished(req)

    def _unbusy(self, req: _Request) -> None:
        for k in req.keys:
            self.busy[k] -= 1
            if not self.busy[k]:
                del self.busy[k]
        self.quiet.set()

    def _finished(self, req: _Request) -> None:
        self._unbusy(req)
        req.session.replies_arrived()

    def _answer(self, req: _Request, reply: bytes) -> None:
        req.pending.data = reply
        if reply is TRYAGAIN:
            req.session.stats.count_error(reply)
        req.session.replies_arrived()

    # -- the mover's side --------------------------------------------------------------------
    async def hold(self, keys: list[bytes]) -> None:
        """Stop new client commands on `keys` and wait for those in flight."""
        self.moving.update(keys)
        while any(k in self.busy for k in keys):
            self.quiet = anyio.Event()
            await self.quiet.wait()

    def release(self, keys: list[bytes]) -> None:
        self.moving.difference_update(keys)
        if not self.loaded:
            return
        ready = [r for r in self.waiting if not self.moving.intersection(r.keys)]
        self.waiting = [r for r in self.waiting if self.moving.intersection(r.keys)]
        for req in ready:
            self._start(req)

    def close(self) -> None:
        """The migration ended: waiting commands get TRYAGAIN (their slot has a new home)."""
        self.closed = True
        for req in self.waiting + self.unready:
            self._answer(req, TRYAGAIN)
        self.waiting.clear()
        self.unready.clear()



class Migrations:
    """The migrations this node takes part in, kept in step with the routing table: a gate
    per running migration, and on the source a mover task that copies its keys."""

    def __init__(self, pool: BackendPool, keys_per_second: int,
                 current_table: Callable[[], RoutingTable],
                 admin_secret: bytes | None = None,
                 refusal: Callable[[], bytes | None] = lambda: None) -> None:
        self.pool = pool
        self.refusal = refusal  # the node's fence now (proxy/control.py), for the gates
        self.keys_per_second = keys_per_second  # 0: no limit
        self.current_table = current_table
        self.admin_secret = admin_secret  # proven to the target proxy (the mesh secret)
        self.gates: dict[str, SlotGate] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._progress: dict[str, MigrationProgress] = {}
        # the last report of each migration that ended with every key moved, kept
        # FINISHED_KEPT seconds (by time.monotonic()) so `umctl-mesh ... --wait` can still count
        # the keys of a migration committed between two of its reads
        self._finished: dict[str, tuple[float, dict]] = {}
        # set when a migration's last gate has let go of its connections: the next mover of
        # the same migration reads the journal only after the last one's writes
        self._stopped: dict[str, anyio.Event] = {}
        self._movers: dict[str, tuple[Link, BackendConnection, Link]] = {}
        self._copiers: dict[str, DirectCopy | ProxyCopy] = {}
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        """Own the migrations' tasks until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None
                for gate in self.gates.values():
                    gate.close()

    def cut_in_flight(self) -> None:
        """The node was just fenced: drop the gates' and movers' links with commands in
        flight (a batch cut off stays journaled and is settled later)."""
        for gate in self.gates.values():
            for conn in [*gate.conns.values(), *gate.forwards.values()]:
                conn.abort()
        for backend, proxy, direct in self._movers.values():
            backend.abort()
            proxy.abort()
            direct.abort()
        for copier in self._copiers.values():
            copier.abort()

    def progress(self) -> dict[str, dict]:
        return {mid: p.as_dict() for mid, p in self._progress.items()}

    def reconcile(self, table: RoutingTable) -> None:
        running = table.migrations()
        for mid, (marker, mask) in running.items():
            gate = self.gates.get(mid)
            if gate is not None and gate.marker.source == marker.source \
                    and gate.marker.peer == marker.peer:
                gate.update(marker)
                continue
            if gate is not None:  # the other side failed over, or this node changed sides
                self._end(mid)
            conns = {resp3: self.pool.dedicated(resp3) for resp3 in (False, True)}
            forwards = {resp3: peer_connection(marker.peer, resp3, self.admin_secret)
                        for resp3 in (False, True)}
            gate = self.gates[mid] = SlotGate(marker, conns, forwards if marker.source else {},
                                              self.refusal)
            assert self._tg is not None, "Migrations.run() has not started"
            self._tg.start_soon(self._run, gate, mask)
        for mid in [m for m in self.gates if m not in running]:
            self._end(mid)

    def _end(self, mid: str) -> None:
        self.gates.pop(mid).close()
        scope = self._scopes.pop(mid, None)
        if scope is not None:
            scope.cancel()
        progress = self._progress.pop(mid, None)
        if progress is not None and progress.done:
            self._finished[mid] = (time.monotonic(), progress.as_dict())

    def finished(self) -> dict[str, dict]:
        """The final reports of migrations that ended done in the last FINISHED_KEPT s."""
        now = time.monotonic()
        self._finished = {m: f for m, f in self._finished.items() if now - f[0] < FINISHED_KEPT}
        return {m: report for m, (_, report) in self._finished.items()}

    async def _run(self, gate: SlotGate, mask: bytearray) -> None:
        mid = gate.marker.migration_id
        links = [*gate.conns.values(), *gate.forwards.values()]
        previous = self._stopped.get(mid)
        stopped = self._stopped[mid] = anyio.Event()
        with anyio.CancelScope() as scope:
            self._scopes[mid] = scope
            try:
                async with anyio.create_task_group() as tg:
                    for link in links:  # closed below, once commands in flight are answered
                        tg.start_soon(keep_connected, link, False)
                    if gate.marker.source:
                        if previous is not None:
                            await previous.wait()
                        await self._move_keys(gate, mask)
            finally:
                with anyio.move_on_after(GATE_DRAIN_TIMEOUT, shield=True):
                    while gate.busy:  # let checks in flight finish on their connection
                        await anyio.sleep(0.01)
                for link in links:
                    link.close()
                stopped.set()
                if self._stopped.get(mid) is stopped:
                    del self._stopped[mid]

    async def _move_keys(self, gate: SlotGate, mask: bytearray) -> None:
        mid = gate.marker.migration_id
        progress = self._progress.setdefault(mid, MigrationProgress(mid))
        side = Side(mid, lambda: gate.marker.replicas, lambda: gate.marker.peer_replicas)
        pacer = Pacer(lambda: self.keys_per_second if gate.marker.keys_per_second is None
                      else gate.marker.keys_per_second)
        log_ = log.bind(migration=mid)
        while True:
            # the default user: the journal is in a database clients cannot select
            password = self.pool.password
            backend = Link(self.pool.host, self.pool.port, password)
            proxy = peer_connection(gate.marker.peer, False, self.admin_secret)
            direct = direct_target(gate.marker.peer_backend, password)
            self._movers[mid] = (backend, proxy, direct)
            try:
                await backend.connect()
                entries, journaled = await read_journal(backend, mid)
                unsettled = sorted(set(journaled) | gate.moving)
                gate.load(unsettled)
                await gate.ready.wait()
                # Redis to Redis where the source's Redis reaches the target's, else through
                # the proxies: tried each time, the target may have failed over meanwhile
                why_not = await probe_direct(backend, direct, password, mid)
                if why_not is None:
                    copier: DirectCopy | ProxyCopy = DirectCopy(backend, direct, password, mid)
                else:
                    await proxy.connect()
                    # a command of a client's own (WAIT) gives this connection its own Redis
                    # connection at the target, so a WAIT after the RESTOREs waits for them
                    await request(proxy, [b"WAIT", b"0", b"0"])
                    copier = ProxyCopy(backend, proxy)
                self._copiers[mid] = copier
                if copier.method != progress.method:
                    if why_not is None:
                        log_.info("migration_method", method=copier.method)
                    else:  # slower, and big keys block Redis while they copy
                        log_.warning("migration_method", method=copier.method, why=why_not)
                    progress.method = copier.method
                if unsettled:
                    log_.info("migration_settling", keys=len(unsettled))
                    await settle(gate, entries, unsettled, backend, copier, side, progress)
                if progress.total_keys < 0:
                    progress.total_keys = await self._estimate(backend, mask)
                log_.info("migration_mover_started", keys=progress.total_keys)
                await move_all(gate, mask, backend, copier, side, progress, pacer)
                log_.info("migration_keys_moved", keys=progress.moved_keys,
                          passes=progress.passes, method=copier.method,
                          chunked=progress.chunked_keys)
                await anyio.sleep_forever()  # done: the commit removes the migration
            except OSError as exc:
                progress.error = str(exc)
                log_.warning("migration_batch_failed", error=str(exc))
            finally:
                for conn in (backend, proxy, direct):
                    conn.close()
                self._movers.pop(mid, None)
                self._copiers.pop(mid, None)
            await anyio.sleep(MOVE_RETRY_WAIT)

    async def _estimate(self, backend: Link, mask: bytearray) -> int:
        """The keys to move, guessed before the first pass has seen them: the node's keys in
        proportion to the slots moving among those it serves."""
        routes = self.current_table().routes
        served = sum(1 for r in routes if r is None or isinstance(r, MigratingSlots) and r.source)
        reply = await backend.call(b"DBSIZE")
        keys = reply if isinstance(reply, int) else 0
        return keys * sum(mask) // max(served, 1)
