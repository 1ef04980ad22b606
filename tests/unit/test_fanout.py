from __future__ import annotations

import random
import zlib

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.slots import key_slot
from proxy.fanout import (
    MAX_CLIENT_CURSOR,
    MAX_MERGED_REPLY_BYTES,
    MAX_SCAN_SHARDS,
    Merge,
    Part,
    ScanOrder,
    ScanStep,
    ScanTarget,
    concat_arrays,
    first_error,
    merge,
    scan_argv,
    scan_order,
    scan_reply,
    scan_step,
    split,
    sum_integers,
    sum_keyspace,
)
from proxy.resp import encode

# a, b and c hash to three different slots; {a}x hashes with a
A, B, C = key_slot(b"a"), key_slot(b"b"), key_slot(b"c")
assert len({A, B, C}) == 3 and key_slot(b"{a}x") == A


def parse(reply: bytes) -> object:
    reader = hiredis.Reader(notEnoughData=Ellipsis)
    reader.feed(reply)
    value = reader.gets()
    assert reader.gets() is Ellipsis, "more than one reply"
    return value


# ---------------------------------------------------------------------------------- split


@pytest.mark.parametrize("argv", [
    [b"GET", b"a"],
    [b"MGET", b"a"],
    [b"MGET", b"{t}a", b"{t}b", b"{t}c"],
    [b"DEL", b"a", b"a"],
    [b"MGET"],
    [b"MSET"],
    [b"MSET", b"a", b"1", b"b"],
    [b"MSET", b"{t}a", b"1", b"{t}b", b"2"],
    [b"SUNION", b"a", b"b"],
])
def test_nothing_to_split_gives_none(argv):
    assert split(argv) is None


@pytest.mark.parametrize("name,merge_kind", [
    (b"MGET", Merge.VALUES), (b"mget", Merge.VALUES), (b"DEL", Merge.SUM), (b"unlink", Merge.SUM),
    (b"Exists", Merge.SUM), (b"TOUCH", Merge.SUM),
])
def test_keys_are_grouped_by_slot_in_order_of_first_appearance(name, merge_kind):
    plan = split([name, b"a", b"b", b"{a}x", b"c", b"b"])
    assert plan is not None
    assert plan.command == name.decode().upper()
    assert plan.merge is merge_kind
    assert plan.key_count == 5
    assert plan.parts == (
        Part(slot=A, argv=(name, b"a", b"{a}x"), positions=(0, 2)),
        Part(slot=B, argv=(name, b"b", b"b"), positions=(1, 4)),
        Part(slot=C, argv=(name, b"c"), positions=(3,)),
    )


def test_repeated_keys_are_kept_in_their_part():
    plan = split([b"EXISTS", b"a", b"a", b"b"])
    assert plan is not None
    assert [part.argv for part in plan.parts] == [(b"EXISTS", b"a", b"a"), (b"EXISTS", b"b")]
    assert [part.positions for part in plan.parts] == [(0, 1), (2,)]


def test_mset_keeps_each_key_with_its_value():
    plan = split([b"MSET", b"a", b"1", b"b", b"2", b"{a}x", b"3"])
    assert plan is not None
    assert plan.merge is Merge.ALL_OK and plan.key_count == 3
    assert plan.parts == (
        Part(slot=A, argv=(b"MSET", b"a", b"1", b"{a}x", b"3"), positions=(0, 2)),
        Part(slot=B, argv=(b"MSET", b"b", b"2"), positions=(1,)),
    )


# ---------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("resp3", [False, True])
def test_mget_values_come_back_in_the_clients_order_with_the_clients_nulls(resp3):
    binary = bytes(range(256)) + b"\r\n$-1\r\n"
    plan = split([b"MGET", b"a", b"b", b"{a}x", b"c"])
    assert plan is not None
    replies = [encode([binary, None], resp3), encode([b""], resp3), encode([None], resp3)]
    merged = merge(plan, replies)
    assert merged == encode([binary, b"", None, None], resp3)
    assert merged.endswith(b"_\r\n_\r\n" if resp3 else b"$-1\r\n$-1\r\n")


@pytest.mark.parametrize("argv,replies,expected", [
    ([b"DEL", b"a", b"b", b"c"], [b":1\r\n", b":0\r\n", b":1\r\n"], b":2\r\n"),
    ([b"UNLINK", b"a", b"b"], [b":0\r\n", b":0\r\n"], b":0\r\n"),
    ([b"EXISTS", b"a", b"a", b"b"], [b":2\r\n", b":1\r\n"], b":3\r\n"),
    ([b"TOUCH", b"a", b"b"], [b":1\r\n", b":1\r\n"], b":2\r\n"),
    ([b"MSET", b"a", b"1", b"b", b"2"], [b"+OK\r\n", b"+OK\r\n"], b"+OK\r\n"),
])
def test_counts_are_summed_and_mset_is_ok_when_every_part_is(argv, replies, expected):
    plan = split(argv)
    assert plan is not None
    assert merge(plan, replies) == expected


@pytest.mark.parametrize("argv,replies,expected", [
    ([b"MGET", b"a", b"b"], [b"*1\r\n$1\r\nv\r\n", b"-MOVED 3300 1.2.3.4:7000\r\n"],
     b"-MOVED 3300 1.2.3.4:7000\r\n"),
    ([b"MGET", b"a", b"b", b"c"], [b"-ERR first\r\n", b"*1\r\n_\r\n", b"-ERR second\r\n"],
     b"-ERR first\r\n"),
    ([b"DEL", b"a", b"b"], [b":1\r\n", b"!21\r\nSYNTAX invalid syntax\r\n"],
     b"!21\r\nSYNTAX invalid syntax\r\n"),
    ([b"MSET", b"a", b"1", b"b", b"2"], [b"-OOM command not allowed\r\n", b"+OK\r\n"],
     b"-OOM command not allowed\r\n"),
])
def test_the_first_error_of_any_part_is_the_reply_unchanged(argv, replies, expected):
    plan = split(argv)
    assert plan is not None
    assert merge(plan, replies) == expected


@pytest.mark.parametrize("argv,replies", [
    ([b"MGET", b"a", b"b"], [b"*2\r\n$1\r\nv\r\n$1\r\nw\r\n", b"*1\r\n$1\r\nv\r\n"]),  # too many
    ([b"MGET", b"a", b"b"], [b"*-1\r\n", b"*1\r\n$1\r\nv\r\n"]),
    ([b"MGET", b"a", b"b"], [b":1\r\n", b"*1\r\n$1\r\nv\r\n"]),
    ([b"MGET", b"a", b"b"], [b"*1\r\n$1\r\nv\r\n:1\r\n", b"*1\r\n$1\r\nv\r\n"]),  # trailing
    ([b"DEL", b"a", b"b"], [b"+OK\r\n", b":1\r\n"]),
    ([b"DEL", b"a", b"b"], [b":x\r\n", b":1\r\n"]),
    ([b"MSET", b"a", b"1", b"b", b"2"], [b"+OK\r\n", b"+QUEUED\r\n"]),
])
def test_a_reply_of_the_wrong_shape_becomes_an_error(argv, replies):
    plan = split(argv)
    assert plan is not None
    assert merge(plan, replies).startswith(b"-ERR unexpected reply to " + argv[0])


def test_merge_needs_one_reply_per_part():
    plan = split([b"MGET", b"a", b"b"])
    assert plan is not None
    with pytest.raises(ValueError):
        merge(plan, [b"*1\r\n$1\r\nv\r\n"])


def test_merged_reply_over_the_bound_is_refused():
    assert MAX_MERGED_REPLY_BYTES == 512 * 1024 * 1024
    plan = split([b"MGET", b"a", b"b"])
    assert plan is not None
    replies = [encode([b"x" * 100]), encode([b"y" * 100])]
    merged = merge(plan, replies)
    assert merge(plan, replies, max_bytes=len(merged)) == merged
    refused = merge(plan, replies, max_bytes=len(merged) - 1)
    assert refused == b"-ERR the merged MGET reply would exceed %d bytes; ask for fewer keys at a " \
                      b"time\r\n" % (len(merged) - 1)


@pytest.mark.parametrize("replies,expected", [
    ([b":1\r\n", b"$1\r\nx\r\n"], None),
    ([b":1\r\n", b"-ERR a\r\n", b"-ERR b\r\n"], b"-ERR a\r\n"),
    ([b"!5\r\nERR x\r\n"], b"!5\r\nERR x\r\n"),
    ([], None),
])
def test_first_error_finds_simple_and_blob_errors(replies, expected):
    assert first_error(replies) == expected


# ---------------------------------------------------------------------- keyspace fan-outs


@pytest.mark.parametrize("replies,expected", [
    ([b":3\r\n", b":0\r\n", b":4\r\n"], b":7\r\n"),
    ([b":3\r\n"], b":3\r\n"),
    ([b":3\r\n", b"-LOADING Redis is loading\r\n"], b"-LOADING Redis is loading\r\n"),
    ([b":3\r\n", b"$1\r\n3\r\n"], b"-ERR unexpected reply to DBSIZE from a shard\r\n"),
])
def test_dbsize_is_the_sum_of_the_masters(replies, expected):
    assert sum_integers(replies) == expected


@pytest.mark.parametrize("replies,expected", [
    ([encode([b"a", b"b"]), encode([]), encode([b"c"])], encode([b"a", b"b", b"c"])),
    ([encode([]), encode([])], encode([])),
    ([encode([b"a"]), b"-ERR busy\r\n"], b"-ERR busy\r\n"),
    ([encode([b"a"]), b"*-1\r\n"], b"-ERR unexpected reply to KEYS from a shard\r\n"),
    ([encode([b"a"]), b"$1\r\na\r\n"], b"-ERR unexpected reply to KEYS from a shard\r\n"),
])
def test_keys_of_every_master_are_concatenated(replies, expected):
    assert concat_arrays(replies) == expected


def test_keys_over_the_bound_suggest_scan():
    replies = [encode([b"k" * 50]), encode([b"j" * 50])]
    whole = concat_arrays(replies)
    assert concat_arrays(replies, max_bytes=len(whole)) == whole
    refused = concat_arrays(replies, max_bytes=len(whole) - 1)
    assert refused.startswith(b"-ERR the merged KEYS reply would exceed")
    assert b"SCAN" in refused


def info(text: str, resp3: bool = False) -> bytes:
    data = text.replace("\n", "\r\n").encode()
    if resp3:
        return b"=%d\r\ntxt:%s\r\n" % (len(data) + 4, data)
    return b"$%d\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("replies,expected", [
    ([info("# Keyspace\n")], "# Keyspace\n"),
    ([info("# Keyspace\n"), info("# Keyspace\n", resp3=True)], "# Keyspace\n"),
    ([info("# Keyspace\ndb0:keys=3,expires=0,avg_ttl=0\n"),
      info("# Keyspace\ndb0:keys=4,expires=0,avg_ttl=0\n", resp3=True)],
     "# Keyspace\ndb0:keys=7,expires=0,avg_ttl=0\n"),
    # avg_ttl: mean of the non-zero ones, weighted by the keys that have a TTL
    ([info("# Keyspace\ndb0:keys=10,expires=1,avg_ttl=1000\n"),
      info("# Keyspace\ndb0:keys=10,expires=3,avg_ttl=2000\n"),
      info("# Keyspace\ndb0:keys=10,expires=0,avg_ttl=0\n")],
     "# Keyspace\ndb0:keys=30,expires=4,avg_ttl=1750\n"),
    ([info("# Keyspace\ndb0:keys=1,expires=1,avg_ttl=1\n"),
      info("# Keyspace\ndb0:keys=1,expires=1,avg_ttl=2\n")],
     "# Keyspace\ndb0:keys=2,expires=2,avg_ttl=2\n"),  # 1.5 rounds up
    # several dbs, one missing on a shard, and in number order
    ([info("# Keyspace\ndb2:keys=5,expires=5,avg_ttl=100\ndb0:keys=1,expires=0,avg_ttl=0\n"),
      info("# Keyspace\ndb0:keys=2,expires=0,avg_ttl=0\n"),
      info("# Keyspace\n")],
     "# Keyspace\ndb0:keys=3,expires=0,avg_ttl=0\ndb2:keys=5,expires=5,avg_ttl=100\n"),
    # a newer count (Redis 7.4's subexpiry) is summed too
    ([info("# Keyspace\ndb0:keys=1,expires=0,avg_ttl=0,subexpiry=1\n"),
      info("# Keyspace\ndb0:keys=1,expires=0,avg_ttl=0,subexpiry=2\n")],
     "# Keyspace\ndb0:keys=2,expires=0,avg_ttl=0,subexpiry=3\n"),
    ([], "# Keyspace\n"),
])
def test_keyspace_sections_are_summed_per_db(replies, expected):
    assert sum_keyspace(replies) == expected.replace("\n", "\r\n").encode()


@pytest.mark.parametrize("reply", [b"-ERR x\r\n", b":1\r\n", b"$-1\r\n"])
def test_keyspace_of_a_reply_that_is_not_text_is_refused(reply):
    with pytest.raises(ValueError):
        sum_keyspace([info("# Keyspace\n"), reply])


# ---------------------------------------------------------------------------------- SCAN


def target(node_id: str, receiving: bool = False) -> ScanTarget:
    return ScanTarget(node_id=node_id, address=f"10.0.0.{ord(node_id[0])}:7000",
                      receiving=receiving)


def cursor_of(order: ScanOrder, index: int, redis_cursor: int) -> bytes:
    return b"%d" % ((redis_cursor << 18) | (order.tag << 6) | index)


ORDER = scan_order([target("c"), target("a"), target("b")])


@pytest.mark.parametrize("masters,expected", [
    ([target("c"), target("a"), target("b")], ["a", "b", "c"]),
    ([target("a", True), target("c"), target("b")], ["b", "c", "a"]),
    ([target("c", True), target("a", True), target("b")], ["b", "a", "c"]),
])
def test_receiving_shards_are_scanned_last_and_ties_go_by_node_id(masters, expected):
    assert [m.node_id for m in scan_order(masters).masters] == expected


def test_order_tag_is_a_stable_12_bit_crc_of_the_ordered_masters():
    names = "\n".join(f"{m.node_id}@{m.address}/{m.layout}" for m in ORDER.masters)
    assert ORDER.tag == zlib.crc32(names.encode()) & 0xFFF
    assert ORDER.tag == 941  # the same in every process (no hash())


@pytest.mark.parametrize("masters", [
    [target("a", True), target("b"), target("c")],  # a migration into a started
    [target("a"), target("b")],  # a shard left
    [target("a"), target("b"), target("c"), target("d")],  # a shard came
    [target("a"), target("b"), ScanTarget(node_id="c2", address="10.0.0.9:7000",
                                          receiving=False)],  # failover
])
def test_order_tag_changes_when_the_order_changes(masters):
    assert scan_order(masters).tag != ORDER.tag


def test_scan_starts_at_the_first_master_from_cursor_zero():
    assert scan_step(b"0", ORDER) == ScanStep(index=0, redis_cursor=0, target=ORDER.masters[0])


@pytest.mark.parametrize("index,redis_cursor", [(0, 7), (1, 0), (2, 123456), (1, 2**40)])
def test_a_cursor_names_its_master_and_redis_cursor(index, redis_cursor):
    step = scan_step(cursor_of(ORDER, index, redis_cursor), ORDER)
    assert step == ScanStep(index=index, redis_cursor=redis_cursor, target=ORDER.masters[index])


@pytest.mark.parametrize("cursor", [
    b"-1", b"abc", b"", b"1.5", b" 1", b"+1", b"0x10", "١".encode(), b"%d" % (MAX_CLIENT_CURSOR + 1),
])
def test_a_cursor_that_is_not_an_unsigned_64_bit_number_is_invalid(cursor):
    assert scan_step(cursor, ORDER) == b"-ERR invalid cursor\r\n"


def test_a_cursor_past_the_last_master_is_invalid():
    assert scan_step(cursor_of(ORDER, 3, 5), ORDER) == b"-ERR invalid cursor\r\n"


def test_a_cursor_from_another_order_restarts_the_scan():
    moved = scan_order([target("a", True), target("b"), target("c")])
    old = cursor_of(ORDER, 2, 99)
    assert scan_step(old, moved) == ScanStep(index=0, redis_cursor=0, target=moved.masters[0])


def test_scan_refuses_too_many_shards_and_no_shard():
    many = scan_order([target(f"n{i:02d}") for i in range(MAX_SCAN_SHARDS + 1)])
    refused = scan_step(b"0", many)
    assert isinstance(refused, bytes) and refused.startswith(b"-ERR")
    assert scan_step(b"0", scan_order([target(f"n{i:02d}") for i in range(MAX_SCAN_SHARDS)])) \
        == ScanStep(index=0, redis_cursor=0, target=target("n00"))
    assert scan_step(b"0", scan_order([])) == b"-CLUSTERDOWN The cluster is down\r\n"


@pytest.mark.parametrize("argv,expected", [
    ([b"SCAN", b"99"], [b"SCAN", b"42"]),
    ([b"scan", b"99", b"MATCH", b"user:*", b"COUNT", b"100", b"TYPE", b"hash"],
     [b"scan", b"42", b"MATCH", b"user:*", b"COUNT", b"100", b"TYPE", b"hash"]),
])
def test_scan_argv_substitutes_the_redis_cursor_and_keeps_the_options(argv, expected):
    step = ScanStep(index=1, redis_cursor=42, target=ORDER.masters[1])
    assert scan_argv(argv, step) == expected


@pytest.mark.parametrize("index,redis_next,next_index", [
    (0, 17, 0),  # the master's scan goes on
    (1, 2**40, 1),
    (0, 0, 1),  # it ended: the next master, from its start
    (1, 0, 2),
    (2, 0, None),  # the last master ended: the scan is over
])
@pytest.mark.parametrize("resp3", [False, True])
def test_scan_reply_carries_the_combined_cursor_and_the_keys_raw(index, redis_next, next_index,
                                                                 resp3):
    step = ScanStep(index=index, redis_cursor=5, target=ORDER.masters[index])
    keys = [b"k1", b"\x00bin\r\n"]
    reply = scan_reply(step, ORDER, encode([b"%d" % redis_next, keys], resp3))
    if next_index is None:
        assert reply == encode([b"0", keys], resp3)
        return
    cursor = cursor_of(ORDER, next_index, redis_next)
    assert reply == encode([cursor, keys], resp3)
    assert scan_step(cursor, ORDER) == ScanStep(index=next_index, redis_cursor=redis_next,
                                                target=ORDER.masters[next_index])


@pytest.mark.parametrize("part_reply,expected", [
    (b"-ERR unknown type\r\n", b"-ERR unknown type\r\n"),
    (b"!9\r\nERR nope!\r\n", b"!9\r\nERR nope!\r\n"),
    (b"*1\r\n$1\r\n0\r\n", b"-ERR unexpected reply to SCAN from a shard\r\n"),
    (b"*2\r\n$1\r\nx\r\n*0\r\n", b"-ERR unexpected reply to SCAN from a shard\r\n"),
    (b"*2\r\n:0\r\n*0\r\n", b"-ERR unexpected reply to SCAN from a shard\r\n"),
    (b"*2\r\n$1\r\n0\r\n$0\r\n\r\n", b"-ERR unexpected reply to SCAN from a shard\r\n"),
])
def test_scan_reply_passes_errors_and_refuses_other_shapes(part_reply, expected):
    step = ScanStep(index=0, redis_cursor=0, target=ORDER.masters[0])
    assert scan_reply(step, ORDER, part_reply) == expected


def test_scan_reply_refuses_a_cursor_too_large_for_64_bits():
    step = ScanStep(index=0, redis_cursor=0, target=ORDER.masters[0])
    huge = encode([b"%d" % (1 << 47), []])
    assert scan_reply(step, ORDER, huge).startswith(b"-ERR a shard's SCAN cursor is too large")


# A fake Redis SCAN over key numbers: the cursor is 1 + the next key number to look at, so a
# key in the shard for the whole scan is returned exactly once, as Redis promises.


def fake_scan(shard: set[int], argv: list[bytes]) -> bytes:
    start = max(int(argv[1]) - 1, 0)
    count = int(argv[argv.index(b"COUNT") + 1])
    ahead = sorted(k for k in shard if k >= start)
    batch, rest = ahead[:count], ahead[count:]
    return encode([b"%d" % (rest[0] + 1 if rest else 0), [b"key:%d" % k for k in batch]])


def full_scan(order: ScanOrder, shards: dict[str, set[int]], count: int,
              between_steps=lambda: None) -> list[bytes]:
    found: list[bytes] = []
    cursor = b"0"
    for _ in range(10_000):
        step = scan_step(cursor, order)
        assert isinstance(step, ScanStep)
        argv = scan_argv([b"SCAN", cursor, b"COUNT", b"%d" % count], step)
        reply = parse(scan_reply(step, order, fake_scan(shards[step.target.node_id], argv)))
        assert isinstance(reply, list)
        cursor, keys = reply
        found.extend(keys)
        between_steps()
        if cursor == b"0":
            return found
    raise AssertionError("the scan did not end")


@settings(max_examples=60, deadline=None)
@given(shard_count=st.integers(1, 8), key_count=st.integers(0, 120), count=st.integers(1, 25),
       seed=st.integers(0, 2**32))
def test_a_full_scan_of_a_quiet_cluster_returns_every_key_exactly_once(shard_count, key_count,
                                                                       count, seed):
    rng = random.Random(seed)
    shards: dict[str, set[int]] = {f"node-{i}": set() for i in range(shard_count)}
    for key in range(key_count):
        shards[rng.choice(sorted(shards))].add(key)
    order = scan_order([target(name) for name in shards])
    found = full_scan(order, shards, count)
    assert sorted(found) == sorted(b"key:%d" % k for k in range(key_count))


@settings(max_examples=40, deadline=None)
@given(key_count=st.integers(1, 80), count=st.integers(1, 10), seed=st.integers(0, 2**32))
def test_keys_moving_into_the_receiving_shard_during_a_scan_are_found(key_count, count, seed):
    rng = random.Random(seed)
    shards: dict[str, set[int]] = {"a": set(), "b": set(), "c": set()}
    for key in range(key_count):
        shards[rng.choice("ab")].add(key)
    order = scan_order([target("a"), target("b", receiving=True), target("c")])
    assert [m.node_id for m in order.masters] == ["a", "c", "b"]

    def migrate_some() -> None:  # a -> b, a few keys per step
        for key in sorted(shards["a"])[: rng.randint(0, 3)]:
            shards["a"].discard(key)
            shards["b"].add(key)

    found = full_scan(order, shards, count, migrate_some)
    assert set(found) == {b"key:%d" % k for k in range(key_count)}


def test_scan_tag_changes_when_a_shards_slots_change():
    before = [ScanTarget(node_id="a", address="h:1", receiving=False, layout="((0, 8191),)"),
              ScanTarget(node_id="b", address="h:2", receiving=False, layout="((8192, 16383),)")]
    after = [ScanTarget(node_id="a", address="h:1", receiving=False, layout="((0, 16383),)"),
             ScanTarget(node_id="b", address="h:2", receiving=False, layout="()")]
    assert scan_order(before).tag != scan_order(after).tag
    assert scan_order(before).tag == scan_order(list(reversed(before))).tag
