"""The register linearizability checker (chaos/linearizable.py) on hand-made histories: each
row is a history of one key, the verdict expected, and for a violation the operations (by
label) it must name."""
from __future__ import annotations

import random
import time

import pytest

from chaos.history import Op
from chaos.linearizable import Verdict, check, check_key


def history(*rows: tuple) -> tuple[list[Op], dict[str, int]]:
    """Rows of (label, f, value, invoke, complete, status); a get's value is what it read,
    a set's what it wrote; complete None for unknown. Returns the ops and label -> op id."""
    ops, ids = [], {}
    for label, f, value, t0, t1, status in rows:
        op = Op(len(ops), process=len(ops), f=f, key="k", invoke=t0,
                complete=None if status == "unknown" else t1, status=status,
                value=value if f == "set" else None, result=value if f == "get" else None)
        ids[label] = op.id
        ops.append(op)
    return ops, ids


CASES = {
    "sequential": ("linearizable", [], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("r1", "get", "a", 2, 3, "ok"),
        ("w2", "set", "b", 4, 5, "ok"),
        ("r2", "get", "b", 6, 7, "ok")]),
    "a read before any write sees nothing": ("linearizable", [], [
        ("r0", "get", None, 0, 1, "ok"),
        ("w1", "set", "a", 2, 3, "ok"),
        ("r1", "get", "a", 4, 5, "ok")]),
    "concurrent writes, reads fix one order": ("linearizable", [], [
        ("w1", "set", "a", 0, 10, "ok"),
        ("w2", "set", "b", 1, 9, "ok"),
        ("r1", "get", "b", 2, 3, "ok"),  # b took effect first ...
        ("r2", "get", "a", 11, 12, "ok")]),  # ... then a
    "the other order is fine too": ("linearizable", [], [
        ("w1", "set", "a", 0, 10, "ok"),
        ("w2", "set", "b", 1, 9, "ok"),
        ("r1", "get", "a", 2, 3, "ok"),
        ("r2", "get", "b", 11, 12, "ok")]),
    "a read concurrent with a write sees either": ("linearizable", [], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("w2", "set", "b", 2, 6, "ok"),
        ("r1", "get", "a", 3, 4, "ok"),
        ("r2", "get", "b", 5, 7, "ok")]),
    "an unknown write appears later": ("linearizable", [], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("w2", "set", "b", 2, None, "unknown"),
        ("r1", "get", "a", 3, 4, "ok"),
        ("r2", "get", "b", 50, 51, "ok"),
        ("r3", "get", "b", 52, 53, "ok")]),
    "an unknown write may never happen": ("linearizable", [], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("w2", "set", "b", 2, None, "unknown"),
        ("r1", "get", "a", 3, 4, "ok"),
        ("r2", "get", "a", 5, 6, "ok")]),
    "failed writes and unanswered reads say nothing": ("linearizable", [], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("w2", "set", "b", 2, 3, "fail"),
        ("r1", "get", None, 4, None, "unknown"),
        ("r2", "get", "a", 5, 6, "ok")]),
    "stale read": ("violation", ["r1", "w1", "w2"], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("w2", "set", "b", 2, 3, "ok"),
        ("r1", "get", "a", 4, 5, "ok")]),
    "lost write: later reads have the older value": ("violation", ["r1", "w1", "w2"], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("r0", "get", "a", 2, 3, "ok"),
        ("w2", "set", "b", 4, 5, "ok"),
        ("r1", "get", "a", 6, 7, "ok"),
        ("r2", "get", "a", 8, 9, "ok")]),
    "lost write: the key is gone": ("violation", ["r1", "w1"], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("r1", "get", None, 2, 3, "ok")]),
    "a read of a value never written": ("violation", ["r1"], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("r1", "get", "zzz", 2, 3, "ok")]),
    "a read of a failed write's value": ("violation", ["r1", "w2"], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("w2", "set", "b", 2, 3, "fail"),
        ("r1", "get", "b", 4, 5, "ok")]),
    "a value read before its write was invoked": ("violation", ["r1", "w1"], [
        ("r1", "get", "a", 0, 1, "ok"),
        ("w1", "set", "a", 2, 3, "ok")]),
    "reads flip between two values": ("violation", ["r3", "w1", "w2"], [
        ("w1", "set", "a", 0, 10, "ok"),
        ("w2", "set", "b", 0, 10, "ok"),
        ("r1", "get", "a", 1, 2, "ok"),
        ("r2", "get", "b", 3, 4, "ok"),
        ("r3", "get", "a", 5, 6, "ok")]),
    "an unknown write seen, then an older value again": ("violation", ["r2", "w1", "w2"], [
        ("w1", "set", "a", 0, 1, "ok"),
        ("w2", "set", "b", 2, None, "unknown"),
        ("r1", "get", "b", 3, 4, "ok"),
        ("r2", "get", "a", 5, 6, "ok")]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_verdicts_on_hand_made_histories(name):
    outcome, named, rows = CASES[name]
    ops, ids = history(*rows)
    verdict = check_key("k", ops)
    assert verdict.outcome == outcome, verdict.detail
    assert set(verdict.ops) >= {ids[label] for label in named}, verdict
    assert verdict.ops[0] == ids[named[0]] if named else verdict.ops == ()
    assert bool(verdict.detail) == verdict.violation


def test_keys_are_checked_apart_and_list_operations_ignored():
    ops, _ = history(("w1", "set", "a", 0, 1, "ok"), ("r1", "get", "a", 2, 3, "ok"))
    other = Op(len(ops), 9, "get", "j", invoke=0, complete=1, status="ok", result="a")
    listed = Op(len(ops) + 1, 9, "append", "k", "x", invoke=0, complete=1, status="ok")
    verdicts = check([*ops, other, listed])
    assert [(v.key, v.outcome) for v in verdicts] == [("j", "violation"), ("k", "linearizable")]


def test_the_search_is_bounded_and_says_undecided():
    # many concurrent unknown writes all read in one order: a big space for a tiny limit
    rows = [(f"w{i}", "set", f"v{i}", 0, None, "unknown") for i in range(12)]
    rows += [(f"r{i}", "get", f"v{i}", 10 + i, 10.5 + i, "ok") for i in range(12)]
    rows += [("bad", "get", "v0", 100, 101, "ok")]
    ops, _ = history(*rows)
    verdict = check_key("k", ops, max_states=20)
    assert verdict == Verdict("k", "undecided", (), verdict.detail) and "20" in verdict.detail
    assert check_key("k", ops).violation  # with the real limit it is decided


def test_a_long_concurrent_history_is_decided_quickly():
    rng = random.Random(3)
    ops: list[Op] = []
    value, t = None, 0.0
    for i in range(20000):  # each takes effect at t; overlapping the ones around it
        t += 0.25
        t0, t1 = t - rng.uniform(0, 1), t + rng.uniform(0, 1)
        if rng.random() < 0.5:
            value = f"v{i}"
            ops.append(Op(i, i % 8, "set", "k", value, invoke=t0, complete=t1, status="ok"))
        else:
            ops.append(Op(i, i % 8, "get", "k", invoke=t0, complete=t1, status="ok",
                          result=value))
    started = time.monotonic()
    assert check_key("k", ops).outcome == "linearizable"
    assert time.monotonic() - started < 10
