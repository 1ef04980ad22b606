"""The migration gate's and mover's pure decisions, and the routes a migration gives its
source and target (proxy/migration.py, proxy/mover.py, proxy/routing.py), as tables."""
from __future__ import annotations

from dataclasses import replace

import pytest

from core.view import ClusterConfig, Migration
from proxy.migration import Checked, after_check, is_write
from proxy.mover import (
    BATCH_BYTES,
    BATCH_KEYS,
    RATED_BATCH_BYTES,
    Batch,
    batch_limits,
    confirmed,
    pack_keys,
    plan_batches,
    restore_commands,
    unpack_keys,
)
from proxy.routing import MigratingSlots, live_replicas, table_from_view
from tests.unit.test_view import make_view

# s1 (node-0, replica node-1) -> s2 (node-2, replica node-3), slots 0-100, started at epoch 1
VIEW = replace(make_view(2, 1), migrations=(Migration(((0, 100),), "s1", "s2", 1),))
MID = VIEW.migrations[0].id


@pytest.mark.parametrize("present, keys, source, ready, expected", [
    (1, 1, True, True, Checked.RUN),
    (2, 2, True, False, Checked.RUN),  # all here: served here even before the barrier
    (0, 1, True, True, Checked.FORWARD),  # moved (or never existed): the target has it
    (0, 1, True, False, Checked.WAIT),  # maybe moved, the target not ready: wait
    (1, 2, True, True, Checked.TRYAGAIN),  # split
    (1, 2, True, False, Checked.TRYAGAIN),
    (2, 2, False, True, Checked.RUN),  # the target, after ASKING: all arrived
    (1, 2, False, True, Checked.TRYAGAIN),
    (0, 2, False, True, Checked.TRYAGAIN),  # the target never forwards
])
def test_what_the_gate_does_after_its_check(present, keys, source, ready, expected):
    assert after_check(present, keys, source, ready) is expected


def test_the_source_gates_before_its_barrier_passes():
    """After a restart, a promotion or a cancel, the source serves the slots through the
    gate from the first table: never as their plain owner while keys may be at the target."""
    before = table_from_view(VIEW, "node-0", frozenset())
    route = before.routes[50]
    assert isinstance(route, MigratingSlots) and route.source and not route.ready
    assert route.peer == "127.0.0.1:7002"
    after = table_from_view(VIEW, "node-0", frozenset({MID}))
    assert after.routes[50].ready  # type: ignore[union-attr]  # a MigratingSlots
    assert before.routes[101] is None  # slots outside the migration are plain
    target = table_from_view(VIEW, "node-2", frozenset())
    assert isinstance(target.routes[50], MigratingSlots) and not target.routes[50].source


def test_the_source_follows_the_target_shards_current_master():
    failed_over = replace(VIEW, shards=(VIEW.shards[0], replace(
        VIEW.shards[1], master="node-3", replicas=("node-2",))), failed=("node-2",))
    route = table_from_view(failed_over, "node-0").routes[0]
    assert isinstance(route, MigratingSlots) and route.peer == "127.0.0.1:7003"
    assert route.peer_replicas == 0  # the old master is failed: nobody to WAIT for there
    assert route.replicas == 1


def test_markers_carry_replica_counts_and_synchronous_mode():
    synced = replace(VIEW, config=ClusterConfig(min_replicas_ack=1, ack_timeout_ms=250))
    route = table_from_view(synced, "node-0").routes[0]
    assert isinstance(route, MigratingSlots)
    assert (route.replicas, route.peer_replicas, route.min_replicas_ack,
            route.ack_timeout_ms) == (1, 1, 1, 250)
    assert live_replicas(replace(VIEW, failed=("node-1",)), "s1") == 0


@pytest.mark.parametrize("rate", [None, 0, 5000])
def test_markers_carry_the_clusters_migration_rate(rate):
    """The mover reads its rate from the marker: the cluster's (`migrate throttle`), or
    None for the node's --migration-rate; both sides' markers carry it."""
    view = replace(VIEW, config=ClusterConfig(migration_rate=rate))
    source = table_from_view(view, "node-0").routes[0]
    target = table_from_view(view, "node-2").routes[0]
    assert isinstance(source, MigratingSlots) and source.source
    assert isinstance(target, MigratingSlots) and not target.source
    assert source.keys_per_second == target.keys_per_second == rate
    throttled = table_from_view(view.next(config=ClusterConfig(migration_rate=7)), "node-0")
    assert throttled.routes[0].keys_per_second == 7  # type: ignore[union-attr]


def test_a_batch_copies_what_is_still_here_with_its_ttl():
    keys = [b"a", b"b", b"c", b"d"]
    dumps = [b"PAY", -1,  # a: no TTL
             None, -2,  # b: gone
             b"PQ", 1500,  # c: expires in 1.5 s
             b"X", -2,  # d: expired between DUMP and PTTL
             b"Y", 0]  # e: under 1 ms left (0 would mean no TTL)
    assert restore_commands((*keys, b"e"), dumps) == [
        (b"ASKING",), (b"RESTORE", b"a", b"0", b"PAY", b"REPLACE"),
        (b"ASKING",), (b"RESTORE", b"c", b"1500", b"PQ", b"REPLACE"),
        (b"ASKING",), (b"RESTORE", b"e", b"1", b"Y", b"REPLACE")]


@pytest.mark.parametrize("sizes, expected", [
    ([], []),
    ([0, 0], []),  # gone between SCAN and sizing: nothing to move
    ([10, 20, 30], [Batch((b"k0", b"k1", b"k2"), 60)]),
    ([60, 50], [Batch((b"k0",), 60), Batch((b"k1",), 50)]),  # over the bytes: a new batch
    ([10, 10, 10, 10, 10], [Batch((b"k0", b"k1", b"k2"), 30), Batch((b"k3", b"k4"), 20)]),  # keys
    ([10, 1000, 10], [Batch((b"k1",), 1000, True), Batch((b"k0", b"k2"), 20)]),  # big: alone
    ([100], [Batch((b"k0",), 100)]),  # exactly the batch size: fits
    ([999, 0, 5], [Batch((b"k0",), 999), Batch((b"k2",), 5)]),
])
def test_batches_are_sized_by_bytes_and_keys_and_big_keys_go_alone(sizes, expected):
    keys = [b"k%d" % i for i in range(len(sizes))]
    assert plan_batches(keys, sizes, batch_bytes=100, batch_keys=3, big_key=1000) == expected


@pytest.mark.parametrize("reply, replicas, expected", [
    (b":1\r\n", 1, True), (b":2\r\n", 1, True), (b":0\r\n", 1, False),
    (b"-UNCERTAIN x\r\n", 1, False), (b"-CLUSTERDOWN x\r\n", 0, False),
])
def test_wait_confirms(reply, replicas, expected):
    assert confirmed(reply, replicas) is expected


@pytest.mark.parametrize("argv, expected", [
    ([b"SET", b"k", b"v"], True), ([b"incr", b"k"], True), ([b"GET", b"k"], False),
    ([b"OBJECT", b"ENCODING", b"k"], False), ([b"NOSUCH", b"k"], False),
])
def test_which_gated_commands_are_writes(argv, expected):
    assert is_write(argv) is expected


@pytest.mark.parametrize("keys", [
    [], [b""], [b"a"], [b"k:1", b"{tag}x", b"\x00\r\n\xff" * 100], [b"x" * 70_000, b"y"],
])
def test_a_journal_entry_packs_any_keys_and_unpacks_them_in_order(keys):
    assert unpack_keys(pack_keys(keys)) == keys


@pytest.mark.parametrize("rate, expected", [
    (0, (BATCH_BYTES, BATCH_KEYS)),  # no limit: the biggest batches
    (1000, (RATED_BATCH_BYTES, 16)),  # slow: small batches, never under 16 keys
    (10_000, (RATED_BATCH_BYTES, 50)),
    (10_000_000, (RATED_BATCH_BYTES, BATCH_KEYS)),
])
def test_under_a_rate_batches_are_small_and_frequent(rate, expected):
    assert batch_limits(rate) == expected
