"""Slot migration on the data path: the gate that serializes clients against the key mover,
and the mover itself.

Every command on a migrating slot, on the source, goes through the gate: it asks the backend
whether the command's keys are here (`EXISTS`), then runs it here, forwards it to the target
proxy after ASKING (none are here: they moved, or never existed), or answers `-TRYAGAIN`
(some are). Forwarding instead of answering `-ASK` is deliberate: redis-py 8 fails with an
AttributeError on an ASK to a node missing from its slot map, which a new shard always is.
The mover moves a batch of keys only while no client command on those keys is between its
check and its reply, and clients
that arrive for keys being moved wait for the batch. That is the whole race of DESIGN.md
section 7.4: a key is either here and served here, or gone and served at the target, never
both, and a delete here can never be undone by a late copy.

On the target, a multi-key command after ASKING runs only when all its keys are there.

The source gates a migration's slots from the first table it serves them with (after a
restart, a promotion or a cancel too). Until the start barrier has passed it forwards and
moves nothing: commands whose keys are all here run here, those with missing keys wait for
the barrier (GATE_BARRIER_WAIT, then -TRYAGAIN). Nothing runs until the mover has read the
journal.

A batch, with its keys held: DUMP them; add them to the journal (a set in the source Redis's
JOURNAL_DB, which clients cannot select, replicated with the rest); copy them to the target
(RESTORE after ASKING); then one MULTI here UNLINKs them and removes them from the journal.
WAIT follows each step when the shard has live replicas (MOVE_ACK_TIMEOUT_MS):
- the journal not confirmed: nothing was copied; the keys are released, the batch retried.
- a RESTORE refused, or the copies not confirmed at the target: the copies are deleted there
  (confirmed by WAIT too) and removed from the journal; if that cannot be confirmed either,
  the keys stay held and journaled until a later attempt settles them.
- the UNLINK not confirmed: the keys stay held (clients on them wait) and WAIT is tried again
  (MOVE_ACK_ATTEMPTS, then the batch is retried) until the replicas have it, since a promoted
  replica would otherwise serve the old values. A replica the leader marks failed stops
  counting when the view says so.
A key in the journal may have a copy at the target; a restarted or promoted source holds the
journal's keys from its first moment and settles them first (copies again what is here,
forgets what is gone). So a copy at the target is only ever read once the source let go of
the key for good.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import anyio
import hiredis
import structlog
from anyio.abc import TaskGroup

from core import secret
from core.address import Address
from core.slots import key_slot

from .admission import DISPATCH, TRYAGAIN
from .backend import BackendConnection, BackendPool, Pending, keep_connected, request, request_many
from .replies import SyncedWrite
from .resp import encode_command
from .routing import MigratingSlots, RoutingTable

log = structlog.get_logger("proxy.migration")

_ASKING = encode_command([b"ASKING"])
SCAN_COUNT = 1000
MOVE_BATCH = 128  # keys per DUMP/RESTORE/UNLINK round
DEFAULT_KEYS_PER_SECOND = 20_000  # the mover's rate limit (mesh-proxy --migration-rate)
MOVE_RETRY_WAIT = 0.5  # after a failed batch (the target unreachable, say)
GATE_DRAIN_TIMEOUT = 5.0  # an ended migration waits this long for gated commands in flight
# a command whose keys are missing on a source whose start barrier has not passed waits this
# long for it (they may be at the target), then gets TRYAGAIN
GATE_BARRIER_WAIT = 5.0
# WAIT's timeout for the replicas of either side to confirm a batch's journal, copies or UNLINK
MOVE_ACK_TIMEOUT_MS = 1000
MOVE_ACK_ATTEMPTS = 5  # WAITs for the UNLINK before the batch is retried (its keys stay held)
JOURNAL_DB = b"1"  # the source's journal lives here: no client can SELECT it
MARK_TTL_MS = 600_000


@dataclass
class MigrationProgress:
    """What the source reports about one migration (published in its status)."""

    migration_id: str
    total_keys: int = -1  # counted by a first scan before anything moves; -1: not yet
    moved_keys: int = 0
    moved_bytes: int = 0
    passes: int = 0
    started_at: float = field(default_factory=time.time)
    done: bool = False
    error: str = ""

    def as_dict(self) -> dict:
        elapsed = max(time.time() - self.started_at, 1e-6)
        rate = self.moved_keys / elapsed
        left = 0 if self.done else max(self.total_keys - self.moved_keys, 0)
        return {"total_keys": self.total_keys, "moved_keys": self.moved_keys,
                "left_keys": left if self.total_keys >= 0 else None,
                "moved_bytes": self.moved_bytes, "passes": self.passes, "done": self.done,
                "error": self.error, "keys_per_sec": round(rate, 1),
                "eta_sec": round(left / rate, 1) if rate and self.total_keys >= 0 else None,
                "started_at": self.started_at}


class Client(Protocol):
    """The session a gated command came from: its protocol, and where to say it is done."""

    resp3: bool

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


def _parse(raw: bytes) -> object:
    reader = hiredis.Reader()
    reader.feed(raw)
    return reader.gets()


def journal_key(migration_id: str) -> bytes:
    """The set, in the source's JOURNAL_DB, of the keys that may have a copy at the target
    that the source has not settled yet (copied, not yet unlinked here or undone there)."""
    return b"moonmesh:moving:" + migration_id.encode()


def mark_key(migration_id: str) -> bytes:
    """Written in each batch's transaction, so a WAIT on the mover's connection has a write
    of its own to wait for (the UNLINK it confirms may be an earlier connection's)."""
    return b"moonmesh:moved:" + migration_id.encode()


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """What one batch does, from the DUMP and PTTL replies of its keys."""

    present: tuple[bytes, ...]  # copied to the target, then unlinked here
    restore: tuple[tuple[bytes, ...], ...]  # ASKING + RESTORE, for the target proxy
    size: int  # bytes of the copies


def plan_batch(keys: list[bytes], dumps: list[bytes]) -> BatchPlan:
    """`dumps`: the DUMP and PTTL replies of `keys`, in turn. The time left goes over, not
    the moment of expiry (PEXPIRETIME + ABSTTL would trust that both hosts' wall clocks
    agree); a key lives at most the copy's transfer time longer, as with Redis's MIGRATE."""
    restore: list[tuple[bytes, ...]] = []
    present: list[bytes] = []
    size = 0
    for i, key in enumerate(keys):
        payload, expires = _parse(dumps[2 * i]), _parse(dumps[2 * i + 1])
        if not isinstance(payload, bytes) or not isinstance(expires, int) or expires == -2:
            continue  # gone (deleted or expired): nothing to copy
        # a TTL of 0 would mean none: a key with under 1 ms left keeps 1 ms
        ttl = 0 if expires == -1 else max(expires, 1)
        cmd: tuple[bytes, ...] = (b"RESTORE", key, b"%d" % ttl, payload, b"REPLACE")
        restore += [(b"ASKING",), cmd]
        present.append(key)
        size += len(payload)
    return BatchPlan(tuple(present), tuple(restore), size)


def confirmed(reply: bytes, replicas: int) -> bool:
    """WAIT's raw reply says `replicas` replicas have this connection's writes."""
    return reply[:1] == b":" and int(reply[1:-2]) >= replicas


async def _acked(conn: BackendConnection, replicas: int) -> bool:
    """The writes sent on `conn` reached `replicas` replicas within MOVE_ACK_TIMEOUT_MS."""
    if replicas <= 0:
        return True
    reply = await request(conn, [b"WAIT", b"%d" % replicas, b"%d" % MOVE_ACK_TIMEOUT_MS])
    return confirmed(reply, replicas)


async def read_journal(backend: BackendConnection, migration_id: str) -> list[bytes]:
    replies = await request_many(backend, [[b"SELECT", JOURNAL_DB],
                                           [b"SMEMBERS", journal_key(migration_id)],
                                           [b"SELECT", b"0"]])
    members = _parse(replies[1])
    if not isinstance(members, list):
        raise OSError(f"reading the migration journal failed: {replies[1]!r}")
    return sorted(members)


async def run_mover(gate: SlotGate, mask: bytearray, backend: BackendConnection,
                    target: BackendConnection, progress: MigrationProgress,
                    keys_per_second: int = DEFAULT_KEYS_PER_SECOND) -> None:
    """Move every key of the migration's slots from the backend to the target proxy, then
    keep reporting done until cancelled (the commit removes the migration).

    First the keys left unsettled (in the journal, or held after a failed batch) are held,
    and, once the barrier has passed, settled."""
    mid = gate.marker.migration_id
    log_ = log.bind(migration=mid)
    unsettled = sorted(set(await read_journal(backend, mid)) | gate.moving)
    gate.load(unsettled)
    await gate.ready.wait()
    if unsettled:
        log_.info("migration_settling", keys=len(unsettled))
        await _move_batch(gate, unsettled, backend, target, progress)
    interval = MOVE_BATCH / keys_per_second if keys_per_second > 0 else 0.0
    if progress.total_keys < 0:  # count first, so progress has a total and an ETA
        total, cursor = 0, b"0"
        while True:
            reply = _parse(await request(backend, [b"SCAN", cursor, b"COUNT", b"%d" % SCAN_COUNT]))
            if not isinstance(reply, list):
                raise OSError(f"SCAN failed: {reply}")
            cursor, batch = reply
            total += sum(1 for k in batch if mask[key_slot(k)])
            if cursor == b"0":
                break
        progress.total_keys = total
    log_.info("migration_mover_started", keys=progress.total_keys)
    while not progress.done:
        cursor = b"0"
        found = 0
        while True:
            reply = _parse(await request(backend, [b"SCAN", cursor, b"COUNT", b"%d" % SCAN_COUNT]))
            if not isinstance(reply, list):
                raise OSError(f"SCAN failed: {reply}")
            cursor, batch = reply
            keys = [k for k in batch if mask[key_slot(k)]]
            found += len(keys)
            for i in range(0, len(keys), MOVE_BATCH):
                started = time.monotonic()
                await _move_batch(gate, keys[i : i + MOVE_BATCH], backend, target, progress)
                await anyio.sleep(max(0.0, interval - (time.monotonic() - started)))
            if cursor == b"0":
                break
        progress.passes += 1
        if found == 0:
            progress.done = True
            log_.info("migration_keys_moved", keys=progress.moved_keys, passes=progress.passes)
    await anyio.sleep_forever()


async def _move_batch(gate: SlotGate, keys: list[bytes], backend: BackendConnection,
                      target: BackendConnection, progress: MigrationProgress) -> None:
    """Move `keys` (held meanwhile): journal them here (replicated), copy them to the target
    (replicated), then unlink them here and clear them from the journal in one transaction
    (replicated) before any client is sent to the target for them.

    A key's copy at the target is never seen while the source still serves the key: until
    the batch is settled the keys stay held. A failure before anything was copied releases
    them; a failure after the copy tries to undo it at the target, and if that cannot be
    confirmed either, the keys stay held (and journaled) until a later attempt settles them.
    """
    mid = gate.marker.migration_id
    journal = journal_key(mid)
    if gate.refusal() is not None:  # a fenced node moves nothing: a replica may be promoted
        raise OSError("this node is fenced")
    await gate.hold(keys)
    settled = True  # whatever the target has of these keys, nobody can read it there
    try:
        dumps = await request_many(backend, [c for k in keys
                                             for c in ([b"DUMP", k], [b"PTTL", k])])
        plan = plan_batch(keys, dumps)
        present = list(plan.present)
        if present:
            written = await request_many(backend, [[b"SELECT", JOURNAL_DB],
                                                   [b"SADD", journal, *present],
                                                   [b"SELECT", b"0"]])
            if written[1][:1] != b":":
                raise OSError(f"journal write failed: {written[1]!r}")
            if not await _acked(backend, gate.marker.replicas):
                raise OSError("the journal did not reach this shard's replicas in time")
            settled = False
            replies = await request_many(target, [list(c) for c in plan.restore])
            failed = [r for r in replies[1::2] if r != b"+OK\r\n"]
            if failed or not await _acked(target, gate.marker.peer_replicas):
                settled = await _undo(gate, present, backend, target)
                raise OSError(f"RESTORE at {gate.marker.peer} failed: "
                              f"{failed[0] if failed else b'not replicated in time'!r}")
        txn = [[b"MULTI"], *([[b"UNLINK", *present]] if present else []),
               [b"SELECT", JOURNAL_DB], [b"SREM", journal, *keys],
               [b"SET", mark_key(mid), b"%d" % progress.moved_keys, b"PX", b"%d" % MARK_TTL_MS],
               [b"SELECT", b"0"], [b"EXEC"]]
        settled = False
        done = await request_many(backend, txn)
        if done[-1][:1] != b"*":
            raise OSError(f"UNLINK failed: {done[-1]!r}")
        # the copies are the live ones now: a promoted replica must not serve the old ones
        for _ in range(MOVE_ACK_ATTEMPTS):
            if await _acked(backend, gate.marker.replicas):
                settled = True
                break
            log.warning("migration_unlink_unconfirmed", migration=mid, keys=len(keys))
        if not settled:
            raise OSError("the UNLINK did not reach this shard's replicas in time")
        progress.moved_keys += len(present)
        progress.moved_bytes += plan.size
        progress.error = ""
    finally:
        if settled:
            gate.release(keys)


async def _undo(gate: SlotGate, keys: list[bytes], backend: BackendConnection,
                target: BackendConnection) -> bool:
    """A copy failed part-way: delete what the target may have of `keys` and clear them
    from the journal. True once the target's deletion is confirmed (its replicas too)."""
    try:
        deleted = await request_many(target, [c for k in keys for c in ([b"ASKING"], [b"DEL", k])])
        if any(r[:1] != b":" for r in deleted[1::2]) \
                or not await _acked(target, gate.marker.peer_replicas):
            return False
        await request_many(backend, [[b"SELECT", JOURNAL_DB],
                                     [b"SREM", journal_key(gate.marker.migration_id), *keys],
                                     [b"SELECT", b"0"]])
    except OSError:
        return False
    return True


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
        # set when a migration's last gate has let go of its connections: the next mover of
        # the same migration reads the journal only after the last one's writes
        self._stopped: dict[str, anyio.Event] = {}
        self._movers: dict[str, tuple[BackendConnection, BackendConnection]] = {}
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
        for backend, target in self._movers.values():
            backend.abort()
            target.abort()

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
            forwards = {resp3: self._peer_connection(marker.peer, resp3) for resp3 in (False, True)}
            gate = self.gates[mid] = SlotGate(marker, conns, forwards if marker.source else {},
                                              self.refusal)
            assert self._tg is not None, "Migrations.run() has not started"
            self._tg.start_soon(self._run, gate, mask)
        for mid in [m for m in self.gates if m not in running]:
            self._end(mid)

    def _peer_connection(self, address: str, resp3: bool) -> BackendConnection:
        """A connection to another proxy of this cluster, authenticated as a peer by the
        mesh secret (challenge-response: the secret never crosses the wire)."""
        peer = Address.parse(address)
        key = self.admin_secret
        prove = None if key is None else (
            lambda nonce: [b"UMCTL", b"PROVE", secret.proof(key, nonce)])
        return BackendConnection(peer.host, peer.port, resp3, prove=prove)

    def _end(self, mid: str) -> None:
        self.gates.pop(mid).close()
        scope = self._scopes.pop(mid, None)
        if scope is not None:
            scope.cancel()
        self._progress.pop(mid, None)

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
        while True:
            # the default user: the journal is in a database clients cannot select
            backend = BackendConnection(self.pool.host, self.pool.port, False, self.pool.password)
            target = self._peer_connection(gate.marker.peer, False)
            self._movers[mid] = (backend, target)
            try:
                await backend.connect()
                await target.connect()
                # a command of a client's own (WAIT) gives this connection its own Redis
                # connection at the target, so the WAIT after the RESTOREs waits for them
                await request(target, [b"WAIT", b"0", b"0"])
                await run_mover(gate, mask, backend, target, progress, self.keys_per_second)
            except OSError as exc:
                progress.error = str(exc)
                log.warning("migration_batch_failed", migration=mid, error=str(exc))
            finally:
                backend.close()
                target.close()
                self._movers.pop(mid, None)
            await anyio.sleep(MOVE_RETRY_WAIT)
