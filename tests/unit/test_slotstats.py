"""proxy/slotstats.py: CLUSTER SLOT-STATS's arguments and rows, as Valkey 8 answers them."""
from __future__ import annotations

import pytest

from proxy.slotstats import (
    ARITY,
    BAD_LIMIT,
    BAD_METRIC,
    BAD_SLOT,
    REPEATED,
    SYNTAX,
    OrderBy,
    SlotNumbers,
    SlotsRange,
    SlotStatsError,
    parse,
    rows,
    served_slots,
)


def argv(*words: str) -> list[bytes]:
    return [b"CLUSTER", b"SLOT-STATS", *(w.encode() for w in words)]


@pytest.mark.parametrize(("words", "expected"), [
    (("SLOTSRANGE", "0", "16383"), SlotsRange(0, 16383)),
    (("slotsrange", "7", "7"), SlotsRange(7, 7)),
    (("SLOTSRANGE", "0", "0"), SlotsRange(0, 0)),
    (("ORDERBY", "key-count"), OrderBy("key-count", 16384, True)),
    (("orderby", "CPU-USEC", "limit", "10"), OrderBy("cpu-usec", 10, True)),
    (("ORDERBY", "network-bytes-in", "ASC"), OrderBy("network-bytes-in", 16384, False)),
    (("ORDERBY", "network-bytes-out", "DESC", "LIMIT", "16384"),
     OrderBy("network-bytes-out", 16384, True)),
])
def test_parse(words, expected):
    assert parse(argv(*words)) == expected


@pytest.mark.parametrize(("words", "message"), [
    ((), ARITY),
    (("SLOTSRANGE",), ARITY),
    (("SLOTSRANGE", "0", "16384"), BAD_SLOT),
    (("SLOTSRANGE", "-1", "5"), BAD_SLOT),
    (("SLOTSRANGE", "a", "5"), BAD_SLOT),
    (("SLOTSRANGE", " 1", "5"), BAD_SLOT),
    (("SLOTSRANGE", "-0", "5"), BAD_SLOT),  # Valkey's string2ll takes no -0
    (("SLOTSRANGE", "0", "-0"), BAD_SLOT),
    (("SLOTSRANGE", "01", "5"), BAD_SLOT),
    (("SLOTSRANGE", "5", "1"), "ERR Start slot number 5 is greater than end slot number 1"),
    (("SLOTSRANGE", "1", "2", "3"),
     "ERR unknown subcommand or wrong number of arguments for 'SLOT-STATS'. Try CLUSTER HELP."),
    (("NOPE", "1"),
     "ERR unknown subcommand or wrong number of arguments for 'SLOT-STATS'. Try CLUSTER HELP."),
    (("ORDERBY", "memory-bytes"), BAD_METRIC),
    (("ORDERBY", "key-count", "LIMIT"), SYNTAX),
    (("ORDERBY", "key-count", "LIMIT", "0"), BAD_LIMIT),
    (("ORDERBY", "key-count", "LIMIT", "16385"), BAD_LIMIT),
    (("ORDERBY", "key-count", "LIMIT", "x"), BAD_LIMIT),
    (("ORDERBY", "key-count", "LIMIT", "-0"), BAD_LIMIT),
    (("ORDERBY", "key-count", "LIMIT", "-1"), BAD_LIMIT),
    (("ORDERBY", "key-count", "LIMIT", "1", "LIMIT", "2"), REPEATED),
    (("ORDERBY", "key-count", "ASC", "DESC"), REPEATED),
    (("ORDERBY", "key-count", "sideways"), SYNTAX),
])
def test_parse_errors(words, message):
    with pytest.raises(SlotStatsError) as caught:
        parse(argv(*words))
    assert str(caught.value) == message


def numbers(**values: dict[int, int]) -> SlotNumbers:
    def column(name: str) -> list[int]:
        out = [0] * 16384
        for slot, v in values.get(name, {}).items():
            out[slot] = v
        return out
    return SlotNumbers(column("keys"), column("cpu"), column("bytes_in"), column("bytes_out"))


def row(slot: int, keys: int = 0, cpu: int = 0, bin_: int = 0, bout: int = 0) -> list:
    return [slot, {"key-count": keys, "cpu-usec": cpu, "network-bytes-in": bin_,
                   "network-bytes-out": bout}]


@pytest.mark.parametrize(("request_", "served", "expected"), [
    # only served slots, by slot
    (SlotsRange(0, 10), [3, 1, 20], [row(1, 5), row(3)]),
    (SlotsRange(4, 10), [3, 1, 20], []),
    # ordered by the metric, ties by the lower slot, limited
    (OrderBy("key-count", 2, True), [1, 2, 3, 20], [row(1, 5), row(2)]),
    (OrderBy("key-count", 16384, False), [1, 2, 3], [row(2), row(3), row(1, 5)]),
    (OrderBy("cpu-usec", 1, True), [1, 2, 3, 20], [row(20, cpu=9)]),
])
def test_rows(request_, served, expected):
    got = rows(request_, served, numbers(keys={1: 5}, cpu={20: 9}))
    assert got == expected


def test_floats_are_reported_as_integers():
    n = SlotNumbers([0] * 16384, [1.9] * 16384, [0] * 16384, [2.5] * 16384)
    assert rows(SlotsRange(0, 0), [0], n) == [row(0, cpu=1, bout=2)]


def test_ties_are_of_the_reported_integers_and_go_to_the_lower_slot():
    cpu = [0.0] * 16384
    cpu[7], cpu[3], cpu[9] = 1.2, 1.9, 2.0
    n = SlotNumbers([0] * 16384, cpu, [0] * 16384, [0] * 16384)
    assert [r[0] for r in rows(OrderBy("cpu-usec", 3, True), [9, 7, 3, 1], n)] == [9, 3, 7]
    assert [r[0] for r in rows(OrderBy("cpu-usec", 4, False), [9, 7, 3, 1], n)] == [1, 3, 7, 9]


def test_served_slots_of_ranges():
    assert served_slots([(0, 2), (10, 10)]) == [0, 1, 2, 10]


@pytest.mark.parametrize(("ranges", "within", "expected"), [
    ([(0, 16383)], SlotsRange(5, 7), [5, 6, 7]),
    ([(0, 2), (10, 12)], SlotsRange(2, 10), [2, 10]),
    ([(0, 2), (10, 12)], SlotsRange(3, 9), []),
    ([(0, 2)], SlotsRange(16383, 16383), []),
])
def test_served_slots_within_a_range(ranges, within, expected):
    assert served_slots(ranges, within) == expected
