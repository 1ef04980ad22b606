"""The list-append history checker (chaos/history.py) on hand-made histories, good and bad:
each bad one is caught for the right reason, and only for it."""
from __future__ import annotations

import pytest

from chaos.history import History, Op, check


class H:
    """A hand-made history: operations with explicit invoke/complete times."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def _op(self, p: int, f: str, key: str, t0: float, t1: float | None, status: str,
            value: str | None = None, result=None) -> Op:  # noqa: ANN001
        op = Op(len(self.ops), p, f, key, value, invoke=t0,
                complete=t1 if status != "unknown" else None, status=status, result=result)
        self.ops.append(op)
        return op

    def append(self, key: str, value: str, t0: float, t1: float | None, status: str = "ok",
               length: int | None = None, p: int = 0) -> Op:
        return self._op(p, "append", key, t0, t1, status, value, length)

    def read(self, key: str, values: list[str], t0: float, t1: float, p: int = 1) -> Op:
        return self._op(p, "read", key, t0, t1, "ok", result=values)

    def delete(self, key: str, t0: float, t1: float | None, status: str = "ok", p: int = 2) -> Op:
        return self._op(p, "del", key, t0, t1, status, result=1)


def kinds(h: H) -> list[str]:
    return sorted(a.kind for a in check(h.ops).anomalies)


def test_a_sequential_history_is_valid():
    h = H()
    h.append("k", "a", 0, 1, length=1)
    h.read("k", ["a"], 2, 3)
    h.append("k", "b", 4, 5, length=2)
    h.read("k", ["a", "b"], 6, 7)
    h.append("j", "c", 6, 8, length=1)
    h.read("j", ["c"], 9, 10)
    report = check(h.ops)
    assert report.valid, report.anomalies
    assert report.keys == 2 and report.ops == 6


def test_concurrent_and_unknown_operations_may_go_either_way():
    h = H()
    h.append("k", "a", 0, 5, length=1)
    h.read("k", [], 1, 2)  # concurrent with the append: may miss it
    h.append("k", "b", 3, None, status="unknown")  # may take effect at any time, or never
    h.read("k", ["a"], 6, 7)
    h.read("k", ["a", "b"], 8, 9)  # the unknown append took effect late
    h.append("k", "c", 10, 11, status="fail")  # refused: never seen, fine
    h.append("k", "d", 12, None, status="unknown")  # never took effect: also fine
    h.read("k", ["a", "b"], 13, 14)
    assert check(h.ops).valid, check(h.ops).anomalies


def test_an_acknowledged_append_missing_from_every_later_read_is_lost():
    h = H()
    h.append("k", "a", 0, 1, length=1)
    lost = h.append("k", "b", 2, 3, length=2)
    r1 = h.read("k", ["a"], 4, 5)
    r2 = h.read("k", ["a", "c"], 8, 9)
    h.append("k", "c", 6, 7, length=2)  # the new master took position 2 again
    report = check(h.ops)
    lost_ones = report.of("lost")
    assert len(lost_ones) == 1 and lost_ones[0].ops[:1] == [lost.id]
    assert r1.id in lost_ones[0].ops and r2.id in lost_ones[0].ops
    # and two appends were acknowledged at the same length: two orders of one key
    assert [a.ops for a in report.of("divergent")] == [[lost.id, 4]]


def test_a_read_missing_a_value_a_later_read_has_is_stale():
    h = H()
    a = h.append("k", "a", 0, 1, length=1)
    stale = h.read("k", [], 2, 3)
    h.read("k", ["a"], 4, 5)
    report = check(h.ops)
    assert kinds(h) == ["stale-read"]
    assert report.anomalies[0].ops == [a.id, stale.id]


def test_a_read_seeing_less_than_an_earlier_read_is_stale_even_for_unknown_appends():
    h = H()
    a = h.append("k", "a", 0, None, status="unknown")
    seen = h.read("k", ["a"], 1, 2)
    stale = h.read("k", [], 3, 4)
    h.read("k", ["a"], 5, 6)
    report = check(h.ops)
    assert kinds(h) == ["stale-read"]
    assert report.anomalies[0].ops == [a.id, seen.id, stale.id]


def test_an_observed_unknown_append_that_disappears_is_lost():
    h = H()
    h.append("k", "a", 0, None, status="unknown")
    h.read("k", ["a"], 1, 2)
    h.read("k", [], 3, 4)
    assert kinds(h) == ["lost"]


def test_a_deleted_value_that_comes_back_is_resurrected():
    h = H()
    a = h.append("k", "a", 0, 1, length=1)
    h.read("k", ["a"], 2, 3)
    d = h.delete("k", 4, 5)
    h.read("k", [], 6, 7)
    back = h.read("k", ["a"], 8, 9)
    report = check(h.ops)
    assert kinds(h) == ["resurrected"]
    assert report.anomalies[0].ops == [d.id, back.id, a.id]


def test_a_delete_explains_missing_values_and_concurrent_appends_may_survive_it():
    h = H()
    h.append("k", "a", 0, 1, length=1)
    h.append("k", "b", 2, None, status="unknown")  # may land after the DEL
    h.delete("k", 3, 4)
    h.read("k", [], 5, 6)  # a is gone: no loss, a DEL removed it
    h.read("k", ["b"], 7, 8)  # the unknown append landed after the DEL: legal
    assert check(h.ops).valid, check(h.ops).anomalies


def test_an_unknown_delete_may_or_may_not_have_happened():
    h = H()
    h.append("k", "a", 0, 1, length=1)
    h.delete("k", 2, None, status="unknown")
    h.read("k", ["a"], 3, 4)
    h.read("k", [], 5, 6)
    assert check(h.ops).valid, check(h.ops).anomalies


def test_a_value_twice_in_a_read_is_a_duplicated_effect():
    h = H()
    a = h.append("k", "a", 0, None, status="unknown")  # e.g. a client or proxy retried it
    r = h.read("k", ["a", "a"], 2, 3)
    report = check(h.ops)
    assert kinds(h) == ["duplicate"]
    assert report.anomalies[0].ops == [r.id, a.id]


def test_reads_in_two_orders_are_divergent():
    h = H()
    h.append("k", "a", 0, None, status="unknown")
    h.append("k", "b", 0, None, status="unknown")
    r1 = h.read("k", ["a", "b"], 2, 3)
    r2 = h.read("k", ["b", "a"], 2, 3)
    report = check(h.ops)
    assert kinds(h) == ["divergent"]
    assert sorted(report.anomalies[0].ops) == [r1.id, r2.id]


def test_a_value_at_another_position_than_acknowledged_is_divergent():
    h = H()
    h.append("k", "a", 0, 1, length=2)  # the master said two values, but b came later
    h.append("k", "b", 2, 3, length=1)
    h.read("k", ["a", "b"], 4, 5)
    assert set(kinds(h)) == {"divergent"}


def test_values_never_written_failed_or_from_the_future_are_named():
    h = H()
    h.append("j", "x", 0, 1, length=1)
    f = h.append("k", "f", 0, 1, status="fail")
    r = h.read("k", ["f", "x", "zzz"], 2, 3)
    late = h.append("k", "late", 4, 5, length=4)
    r2 = h.read("k", ["f", "x", "zzz", "late"], 1, 3.5)
    report = check(h.ops)
    assert sorted(kinds(h)) == ["failed-write-visible", "failed-write-visible", "future-read",
                                "phantom", "phantom", "phantom", "phantom"]
    assert [a.ops for a in report.of("future-read")] == [[late.id, r2.id]]
    assert [f.id, r.id] in [a.ops for a in report.of("failed-write-visible")]
    assert "written to j" in report.of("phantom")[0].detail


def test_the_history_records_and_round_trips(tmp_path):
    clock = iter(range(100)).__next__
    h = History(clock=clock)
    a = h.ok(h.invoke(0, "append", "k", "v1"), 1)
    h.unknown(h.invoke(1, "append", "k", "v2"), "timeout")
    h.fail(h.invoke(2, "append", "k", "v3"), "CLUSTERDOWN")
    h.ok(h.invoke(0, "read", "k"), ["v1", "v2"])
    assert (a.invoke, a.complete) == (0, 1)
    h.save(tmp_path / "h.jsonl")
    loaded = History.load(tmp_path / "h.jsonl")
    assert [(o.status, o.result, o.complete) for o in loaded.ops] == [
        ("ok", 1, 1), ("unknown", None, None), ("fail", None, 4), ("ok", ["v1", "v2"], 6)]
    assert check(loaded).valid
    assert "4 operations on 1 keys" in check(loaded).summary()


def test_values_must_be_unique():
    h = H()
    h.append("k", "a", 0, 1)
    h.append("k", "a", 2, 3)
    try:
        check(h.ops)
    except ValueError as exc:
        assert "appended twice" in str(exc)
    else:
        raise AssertionError("a repeated value was accepted")


def test_a_value_appended_after_a_delete_must_stay():
    h = H()
    h.append("k", "a", 0, 1, length=1)
    h.delete("k", 2, 3)
    b = h.append("k", "b", 4, 5, length=1)
    h.read("k", ["b"], 6, 7)
    last = h.read("k", [], 8, 9)
    report = check(h.ops)
    assert kinds(h) == ["lost"]
    assert report.anomalies[0].ops == [b.id, last.id]
    assert report.anomalies[0].window == (5, 9)


def test_a_long_history_is_checked_quickly():
    import random
    import time

    rng = random.Random(1)
    h = H()
    lists: dict[str, list[str]] = {f"k{i}": [] for i in range(200)}
    names = sorted(lists)
    t = 0.0
    for i in range(60000):
        key = rng.choice(names)
        t += 1
        if rng.random() < 0.6:
            lists[key].append(f"v{i}")
            h.append(key, f"v{i}", t, t + 0.5, length=len(lists[key]))
        else:
            h.read(key, list(lists[key]), t, t + 0.5)
    started = time.monotonic()
    report = check(h.ops)
    assert report.valid and report.ops == 60000
    assert time.monotonic() - started < 10


def acked(h: H, key: str, value: str, t0: float, t1: float, node: str) -> Op:
    op = h.append(key, value, t0, t1, length=None)
    op.node = node
    return op


def test_a_slot_acknowledged_by_two_nodes_in_turn_is_two_masters():
    h = H()
    a1 = acked(h, "k", "a1", 0, 1, "n1")
    b1 = acked(h, "k", "b1", 2, 3, "n2")  # n2 took the slot over ...
    a2 = acked(h, "k", "a2", 4, 5, "n1")  # ... n1 still acknowledged a write ...
    b2 = acked(h, "k", "b2", 6, 7, "n2")  # ... and n2 too: both take writes
    acked(h, "k", "a3", 8, 9, "n1")  # the same moment, going on
    found = check(h.ops).of("two-masters")
    assert len(found) == 1 and found[0].ops == [a1.id, b1.id, a2.id, b2.id]
    assert found[0].window == (1, 9)


@pytest.mark.parametrize("times", [
    [(0, 1, "n1"), (2, 3, "n2"), (4, 5, "n2")],  # one handover
    [(0, 1, "n1"), (2, 3, "n2"), (4, 5, "n1"), (6, 7, "n1")],  # and back (a cancel)
    [(0, 3, "n1"), (1, 2, "n2"), (2.5, 4, "n1"), (3.5, 5, "n2")],  # overlapping
    [(0, 1, "n1"), (2, 3, "n2"), (4, 5, "n1"), (20, 21, "n2")],  # the third, much later
])
def test_handovers_or_overlapping_acknowledgements_are_not_two_masters(times):
    h = H()
    for i, (t0, t1, node) in enumerate(times):
        acked(h, "k", f"v{i}", t0, t1, node)
    assert not check(h.ops).of("two-masters")


def test_two_masters_looks_at_slots_not_keys_and_at_every_kind_of_write():
    h = H()
    acked(h, "{t}a", "a1", 0, 1, "n1")
    d = h.delete("{t}b", 2, 3)
    d.node = "n2"
    s = h._op(3, "set", "{t}c", 4, 5, "ok", value="x", result="OK")
    s.node = "n1"
    b = acked(h, "{t}d", "d1", 6, 7, "n2")
    h.read("{t}a", ["a1"], 8, 9)
    assert [a.ops for a in check(h.ops).of("two-masters")] == [[0, d.id, s.id, b.id]]
