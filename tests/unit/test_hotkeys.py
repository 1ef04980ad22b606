"""proxy/hotkeys.py: the space-saving top-N, by tables and by its guarantees."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.hotkeys import MAX_KEY_BYTES, HotKey, SpaceSaving


@pytest.mark.parametrize(("capacity", "stream", "n", "expected"), [
    (4, [b"a", b"b", b"a", b"c", b"a", b"b"], 2, [(b"a", 3, 0), (b"b", 2, 0)]),
    (4, [b"a"], 5, [(b"a", 1, 0)]),
    (4, [], 3, []),
    (4, [b"a", b"b"], 0, []),
    # full: the new key replaces the smallest and inherits its count as the error
    (2, [b"a", b"a", b"b", b"c"], 2, [(b"a", 2, 0), (b"c", 2, 1)]),
    # ties are ordered by key
    (3, [b"b", b"a", b"c"], 3, [(b"a", 1, 0), (b"b", 1, 0), (b"c", 1, 0)]),
])
def test_top(capacity, stream, n, expected):
    table = SpaceSaving(capacity)
    for key in stream:
        table.offer(key)
    assert table.top(n) == [HotKey(*e) for e in expected]


def test_weights_count_as_that_many_operations():
    table = SpaceSaving(4)
    table.offer(b"k", 16)
    table.offer(b"k", 16)
    assert table.top(1) == [HotKey(b"k", 32, 0)] and table.total == 32


def test_memory_is_bounded_by_capacity_and_key_length():
    table = SpaceSaving(8)
    for i in range(10_000):
        table.offer(b"%d" % i + b"x" * 1000)
    assert len(table.counts) == 8 and len(table.errors) == 8
    assert all(len(k) <= MAX_KEY_BYTES for k in table.counts)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        SpaceSaving(0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=300), st.integers(1, 12))
def test_space_saving_guarantees(stream, capacity):
    """Each estimate is within [truth, truth + error]; every key above total/capacity is
    tracked; the counts add up to the total offered."""
    table = SpaceSaving(capacity)
    for x in stream:
        table.offer(b"%d" % x)
    truth = Counter(b"%d" % x for x in stream)
    for key, count in table.counts.items():
        assert truth[key] <= count <= truth[key] + table.errors[key]
    for key, n in truth.items():
        if n > len(stream) / capacity:
            assert key in table.counts
    assert sum(table.counts.values()) == len(stream) == table.total
    top = table.top(capacity)
    assert [h.count for h in top] == sorted((h.count for h in top), reverse=True)


@pytest.mark.parametrize(("offered", "times", "expected"), [
    ({b"a": 8, b"b": 3}, 1, [(b"a", 4, 0), (b"b", 1, 0)]),
    ({b"a": 8, b"b": 3}, 2, [(b"a", 2, 0)]),  # b falls to 0 and goes
    ({b"a": 8}, 0, [(b"a", 8, 0)]),
    ({b"a": 8}, 10_000, []),  # an hour idle: empty
])
def test_halving_ages_every_count(offered, times, expected):
    table = SpaceSaving(4)
    for key, weight in offered.items():
        table.offer(key, weight)
    table.halve(times)
    assert table.top(4) == [HotKey(*e) for e in expected]
    assert table.total == sum(table.counts.values())


def test_a_key_hot_now_outranks_one_hot_long_ago():
    table = SpaceSaving(2)
    table.offer(b"old", 1000)
    for _ in range(5):  # five half-lives without `old`, `new` at a tenth of its rate
        table.halve()
        table.offer(b"new", 100)
    assert [h.key for h in table.top(2)] == [b"new", b"old"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 30), st.just(-1)), max_size=300), st.integers(1, 12))
def test_halving_keeps_the_table_consistent(stream, capacity):
    """-1 in the stream is a halving: errors stay within counts, the counts add up to the
    total, the heap still finds the smallest, and memory stays bounded."""
    table = SpaceSaving(capacity)
    for x in stream:
        if x < 0:
            table.halve()
        else:
            table.offer(b"%d" % x)
        assert len(table.counts) <= capacity and table.errors.keys() == table.counts.keys()
        assert all(0 <= table.errors[k] <= c for k, c in table.counts.items())
        assert sum(table.counts.values()) == table.total
