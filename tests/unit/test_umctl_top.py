"""umctl-mesh top's pure part: the proxies' replies parsed, the nodes' readings merged."""
from __future__ import annotations

import pytest

from proxy.hotkeys import MAX_KEY_BYTES as HOTKEY_BYTES
from tests.unit.test_view import make_view
from tools.umctl_mesh.top import (
    NodeReading,
    merge_keys,
    merge_slots,
    node_rows,
    parse_hotkeys,
    parse_slot_stats,
)

VIEW = make_view(2, 1)  # s1: node-0 (master), node-1; s2: node-2 (master), node-3
S1_SLOT, S2_SLOT = 5, 16000


def stats(cpu: int, keys: int = 0, bytes_in: int = 0, bytes_out: int = 0) -> dict[str, int]:
    return {"key-count": keys, "cpu-usec": cpu, "network-bytes-in": bytes_in,
            "network-bytes-out": bytes_out}


@pytest.mark.parametrize("reply,expected", [
    ([], ()),
    ([[b"a", 30], [b"b", 10]], ((b"a", 30), (b"b", 10))),
])
def test_hotkeys_replies_are_parsed(reply, expected):
    assert parse_hotkeys(reply) == expected


@pytest.mark.parametrize("reply", [b"oops", [[b"a"]], [[b"a", b"30"]], [["a", 1]], None])
def test_a_malformed_hotkeys_reply_is_an_error(reply):
    with pytest.raises(ValueError, match="HOTKEYS"):
        parse_hotkeys(reply)


def test_slot_stats_replies_are_parsed_and_missing_fields_are_zero():
    reply = [[7, [b"key-count", 3, b"cpu-usec", 120, b"network-bytes-in", 40,
                  b"network-bytes-out", 90]],
             [9, [b"cpu-usec", 5]]]
    assert parse_slot_stats(reply) == ((7, stats(120, 3, 40, 90)), (9, stats(5)))


@pytest.mark.parametrize("reply", [b"x", [[7]], [["7", []]], [[7, [b"cpu-usec"]]]])
def test_a_malformed_slot_stats_reply_is_an_error(reply):
    with pytest.raises(ValueError, match="SLOT-STATS"):
        parse_slot_stats(reply)


def test_a_key_read_on_master_and_replica_adds_up_and_the_most_used_comes_first():
    # user and alpha hash to s1's slots, cart and zeta to s2's
    readings = [NodeReading("node-0", hotkeys=((b"alpha", 100), (b"user", 40))),
                NodeReading("node-1", hotkeys=((b"user", 80),)),
                NodeReading("node-2", hotkeys=((b"zeta", 50), (b"cart", 50)))]
    got = merge_keys(readings, VIEW, 10)
    assert [(k["key"], k["ops"], k["nodes"]) for k in got] == [
        ("user", 120, ["node-0", "node-1"]), ("alpha", 100, ["node-0"]),
        ("cart", 50, ["node-2"]), ("zeta", 50, ["node-2"])]
    assert [k["shard"] for k in got] == ["s1", "s1", "s2", "s2"]
    assert len(merge_keys(readings, VIEW, 2)) == 2


def test_a_key_counts_at_its_owning_shard_not_where_it_was_forwarded_from():
    # node-0 took cart (an s2 key) on its plain listener and forwarded it: node-2 sampled
    # the same commands again
    readings = [NodeReading("node-0", hotkeys=((b"cart", 300),)),
                NodeReading("node-2", hotkeys=((b"cart", 100),))]
    assert merge_keys(readings, VIEW, 10) == [
        {"key": "cart", "ops": 100, "nodes": ["node-2"], "shard": "s2"}]


def test_a_key_cut_to_the_tracked_length_counts_where_it_was_seen():
    cut = b"k" * HOTKEY_BYTES  # its first bytes only: their slot says nothing of the key's
    got = merge_keys([NodeReading("node-0", hotkeys=((cut, 7),)),
                      NodeReading("node-2", hotkeys=((cut, 5),))], VIEW, 10)
    assert [(k["ops"], k["nodes"], k["shard"]) for k in got] == [(12, ["node-0", "node-2"], "s1")]


def test_a_key_that_is_not_text_is_shown_escaped():
    got = merge_keys([NodeReading("node-0", hotkeys=((b"\xff\x00k", 1),))], VIEW, 1)
    assert got[0]["key"] == "\\xff\x00k"


def test_slots_add_the_work_of_every_node_and_keep_the_largest_key_count():
    readings = [NodeReading("node-0", slots=((S1_SLOT, stats(100, 7, 10, 20)),)),
                NodeReading("node-1", slots=((S1_SLOT, stats(50, 6, 1, 2)),)),
                NodeReading("node-2", slots=((S2_SLOT, stats(120, 1)), (S2_SLOT + 1, stats(0))))]
    got = merge_slots(readings, VIEW, 10)
    assert got == [
        {"slot": S1_SLOT, "shard": "s1", "key-count": 7, "cpu-usec": 150,
         "network-bytes-in": 11, "network-bytes-out": 22},
        {"slot": S2_SLOT, "shard": "s2", **stats(120, 1)},
        {"slot": S2_SLOT + 1, "shard": "s2", **stats(0)}]
    assert [s["slot"] for s in merge_slots(readings, VIEW, 1)] == [S1_SLOT]


def test_nodes_are_listed_busiest_first_and_unknown_rates_last():
    readings = [NodeReading("node-0", ops_per_sec=10.04), NodeReading("node-1"),
                NodeReading("node-2", ops_per_sec=250.0), NodeReading("node-3", ops_per_sec=0)]
    assert [(n["node"], n["role"], n["shard"], n["ops_per_sec"])
            for n in node_rows(readings, VIEW)] == [
        ("node-2", "master", "s2", 250.0), ("node-0", "master", "s1", 10.0),
        ("node-3", "replica", "s2", 0), ("node-1", "replica", "s1", None)]
