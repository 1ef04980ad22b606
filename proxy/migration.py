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
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import hiredis
import structlog
from anyio.abc import TaskGroup

from core import secret
from core.address import Address
from core.slots import key_slot

from .admission import TRYAGAIN
from .backend import BackendConnection, BackendPool, Pending, keep_connected, request, request_many
from .resp import encode_command
from .routing import MigratingSlots, RoutingTable

log = structlog.get_logger("proxy.migration")

_ASKING = encode_command([b"ASKING"])
SCAN_COUNT = 1000
MOVE_BATCH = 128  # keys per DUMP/RESTORE/UNLINK round
DEFAULT_KEYS_PER_SECOND = 20_000  # the mover's rate limit (mesh-proxy --migration-rate)
MOVE_RETRY_WAIT = 0.5  # after a failed batch (the target unreachable, say)
GATE_DRAIN_TIMEOUT = 5.0  # an ended migration waits this long for gated commands in flight


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


class _Request:
    __slots__ = ("gate", "session", "argv", "keys", "slot", "pending", "check")

    def __init__(self, gate: SlotGate, session: Client, argv: list[bytes], keys: list[bytes],
                 slot: int, pending: Pending) -> None:
        self.gate, self.session, self.argv, self.keys = gate, session, argv, keys
        self.slot, self.pending = slot, pending
        self.check = Pending()

    def replies_arrived(self) -> None:  # the backend answered the EXISTS, or ran the command
        if self.check is not None:
            self.gate._checked(self)
        else:
            self.gate._finished(self)


class SlotGate:
    """Check-then-run for the keys of one migration, ordered against the mover.

    `conns` reach the local backend and `forwards` the target proxy, one per RESP version so a
    client gets replies in its own protocol.
    """

    def __init__(self, marker: MigratingSlots, conns: dict[bool, BackendConnection],
                 forwards: dict[bool, BackendConnection]) -> None:
        self.marker = marker
        self.conns = conns
        self.forwards = forwards
        self.moving: set[bytes] = set()
        self.busy: Counter[bytes] = Counter()
        self.waiting: list[_Request] = []
        self.quiet = anyio.Event()  # set when a busy key is released
        self.closed = False

    def submit(self, session: Client, argv: list[bytes], keys: list[bytes], slot: int,
               pending: Pending) -> None:
        req = _Request(self, session, argv, keys, slot, pending)
        if self.closed:
            self._answer(req, TRYAGAIN)
        elif self.moving.intersection(keys):
            self.waiting.append(req)
        else:
            self._start(req)

    def _start(self, req: _Request) -> None:
        for k in req.keys:
            self.busy[k] += 1
        self.conns[req.session.resp3].queue(encode_command([b"EXISTS", *req.keys]), req.check, req)
        if req.check.data is not None:  # the connection is down: answered at once
            self._checked(req)

    def _checked(self, req: _Request) -> None:
        reply = req.check.data
        req.check = None  # type: ignore[assignment]  # None marks the check answered
        if reply is None or reply[:1] != b":":  # the check failed: the command did not run
            self._finish(req, TRYAGAIN)
            return
        present = int(reply[1:-2])
        resp3 = req.session.resp3
        if present == len(req.keys):
            self.conns[resp3].queue(encode_command(req.argv), req.pending, req)
            if req.pending.data is not None:
                self._finished(req)
        elif present == 0 and self.marker.source:
            forward = self.forwards[resp3]
            forward.queue(_ASKING, Pending(), None)
            forward.queue(encode_command(req.argv), req.pending, req)
            if req.pending.data is not None:
                self._finished(req)
        else:
            self._finish(req, TRYAGAIN)

    def _finish(self, req: _Request, reply: bytes) -> None:
        req.pending.data = reply
        self._finished(req)

    def _finished(self, req: _Request) -> None:
        for k in req.keys:
            self.busy[k] -= 1
            if not self.busy[k]:
                del self.busy[k]
        self.quiet.set()
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
        ready = [r for r in self.waiting if not self.moving.intersection(r.keys)]
        self.waiting = [r for r in self.waiting if self.moving.intersection(r.keys)]
        for req in ready:
            self._start(req)

    def close(self) -> None:
        """The migration ended: waiting commands get TRYAGAIN (their slot has a new home)."""
        self.closed = True
        for req in self.waiting:
            self._answer(req, TRYAGAIN)
        self.waiting.clear()


def _parse(raw: bytes) -> object:
    reader = hiredis.Reader()
    reader.feed(raw)
    return reader.gets()


async def run_mover(gate: SlotGate, mask: bytearray, backend: BackendConnection,
                    target: BackendConnection, progress: MigrationProgress,
                    keys_per_second: int = DEFAULT_KEYS_PER_SECOND) -> None:
    """Move every key of the migration's slots from the backend to the target proxy, then
    keep reporting done until cancelled (the commit removes the migration)."""
    log_ = log.bind(migration=gate.marker.migration_id)
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
    await gate.hold(keys)
    try:
        dumps = await request_many(backend, [c for k in keys
                                             for c in ([b"DUMP", k], [b"PEXPIRETIME", k])])
        restore: list[list[bytes]] = []
        moved: list[bytes] = []
        size = 0
        for i, key in enumerate(keys):
            payload, expires = _parse(dumps[2 * i]), _parse(dumps[2 * i + 1])
            if not isinstance(payload, bytes) or not isinstance(expires, int) or expires == -2:
                continue  # gone meanwhile (deleted or expired): nothing to move
            cmd = [b"RESTORE", key, b"%d" % max(expires, 0), payload, b"REPLACE"]
            if expires > 0:
                cmd.append(b"ABSTTL")
            restore += [[b"ASKING"], cmd]
            moved.append(key)
            size += len(payload)
        if moved:
            replies = await request_many(target, restore)
            failed = [r for r in replies[1::2] if r != b"+OK\r\n"]
            if failed:
                raise OSError(f"RESTORE at {gate.marker.peer} failed: {failed[0]!r}")
            deleted = await request(backend, [b"UNLINK", *moved])
            if deleted[:1] != b":":
                raise OSError(f"UNLINK failed: {deleted!r}")
            progress.moved_keys += len(moved)
            progress.moved_bytes += size
        progress.error = ""
    finally:
        gate.release(keys)


class Migrations:
    """The migrations this node takes part in, kept in step with the routing table: a gate
    per running migration, and on the source a mover task that copies its keys."""

    def __init__(self, pool: BackendPool, keys_per_second: int,
                 current_table: Callable[[], RoutingTable],
                 admin_secret: bytes | None = None) -> None:
        self.pool = pool
        self.keys_per_second = keys_per_second  # 0: no limit
        self.current_table = current_table
        self.admin_secret = admin_secret  # proven to the target proxy (the mesh secret)
        self.gates: dict[str, SlotGate] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._progress: dict[str, MigrationProgress] = {}
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

    def progress(self) -> dict[str, dict]:
        return {mid: p.as_dict() for mid, p in self._progress.items()}

    def reconcile(self, table: RoutingTable) -> None:
        running = table.migrations()
        for mid, (marker, mask) in running.items():
            gate = self.gates.get(mid)
            if gate is not None and gate.marker.source == marker.source:
                continue
            if gate is not None:
                self._end(mid)
            conns = {resp3: self.pool.dedicated(resp3) for resp3 in (False, True)}
            forwards = {resp3: self._peer_connection(marker.peer, resp3) for resp3 in (False, True)}
            gate = self.gates[mid] = SlotGate(marker, conns, forwards if marker.source else {})
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
        with anyio.CancelScope() as scope:
            self._scopes[mid] = scope
            try:
                async with anyio.create_task_group() as tg:
                    for link in links:  # closed below, once commands in flight are answered
                        tg.start_soon(keep_connected, link, False)
                    if gate.marker.source:
                        await self._move_keys(gate, mask)
            finally:
                with anyio.move_on_after(GATE_DRAIN_TIMEOUT, shield=True):
                    while gate.busy:  # let checks in flight finish on their connection
                        await anyio.sleep(0.01)
                for link in links:
                    link.close()

    async def _move_keys(self, gate: SlotGate, mask: bytearray) -> None:
        mid = gate.marker.migration_id
        progress = self._progress.setdefault(mid, MigrationProgress(mid))
        while True:
            backend = self.pool.dedicated(False)
            target = self._peer_connection(gate.marker.peer, False)
            try:
                await backend.connect()
                await target.connect()
                await run_mover(gate, mask, backend, target, progress, self.keys_per_second)
            except OSError as exc:
                progress.error = str(exc)
                log.warning("migration_batch_failed", migration=mid, error=str(exc))
            finally:
                backend.close()
                target.close()
            await anyio.sleep(MOVE_RETRY_WAIT)
