"""The chunked copy of big keys (proxy/chunked.py) between two real redis-servers: contents
compared exactly per type, the TTL, the replacement at the target, expiry during the copy,
failures midway, and the target's database 1 left alone."""
from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import hiredis
import pytest

from proxy.backend import BackendConnection
from proxy.chunked import (
    CHUNK_BYTES,
    TEMP_TTL_MS,
    ChunkedCopyUncertain,
    ChunkedCopyUnsupported,
    CopyStats,
    copy_in_chunks,
)
from tools.launch import HOST, Launcher

pytestmark = pytest.mark.anyio

KEY = b"user:{7}:big\r\n\x00"
TEMP = b"moonmesh:chunk:test-1"
KINDS = ["string", "hash", "set", "zset", "list", "stream"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Raw:
    """A blocking client that keeps replies as Redis sent them (scores as text, errors as
    hiredis.ReplyError), in database `db`."""

    def __init__(self, port: int, db: int = 0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.reader = hiredis.Reader()
        if db:
            assert self(b"SELECT", b"%d" % db) == b"OK"

    def __call__(self, *args: bytes | str | int) -> object:
        return self.many([args])[0]

    def many(self, commands: list[tuple]) -> list[object]:
        out = b""
        for args in commands:
            parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
            out += b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p)
                                                      for p in parts)
        self.sock.sendall(out)
        replies: list[object] = []
        while len(replies) < len(commands):
            reply = self.reader.gets()
            if reply is False:
                data = self.sock.recv(1 << 20)
                assert data, "connection closed"
                self.reader.feed(data)
            else:
                replies.append(reply)
        return replies

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def redis_servers() -> Iterator[dict[str, int]]:
    """The source, a target whose writes go nowhere else ("plain": a string is one streamed
    SET) and one with AOF on, as deploy/ runs Redis ("aof": a string is SETRANGEs)."""
    launcher = Launcher(prefix="mm-chunk-")
    try:
        yield {"src": launcher.redis().port, "plain": launcher.redis().port,
               "aof": launcher.redis(None, "--appendonly", "yes").port}
    finally:
        launcher.cleanup()


@pytest.fixture
def target_name() -> str:
    """Which target a test copies to (tests parametrize it to try both)."""
    return "plain"


@pytest.fixture
def servers(redis_servers, target_name) -> tuple[int, int]:
    """The ports of the source and of this test's target."""
    return redis_servers["src"], redis_servers[target_name]


@pytest.fixture
def redis(servers) -> Iterator[dict[str, Raw]]:
    """Raw clients: the source's db 0, the target's db 0 and db 1; both servers emptied."""
    clients = {"src": Raw(servers[0]), "dst": Raw(servers[1]), "dst1": Raw(servers[1], 1)}
    for name in ("src", "dst"):
        assert clients[name](b"FLUSHALL") == b"OK"
        assert clients[name](b"CONFIG", b"SET", b"maxmemory", b"0") == b"OK"
    yield clients
    assert clients["dst"](b"CONFIG", b"SET", b"maxmemory", b"0") == b"OK"
    for client in clients.values():
        client.close()


class Hooked(BackendConnection):
    """A connection that runs `hook` just before the `nth` command containing `verb` is
    queued (or, with after=True, just after it went out)."""

    def __init__(self, port: int, verb: bytes = b"", nth: int = 0, hook=None,
                 after: bool = False) -> None:
        super().__init__(HOST, port, resp3=False)
        self.verb, self.nth, self.hook, self.after = b"\r\n" + verb + b"\r\n", nth, hook, after
        self.seen = 0

    def queue(self, command, pending, sink, replies=1):
        hit = False
        if self.hook is not None and self.verb in command:
            self.seen += 1
            hit = self.seen == self.nth
        if hit and not self.after:
            self.hook(self)
        super().queue(command, pending, sink, replies)
        if hit and self.after:
            self.hook(self)


async def connect(*conns: BackendConnection) -> None:
    for conn in conns:
        await conn.connect()


async def copy(servers: tuple[int, int], key: bytes, stats: CopyStats | None = None) -> int:
    """copy_in_chunks of `key` from the first server to the second, under TEMP, on links of
    its own (closed after)."""
    source = BackendConnection(HOST, servers[0], False)
    target = BackendConnection(HOST, servers[1], False)
    await connect(source, target)
    try:
        return await copy_in_chunks(source, target, key, TEMP, stats=stats)
    finally:
        source.close()
        target.close()


# -- data --------------------------------------------------------------------------------------

def blob(rng: random.Random, n: int) -> bytes:
    return b"\r\n\x00" + rng.randbytes(max(n - 3, 0)) if n else b""


def score(i: int) -> bytes:
    """Scores of every form: fractions, negatives, huge, infinite, repeated."""
    return [b"%r" % (i * 0.1), b"-%d" % i, b"1e300", b"inf", b"-inf", b"0", b"%r" % (1 / 3),
            b"%r" % (i / 7)][i % 8]


def fill(r: Raw, kind: str, key: bytes, n: int, seed: int = 1) -> None:
    """A `kind` at `key` with about `n` elements (bytes, for a string), binary throughout."""
    rng = random.Random(seed)
    batch: list[tuple] = []
    if kind == "string":
        batch.append((b"SET", key, blob(rng, n)))
    for start in range(0, n if kind != "string" else 0, 500):
        idx = range(start, min(n, start + 500))
        if kind == "hash":
            batch.append((b"HSET", key, *[x for i in idx
                                          for x in (b"f:%d\r\n" % i, blob(rng, rng.randint(0, 60)))]))
        elif kind == "set":
            batch.append((b"SADD", key, *[b"m:%d\x00" % i for i in idx]))
        elif kind == "zset":
            batch.append((b"ZADD", key, *[x for i in idx for x in (score(i), b"z:%d" % i)]))
        elif kind == "list":
            batch.append((b"RPUSH", key, *[b"" if i % 97 == 0 else blob(rng, i % 30) for i in idx]))
        elif kind == "stream":
            for i in idx:
                fields = (b"a", b"%d" % i, b"b", blob(rng, i % 20))
                if i % 11 == 0:
                    fields += (b"a", b"dup")  # a field name twice is allowed in an entry
                batch.append((b"XADD", key, b"%d-%d" % (1000 + i, i % 3), *fields))
    for i in range(0, len(batch), 200):
        replies = r.many(batch[i : i + 200])
        assert not any(isinstance(x, hiredis.ReplyError) for x in replies), replies[:3]
    if kind == "stream" and n > 2:  # deletions: the first, one inside, the last
        last = b"%d-%d" % (1000 + n - 1, (n - 1) % 3)
        assert r(b"XDEL", key, b"1000-0", b"%d-%d" % (1000 + n // 2, (n // 2) % 3), last) == 3


def contents(r: Raw, kind: str, key: bytes) -> object:
    """What `key` holds, in a form two Redis can be compared by (not DUMP: encodings vary)."""
    if kind == "string":
        return r(b"GET", key)
    if kind == "hash":
        flat = r(b"HGETALL", key)
        return dict(zip(flat[0::2], flat[1::2]))  # type: ignore[index]
    if kind == "set":
        return set(r(b"SMEMBERS", key))  # type: ignore[arg-type]
    if kind == "zset":
        return r(b"ZRANGE", key, 0, -1, b"WITHSCORES")
    if kind == "list":
        return r(b"LRANGE", key, 0, -1)
    info = r(b"XINFO", b"STREAM", key)
    fields = dict(zip(info[0::2], info[1::2]))  # type: ignore[index]
    for name in (b"radix-tree-keys", b"radix-tree-nodes"):  # the encoding's, not the data's
        fields.pop(name)
    return r(b"XRANGE", key, b"-", b"+"), fields


def keyspace(r: Raw) -> dict[bytes, object]:
    """Every key of r's database with its type and value (small databases only)."""
    return {k: (r(b"TYPE", k), r(b"DUMP", k)) for k in r(b"KEYS", b"*")}  # type: ignore[union-attr]


SIZES = {"string": 5 * CHUNK_BYTES + 12_345, "hash": 30_000, "set": 30_000, "zset": 30_000,
         "list": 50_000, "stream": 20_000}


# -- copies ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, target_name", [(kind, "plain") for kind in KINDS]
                         + [("string", "aof"), ("hash", "aof")])
async def test_a_big_key_is_copied_exactly_with_its_ttl_replacing_the_target_key(
        kind, servers, redis):
    src, dst, dst1 = redis["src"], redis["dst"], redis["dst1"]
    fill(src, kind, KEY, SIZES[kind])
    assert src(b"PEXPIRE", KEY, 600_000) == 1
    # the target has another value under the name (another type, with its own TTL), and its
    # db 1 a journal named exactly like the user key, and another key
    if kind == "list":
        dst(b"SET", KEY, b"old")
    else:
        dst(b"RPUSH", KEY, b"old")
    dst(b"PEXPIRE", KEY, 5_000)
    dst1(b"SADD", KEY, b"journal-member")
    dst1(b"SET", b"moonmesh:moving:m1", b"x")
    db1_before = keyspace(dst1)
    stats = CopyStats()
    began = time.monotonic()
    copied = await copy(servers, KEY, stats=stats)
    elapsed_ms = (time.monotonic() - began) * 1000
    assert copied > 0 and stats.steps > 10  # several chunks
    assert contents(dst, kind, KEY) == contents(src, kind, KEY)
    ttl = dst(b"PTTL", KEY)
    assert isinstance(ttl, int) and 600_000 - elapsed_ms - 1000 < ttl <= 600_000
    assert dst(b"KEYS", b"*") == [KEY]  # no name it crossed under is left
    assert keyspace(dst1) == db1_before  # the journal named like the key untouched, no copy left
    assert src(b"EXISTS", KEY) == 1  # a copy: the source's is the caller's to unlink


SMALL = {
    "string": [(b"SET", KEY, b"12345")],  # an int-encoded string
    "hash": [(b"HSET", KEY, b"a", b"1", b"b", b"")],
    "set": [(b"SADD", KEY, b"1", b"2", b"3")],  # an intset
    "zset": [(b"ZADD", KEY, b"1.5", b"a", b"-inf", b"b")],
    "list": [(b"RPUSH", KEY, b"x", b"", b"x")],
    "stream": [(b"XADD", KEY, b"1-1", b"f", b"v"), (b"XADD", KEY, b"2-0", b"f", b"w")],
}


@pytest.mark.parametrize("kind, target_name", [(kind, "plain") for kind in KINDS]
                         + [("string", "aof")])
async def test_a_small_key_without_ttl_loses_the_old_keys_ttl(kind, servers, redis):
    src, dst, dst1 = redis["src"], redis["dst"], redis["dst1"]
    src.many(SMALL[kind])
    dst(b"SET", KEY, b"old", b"PX", b"100000")
    assert await copy(servers, KEY) > 0
    assert contents(dst, kind, KEY) == contents(src, kind, KEY)
    assert dst(b"PTTL", KEY) == -1
    assert dst1(b"DBSIZE") == 0


@pytest.mark.parametrize("setup", [
    [(b"SET", b"empty", b"")],
    [(b"XADD", b"empty", b"5-5", b"f", b"v"), (b"XDEL", b"empty", b"5-5")],  # a stream, no entries
    [(b"XGROUP", b"CREATE", b"empty", b"g", b"$", b"MKSTREAM"), (b"XGROUP", b"DESTROY", b"empty", b"g")],
    [(b"SETRANGE", b"empty", CHUNK_BYTES - 1, b"\n")],
    [(b"SETRANGE", b"empty", CHUNK_BYTES, b"\r")],  # one byte more than a chunk
    [(b"SETRANGE", b"empty", 2 * CHUNK_BYTES - 1, b"\x00")],  # two chunks exactly
], ids=["empty-string", "emptied-stream", "created-empty-stream", "one-chunk", "chunk-plus-1",
        "two-chunks"])
@pytest.mark.parametrize("target_name", ["plain", "aof"])
async def test_empty_values_and_chunk_boundaries(setup, servers, redis):
    src, dst = redis["src"], redis["dst"]
    src.many(setup)
    kind = src(b"TYPE", b"empty").decode()  # type: ignore[union-attr]
    await copy(servers, b"empty")
    assert dst(b"EXISTS", b"empty") == 1
    assert contents(dst, kind, b"empty") == contents(src, kind, b"empty")


async def test_big_elements_are_copied_in_chunks_of_fewer_elements(servers, redis):
    src, dst = redis["src"], redis["dst"]
    rng = random.Random(5)
    src.many([(b"HSET", KEY, b"big:%d" % i, blob(rng, 300_000)) for i in range(12)]
             + [(b"HSET", KEY, b"small:%d" % i, b"v") for i in range(3000)]
             + [(b"RPUSH", b"list", blob(rng, 200_000)) for i in range(30)])
    await copy(servers, KEY)
    stats = CopyStats()
    await copy(servers, b"list", stats=stats)
    assert contents(dst, "hash", KEY) == contents(src, "hash", KEY)
    assert contents(dst, "list", b"list") == contents(src, "list", b"list")
    assert stats.steps >= 2 * 6  # 6 MB of list: at least 6 reads (and 6 writes)


@pytest.mark.parametrize("kind, target_name", [("hash", "plain"), ("string", "plain"),
                                               ("string", "aof")])
async def test_a_leftover_copy_of_an_earlier_attempt_is_replaced(kind, servers, redis):
    src, dst, dst1 = redis["src"], redis["dst"], redis["dst1"]
    fill(src, kind, KEY, 2000 if kind == "hash" else 3 * CHUNK_BYTES)
    dst1(b"RPUSH", TEMP, b"stale", b"list")  # another type, even
    await copy(servers, KEY)
    assert contents(dst, kind, KEY) == contents(src, kind, KEY)
    assert dst1(b"DBSIZE") == 0


@pytest.mark.parametrize("db0, db1, hop", [
    ([], [], "the key's name"),
    ([], [KEY], "the copy's name"),
    ([TEMP], [KEY], "the copy's name + :1"),
    ([TEMP, TEMP + b":1", TEMP + b":2"], [KEY, TEMP + b":3"], "the copy's name + :4"),
])
async def test_database_1_keys_are_never_touched_whatever_name_the_copy_crosses_under(
        db0, db1, hop, servers, redis):
    """db 1 may hold a key named like the user key (a journal), db 0 user keys named like
    the copy: each stays as it was, whichever name the copy moves under."""
    src, dst, dst1 = redis["src"], redis["dst"], redis["dst1"]
    fill(src, "set", KEY, 3000)
    for name in db0:
        dst(b"SET", name, b"user value " + name)
    for name in db1:
        dst1(b"SADD", name, b"journal " + name)
    before0, before1 = keyspace(dst), keyspace(dst1)
    await copy(servers, KEY)
    assert contents(dst, "set", KEY) == contents(src, "set", KEY)
    after0 = keyspace(dst)
    assert after0.pop(KEY)[0] == b"set"
    assert after0 == before0, hop
    assert keyspace(dst1) == before1, hop


# -- the key gone, or expiring -----------------------------------------------------------------

async def test_a_missing_key_copies_nothing(servers, redis):
    dst, dst1 = redis["dst"], redis["dst1"]
    dst(b"SET", KEY, b"old")
    dst1(b"SET", TEMP, b"leftover")  # not even a leftover copy is touched: nothing is written
    assert await copy(servers, KEY) == 0
    assert dst(b"GET", KEY) == b"old" and dst1(b"GET", TEMP) == b"leftover"


READS = {"string": b"GETRANGE", "hash": b"HSCAN", "set": b"SSCAN", "zset": b"ZSCAN",
         "list": b"LRANGE", "stream": b"XRANGE"}


@pytest.mark.parametrize("kind, target_name", [(kind, "plain") for kind in KINDS]
                         + [("string", "aof")])
async def test_a_key_that_expires_during_its_copy_leaves_nothing_at_the_target(
        kind, servers, redis):
    src, dst, dst1 = redis["src"], redis["dst"], redis["dst1"]
    fill(src, kind, KEY, SIZES[kind] // 4 if kind != "string" else 3 * CHUNK_BYTES)
    dst(b"SET", KEY, b"old")
    assert src(b"PEXPIRE", KEY, 400) == 1
    # the event loop stalls before the copy's third read, until the key has expired
    source = Hooked(servers[0], READS[kind], 3, lambda _: time.sleep(0.5))
    target = BackendConnection(HOST, servers[1], False)
    await connect(source, target)
    try:
        assert await copy_in_chunks(source, target, KEY, TEMP) == 0
    finally:
        source.close()
        target.close()
    assert dst(b"GET", KEY) == b"old"  # the target's database 0 as it was
    assert dst1(b"DBSIZE") == 0  # the partial copy deleted


async def test_a_key_that_expires_after_its_last_read_is_not_put_in_place(servers, redis):
    """Every chunk was copied, then the key expired: the copy is deleted, not put in place."""
    src, dst, dst1 = redis["src"], redis["dst"], redis["dst1"]
    fill(src, "list", KEY, 5000)
    assert src(b"PEXPIRE", KEY, 300) == 1
    # the first PTTL is the start's; the stall comes before the one after the last read
    source = Hooked(servers[0], b"PTTL", 2, lambda _: time.sleep(0.35))
    target = Hooked(servers[1], b"EVAL", 1, lambda _: pytest.fail("put in place"))
    await connect(source, target)
    try:
        assert await copy_in_chunks(source, target, KEY, TEMP) == 0
    finally:
        source.close()
        target.close()
    assert dst(b"EXISTS", KEY) == 0 and dst1(b"DBSIZE") == 0


async def test_a_stream_with_consumer_groups_is_left_to_a_whole_key_copy(servers, redis):
    src, dst, dst1 = redis["src"], redis["dst"], redis["dst1"]
    fill(src, "stream", KEY, 3000)
    src(b"XGROUP", b"CREATE", KEY, b"workers", b"0")
    dst(b"SET", KEY, b"old")
    with pytest.raises(ChunkedCopyUnsupported, match="consumer group"):
        await copy(servers, KEY)
    assert dst(b"GET", KEY) == b"old" and dst1(b"DBSIZE") == 0


# -- failures midway ---------------------------------------------------------------------------

def refuse_writes(port: int):
    def hook(_: BackendConnection) -> None:
        r = Raw(port)
        assert r(b"CONFIG", b"SET", b"maxmemory", b"1") == b"OK"
        r.close()
    return hook


def cut_link(conn: BackendConnection) -> None:
    assert conn.transport is not None
    conn.transport.abort()


def kill_target_clients(port: int, spare: list[Raw]):
    """Drop every connection to the target but the test's own (`spare`)."""
    def hook(_: BackendConnection) -> None:
        r = Raw(port)
        keep = {c(b"CLIENT", b"ID") for c in [r, *spare]}
        listing = r(b"CLIENT", b"LIST")
        assert isinstance(listing, bytes)
        for line in listing.decode().splitlines():
            client = int(line.split()[0].removeprefix("id="))
            if client not in keep:
                assert r(b"CLIENT", b"KILL", b"ID", client) == 1
        r.close()
    return hook


@pytest.mark.parametrize("kind, how, target_name", [
    ("hash", "target refuses writes", "plain"),
    ("stream", "target refuses writes", "plain"),
    ("string", "target refuses writes", "plain"),
    ("string", "target refuses writes", "aof"),
    ("hash", "target link lost", "plain"),
    ("list", "target link lost", "plain"),
    ("string", "target link lost", "plain"),
    ("string", "target link lost", "aof"),
    ("zset", "source link lost", "plain"),
    ("string", "source link lost", "plain"),
    ("string", "source link lost", "aof"),
])
async def test_a_failure_midway_raises_and_leaves_no_copy(kind, how, target_name, servers, redis):
    src, dst, dst1 = redis["src"], redis["dst"], redis["dst1"]
    fill(src, kind, KEY, SIZES[kind] // 3 if kind != "string" else 4 * CHUNK_BYTES)
    dst(b"SET", KEY, b"old")
    dst1(b"SADD", KEY, b"journal")
    source: BackendConnection = BackendConnection(HOST, servers[0], False)
    target: BackendConnection = BackendConnection(HOST, servers[1], False)
    if how == "source link lost":
        source = Hooked(servers[0], READS[kind], 3, cut_link)
    elif kind == "string" and target_name == "plain":  # one streamed SET on a connection of
        # its own: act from the source side
        hook = refuse_writes(servers[1]) if how == "target refuses writes" \
            else kill_target_clients(servers[1], [dst, dst1])
        source = Hooked(servers[0], b"GETRANGE", 3, hook)
    elif how == "target refuses writes":
        target = Hooked(servers[1], b"MULTI", 3, refuse_writes(servers[1]))
    else:
        target = Hooked(servers[1], b"MULTI", 3, cut_link)
    await connect(source, target)
    try:
        with pytest.raises(OSError, match="chunked copy of") as failure:
            await copy_in_chunks(source, target, KEY, TEMP)
    finally:
        source.close()
        target.close()
    if how == "target refuses writes":
        assert "OOM" in str(failure.value)
    assert not isinstance(failure.value, ChunkedCopyUncertain)
    assert dst(b"GET", KEY) == b"old"
    assert dst1(b"EXISTS", TEMP) == 0  # deleted (on a new connection when the link was cut)
    assert dst1(b"SMEMBERS", KEY) == [b"journal"]


async def test_a_lost_reply_to_the_final_step_is_uncertain_and_leaves_one_or_the_other(
        servers, redis):
    src, dst, dst1 = redis["src"], redis["dst"], redis["dst1"]
    fill(src, "hash", KEY, 5000)
    dst(b"SET", KEY, b"old")
    source = BackendConnection(HOST, servers[0], False)
    target = Hooked(servers[1], b"EVAL", 1, lambda c: (c.flush(), cut_link(c)), after=True)
    await connect(source, target)
    try:
        with pytest.raises(ChunkedCopyUncertain):
            await copy_in_chunks(source, target, KEY, TEMP)
    finally:
        source.close()
        target.close()
    assert dst1(b"EXISTS", TEMP) == 0
    if dst(b"TYPE", KEY) == b"hash":  # the script ran: the whole copy is in place
        assert contents(dst, "hash", KEY) == contents(src, "hash", KEY)
    else:
        assert dst(b"GET", KEY) == b"old"


async def test_the_copy_has_a_ttl_of_its_own_while_it_is_built(servers, redis):
    """A copy whose builder dies goes away by itself."""
    src, dst1 = redis["src"], redis["dst1"]
    fill(src, "hash", KEY, 8000)
    seen: list[object] = []
    source = Hooked(servers[0], b"HSCAN", 4, lambda _: seen.append(dst1(b"PTTL", TEMP)))
    target = BackendConnection(HOST, servers[1], False)
    await connect(source, target)
    try:
        await copy_in_chunks(source, target, KEY, TEMP)
    finally:
        source.close()
        target.close()
    assert len(seen) == 1 and isinstance(seen[0], int) and 0 < seen[0] <= TEMP_TTL_MS


@pytest.mark.parametrize("target_name, expected", [
    ("plain", {b"set": 1}),  # the value streamed into one SET
    ("aof", {b"setrange": 5}),  # full size at once, then 4 pieces
])
async def test_a_string_is_one_set_or_setranges_as_the_target_propagates_writes(
        target_name, expected, servers, redis):
    src, dst = redis["src"], redis["dst"]
    fill(src, "string", KEY, 4 * CHUNK_BYTES - 5)
    assert dst(b"CONFIG", b"RESETSTAT") == b"OK"
    await copy(servers, KEY)
    stats = dst(b"INFO", b"commandstats")
    assert isinstance(stats, bytes)
    calls = {line.split(b":")[0].removeprefix(b"cmdstat_"): int(line.split(b"calls=")[1].split(b",")[0])
             for line in stats.splitlines() if line.startswith(b"cmdstat_")}
    assert {cmd: calls.get(cmd, 0) for cmd in (b"set", b"setrange", b"append")} == \
        {b"set": 0, b"setrange": 0, b"append": 0, **expected}
    assert contents(dst, "string", KEY) == contents(src, "string", KEY)
