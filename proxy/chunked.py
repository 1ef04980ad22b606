"""Copy one big key from one Redis to another in small steps (for the slot mover).

`MIGRATE`/`DUMP`/`RESTORE` serialize a whole key in one command: a 100 MB string or a hash of a
million fields blocks its Redis for that long. `copy_in_chunks` reads the key at the source a
chunk at a time and builds a copy under a temporary name in the target's database 1 (clients
cannot select it through the proxies), then puts the copy in place in one atomic step. Every
command either side runs is bounded (CHUNK_BYTES, CHUNK_ELEMENTS): each step costs either
Redis about a millisecond (measured: p50 under 1 ms, p99 under 4 ms on a busy host), with one
exception, a big string at a target with AOF or replicas (below).

The pure part (values in, values out) plans the steps: what to read next
(`read_command`: GETRANGE by byte range, HSCAN/SSCAN/ZSCAN by cursor, LRANGE by index, XRANGE
after the last id read), what to write for what was read (`plan_chunk`: HSET, SADD, ZADD with
the scores as read, RPUSH, XADD with the entries' ids), the transaction a chunk is written in
(`write_transaction`), a stream's metadata (`stream_finish`: XSETID), the TTL the copy gets
(`ttl_left`) and the final step (`finalize_command`).

A string is never grown with APPEND: measured on Redis 7.0 (jemalloc), a string grown in 1 MiB
steps is reallocated and copied each time it crosses an allocation size class (about every 25%),
and those steps took 20-260 ms each for a 100 MB string. How it is built depends on the target:
- its writes go nowhere else (no AOF, no replication backlog): ONE `SET` whose value is streamed
  as it is read, a GETRANGE at a time, on a connection of its own. Redis reads a big argument
  straight into the buffer that becomes the value, a socket read at a time, and the SET then
  costs O(1): nothing at the target takes a millisecond.
- its writes propagate (AOF, replicas): that SET would be copied whole into the AOF or the
  replication buffer when it runs (measured: a 432 ms AOF write for 100 MB). Instead the first
  step makes the string full size (SETRANGE at its end) and each piece is a 1 MiB SETRANGE into
  it: ONE step that costs about 1 ms per MB (Redis zeroes the new string: 75-110 ms for 100 MB
  here), then steps of about 0.1 ms. No Redis 7.0 command builds a big string with less.

The atomic step is a Lua script (`FINALIZE_SCRIPT`) at the target: it UNLINKs `key` in db 0 and
brings the copy over under `key` with the TTL left. MOVE keeps a key's name and refuses to
overwrite, and RENAME in db 1 could clobber a db-1 key named like the user key (a journal, say),
so the script crosses databases under a name it has checked is free: see the script's comment.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import anyio
import hiredis
import structlog

from .backend import CONNECT_TIMEOUT, BackendConnection, Batch
from .resp import ReplyScanner, encode_command

log = structlog.get_logger("proxy.chunked")

# of a string per GETRANGE (p50 0.1 ms) and SETRANGE; the byte budget of a collection's chunk
CHUNK_BYTES = 1 << 20
# elements per SCAN/LRANGE/XRANGE and per write (fewer when they are big). Measured for a hash of
# 1M small fields on a busy 2-CPU host: HSCAN p50 0.9 ms / p99 3.7 ms, HSET p50 0.6 / p99 3.4
# (1000: p50 2.0 / p99 5.8 and 1.2 / 7.5), the whole copy 15% slower than with 1000
CHUNK_ELEMENTS = 500
# a collection's first read asks for this many: its elements' size is not known yet (a list of
# 1000 elements of 1 MB would be 1 GB in one reply); the next read asks for what fits CHUNK_BYTES
FIRST_ELEMENTS = 10
TEMP_DB = b"1"  # where the copy is built (the mover's journals live there too): no client selects it
# the copy carries this TTL while it is built (renewed with every chunk), so a copy whose
# builder died goes away by itself; the atomic step sets the key's own TTL
TEMP_TTL_MS = 60_000
DISCARD_TIMEOUT = 2.0  # seconds for the best-effort deletion of the copy after a failure
_GROUP = b"moonmesh-chunk"  # a consumer group that exists only to create an empty stream

KINDS = (b"string", b"hash", b"set", b"zset", b"list", b"stream")
LENGTH_COMMANDS = {b"string": b"STRLEN", b"hash": b"HLEN", b"set": b"SCARD", b"zset": b"ZCARD",
                   b"list": b"LLEN", b"stream": b"XLEN"}
_SCANS = {b"hash": b"HSCAN", b"set": b"SSCAN", b"zset": b"ZSCAN"}


class ChunkedCopyUnsupported(Exception):
    """The key cannot be copied in chunks (a stream with consumer groups: their pending entries
    and consumers have no command to recreate them; a type this module does not know, a
    module's). Raised before anything is written: copy the key whole (MIGRATE) instead."""


class ChunkedCopyUncertain(OSError):
    """The link to the target was lost after the final step was sent: the key may or may not be
    in place at the target (as a MIGRATE whose reply was lost)."""


# ------------------------------------------------------------------------------ the pure part


@dataclass(frozen=True, slots=True)
class Position:
    """Where the next read starts, and how much it asks for.

    `at`: a string's byte offset, a list's index, a hash/set/zset's SCAN cursor, or a stream's
    XRANGE start ("-", then "(" + the last id read). `count`: bytes (string) or elements.
    """

    at: bytes
    count: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one read brought: the writes that copy it into the temporary key (collections),
    or the bytes read (`piece`, strings: the caller streams them into its SET, or writes them
    with `string_writes`); where the next read starts (None: that was the last); and its size
    in bytes (of the elements, roughly)."""

    writes: tuple[tuple[bytes, ...], ...]
    next: Position | None
    size: int
    piece: bytes = b""


def first_position(kind: bytes) -> Position:
    if kind == b"string":
        return Position(b"0", CHUNK_BYTES)
    return Position(b"-" if kind == b"stream" else b"0", FIRST_ELEMENTS)


def read_command(kind: bytes, key: bytes, pos: Position) -> list[bytes]:
    """The command that reads the chunk at `pos` of `key`, a `kind` (TYPE's reply)."""
    if kind == b"string":
        start = int(pos.at)
        return [b"GETRANGE", key, pos.at, b"%d" % (start + pos.count - 1)]
    if kind == b"list":
        start = int(pos.at)
        return [b"LRANGE", key, pos.at, b"%d" % (start + pos.count - 1)]
    if kind == b"stream":
        return [b"XRANGE", key, pos.at, b"+", b"COUNT", b"%d" % pos.count]
    return [_SCANS[kind], key, pos.at, b"COUNT", b"%d" % pos.count]


def next_count(count: int, elements: int, size: int) -> int:
    """The element count for the next read: as many as fit CHUNK_BYTES at the average size
    of the last chunk's elements, 1 to CHUNK_ELEMENTS; twice as many after an empty SCAN page
    (which says nothing about sizes)."""
    if elements <= 0:
        return min(CHUNK_ELEMENTS, 2 * count)
    return max(1, min(CHUNK_ELEMENTS, CHUNK_BYTES * elements // max(size, 1)))


def plan_chunk(kind: bytes, temp: bytes, pos: Position, reply: object) -> Chunk:
    """The chunk read at `pos` (its reply, parsed: bytes, or lists of bytes) as writes to
    `temp`, and the next position. A read that got fewer than it asked for was the last
    (GETRANGE, LRANGE, XRANGE); a SCAN is done when its cursor is 0 (a page may be empty
    before that)."""
    if kind == b"string":
        if not isinstance(reply, bytes):
            raise ValueError(f"GETRANGE replied {reply!r}")
        done = len(reply) < pos.count
        nxt = None if done else Position(b"%d" % (int(pos.at) + len(reply)), pos.count)
        return Chunk((), nxt, len(reply), reply)
    if kind == b"list":
        items = _bytes_list(reply, "LRANGE")
        size = sum(map(len, items))
        done = len(items) < pos.count
        nxt = None if done else Position(b"%d" % (int(pos.at) + len(items)),
                                         next_count(pos.count, len(items), size))
        return Chunk(((b"RPUSH", temp, *items),) if items else (), nxt, size)
    if kind == b"stream":
        if not isinstance(reply, list):
            raise ValueError(f"XRANGE replied {reply!r}")
        writes = []
        size = 0
        for entry in reply:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], bytes)):
                raise ValueError(f"XRANGE replied an entry {entry!r}")
            fields = _bytes_list(entry[1], "XRANGE")
            writes.append((b"XADD", temp, entry[0], *fields))
            size += len(entry[0]) + sum(map(len, fields))
        done = len(reply) < pos.count
        nxt = None if done else Position(b"(" + reply[-1][0],
                                         next_count(pos.count, len(reply), size))
        return Chunk(tuple(writes), nxt, size)
    # a SCAN: [cursor, [element, ...]], [field, value, ...] or [member, score, ...]
    if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], bytes)):
        raise ValueError(f"{_SCANS.get(kind, kind)!r} replied {reply!r}")
    cursor, flat = reply[0], _bytes_list(reply[1], "SCAN")
    size = sum(map(len, flat))
    elements = len(flat) if kind == b"set" else len(flat) // 2
    if kind == b"hash":
        write: tuple[bytes, ...] = (b"HSET", temp, *flat)
    elif kind == b"set":
        write = (b"SADD", temp, *flat)
    else:  # ZADD takes score then member: the score's text goes as ZSCAN wrote it
        write = (b"ZADD", temp, *[flat[i ^ 1] for i in range(len(flat))])
    nxt = None if cursor == b"0" else Position(cursor, next_count(pos.count, elements, size))
    return Chunk((write,) if flat else (), nxt, size)


def _bytes_list(value: object, what: str) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise ValueError(f"{what} replied {value!r}")
    return value


def write_transaction(temp: bytes, writes: tuple[tuple[bytes, ...], ...],
                      created: bool) -> list[list[bytes]]:
    """The pipeline that writes one chunk into `temp` in TEMP_DB, leaving the connection in
    database 0. One MULTI: the first write removes a leftover `temp` (an earlier attempt's),
    a later one first checks `temp` is still there (EXISTS: its reply tells), and every one
    renews its TTL, so a `temp` this copy made never lives on without one."""
    first = [b"EXISTS", temp] if created else [b"UNLINK", temp]
    return [[b"SELECT", TEMP_DB], [b"MULTI"], first, *[list(w) for w in writes],
            [b"PEXPIRE", temp, b"%d" % TEMP_TTL_MS], [b"EXEC"], [b"SELECT", b"0"]]


def check_transaction(replies: list[object], created: bool) -> None:
    """Raise OSError unless `write_transaction`'s replies (parsed) say it all ran and `temp`
    exists (and existed before, if `created`)."""
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise OSError(f"writing a chunk at the target failed: {reply}")
    results = replies[-2]
    if not isinstance(results, list):
        raise OSError(f"writing a chunk at the target failed: EXEC replied {results!r}")
    for result in results:
        if isinstance(result, hiredis.ReplyError):
            raise OSError(f"writing a chunk at the target failed: {result}")
    if created and results[0] != 1:
        raise OSError("the temporary copy vanished at the target while it was built")
    if results[-1] != 1:
        raise OSError("the temporary copy is missing at the target after a write")


@dataclass(frozen=True, slots=True)
class StreamMeta:
    """What XINFO STREAM says about a stream besides its entries."""

    last_id: bytes
    entries_added: int
    max_deleted_id: bytes
    groups: int


def stream_meta(reply: object) -> StreamMeta:
    """From XINFO STREAM's reply (RESP2: a flat list of names and values)."""
    if not isinstance(reply, list) or len(reply) % 2:
        raise ValueError(f"XINFO STREAM replied {reply!r}")
    info = dict(zip(reply[0::2], reply[1::2]))
    try:
        last, added = info[b"last-generated-id"], info[b"entries-added"]
        deleted, groups = info[b"max-deleted-entry-id"], info[b"groups"]
    except KeyError as exc:
        raise ValueError(f"XINFO STREAM has no {exc.args[0]!r}: {reply!r}") from None
    if not (isinstance(last, bytes) and isinstance(deleted, bytes)
            and isinstance(added, int) and isinstance(groups, int)):
        raise ValueError(f"XINFO STREAM replied {reply!r}")
    return StreamMeta(last, added, deleted, groups)


def stream_finish(temp: bytes, meta: StreamMeta, created: bool) -> tuple[tuple[bytes, ...], ...]:
    """The writes that give the copy the source stream's last id, entries-added and
    max-deleted-id (XSETID); for a stream without entries (which can exist, unlike an empty
    hash) they first create it (XGROUP CREATE ... MKSTREAM, and the group destroyed)."""
    make = ((b"XGROUP", b"CREATE", temp, _GROUP, b"$", b"MKSTREAM"),
            (b"XGROUP", b"DESTROY", temp, _GROUP)) if not created else ()
    return (*make, (b"XSETID", temp, meta.last_id, b"ENTRIESADDED", b"%d" % meta.entries_added,
                    b"MAXDELETEDID", meta.max_deleted_id))


def writes_propagate(info: bytes) -> bool:
    """INFO persistence + replication: every write goes to an AOF or a replication backlog,
    which copy a command's arguments when it runs (a 100 MB SET: 100 MB in one step)."""
    return b"aof_enabled:1\r" in info or b"repl_backlog_active:1\r" in info


def string_writes(temp: bytes, offset: int, piece: bytes, total: int) -> tuple[tuple[bytes, ...], ...]:
    """A string's piece at `offset` as writes into `temp`, for a target whose writes propagate:
    the first makes the string full size at once (SETRANGE at its end: one allocation, where
    growing it with APPEND would reallocate and copy it each time it crosses an allocation size
    class), then each piece is a SETRANGE into it. A string of one piece is a SET."""
    if offset:
        return ((b"SETRANGE", temp, b"%d" % offset, piece),)
    if len(piece) >= total:
        return ((b"SET", temp, piece),)
    return ((b"SETRANGE", temp, b"%d" % (total - 1), b"\x00"), (b"SETRANGE", temp, b"0", piece))


def string_prelude(temp: bytes, total: int) -> bytes:
    """The bytes that start a string's copy on its own connection: select TEMP_DB, remove a
    leftover `temp`, and the SET up to its value, which follows in pieces (`total` bytes)."""
    return (encode_command([b"SELECT", TEMP_DB]) + encode_command([b"UNLINK", temp])
            + b"*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(temp), temp, total))


def string_trailer() -> bytes:
    """What ends the SET after its value: the copy's TTL while it waits for the final step."""
    ttl = b"%d" % TEMP_TTL_MS
    return b"\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl)


def ttl_left(pttl_start: int, since_start_ms: float, pttl_end: int,
             since_end_ms: float) -> int | None:
    """The TTL (ms) the copy gets: 0 for none, None when the key has expired meanwhile.

    Both PTTL readings (at the start and after the last read; -1 none, -2 gone) count, each
    less the time since it was sent: the time left, never the moment of expiry, since the
    hosts' clocks may differ. Under 1 ms left is 1 ms (a TTL of 0 would mean none)."""
    if pttl_start == -2 or pttl_end == -2:
        return None
    left = [p - since for p, since in ((pttl_start, since_start_ms), (pttl_end, since_end_ms))
            if p >= 0]
    if not left:
        return 0
    least = min(left)
    return None if least <= 0 else max(1, int(least))


# The atomic step at the target. KEYS[1]: the copy, in db 1; KEYS[2]: the key, in db 0;
# ARGV[1]: its TTL in ms, as text (Lua's numbers are doubles), 0 for none.
#
# MOVE keeps a key's name and fails if the other database has that name; RENAME replaces its
# target. So the copy crosses from db 1 to db 0 under a `hop` name that is free in db 1 (so the
# RENAME to it there replaces nothing) and in db 0 (MOVE's condition):
#   - the key's own name, if db 1 has no key of that name (db 0's is unlinked first);
#   - else the copy's own name, if db 0 has no key of that name (then renamed to the key in
#     db 0, where the old key is unlinked first);
#   - else the copy's name with ":1" ... ":8", the first free in both.
# Every check runs before the first write (a script that fails midway keeps its writes), so
# the script either changes nothing or replaces the key; in db 1 it only ever renames the copy
# to a free name and moves it out. It reads other db-1 names with EXISTS (which removes a key
# there only if it has expired anyway).
FINALIZE_SCRIPT = b"""
local temp, key, ttl = KEYS[1], KEYS[2], ARGV[1]
local function exists(db, name)
  redis.call('SELECT', db)
  return redis.call('EXISTS', name) == 1
end
if not exists('1', temp) then
  return redis.error_reply('ERR chunked copy: the temporary copy is gone')
end
local hop = nil
if not exists('1', key) then
  hop = key
else
  for i = 0, 8 do
    local name = temp
    if i > 0 then name = temp .. ':' .. i end
    if (i == 0 or not exists('1', name)) and not exists('0', name) then
      hop = name
      break
    end
  end
  if hop == nil then
    return redis.error_reply('ERR chunked copy: no free name to move the copy under')
  end
end
redis.call('SELECT', '0')
redis.call('UNLINK', key)
redis.call('SELECT', '1')
if hop ~= temp then redis.call('RENAME', temp, hop) end
redis.call('MOVE', hop, '0')
redis.call('SELECT', '0')
if hop ~= key then redis.call('RENAME', hop, key) end
if ttl ~= '0' then redis.call('PEXPIRE', key, ttl) else redis.call('PERSIST', key) end
return 1
"""


def finalize_command(temp: bytes, key: bytes, ttl_ms: int) -> list[bytes]:
    """EVAL of FINALIZE_SCRIPT: `temp` (db 1) becomes `key` (db 0), TTL `ttl_ms` (0: none)."""
    return [b"EVAL", FINALIZE_SCRIPT, b"2", temp, key, b"%d" % ttl_ms]


def max_steps(kind: bytes, length: int) -> int:
    """A bound on the reads of a key of `length` (STRLEN, HLEN, ...): past it the key is not
    what it was (it is held: it cannot be), and the copy gives up rather than loop."""
    if kind == b"string":
        return length // CHUNK_BYTES + 2
    return 4 * length + 64  # a SCAN of COUNT 1 visits about a bucket a call


# ------------------------------------------------------------------------------ the copy


@dataclass
class CopyStats:
    """What a copy did, for logs and measurements: round trips, and the slowest of them."""

    steps: int = 0
    slowest: float = 0.0  # seconds
    slowest_step: str = ""

    def note(self, what: bytes, seconds: float) -> None:
        self.steps += 1
        if seconds > self.slowest:
            self.slowest, self.slowest_step = seconds, what.decode(errors="replace")


class _Flight:
    """Commands queued on a connection now (one pipelined batch), their replies awaited
    later, so a source read and a target write are out at the same time."""

    __slots__ = ("event", "batch", "count", "sent", "what", "stats")

    def __init__(self, conn: BackendConnection, commands: list[list[bytes]],
                 stats: CopyStats | None) -> None:
        self.event = anyio.Event()
        self.batch = Batch()
        self.count = len(commands)
        self.what = b" ".join(c[0] for c in commands)[:60]
        self.stats = stats
        self.sent = time.monotonic()
        conn.queue(b"".join(encode_command(c) for c in commands), self.batch, self, self.count)
        conn.flush()

    def replies_arrived(self) -> None:
        self.event.set()

    async def replies(self) -> list[object]:
        """The replies, parsed (errors as hiredis.ReplyError: the link's too)."""
        while self.batch.data is None:
            await self.event.wait()
            self.event = anyio.Event()
        if self.stats is not None:
            self.stats.note(self.what, time.monotonic() - self.sent)
        reader = hiredis.Reader()
        for part in self.batch.parts:
            reader.feed(part)
        reader.feed(self.batch.data)
        out = [reader.gets() for _ in range(self.count)]
        if any(value is False for value in out):
            raise OSError("a reply was cut short")
        return out


def _value(value: object, what: str) -> object:
    """`value`, unless it is an error reply (the link's too: -CLUSTERDOWN, -UNCERTAIN)."""
    if isinstance(value, hiredis.ReplyError):
        raise OSError(f"{what} failed: {value}")
    return value


def _int(value: object, what: str) -> int:
    value = _value(value, what)
    if not isinstance(value, int):
        raise OSError(f"{what} replied {value!r}")
    return value


async def copy_in_chunks(source: BackendConnection, target: BackendConnection, key: bytes,
                         temp: bytes, *, stats: CopyStats | None = None) -> int:
    """Copy `key` from the source Redis to the target Redis's database 0 in bounded steps;
    return the bytes copied (of the elements, roughly), 0 if the key was gone.

    `source`: RESP2, database 0. `target`: RESP2, database 0, a user that may SELECT, EVAL,
    MOVE, INFO (the default user); it is left in database 0 and may be shared (each step is
    one self-contained pipeline), but a string for a target without AOF or replication goes
    over a connection of its own to target.host:port (as the default user with
    target.password). The key must not change meanwhile (the mover holds it);
    it may expire. `temp` (a `moonmesh:chunk:...` name) is where the copy is built, in the
    target's TEMP_DB; no other db-1 key is changed. At the end one script replaces the target's
    `key` with the copy, with the TTL left (see `ttl_left`). If the key expired meanwhile,
    the copy is deleted and the target's database 0 is left as it was: 0 is returned.

    Raises ChunkedCopyUnsupported (nothing written) for a stream with consumer groups or a
    type other than KINDS: copy such a key whole. Raises OSError on any failure (a link, an
    error reply), after deleting the copy at the target (best effort: on `target`, or a new
    connection if that one is down; the copy's TTL, TEMP_TTL_MS, covers the rest);
    ChunkedCopyUncertain (an OSError) if the final step's reply was lost.
    """
    try:
        return await _copy(source, target, key, temp, stats)
    except ChunkedCopyUnsupported:
        raise  # before anything was written
    except ChunkedCopyUncertain:
        await _discard(target, temp)  # if the script ran, `temp` is gone already
        raise
    except BaseException as exc:
        await _discard(target, temp)
        if isinstance(exc, (OSError, ValueError)):
            raise OSError(f"chunked copy of {_show(key)} failed: {exc}") from exc
        raise


async def _copy(source: BackendConnection, target: BackendConnection, key: bytes, temp: bytes,
                stats: CopyStats | None) -> int:
    started = time.monotonic()
    probe = _Flight(source, [[b"TYPE", key], [b"PTTL", key]], stats)
    # a target whose database 1 does not exist would get the chunks in database 0
    check = _Flight(target, [[b"SELECT", TEMP_DB], [b"SELECT", b"0"],
                             [b"INFO", b"persistence", b"replication"]], stats)
    kind_raw, pttl_raw = await probe.replies()
    *selected, info = await check.replies()
    for reply in selected:
        if reply != b"OK":
            raise OSError(f"the target cannot select database {TEMP_DB.decode()}: {reply!r}")
    if not isinstance(info, bytes):
        raise OSError(f"INFO at the target failed: {info!r}")
    kind, pttl_start = _value(kind_raw, "TYPE"), _int(pttl_raw, "PTTL")
    if kind == b"none" or pttl_start == -2:
        return 0
    if not isinstance(kind, bytes) or kind not in KINDS:
        raise ChunkedCopyUnsupported(f"{_show(key)} is a {kind!r}: not copied in chunks")
    sizing = [[LENGTH_COMMANDS[kind], key]]
    if kind == b"stream":
        sizing.append([b"XINFO", b"STREAM", key])
    sized = await _Flight(source, sizing, stats).replies()
    length = _int(sized[0], LENGTH_COMMANDS[kind].decode())
    meta = None
    if kind == b"stream":
        xinfo = sized[1]
        if isinstance(xinfo, hiredis.ReplyError):  # gone since TYPE ("no such key")
            return 0
        meta = stream_meta(xinfo)
        if meta.groups:
            raise ChunkedCopyUnsupported(f"{_show(key)} is a stream with {meta.groups} "
                                         "consumer group(s): not copied in chunks")
    elif length == 0 and kind != b"string":  # an empty collection does not exist: it expired
        return 0
    if kind == b"string" and not writes_propagate(info):
        copied = await _copy_string(source, target, key, temp, length, stats)
    else:
        copied = await _copy_in_steps(source, target, key, temp, kind, length, meta, stats)
    # read after the last chunk: the key may have expired meanwhile (then reads found nothing)
    ended = time.monotonic()
    pttl_end = _int((await _Flight(source, [[b"PTTL", key]], stats).replies())[0], "PTTL")
    now = time.monotonic()
    ttl = ttl_left(pttl_start, (now - started) * 1000, pttl_end, (now - ended) * 1000)
    if ttl is None:  # expired: nothing goes in place
        await _discard(target, temp)
        return 0
    if copied is None:
        raise OSError("the reads came up short, yet the key is still there: it changed")
    final = (await _Flight(target, [finalize_command(temp, key, ttl)], stats).replies())[0]
    if isinstance(final, hiredis.ReplyError) and str(final).startswith("UNCERTAIN"):
        raise ChunkedCopyUncertain(f"chunked copy of {_show(key)}: the link to the target was "
                                   "lost after the final step was sent: it may have run")
    if final != 1:
        raise OSError(f"putting the copy in place failed: {final!r}")
    return copied


async def _copy_in_steps(source: BackendConnection, target: BackendConnection, key: bytes,
                         temp: bytes, kind: bytes, length: int, meta: StreamMeta | None,
                         stats: CopyStats | None) -> int | None:
    """Read chunk after chunk, each written (one transaction) while the next is read: a
    collection, or a string (`length` bytes) for a target whose writes propagate. None: the
    reads found nothing or came up short (the key expired)."""
    pos = first_position(kind)
    read: _Flight | None = _Flight(source, [read_command(kind, key, pos)], stats)
    created = False
    copied = 0
    for _ in range(max_steps(kind, length)):
        assert read is not None
        chunk = plan_chunk(kind, temp, pos, _value((await read.replies())[0], "reading a chunk"))
        nxt, writes = chunk.next, chunk.writes
        if kind == b"string":
            if copied + chunk.size > length:
                raise OSError("the string grew during its copy")
            if nxt is None and copied + chunk.size < length:
                return None  # came up short: it expired (nothing more is written)
            writes = string_writes(temp, copied, chunk.piece, length)
            if copied + chunk.size == length:
                nxt = None  # all there: no read to find nothing
        read = None if nxt is None else _Flight(source, [read_command(kind, key, nxt)], stats)
        if nxt is None and meta is not None:
            writes += stream_finish(temp, meta, created or bool(writes))
        if writes:
            replies = await _Flight(target, write_transaction(temp, writes, created),
                                    stats).replies()
            check_transaction(replies, created)
            created = True
        copied += chunk.size
        if nxt is None:
            return copied if created else None
        pos = nxt
    raise OSError(f"{_show(key)} took more than {max_steps(kind, length)} reads (of "
                  f"{length} elements or bytes): it changed during its copy")


async def _copy_string(source: BackendConnection, target: BackendConnection, key: bytes,
                       temp: bytes, total: int, stats: CopyStats | None) -> int | None:
    """Stream the string into one SET at the target, on a connection of its own (its bytes
    go out between awaits: nothing else may write in between). None: the string came up short
    (it expired); the unfinished SET dies with the connection."""
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(target.host, target.port)
    except (OSError, TimeoutError) as exc:
        raise OSError(f"cannot connect to {target.host}:{target.port}: {exc}") from None
    finished = False
    try:
        replies = 3
        if target.password:
            writer.write(encode_command([b"AUTH", b"default", target.password.encode()]))
            replies += 1
        writer.write(string_prelude(temp, total))
        pos = first_position(b"string")
        read: _Flight | None = _Flight(source, [read_command(b"string", key, pos)], stats)
        sent = 0
        for _ in range(max_steps(b"string", total)):
            assert read is not None
            chunk = plan_chunk(b"string", temp, pos,
                               _value((await read.replies())[0], "GETRANGE"))
            if sent + len(chunk.piece) > total:
                raise OSError(f"{_show(key)} grew during its copy")
            more = chunk.next is not None and sent + len(chunk.piece) < total
            read = _Flight(source, [read_command(b"string", key, chunk.next)], stats) \
                if more and chunk.next is not None else None
            writer.write(chunk.piece)
            sent += len(chunk.piece)
            try:
                await writer.drain()
            except ConnectionError as exc:
                raise OSError(f"sending the string to the target failed: {exc}") from None
            if read is None:
                break
            assert chunk.next is not None
            pos = chunk.next
        if sent < total:
            return None
        writer.write(string_trailer())
        began = time.monotonic()
        try:
            raw = await _read_replies(reader, replies)
        except ConnectionError as exc:
            raise OSError(f"sending the string to the target failed: {exc}") from None
        if stats is not None:
            stats.note(b"SET (the string's end)", time.monotonic() - began)
        for reply in raw:
            if reply[:1] == b"-":
                raise OSError(f"the target refused the string: {reply!r}")
        finished = True
        return sent
    finally:
        if finished:
            writer.close()
        else:  # drop what is unsent: Redis frees an unfinished command with its client
            writer.transport.abort()


async def _read_replies(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    buf = bytearray()
    scanner = ReplyScanner()
    out: list[bytes] = []
    start = 0
    while len(out) < n:
        end = scanner.next_end(buf)
        if end < 0:
            data = await reader.read(65536)
            if not data:
                raise OSError("the target closed the connection")
            buf += data
            continue
        out.append(bytes(buf[start:end]))
        start = end
    return out


async def _discard(target: BackendConnection, temp: bytes) -> None:
    """Delete the copy at the target, best effort (on `target` if it is up, so after the
    writes sent on it; else on a new connection), within DISCARD_TIMEOUT, even when cancelled."""
    commands = [[b"SELECT", TEMP_DB], [b"UNLINK", temp], [b"SELECT", b"0"]]
    with anyio.move_on_after(DISCARD_TIMEOUT, shield=True):
        try:
            if target.up:
                replies = await _Flight(target, commands, None).replies()
                if isinstance(replies[1], int):
                    return
            conn = BackendConnection(target.host, target.port, False, target.password)
            try:
                await conn.connect()
                replies = await _Flight(conn, commands, None).replies()
            finally:
                conn.close()
            if isinstance(replies[1], int):
                return
            log.warning("chunked_copy_discard_failed", temp=_show(temp), reply=str(replies[1]))
        except OSError as exc:
            log.warning("chunked_copy_discard_failed", temp=_show(temp), error=str(exc))


def _show(key: bytes) -> str:
    return repr(key[:100] + (b"..." if len(key) > 100 else b""))
