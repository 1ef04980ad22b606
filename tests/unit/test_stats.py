"""proxy/stats.py: the data path's counters, their bounds and the sample's weights."""
from __future__ import annotations

import random
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import proxy.stats
from core.slots import key_slot
from proxy.jobs import SLOT_COUNTS_FRESH, KeyCounts
from proxy.resp import encode_command
from proxy.stats import (
    HOTKEYS_HALF_LIFE,
    LATENCY_BUCKETS,
    LONGEST_NAME,
    MAX_COMMAND_NAMES,
    MAX_ERROR_KINDS,
    SAMPLE_EVERY,
    ProxyStats,
    Sample,
    command_name,
    count_into,
    error_kind,
    fold_commands,
    is_command,
    key_of,
    name_and_key,
    next_gap,
    request_bytes,
)


@pytest.fixture
def monkeypatch_gap(monkeypatch):
    """Fixed gaps between sample points instead of random ones."""
    return lambda gap: monkeypatch.setattr(proxy.stats, "next_gap", lambda: gap)


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
@given(st.lists(st.integers(1, 600), min_size=1, max_size=40), st.integers(1, 2 * SAMPLE_EVERY))
def test_samples_stand_for_every_command_exactly(reads, gap):
    """With gaps of `gap` commands between sample points: every point is a hot-key sample of
    weight SAMPLE_EVERY, and a read's weight is its points', so both add up to the points
    passed."""
    with patch.object(proxy.stats, "next_gap", lambda: gap):
        check_weights(reads, gap)


def check_weights(reads: list[int], gap: int) -> None:
    stats = ProxyStats()
    stats.countdown = gap
    weights = total = 0
    for n in reads:
        batch = [[b"GET", b"k%d" % (total + i)] for i in range(n)]
        if n >= stats.countdown:
            name, slot, weight = stats.sample(batch, 0.0)
            assert name == "GET" and weight % SAMPLE_EVERY == 0 and weight
            weights += weight
        else:
            stats.countdown -= n
        total += n
        assert 1 <= stats.countdown <= gap
    assert weights == total // gap * SAMPLE_EVERY
    assert stats.hotkeys.total == weights


def test_random_gaps_average_sample_every():
    random.seed(7)
    gaps = [next_gap() for _ in range(20_000)]
    assert min(gaps) >= 1 and max(gaps) <= 2 * SAMPLE_EVERY - 1
    assert abs(sum(gaps) / len(gaps) - SAMPLE_EVERY) < SAMPLE_EVERY * 0.03


def test_weights_estimate_the_commands_read():
    random.seed(11)
    stats = ProxyStats()
    total = 0
    for n in [1] * 20_000 + [16] * 3_000 + [256] * 300:
        batch = [[b"GET", b"k"]] * n
        if n >= stats.countdown:
            stats.sample(batch, 0.0)
        else:
            stats.countdown -= n
        total += n
    assert abs(stats.hotkeys.total - total) < total * 0.1


def test_a_read_gives_its_first_sample_point(monkeypatch_gap):
    monkeypatch_gap(SAMPLE_EVERY)
    stats = ProxyStats()
    stats.countdown = 3
    batch = [[b"GET", b"k%d" % i] for i in range(2 * SAMPLE_EVERY + 5)]
    name, slot, weight = stats.sample(batch, 0.0)
    assert (name, slot, weight) == ("GET", key_slot(b"k2"), 3 * SAMPLE_EVERY)
    # every point's key is a sample: one pipeline's hot key is found however long it is
    assert sorted((c.key, c.count) for c in stats.hotkeys.top(10)) == [
        (b"k%d" % i, SAMPLE_EVERY) for i in sorted([2, 2 + SAMPLE_EVERY, 2 + 2 * SAMPLE_EVERY])]
    # points at 2, 2+S, 2+2S; the next is 2+3S, i.e. S-2 commands into the next read
    assert stats.countdown == 2 + 3 * SAMPLE_EVERY - len(batch) + 1


def test_sampled_commands_charge_their_slot():
    stats = ProxyStats()
    stats.countdown = 1
    name, slot, weight = stats.sample([[b"SET", b"k", b"v"]], 0.0)
    weight = SAMPLE_EVERY  # one point in a read of one command
    assert (name, slot, weight) == ("SET", key_slot(b"k"), SAMPLE_EVERY)
    assert stats.slot_bytes_in[slot] == len(encode_command([b"SET", b"k", b"v"])) * SAMPLE_EVERY
    sample = Sample(0.0, name, slot, weight, commands=2)
    sample.cpu, sample.wrote = 0.000010, 10
    stats.finish(sample, 0.0003)
    # the read's cost is split between its 2 commands, then weighted like the sample
    assert stats.slot_cpu_usec[slot] == pytest.approx(10 / 2 * SAMPLE_EVERY)
    assert stats.slot_bytes_out[slot] == 10 / 2 * SAMPLE_EVERY
    snap = stats.latency_snapshot()["SET"]
    assert snap.count == 1 and snap.total == 0.0003
    assert snap.buckets[LATENCY_BUCKETS.index(0.00025)] == 0
    assert snap.buckets[LATENCY_BUCKETS.index(0.0005)] == 1 and snap.buckets[-1] == 1


def test_keyless_sampled_commands_charge_no_slot():
    stats = ProxyStats()
    stats.countdown = 1
    assert stats.sample([[b"PING"]], 0.0) == ("PING", -1, SAMPLE_EVERY)  # one point, one command
    assert stats.hotkeys.total == 0
    stats.finish(Sample(0.0, "PING", -1, SAMPLE_EVERY, 1), 0.001)
    assert sum(stats.slot_cpu_usec) == 0 and stats.latency_snapshot()["PING"].count == 1


def test_made_up_names_from_a_hostile_client_stay_bounded():
    stats = ProxyStats()
    for i in range(5 * MAX_COMMAND_NAMES):
        stats.count_new(b"x%d" % i, 1)
        stats.count_each([[b"GET", b"k"], [b"y%d" % i, b"k"]])
    assert len(stats.commands) <= MAX_COMMAND_NAMES + 1
    assert stats.command_counts() == {"GET": 5 * MAX_COMMAND_NAMES,
                                      "other": 10 * MAX_COMMAND_NAMES}


@pytest.mark.parametrize(("raw", "known"), [
    (b"get", True), (b"GEORADIUSBYMEMBER_RO", True), (b"nosuch", False), (b"", False),
    (b"GET" + b" " * LONGEST_NAME, False), (b"x" * (1 << 20), False),
])
def test_is_command(raw, known):
    assert is_command(raw) is known


def test_made_up_names_are_other_at_once_so_their_bytes_are_bounded():
    stats = ProxyStats()
    huge = [b"%06d" % i + b"x" * 100_000 for i in range(50)]
    for name in huge[:25]:
        stats.count_new(name, 1)
    for name in huge[25:]:
        stats.count_each([[b"GET", b"k"], [name, b"k"], [b"get", b"k"]])
    assert set(stats.commands) == {b"other", b"GET", b"get"}
    assert sum(map(len, stats.commands)) <= (MAX_COMMAND_NAMES + 1) * LONGEST_NAME
    assert stats.command_counts() == {"GET": 50, "other": 50}


def test_made_up_names_are_not_cached_by_samples():
    name = b"y" * (1 << 20)
    assert name_and_key([name, b"k"]) == ("other", None)
    assert name not in proxy.stats._spellings
    assert name_and_key([b"gEt", b"k"]) == ("GET", b"k")


def test_reset_forgets_everything_but_clients_accepted():
    stats = ProxyStats()
    stats.clients_accepted = 3
    stats.count_new(b"GET", 5)
    stats.count_error(b"-MOVED 1 h:1\r\n")
    stats.countdown = 1
    _, slot, _ = stats.sample([[b"GET", b"secret-key"]], 0.0)
    stats.finish(Sample(0.0, "GET", slot, SAMPLE_EVERY, 1), 0.001)
    assert stats.hotkeys.top(1) and stats.slot_bytes_in[slot] and stats.latency
    stats.reset()
    assert stats.commands == {} and stats.errors == {} and stats.latency == {}
    assert stats.hotkeys.top(10) == [] and stats.hotkeys.total == 0
    assert not any(stats.slot_bytes_in) and not any(stats.slot_cpu_usec) \
        and not any(stats.slot_bytes_out)
    assert stats.latency_snapshot() == {} and stats.command_counts() == {}
    assert stats.clients_accepted == 3 and stats.countdown >= 1


def test_skip_draws_the_points_of_a_read_without_a_sample(monkeypatch_gap):
    monkeypatch_gap(10)
    stats = ProxyStats()
    stats.countdown = 3
    assert stats.skip(25) == 3 * SAMPLE_EVERY  # points at commands 3, 13 and 23
    assert stats.countdown == 8  # the next at command 33: the 8th of the next read
    assert stats.hotkeys.total == 0


@pytest.mark.parametrize(("tenant", "epoch", "age", "fresh"), [
    ("t", 3, 0.0, True),
    ("t", 3, SLOT_COUNTS_FRESH - 0.1, True),
    ("t", 3, SLOT_COUNTS_FRESH, False),  # too old
    ("t", 3, -1.0, False),  # a clock that went back: not trusted
    ("t", 4, 0.0, False),  # another epoch of the table: slots may have moved
    ("u", 3, 0.0, False),  # another tenant's counts
])
def test_key_counts_are_reused_for_the_same_table_while_fresh(tenant, epoch, age, fresh):
    counts = KeyCounts("t", 3, 100.0, (0,) * 16384)
    assert counts.fresh_for(tenant, epoch, 100.0 + age) is fresh


def test_hot_keys_are_halved_once_per_half_life_passed():
    stats = ProxyStats()
    stats.countdown = 1
    with patch.object(proxy.stats, "next_gap", lambda: 1):
        stats.sample([[b"GET", b"k"]], 100.0)  # a fresh table ages nothing that was offered
        assert stats.hotkeys.top(1)[0].count == SAMPLE_EVERY
        stats.sample([[b"GET", b"other"]], 100.0 + HOTKEYS_HALF_LIFE)
        assert dict(stats.hotkeys.counts) == {b"k": SAMPLE_EVERY // 2, b"other": SAMPLE_EVERY}
    stats.age_hotkeys(100.0 + 3 * HOTKEYS_HALF_LIFE)  # UMCTL HOTKEYS ages it as it reads
    assert dict(stats.hotkeys.counts) == {b"k": SAMPLE_EVERY // 8, b"other": SAMPLE_EVERY // 4}
    stats.age_hotkeys(100.0 + 3 * HOTKEYS_HALF_LIFE + 1)  # less than a half-life more: as is
    assert dict(stats.hotkeys.counts) == {b"k": SAMPLE_EVERY // 8, b"other": SAMPLE_EVERY // 4}
