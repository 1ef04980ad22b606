"""The chunked copy's pure planners (proxy/chunked.py), as tables: what each type reads next,
what it writes for what it read, when it is done, the transactions, the TTL decision."""
from __future__ import annotations

import hiredis
import pytest

from proxy.chunked import (
    CHUNK_BYTES,
    CHUNK_ELEMENTS,
    FIRST_ELEMENTS,
    KINDS,
    LENGTH_COMMANDS,
    TEMP_TTL_MS,
    Chunk,
    Position,
    StreamMeta,
    check_transaction,
    finalize_command,
    first_position,
    max_steps,
    next_count,
    plan_chunk,
    read_command,
    stream_finish,
    stream_meta,
    string_prelude,
    string_trailer,
    string_writes,
    ttl_left,
    write_transaction,
    writes_propagate,
)

K, T = b"user:key", b"moonmesh:chunk:1"


def test_every_kind_has_a_first_position_and_a_length_command():
    assert set(LENGTH_COMMANDS) == set(KINDS)
    assert first_position(b"string") == Position(b"0", CHUNK_BYTES)
    assert first_position(b"stream") == Position(b"-", FIRST_ELEMENTS)
    for kind in (b"hash", b"set", b"zset", b"list"):
        assert first_position(kind) == Position(b"0", FIRST_ELEMENTS)


@pytest.mark.parametrize("kind, pos, expected", [
    (b"string", Position(b"0", CHUNK_BYTES), [b"GETRANGE", K, b"0", b"1048575"]),
    (b"string", Position(b"1048576", CHUNK_BYTES), [b"GETRANGE", K, b"1048576", b"2097151"]),
    (b"string", Position(b"5", 3), [b"GETRANGE", K, b"5", b"7"]),
    (b"hash", Position(b"0", 10), [b"HSCAN", K, b"0", b"COUNT", b"10"]),
    (b"set", Position(b"1234", 1000), [b"SSCAN", K, b"1234", b"COUNT", b"1000"]),
    (b"zset", Position(b"77", 3), [b"ZSCAN", K, b"77", b"COUNT", b"3"]),
    (b"list", Position(b"0", 10), [b"LRANGE", K, b"0", b"9"]),
    (b"list", Position(b"2010", 1000), [b"LRANGE", K, b"2010", b"3009"]),
    (b"stream", Position(b"-", 10), [b"XRANGE", K, b"-", b"+", b"COUNT", b"10"]),
    (b"stream", Position(b"(5-1", 1000), [b"XRANGE", K, b"(5-1", b"+", b"COUNT", b"1000"]),
])
def test_read_commands(kind, pos, expected):
    assert read_command(kind, K, pos) == expected


@pytest.mark.parametrize("count, elements, size, expected", [
    (10, 10, 640, CHUNK_ELEMENTS),  # small elements: as many as allowed
    (10, 10, 10 * 100_000, 10),  # 100 KB each: 10 fit a MiB
    (1000, 4, 4 * 600_000, 1),  # over half a MiB each: one at a time
    (1000, 1, 50 << 20, 1),  # a huge one: still one (an element is never split)
    (10, 10, 0, CHUNK_ELEMENTS),  # empty strings as elements
    (10, 0, 0, 20),  # an empty SCAN page: ask for more
    (800, 0, 0, CHUNK_ELEMENTS),
])
def test_the_next_count_fits_the_byte_budget(count, elements, size, expected):
    assert next_count(count, elements, size) == expected


# -- strings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("pos, reply, expected", [
    # first of several: a full chunk, go on after it
    (Position(b"0", 4), b"ab\r\n", Chunk((), Position(b"4", 4), 4, b"ab\r\n")),
    # a middle one
    (Position(b"4", 4), b"\x00\x00\xff\n", Chunk((), Position(b"8", 4), 4, b"\x00\x00\xff\n")),
    # the last, short
    (Position(b"8", 4), b"z", Chunk((), None, 1, b"z")),
    # a string of exactly two chunks: the third read finds nothing
    (Position(b"8", 4), b"", Chunk((), None, 0, b"")),
    # the empty string (it exists: SET k "")
    (Position(b"0", CHUNK_BYTES), b"", Chunk((), None, 0, b"")),
])
def test_string_chunks(pos, reply, expected):
    assert plan_chunk(b"string", T, pos, reply) == expected


def test_a_string_copy_is_one_streamed_set_with_the_copy_ttl():
    assert string_prelude(T, 5) == (b"*2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n"
                                    b"*2\r\n$6\r\nUNLINK\r\n$16\r\nmoonmesh:chunk:1\r\n"
                                    b"*5\r\n$3\r\nSET\r\n$16\r\nmoonmesh:chunk:1\r\n$5\r\n")
    ttl = b"%d" % TEMP_TTL_MS
    assert string_trailer() == b"\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl)
    # the pieces in between make a valid command
    reader = hiredis.Reader()
    reader.feed(string_prelude(T, 5) + b"a\r\n\x00b" + string_trailer())
    assert [reader.gets() for _ in range(3)] == [
        [b"SELECT", b"1"], [b"UNLINK", T], [b"SET", T, b"a\r\n\x00b", b"PX", ttl]]


@pytest.mark.parametrize("info, propagate", [
    (b"# Persistence\r\naof_enabled:0\r\n# Replication\r\nrepl_backlog_active:0\r\n", False),
    (b"# Persistence\r\naof_enabled:1\r\n# Replication\r\nrepl_backlog_active:0\r\n", True),
    (b"# Persistence\r\naof_enabled:0\r\n# Replication\r\nrepl_backlog_active:1\r\n", True),
])
def test_whether_the_targets_writes_propagate(info, propagate):
    assert writes_propagate(info) is propagate


@pytest.mark.parametrize("offset, piece, total, expected", [
    # the first piece of several: the string full size at once, then the piece
    (0, b"ab", 5, ((b"SETRANGE", T, b"4", b"\x00"), (b"SETRANGE", T, b"0", b"ab"))),
    (2, b"cd", 5, ((b"SETRANGE", T, b"2", b"cd"),)),  # a middle one
    (4, b"e", 5, ((b"SETRANGE", T, b"4", b"e"),)),  # the last
    (0, b"abc", 3, ((b"SET", T, b"abc"),)),  # a string of one piece
    (0, b"", 0, ((b"SET", T, b""),)),  # the empty string
])
def test_string_writes_for_a_target_whose_writes_propagate(offset, piece, total, expected):
    assert string_writes(T, offset, piece, total) == expected


# -- collections -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, pos, reply, writes, nxt, size", [
    # hash: first page, a middle page, an empty page before the end, the last (cursor 0)
    (b"hash", Position(b"0", 10), [b"17", [b"f1", b"v1", b"f2", b""]],
     ((b"HSET", T, b"f1", b"v1", b"f2", b""),), Position(b"17", CHUNK_ELEMENTS), 6),
    (b"hash", Position(b"17", 1000), [b"99", [b"f\r\n", b"\x00"]],
     ((b"HSET", T, b"f\r\n", b"\x00"),), Position(b"99", CHUNK_ELEMENTS), 4),
    (b"hash", Position(b"99", 1000), [b"3", []], (), Position(b"3", CHUNK_ELEMENTS), 0),
    (b"hash", Position(b"3", 10), [b"5", []], (), Position(b"5", 20), 0),
    (b"hash", Position(b"3", 1000), [b"0", [b"f9", b"v9"]], ((b"HSET", T, b"f9", b"v9"),),
     None, 4),
    # a small hash (listpack): everything in the first page, cursor 0
    (b"hash", Position(b"0", 10), [b"0", [b"a", b"1"]], ((b"HSET", T, b"a", b"1"),), None, 2),
    # a page that ends the scan with nothing in it
    (b"set", Position(b"8", 1000), [b"0", []], (), None, 0),
    (b"set", Position(b"0", 10), [b"12", [b"m1", b"", b"3"]], ((b"SADD", T, b"m1", b"", b"3"),),
     Position(b"12", CHUNK_ELEMENTS), 3),
    # zset: members and scores swap places; scores go as text, exactly as read
    (b"zset", Position(b"0", 10),
     [b"4", [b"m1", b"0.10000000000000001", b"m2", b"-inf", b"m3", b"1e+300"]],
     ((b"ZADD", T, b"0.10000000000000001", b"m1", b"-inf", b"m2", b"1e+300", b"m3"),),
     Position(b"4", CHUNK_ELEMENTS), 35),
    (b"zset", Position(b"4", 1000), [b"0", [b"m4", b"3"]], ((b"ZADD", T, b"3", b"m4"),), None, 3),
    # list: a full read goes on after it (by index), a short one is the last, so is an empty one
    (b"list", Position(b"0", 3), [b"a", b"b", b"c"], ((b"RPUSH", T, b"a", b"b", b"c"),),
     Position(b"3", CHUNK_ELEMENTS), 3),
    (b"list", Position(b"3", 3), [b"d", b"e"], ((b"RPUSH", T, b"d", b"e"),), None, 2),
    (b"list", Position(b"6", 3), [], (), None, 0),
    # big elements: the next read asks for fewer
    (b"list", Position(b"0", 2), [b"x" * 300_000, b"y" * 300_000],
     ((b"RPUSH", T, b"x" * 300_000, b"y" * 300_000),), Position(b"2", 3), 600_000),
    # stream: one XADD per entry with its id; the next read starts after the last id
    (b"stream", Position(b"-", 2), [[b"1-1", [b"a", b"1"]], [b"1-2", [b"a", b"2", b"a", b"3"]]],
     ((b"XADD", T, b"1-1", b"a", b"1"), (b"XADD", T, b"1-2", b"a", b"2", b"a", b"3")),
     Position(b"(1-2", CHUNK_ELEMENTS), 12),
    (b"stream", Position(b"(1-2", 5), [[b"9-0", [b"f", b"\r\n"]]],
     ((b"XADD", T, b"9-0", b"f", b"\r\n"),), None, 6),
    (b"stream", Position(b"(9-0", 5), [], (), None, 0),
])
def test_collection_chunks(kind, pos, reply, writes, nxt, size):
    chunk = plan_chunk(kind, T, pos, reply)
    assert chunk == Chunk(writes, nxt, size)


@pytest.mark.parametrize("kind, reply", [
    (b"string", None),  # GETRANGE never replies nil
    (b"hash", [b"0"]),
    (b"hash", [b"0", [b"f", 1]]),
    (b"list", b"not a list"),
    (b"stream", [[b"1-1"]]),
])
def test_unexpected_replies_raise(kind, reply):
    with pytest.raises(ValueError):
        plan_chunk(kind, T, first_position(kind), reply)


def test_a_chunk_is_written_in_one_transaction_that_renews_the_copy_ttl():
    writes = ((b"HSET", T, b"f", b"v"),)
    ttl = b"%d" % TEMP_TTL_MS
    first = write_transaction(T, writes, created=False)
    assert first == [[b"SELECT", b"1"], [b"MULTI"], [b"UNLINK", T], [b"HSET", T, b"f", b"v"],
                     [b"PEXPIRE", T, ttl], [b"EXEC"], [b"SELECT", b"0"]]
    later = write_transaction(T, writes, created=True)
    assert later == first[:2] + [[b"EXISTS", T]] + first[3:]


def _tx_replies(results: object) -> list[object]:
    return [b"OK", b"OK", b"QUEUED", b"QUEUED", b"QUEUED", results, b"OK"]


@pytest.mark.parametrize("results, created, error", [
    ([0, 1, 1], False, None),  # the first: nothing to unlink, one field, TTL set
    ([1, 1, 1], False, None),  # a leftover copy was removed
    ([1, 0, 1], True, None),  # later: it was there; the field existed (a SCAN repeat)
    ([0, 1, 1], True, "vanished"),  # later, and the copy was gone (its TTL ran out)
    ([1, 1, 0], True, "missing"),
    ([1, hiredis.ReplyError("WRONGTYPE x"), 1], True, "WRONGTYPE"),
    (hiredis.ReplyError("EXECABORT Transaction discarded"), True, "EXECABORT"),
    (None, True, "EXEC replied"),
])
def test_transaction_checks(results, created, error):
    if error is None:
        check_transaction(_tx_replies(results), created)
    else:
        with pytest.raises(OSError, match=error):
            check_transaction(_tx_replies(results), created)


def test_a_refused_write_fails_the_chunk_even_before_exec():
    replies = _tx_replies(hiredis.ReplyError("EXECABORT x"))
    replies[3] = hiredis.ReplyError("OOM command not allowed when used memory > 'maxmemory'.")
    with pytest.raises(OSError, match="OOM"):
        check_transaction(replies, True)


# -- streams' metadata -------------------------------------------------------------------------

INFO = [b"length", 2, b"radix-tree-keys", 1, b"radix-tree-nodes", 2,
        b"last-generated-id", b"7-0", b"max-deleted-entry-id", b"6-0", b"entries-added", 5,
        b"recorded-first-entry-id", b"2-0", b"groups", 0,
        b"first-entry", [b"2-0", [b"a", b"1"]], b"last-entry", [b"5-0", [b"a", b"1"]]]


def test_stream_metadata_from_xinfo():
    assert stream_meta(INFO) == StreamMeta(b"7-0", 5, b"6-0", 0)
    with_groups = list(INFO)
    with_groups[with_groups.index(b"groups") + 1] = 2
    assert stream_meta(with_groups).groups == 2
    with pytest.raises(ValueError):
        stream_meta(INFO[:-4] + [b"oops"])
    with pytest.raises(ValueError):
        stream_meta([b"length", 2])


def test_stream_finish_sets_the_metadata_and_creates_an_empty_stream():
    meta = StreamMeta(b"7-0", 5, b"6-0", 0)
    setid = (b"XSETID", T, b"7-0", b"ENTRIESADDED", b"5", b"MAXDELETEDID", b"6-0")
    assert stream_finish(T, meta, created=True) == (setid,)
    assert stream_finish(T, meta, created=False) == (
        (b"XGROUP", b"CREATE", T, b"moonmesh-chunk", b"$", b"MKSTREAM"),
        (b"XGROUP", b"DESTROY", T, b"moonmesh-chunk"), setid)


# -- the TTL and the final step ----------------------------------------------------------------

@pytest.mark.parametrize("start, since_start, end, since_end, expected", [
    (-1, 5000.0, -1, 1.0, 0),  # no TTL
    (10_000, 1500.0, 8_600, 1.0, 8_500),  # the start reading, less the time since, is less
    (10_000, 1500.0, 8_400, 1.0, 8_399),  # the end reading is (the source's clock jumped)
    (10_000, 9_999.5, 600, 0.0, 1),  # under a millisecond left: 1
    (10_000, 10_000.0, 1, 0.0, None),  # ran out
    (100, 250.0, -2, 0.5, None),  # expired during the copy
    (-2, 0.0, -2, 0.0, None),
    (-1, 10.0, 500, 0.0, 500),  # (cannot happen while held) the one reading with a TTL counts
])
def test_ttl_left(start, since_start, end, since_end, expected):
    assert ttl_left(start, since_start, end, since_end) == expected


def test_the_final_step_is_one_eval():
    cmd = finalize_command(T, K, 1234)
    assert cmd[0] == b"EVAL" and cmd[2:] == [b"2", T, K, b"1234"]
    assert finalize_command(T, K, 0)[-1] == b"0"


@pytest.mark.parametrize("kind, length, enough", [
    (b"string", 0, 1), (b"string", CHUNK_BYTES, 2), (b"string", 100 * CHUNK_BYTES + 1, 101),
    (b"hash", 1, 2), (b"list", 1_000_000, 1_000_000),  # one element a read at worst
])
def test_max_steps_leaves_room_for_every_read(kind, length, enough):
    assert max_steps(kind, length) >= enough
