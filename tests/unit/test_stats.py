"""proxy/stats.py: the data path's counters, their bounds and the sample's weights."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.slots import key_slot
from proxy.resp import encode_command
from proxy.stats import (
    LATENCY_BUCKETS,
    MAX_ERROR_KINDS,
    SAMPLE_EVERY,
    ProxyStats,
    Sample,
    command_name,
    count_into,
    error_kind,
    fold_commands,
    key_of,
    request_bytes,
)


@pytest.mark.parametrize(("reply", "kind"), [
    (b"-MOVED 3999 127.0.0.1:7000\r\n", "MOVED"),
    (b"-TRYAGAIN\r\n", "TRYAGAIN"),
    (b"-ERR unknown command 'x'\r\n", "ERR"),
    (b"-\r\n", "ERR"),
])
def test_error_kind(reply, kind):
    assert error_kind(reply) == kind


@pytest.mark.parametrize(("raw", "name"), [
    (b"get", "GET"), (b"GeT", "GET"), (b"CLUSTER", "CLUSTER"), (b"nosuch", "other"),
])
def test_command_name(raw, name):
    assert command_name(raw) == name


def test_fold_merges_spellings_and_bounds_made_up_names():
    raw = {b"get": 2, b"GET": 3, b"Set": 1, b"zzz": 4, b"yyy": 1}
    assert fold_commands(raw) == {b"GET": 5, b"SET": 1, b"other": 5}


def test_counting_names_of_a_batch():
    counts: dict[bytes, int] = {}
    count_into(counts, (argv[0] for argv in [[b"GET", b"a"], [b"GET", b"b"], [b"SET", b"c"]]))
    assert counts == {b"GET": 2, b"SET": 1}


def test_error_kinds_are_capped():
    stats = ProxyStats()
    for i in range(MAX_ERROR_KINDS + 10):
        stats.count_error(b"-KIND%d x\r\n" % i)
    assert len(stats.errors) == MAX_ERROR_KINDS + 1 and stats.errors["other"] == 10


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6))
def test_request_bytes_is_the_encoded_size(argv):
    assert request_bytes(argv) == len(encode_command(argv))


@pytest.mark.parametrize(("argv", "key"), [
    ([b"GET", b"k"], b"k"), ([b"set", b"k", b"v"], b"k"), ([b"PING"], None),
    ([b"GET"], None), ([b"EVAL", b"s", b"1", b"k"], None), ([b"NOSUCH", b"k"], None),
])
def test_key_of(argv, key):
    assert key_of(argv) == key


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=40))
def test_exactly_one_command_in_sample_every_is_sampled(reads):
    """Whatever the reads' sizes, the countdown samples the commands at global positions
    SAMPLE_EVERY-1, 2*SAMPLE_EVERY-1, ... and stays in 1..SAMPLE_EVERY."""
    stats = ProxyStats()
    sampled = total = 0
    for n in reads:
        batch = [[b"GET", b"k%d" % (total + i)] for i in range(n)]
        if n >= stats.countdown:
            names, slots = stats.sample(batch)
            sampled += len(names)
        else:
            stats.countdown -= n
        total += n
        assert 1 <= stats.countdown <= SAMPLE_EVERY
    assert sampled == total // SAMPLE_EVERY
    # each sampled key carries SAMPLE_EVERY operations
    assert stats.hotkeys.total == sampled * SAMPLE_EVERY


def test_sampled_commands_charge_their_slot():
    stats = ProxyStats()
    stats.countdown = 1
    names, slots = stats.sample([[b"SET", b"k", b"v"]])
    assert names == ["SET"] and slots == [key_slot(b"k")]
    assert stats.slot_bytes_in[key_slot(b"k")] == len(encode_command([b"SET", b"k", b"v"])) \
        * SAMPLE_EVERY
    sample = Sample(0.0, names, slots, commands=2)
    sample.cpu, sample.wrote = 0.000010, 10
    stats.finish(sample, 0.0003)
    # the read's cost is split between its 2 commands, then weighted like the sample
    assert stats.slot_cpu_usec[key_slot(b"k")] == pytest.approx(10 / 2 * SAMPLE_EVERY)
    assert stats.slot_bytes_out[key_slot(b"k")] == 10 / 2 * SAMPLE_EVERY
    snap = stats.latency_snapshot()["SET"]
    assert snap.count == 1 and snap.total == 0.0003
    assert snap.buckets[LATENCY_BUCKETS.index(0.00025)] == 0
    assert snap.buckets[LATENCY_BUCKETS.index(0.0005)] == 1 and snap.buckets[-1] == 1


def test_keyless_sampled_commands_charge_no_slot():
    stats = ProxyStats()
    stats.countdown = 1
    names, slots = stats.sample([[b"PING"]])
    assert names == ["PING"] and slots == [-1] and stats.hotkeys.total == 0
