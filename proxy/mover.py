"""The key mover: moves every key of a migration's slots from this node's Redis to the target.

Keys go in batches sized by bytes. A batch, with its keys held in the gate (no client command
on them runs meanwhile, proxy/migration.py): add them to the journal (a hash in the source
Redis's JOURNAL_DB, which clients cannot select, replicated with the rest: one field per
batch, its keys packed in the value); copy them to the target; then UNLINK them here, and
remove the batch from the journal once the replicas have the UNLINK (in the same MULTI when
there are none). Without replicas at the target, MIGRATE deletes what it copied itself (no
COPY). WAIT follows each step when the shard has live replicas (MOVE_ACK_TIMEOUT_MS):
- the journal not confirmed: nothing was copied; the keys are released, the batch retried.
- a copy refused, or the copies not confirmed at the target: the copies are deleted there
  (confirmed by WAIT too) and removed from the journal; if that cannot be confirmed either,
  the keys stay held and journaled until a later attempt settles them.
- the UNLINK not confirmed: the keys stay held and journaled (clients on them wait) and WAIT
  is tried again (MOVE_ACK_ATTEMPTS, then the batch is settled again) until the replicas have
  it, since a promoted replica would otherwise serve the old values, or settle them back over
  newer writes at the target.
A fenced node copies and undoes nothing: a replica may be promoted and own the keys.
A key in the journal may have a copy at the target; a restarted or promoted source holds the
journal's keys from its first moment and settles them first (copies again what is here,
forgets what is gone). So a copy at the target is only ever read once the source let go of
the key for good.

How a batch is copied is the copier's business, chosen by a probe when the mover starts:
- `DirectCopy`: the source Redis sends the keys straight to the target Redis with `MIGRATE
  ... COPY REPLACE KEYS`, in C; keys over BIG_KEY_BYTES are copied in chunks
  (proxy/chunked.py) so no step blocks either Redis for long.
- `ProxyCopy`, the fallback where the source Redis cannot reach the target Redis (or not
  with this node's password): DUMP here, RESTORE through the target proxy after ASKING.
Both keep the time a key has left (not its moment of expiry: the hosts' clocks may differ).
"""
from __future__ import annotations

import os
import time
from binascii import crc_hqx
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import structlog

from core.address import Address
from core.slots import SLOT_MASK, key_slot

from .backend import BackendConnection, request, request_many
from .chunked import ChunkedCopyUnsupported, copy_in_chunks
from .link import Link

log = structlog.get_logger("proxy.mover")

SCAN_COUNT = 1000  # keys per SCAN step
BATCH_BYTES = 512 * 1024  # a batch's size (MEMORY USAGE): one MIGRATE blocks Redis ~10 ms
BATCH_KEYS = 1024  # and at most this many keys
# under a rate limit: about this many batches a second, each at most RATED_BATCH_BYTES (one
# MIGRATE then blocks the source Redis well under a millisecond: client p99 stays near)
RATED_BATCHES_PER_SEC = 200
RATED_BATCH_BYTES = 64 * 1024
MIN_BATCH_KEYS = 16
BIG_KEY_BYTES = 1024 * 1024  # a key this big moves alone, in chunks (MIGRATE: ~10 ms per MB)
MOVES_IN_FLIGHT = 2  # batches between hold and release at once
MIGRATE_TIMEOUT_MS = 1000  # MIGRATE's I/O timeout (the source Redis waits this long at most)
PROBE_TIMEOUT_MS = 100  # the probe's: the source Redis is blocked while MIGRATE connects
DEFAULT_KEYS_PER_SECOND = 20_000  # the mover's rate limit (mesh-proxy --migration-rate; 0: none)
# WAIT's timeout for the replicas of either side to confirm a batch's journal, copies or UNLINK
MOVE_ACK_TIMEOUT_MS = 1000
MOVE_ACK_ATTEMPTS = 5  # WAITs for the UNLINK before the batch is retried (its keys stay held)
JOURNAL_DB = b"1"  # the source's journal lives here: no client can SELECT it
MARK_TTL_MS = 600_000

# MEMORY USAGE of each key (0: gone), in one round trip: O(1) per key (it samples collections)
_SIZES = (b"local s = {} for i, k in ipairs(KEYS) do "
          b"s[i] = redis.call('MEMORY', 'USAGE', k) or 0 end return s")


class Gate(Protocol):
    """What the mover needs of the slot gate (proxy/migration.py)."""

    moving: set[bytes]

    async def hold(self, keys: list[bytes]) -> None: ...
    def release(self, keys: list[bytes]) -> None: ...
    def refusal(self) -> bytes | None: ...


@dataclass
class MigrationProgress:
    """What the source reports about one migration (published in its status)."""

    migration_id: str
    # an estimate (the node's keys in proportion to the slots moving) until the first pass
    # has seen every key, then the count
    total_keys: int = -1
    moved_keys: int = 0
    moved_bytes: int = 0
    passes: int = 0
    method: str = ""  # "migrate" (Redis to Redis) or "proxy" (DUMP/RESTORE through proxies)
    chunked_keys: int = 0  # big keys copied in chunks
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
                "method": self.method, "chunked_keys": self.chunked_keys,
                "error": self.error, "keys_per_sec": round(rate, 1),
                "eta_sec": round(left / rate, 1) if rate and self.total_keys >= 0 else None,
                "started_at": self.started_at}


@dataclass(frozen=True, slots=True)
class Batch:
    keys: tuple[bytes, ...]
    size: int  # bytes, by MEMORY USAGE
    big: bool = False  # one key over BIG_KEY_BYTES: copied in chunks


def plan_batches(keys: list[bytes], sizes: list[int], batch_bytes: int = BATCH_BYTES,
                 batch_keys: int = BATCH_KEYS, big_key: int = BIG_KEY_BYTES) -> list[Batch]:
    """Group `keys` (with their MEMORY USAGE; 0: gone) into batches of at most `batch_bytes`
    and `batch_keys`; a key of `big_key` bytes or more is a batch of its own."""
    batches: list[Batch] = []
    run: list[bytes] = []
    run_size = 0
    for key, size in zip(keys, sizes):
        if size <= 0:
            continue
        if size >= big_key:
            batches.append(Batch((key,), size, True))
            continue
        if run and (run_size + size > batch_bytes or len(run) >= batch_keys):
            batches.append(Batch(tuple(run), run_size))
            run, run_size = [], 0
        run.append(key)
        run_size += size
    if run:
        batches.append(Batch(tuple(run), run_size))
    return batches


def journal_key(migration_id: str) -> bytes:
    """The hash, in the source's JOURNAL_DB, of the batches whose keys may have a copy at the
    target that the source has not settled yet (copied, not yet unlinked here or undone
    there): batch id -> its keys, packed."""
    return b"moonmesh:moving:" + migration_id.encode()


def pack_keys(keys: tuple[bytes, ...] | list[bytes]) -> bytes:
    """Keys as one value: each one's length (4 bytes, big-endian), then the key."""
    return b"".join(len(k).to_bytes(4, "big") + k for k in keys)


def unpack_keys(packed: bytes) -> list[bytes]:
    keys, i = [], 0
    while i + 4 <= len(packed):
        size = int.from_bytes(packed[i : i + 4], "big")
        keys.append(packed[i + 4 : i + 4 + size])
        i += 4 + size
    return keys


def mark_key(migration_id: str) -> bytes:
    """Written (in JOURNAL_DB) after each step WAIT confirms, so the connection has a write of
    its own to wait for (the UNLINK or the copies it confirms may be another connection's)."""
    return b"moonmesh:moved:" + migration_id.encode()


def confirmed(reply: bytes, replicas: int) -> bool:
    """WAIT's raw reply says `replicas` replicas have this connection's writes."""
    return reply[:1] == b":" and int(reply[1:-2]) >= replicas


def _marked_wait(migration_id: str, replicas: int) -> list[list[bytes]]:
    """A write of this connection's own in JOURNAL_DB, then WAIT for it (and so for every
    write the Redis applied before it)."""
    return [[b"SELECT", JOURNAL_DB],
            [b"SET", mark_key(migration_id), b"1", b"PX", b"%d" % MARK_TTL_MS],
            [b"SELECT", b"0"], [b"WAIT", b"%d" % replicas, b"%d" % MOVE_ACK_TIMEOUT_MS]]


async def _acked(link: Link, migration_id: str, replicas: int) -> bool:
    """Every write the Redis behind `link` applied so far reached `replicas` replicas."""
    if replicas <= 0:
        return True
    replies = await link.call_many(_marked_wait(migration_id, replicas))
    return isinstance(replies[-1], int) and replies[-1] >= replicas


class Copier(Protocol):
    """How a batch's keys get to the target, and how a failed copy is undone there."""

    method: str

    async def copy(self, keys: tuple[bytes, ...], move: bool = False) -> None:
        """Copy `keys` (those that exist) to the target, replacing what is there; OSError
        when they may not all have arrived. `move`: the copier may delete here what arrived
        (only asked when nothing needs confirming at the target first)."""

    async def copy_big(self, key: bytes) -> None:
        """Copy one big key, never blocking either Redis for long if the method allows."""

    async def confirmed(self, migration_id: str, replicas: int) -> bool:
        """The target's replicas have the copies made so far."""

    async def undo(self, migration_id: str, keys: tuple[bytes, ...], replicas: int) -> bool:
        """Delete what the target may have of `keys`: True once confirmed there."""

    def abort(self) -> None:
        """The node was fenced: stop copies on links of the copier's own."""


class DirectCopy:
    """MIGRATE from the source Redis straight to the target Redis (`target`: a connection
    of the mover's own to it, for WAIT, undo and chunked copies)."""

    method = "migrate"

    def __init__(self, backend: Link, target: Link, password: str | None,
                 migration_id: str) -> None:
        self.backend, self.target = backend, target
        self.migration_id = migration_id
        self._chunking: set[BackendConnection] = set()  # the links of chunked copies running
        self._migrate = [b"MIGRATE", target.host.encode(), b"%d" % target.port, b"", b"0",
                         b"%d" % MIGRATE_TIMEOUT_MS, b"COPY", b"REPLACE",
                         *([b"AUTH", password.encode()] if password else []), b"KEYS"]

    async def copy(self, keys: tuple[bytes, ...], move: bool = False) -> None:
        # without COPY, MIGRATE deletes each key here once the target has it: the batch's
        # UNLINK has nothing left to do
        migrate = self._migrate if not move else [a for a in self._migrate if a != b"COPY"]
        reply = await self.backend.call(*migrate, *keys)
        if reply != b"OK" and reply != b"NOKEY":
            raise OSError(f"MIGRATE to {self.target.host}:{self.target.port} failed: "
                          f"{str(reply)[:200]}")

    async def copy_big(self, key: bytes) -> None:
        # connections of its own: the chunks SELECT at the target while batches run
        source = BackendConnection(self.backend.host, self.backend.port, False,
                                   self.backend.password)
        target = BackendConnection(self.target.host, self.target.port, False,
                                   self.target.password)
        links = {source, target}
        self._chunking |= links
        try:
            await source.connect()
            await target.connect()
            # a name of its own: two copies may run, and one of an earlier attempt linger
            temp = b"moonmesh:chunk:%s:%s" % (self.migration_id.encode(), os.urandom(8).hex().encode())
            await copy_in_chunks(source, target, key, temp)
        except ChunkedCopyUnsupported:
            await self.copy((key,))  # whole, with MIGRATE (a stream with consumer groups)
        finally:
            self._chunking -= links
            source.close()
            target.close()

    def abort(self) -> None:
        """The node was fenced: chunked copies stop at their next step."""
        for link in self._chunking:
            link.close()

    async def confirmed(self, migration_id: str, replicas: int) -> bool:
        return await _acked(self.target, migration_id, replicas)

    async def undo(self, migration_id: str, keys: tuple[bytes, ...], replicas: int) -> bool:
        try:
            deleted = await self.target.call(b"DEL", *keys)
            return isinstance(deleted, int) and await _acked(self.target, migration_id, replicas)
        except OSError:
            return False


async def probe_direct(backend: Link, target: Link, password: str | None,
                       migration_id: str) -> str | None:
    """Can the source Redis MIGRATE to the target Redis? This node must reach it first (so
    an unreachable target costs the source Redis no blocked MIGRATE); then a throwaway key
    in JOURNAL_DB goes there and is deleted on both sides. None: it can; else why not."""
    probe = b"moonmesh:probe:" + migration_id.encode()
    try:
        await target.connect()
        replies = await backend.call_many([
            [b"SELECT", JOURNAL_DB], [b"SET", probe, b"1", b"PX", b"%d" % MARK_TTL_MS],
            [b"MIGRATE", target.host.encode(), b"%d" % target.port, b"", JOURNAL_DB,
             b"%d" % PROBE_TIMEOUT_MS, b"REPLACE",
             *([b"AUTH", password.encode()] if password else []), b"KEYS", probe],
            [b"DEL", probe], [b"SELECT", b"0"]])
        arrived = await target.call_many([[b"SELECT", JOURNAL_DB], [b"DEL", probe],
                                          [b"SELECT", b"0"]])
    except OSError as exc:
        return str(exc)
    if replies[2] != b"OK":
        return f"MIGRATE answered {replies[2]!r}"
    if arrived[1] != 1:
        return "the probe key did not arrive"
    return None


def direct_target(address: str, password: str | None) -> Link:
    peer = Address.parse(address)
    return Link(peer.host, peer.port, password)


class ProxyCopy:
    """DUMP here, RESTORE through the target proxy after ASKING (`target`: a connection to
    the target proxy, authenticated as a peer, with a Redis connection of its own there so
    WAIT covers its RESTOREs)."""

    method = "proxy"

    def __init__(self, backend: Link, target: BackendConnection) -> None:
        self.backend, self.target = backend, target

    async def copy(self, keys: tuple[bytes, ...], move: bool = False) -> None:
        dumps = await self.backend.call_many([c for k in keys
                                              for c in ([b"DUMP", k], [b"PTTL", k])])
        restore = restore_commands(keys, dumps)
        if not restore:
            return
        replies = await request_many(self.target, [list(c) for c in restore])
        failed = [r for r in replies[1::2] if r != b"+OK\r\n"]
        if failed:
            raise OSError(f"RESTORE at {self.target.host}:{self.target.port} failed: "
                          f"{failed[0][:200]!r}")

    async def copy_big(self, key: bytes) -> None:
        await self.copy((key,))  # whole: the target's Redis is out of this node's reach

    def abort(self) -> None:
        pass  # its links are the mover's

    async def confirmed(self, migration_id: str, replicas: int) -> bool:
        if replicas <= 0:
            return True
        reply = await request(self.target, [b"WAIT", b"%d" % replicas,
                                            b"%d" % MOVE_ACK_TIMEOUT_MS])
        return confirmed(reply, replicas)

    async def undo(self, migration_id: str, keys: tuple[bytes, ...], replicas: int) -> bool:
        try:
            deleted = await request_many(self.target,
                                         [c for k in keys for c in ([b"ASKING"], [b"DEL", k])])
            return all(r[:1] == b":" for r in deleted[1::2]) \
                and await self.confirmed(migration_id, replicas)
        except OSError:
            return False


def restore_commands(keys: tuple[bytes, ...], dumps: list[object]) -> list[tuple[bytes, ...]]:
    """ASKING + RESTORE for each key of `keys` that `dumps` (its DUMP and PTTL replies, in
    turn) shows present. The time left goes over, as with MIGRATE."""
    commands: list[tuple[bytes, ...]] = []
    for i, key in enumerate(keys):
        payload, expires = dumps[2 * i], dumps[2 * i + 1]
        if not isinstance(payload, bytes) or not isinstance(expires, int) or expires == -2:
            continue  # gone (deleted or expired): nothing to copy
        # a TTL of 0 would mean none: a key with under 1 ms left keeps 1 ms
        ttl = 0 if expires == -1 else max(expires, 1)
        commands += [(b"ASKING",), (b"RESTORE", key, b"%d" % ttl, payload, b"REPLACE")]
    return commands


@dataclass
class Side:
    """What a batch needs to know about the migration now (the marker may change)."""

    migration_id: str
    replicas: Callable[[], int]  # live replicas of this shard
    peer_replicas: Callable[[], int]  # of the target's shard


def _unless_fenced(gate: Gate) -> None:
    """A fenced node copies and undoes nothing: a replica may be promoted meanwhile, settle
    the keys and serve them (a late copy would overwrite what clients wrote since)."""
    if gate.refusal() is not None:
        raise OSError("this node is fenced")


async def move_batch(gate: Gate, batch: Batch, backend: Link, copier: Copier,
                     side: Side, progress: MigrationProgress) -> None:
    """Move `batch` (held meanwhile): journal it here (replicated), copy it to the target
    (replicated), then unlink it here (replicated) before any client is sent to the target
    for it. The journal entry goes only once the replicas have the unlink: until then a
    restarted or promoted source holds the keys."""
    mid = side.migration_id
    journal = journal_key(mid)
    entry = b"%d:%d" % (id(batch), time.monotonic_ns())  # this batch's field in the journal
    forget = [[b"SELECT", JOURNAL_DB], [b"HDEL", journal, entry], [b"SELECT", b"0"]]
    keys = list(batch.keys)
    _unless_fenced(gate)
    await gate.hold(keys)
    settled = True  # whatever the target has of these keys, nobody can read it there
    try:
        written = await backend.call_many([[b"SELECT", JOURNAL_DB],
                                           [b"HSET", journal, entry, pack_keys(keys)],
                                           [b"SELECT", b"0"]])
        if not isinstance(written[1], int):
            raise OSError(f"journal write failed: {written[1]!r}")
        if not await _acked(backend, mid, side.replicas()):
            raise OSError("the journal did not reach this shard's replicas in time")
        settled = False
        peer_replicas = side.peer_replicas()
        moving = not batch.big and peer_replicas == 0  # MIGRATE may delete as it copies
        try:
            _unless_fenced(gate)
            if batch.big:
                await copier.copy_big(keys[0])
                progress.chunked_keys += 1
            else:
                await copier.copy(batch.keys, moving)
            if not await copier.confirmed(mid, peer_replicas):
                raise OSError("the copies did not reach the target's replicas in time")
        except OSError:
            # undo what the target may have of the keys still here (what MIGRATE deleted
            # here arrived there for good, and is released once the replicas have the
            # delete); if that fails the keys stay held and journaled until a later attempt
            # settles them
            _unless_fenced(gate)
            undo = batch.keys if not moving else await _still_here(backend, batch.keys)
            if (not undo or await copier.undo(mid, undo, peer_replicas)) \
                    and (not moving or await _acked(backend, mid, side.replicas())):
                await backend.call_many(forget)
                settled = True
            raise
        replicated = side.replicas() > 0
        done = await backend.call_many([[b"MULTI"], [b"UNLINK", *keys],
                                        *([] if replicated else forget), [b"EXEC"]])
        result = done[-1]
        if not isinstance(result, list) or not isinstance(result[0], int):
            raise OSError(f"UNLINK failed: {str(result)[:200]}")
        # the copies are the live ones now: a promoted replica must not serve the old ones
        for _ in range(MOVE_ACK_ATTEMPTS):
            if await _acked(backend, mid, side.replicas()):
                settled = True
                break
            log.warning("migration_unlink_unconfirmed", migration=mid, keys=len(keys))
        if not settled:
            raise OSError("the UNLINK did not reach this shard's replicas in time")
        if replicated:
            await backend.call_many(forget)
        progress.moved_keys += len(keys) if moving else result[0]
        progress.moved_bytes += batch.size
        progress.error = ""
    finally:
        if settled:
            gate.release(keys)


async def _still_here(backend: Link, keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """Those of `keys` this Redis still has (an OSError leaves them all held: the others'
    only copy may be at the target)."""
    there = await backend.call_many([[b"EXISTS", k] for k in keys])
    return tuple(k for k, n in zip(keys, there) if n == 1)


async def sized(backend: Link, keys: list[bytes],
                limits: tuple[int, int] = (BATCH_BYTES, BATCH_KEYS)) -> list[Batch]:
    """`keys` in batches of at most `limits` (bytes, keys) by their size now (gone ones left
    out)."""
    if not keys:
        return []
    reply = await backend.call(b"EVAL", _SIZES, b"%d" % len(keys), *keys)
    if not isinstance(reply, list):
        raise OSError(f"sizing keys failed: {reply}")
    return plan_batches(keys, reply, *limits)


async def read_journal(backend: Link, migration_id: str) -> tuple[list[bytes], list[bytes]]:
    """The journal's batches (their fields) and their keys."""
    replies = await backend.call_many([[b"SELECT", JOURNAL_DB],
                                       [b"HGETALL", journal_key(migration_id)],
                                       [b"SELECT", b"0"]])
    fields = replies[1]
    if not isinstance(fields, list):
        raise OSError(f"reading the migration journal failed: {fields!r}")
    keys = {k for packed in fields[1::2] for k in unpack_keys(packed)}
    return fields[0::2], sorted(keys)


def batch_limits(rate: int) -> tuple[int, int]:
    """(bytes, keys) of a batch at `rate` keys/s (0: no limit)."""
    if rate <= 0:
        return BATCH_BYTES, BATCH_KEYS
    return RATED_BATCH_BYTES, max(MIN_BATCH_KEYS, min(BATCH_KEYS, rate // RATED_BATCHES_PER_SEC))


class Pacer:
    """Spaces batches so the mover stays under `rate()` keys/s (0: no limit), read live."""

    def __init__(self, rate: Callable[[], int]) -> None:
        self.rate = rate
        self.next_at = 0.0

    def limits(self) -> tuple[int, int]:
        """A batch's bytes and keys: under a rate, small batches often (each blocks the
        source Redis for well under a client's usual latency), else the biggest."""
        return batch_limits(self.rate())

    async def wait(self, keys: int) -> None:
        rate = self.rate()
        now = anyio.current_time()
        if rate <= 0:
            self.next_at = now
            return
        self.next_at = max(self.next_at, now)
        if self.next_at > now:
            await anyio.sleep(self.next_at - now)
        self.next_at += keys / rate


def in_slots(keys: list[bytes], mask: bytearray) -> list[bytes]:
    """The keys whose slot `mask` marks (without a hash tag in the page, the slot is just
    the CRC: no call per key)."""
    if b"{" in b"".join(keys):
        return [k for k in keys if mask[key_slot(k)]]
    return [k for k in keys if mask[crc_hqx(k, 0) & SLOT_MASK]]


async def settle(gate: Gate, entries: list[bytes], unsettled: list[bytes], backend: Link,
                 copier: Copier, side: Side, progress: MigrationProgress) -> None:
    """Copy again the journal's keys that are here (a copy may be at the target, the source
    never unlinked them), forget those that are gone (moved, or expired), then drop the
    journal's old `entries` (each batch here journals itself anew)."""
    batches = [b for i in range(0, len(unsettled), BATCH_KEYS)
               for b in await sized(backend, unsettled[i : i + BATCH_KEYS])]
    for batch in batches:
        await move_batch(gate, batch, backend, copier, side, progress)
    # the gone ones were deleted here by a batch that may not have seen its WAIT through
    if not await _acked(backend, side.migration_id, side.replicas()):
        raise OSError("the replicas have not confirmed the settled keys in time")
    if entries:
        await backend.call_many([[b"SELECT", JOURNAL_DB],
                                 [b"HDEL", journal_key(side.migration_id), *entries],
                                 [b"SELECT", b"0"]])
    gate.release(list(set(unsettled).difference(k for b in batches for k in b.keys)))


async def move_all(gate: Gate, mask: bytearray, backend: Link, copier: Copier,
                   side: Side, progress: MigrationProgress, pacer: Pacer) -> None:
    """Scan for the migration's keys until a whole pass finds none, moving them in batches,
    MOVES_IN_FLIGHT at once. Raises OSError on the first failure."""
    while not progress.done:
        found = await _one_pass(gate, mask, backend, copier, side, progress, pacer)
        progress.passes += 1
        if progress.passes == 1:  # every key there was has been seen: the estimate goes
            progress.total_keys = progress.moved_keys
        if found == 0:
            progress.done = True


async def _one_pass(gate: Gate, mask: bytearray, backend: Link, copier: Copier,
                    side: Side, progress: MigrationProgress, pacer: Pacer) -> int:
    failures: list[OSError] = []
    in_flight = anyio.Semaphore(MOVES_IN_FLIGHT)
    found = 0
    found_since: list[bytes] = []  # since the last batches were made

    async def move(batch: Batch) -> None:
        try:
            await move_batch(gate, batch, backend, copier, side, progress)
        except OSError as exc:
            failures.append(exc)
            tg.cancel_scope.cancel()
        finally:
            in_flight.release()

    async with anyio.create_task_group() as tg:
        try:
            cursor = b"0"
            while True:
                reply = await backend.call(b"SCAN", cursor, b"COUNT", b"%d" % SCAN_COUNT)
                if not isinstance(reply, list):
                    raise OSError(f"SCAN failed: {reply}")
                cursor, page = reply
                keys = in_slots(page, mask)
                found += len(keys)
                found_since += keys
                limits = pacer.limits()
                if len(found_since) < limits[1] and cursor != b"0":
                    continue  # a page holds few of the migration's keys: fill a batch first
                for batch in await sized(backend, found_since, limits):
                    await pacer.wait(len(batch.keys))
                    await in_flight.acquire()
                    tg.start_soon(move, batch)
                found_since = []
                if cursor == b"0":
                    break
        except OSError as exc:  # not out of the group: it would be an ExceptionGroup
            failures.append(exc)
            tg.cancel_scope.cancel()
    if failures:
        raise failures[0]
    return found
