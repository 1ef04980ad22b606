from __future__ import annotations

import json
from dataclasses import replace

import pytest

from core.view import (
    MAX_MIGRATION_RATE,
    ClusterConfig,
    ClusterView,
    Migration,
    NodeAddress,
    Shard,
    ViewError,
    even_split,
    from_json,
    to_json,
    validate,
)


def make_view(shards: int = 2, replicas: int = 1) -> ClusterView:
    ranges = even_split(shards)
    shard_list, nodes = [], []
    n = 0
    for i in range(shards):
        members = []
        for _ in range(1 + replicas):
            nid = f"node-{n}"
            nodes.append((nid, NodeAddress(f"127.0.0.1:{7000 + n}", f"127.0.0.1:{17000 + n}")))
            members.append(nid)
            n += 1
        shard_list.append(Shard(f"s{i + 1}", members[0], tuple(members[1:]), ranges[i]))
    return ClusterView("mydb", 1, tuple(shard_list), tuple(sorted(nodes)))


def test_a_well_formed_view_round_trips_through_json():
    view = replace(make_view(3), config=ClusterConfig(password_hash="ab" * 32),
                   migrations=(Migration(((0, 10),), "s1", "s2", 1),))
    validate(view)
    assert from_json(to_json(view)) == view


@pytest.mark.parametrize("rate", [None, 0, 1, 5000, MAX_MIGRATION_RATE])
def test_the_migration_rate_round_trips(rate):
    view = replace(make_view(2), config=ClusterConfig(migration_rate=rate))
    data = to_json(view)
    assert json.loads(data)["config"]["migration_rate"] == rate
    assert from_json(data) == view and from_json(data).config.migration_rate == rate


def test_a_view_from_before_the_migration_rate_reads_as_the_node_flag():
    doc = json.loads(to_json(make_view(2)))
    del doc["config"]["migration_rate"]
    assert from_json(json.dumps(doc)).config.migration_rate is None


@pytest.mark.parametrize("value, message", [
    (-1, "migration_rate must be 0"), (MAX_MIGRATION_RATE + 1, "migration_rate must be 0"),
    ("5000", "expected an integer"), (True, "expected an integer"), (2.5, "expected an integer"),
])
def test_a_bad_migration_rate_in_json_is_refused(value, message):
    doc = json.loads(to_json(make_view(2)))
    doc["config"]["migration_rate"] = value
    with pytest.raises(ViewError, match=message):
        from_json(json.dumps(doc))


def test_even_split_covers_every_slot_once():
    for n in (1, 2, 3, 7, 16384):
        ranges = [r for rs in even_split(n) for r in rs]
        assert ranges[0][0] == 0 and ranges[-1][1] == 16383
        assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s + 1 for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1


def shard(view, i, **changes):
    shards = list(view.shards)
    shards[i] = replace(shards[i], **changes)
    return replace(view, shards=tuple(shards))


def rate(view, value):
    return replace(view, config=replace(view.config, migration_rate=value))


BAD = [
    ("bad name", lambda v: replace(v, cluster="no spaces"), "invalid cluster name"),
    ("epoch 0", lambda v: replace(v, epoch=0), "epoch"),
    ("slot owned twice", lambda v: shard(v, 1, slots=((8000, 16383),)), "owned by"),
    ("slot unowned", lambda v: shard(v, 1, slots=((8200, 16383),)), "no owner"),
    ("node in two shards", lambda v: shard(v, 1, replicas=("node-0",)), "more than one"),
    ("master is own replica", lambda v: shard(v, 0, replicas=("node-0",)), "more than one"),
    ("node without address", lambda v: shard(v, 0, replicas=("ghost",)), "no addresses"),
    ("unsorted ranges", lambda v: shard(v, 0, slots=((100, 8191), (0, 99))), "sorted"),
    ("listed but unused", lambda v: replace(v, nodes=v.nodes + (
        ("spare", NodeAddress("127.0.0.1:1", "127.0.0.1:2")),)), "in no shard"),
    ("bad address", lambda v: replace(v, nodes=(("node-0", NodeAddress("x", "y:1")),)
                                        + v.nodes[1:]), "invalid address"),
    ("migration of foreign slots", lambda v: replace(
        v, migrations=(Migration(((9000, 9001),), "s1", "s2", 1),)), "does not own"),
    ("migration to unknown shard", lambda v: replace(
        v, migrations=(Migration(((0, 1),), "s1", "s9", 1),)), "unknown shards"),
    ("negative migration rate", lambda v: rate(v, -1),
     r"config migration_rate must be 0 \(no limit\) to 10000000 keys/s or null .* not -1"),
    ("migration rate over the limit", lambda v: rate(v, MAX_MIGRATION_RATE + 1),
     "migration_rate must be 0 .* not 10000001"),
    ("migration rate not an integer", lambda v: rate(v, 2.5), "migration_rate .* not 2.5"),
    ("migration rate a string", lambda v: rate(v, "5000"), "migration_rate .* not '5000'"),
    ("migration rate a bool", lambda v: rate(v, True), "migration_rate .* not True"),
]


@pytest.mark.parametrize("name, change, message", BAD, ids=[b[0] for b in BAD])
def test_invalid_views_are_refused(name, change, message):
    with pytest.raises(ViewError, match=message):
        validate(change(make_view()))


@pytest.mark.parametrize("data", [b"", b"{}", b"[]", b'{"cluster": 1}',
                                  b'{"cluster":"a","epoch":"1","shards":[],"nodes":{}}'])
def test_malformed_json_is_a_view_error(data):
    with pytest.raises(ViewError):
        from_json(data)


def test_leaving_replica_is_dropped_and_leaving_master_hands_over():
    from mesh.model.changes import without_departed

    view = make_view(2, 2)  # s1: node-0 (+1, +2), s2: node-3 (+4, +5)
    assert without_departed(view, set(), {}) is None
    new = without_departed(view, {"node-1", "node-3"}, {"node-4": 10, "node-5": 20})
    assert new.epoch == view.epoch + 1
    assert [(s.master, s.replicas) for s in new.shards] == [("node-0", ("node-2",)),
                                                             ("node-5", ("node-4",))]
    assert "node-1" not in new.node_ids and "node-3" not in new.node_ids


def test_leaving_master_without_replica_stays():
    from mesh.model.changes import without_departed

    assert without_departed(make_view(2, 0), {"node-0"}, {}) is None
