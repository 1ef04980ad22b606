from __future__ import annotations

import binascii

from core.slots import key_slot, normalize, parse_range
from proxy import clusterinfo
from proxy.routing import SLOT_NOT_SERVED, empty_table, node_id, table_from_meta
from proxy.umctl import parse_setcluster


def table(line: str, me: str = "127.0.0.1:5299"):
    return table_from_meta(parse_setcluster([w.encode() for w in line.split()]), me)


SEED = "v2 1 NOFLAGS mydb 127.0.0.1:6379 1 0-8000 PEER 127.0.0.1:7000 1 8001-16383"


def test_key_slot_matches_redis_examples():
    assert key_slot(b"a") == 15495
    assert key_slot(b"b") == 3300
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    # an empty tag: the whole key is hashed (CRC16/XMODEM is binascii's crc_hqx from 0)
    assert key_slot(b"foo{}{bar}") == binascii.crc_hqx(b"foo{}{bar}", 0) % 16384 != key_slot(b"bar")
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")


def test_slot_ranges_normalize():
    assert normalize([(5, 9), (0, 4), (20, 20)]) == ((0, 9), (20, 20))
    assert parse_range("300") == (300, 300)


def test_owned_slots_are_local_and_the_rest_redirect():
    t = table(SEED)
    assert t.routes[0] is None and t.routes[8000] is None
    assert t.routes[15495] == b"-MOVED 15495 127.0.0.1:7000\r\n"


def test_only_a_table_with_every_slot_here_serves_all():
    assert table("v2 1 NOFLAGS mydb 127.0.0.1:5299 1 0-16383").serves_all
    assert not table(SEED).serves_all
    assert not empty_table().serves_all


def test_uncovered_slots_are_not_served():
    t = table("v2 1 NOFLAGS mydb 127.0.0.1:6379 1 0-100")
    assert t.routes[101] == SLOT_NOT_SERVED
    assert empty_table().routes[0] == SLOT_NOT_SERVED


def test_node_ids_are_stable_forty_characters():
    a = node_id("mydb", "127.0.0.1:5299")
    assert len(a) == 40 and a.startswith("mydb" + "_" * 16)
    assert a == node_id("mydb", "127.0.0.1:5299") != node_id("mydb", "127.0.0.1:7000")
    assert len(node_id("x" * 60, "h:1")) == 40


def test_cluster_nodes_lines():
    t = table(SEED)
    me, peer = clusterinfo.cluster_nodes(t).splitlines()
    assert me.split()[1:] == ["127.0.0.1:5299", "myself,master", "-", "0", "0", "1", "connected",
                              "0-8000"]
    assert peer.split()[1:] == ["127.0.0.1:7000", "master", "-", "0", "0", "1", "connected",
                                "8001-16383"]


def test_cluster_slots_and_shards_cover_the_same_ranges():
    t = table(SEED)
    slots = clusterinfo.cluster_slots(t)
    assert [(r[0], r[1], r[2][1]) for r in slots] == [(0, 8000, 5299), (8001, 16383, 7000)]
    shards = clusterinfo.cluster_shards(t)
    assert [s["slots"] for s in shards] == [[0, 8000], [8001, 16383]]
    assert "cluster_state:ok" in clusterinfo.cluster_info(t)
    assert "cluster_state:fail" in clusterinfo.cluster_info(
        table("v2 1 NOFLAGS mydb 127.0.0.1:6379 1 0-100"))


def test_password_in_config_is_kept_only_as_a_hash():
    t = table(SEED + " CONFIG password s3cret")
    assert t.password_hash and "s3cret" not in repr(t)


def test_table_from_view_serves_the_masters_slots_and_lists_replicas():
    from proxy.routing import table_from_view
    from tests.unit.test_view import make_view

    view = make_view(2, 1)  # s1: node-0 (+node-1), s2: node-2 (+node-3)
    master = table_from_view(view, "node-0")
    assert master.routes[0] is None and master.routes[16383] == b"-MOVED 16383 127.0.0.1:7002\r\n"
    replica = table_from_view(view, "node-1")
    assert replica.routes[0] == b"-MOVED 0 127.0.0.1:7000\r\n"
    lines = clusterinfo.cluster_nodes(replica).splitlines()
    mine = next(line for line in lines if "myself" in line).split()
    assert mine[2] == "myself,slave" and mine[3] == node_id("mydb", "node-0")
    slots = clusterinfo.cluster_slots(master)
    assert [[n[1] for n in row[2:]] for row in slots] == [[7000, 7001], [7002, 7003]]
    shards = clusterinfo.cluster_shards(master)
    assert [[n["role"] for n in s["nodes"]] for s in shards] == [["master", "replica"]] * 2
