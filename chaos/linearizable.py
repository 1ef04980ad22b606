"""Linearizability of registers, checked per key (pure: history in, verdicts out).

The register workload writes a key with `SET key value` (`set`, a value written once in the
whole history) and reads it with `GET key` (`get`, the value or None for a missing key). A
history of one key is linearizable when some order of its operations (a) explains every read by
the write before it (None before any write), (b) puts every `ok` operation between its
invocation and its completion, (c) puts every `unknown` write anywhere after its invocation, or
leaves it out, and (d) leaves out every failed operation. Reads that did not complete say
nothing and are dropped; so are unknown writes whose value nobody read (leaving such a write
out never makes a read wrong).

The search is Wing & Gong's, with Lowe's memo of (operations placed, register value), as in
Knossos and Porcupine: walk the invocation/completion events in time order; at an invocation,
try to place that operation next; at the completion of an operation not placed yet, undo the
last placement and try the next candidate. It explores at most `MAX_STATES` states per key and
answers "undecided" beyond that instead of running on. A violation names the operation that
could not be placed at the deepest point the search reached, the write of the value it read,
the write of the value the register held there, and the operations placed just before.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chaos.history import Op

MAX_STATES = 200_000  # memoized states explored for one key before the verdict is "undecided"
MAX_STEPS = 5_000_000  # events visited for one key, the same
SHOWN_PREFIX = 3  # operations placed just before the stuck one, named in a violation
REGISTER_OPS = ("set", "get")
KINDS = ("nonlinearizable",)  # as anomalies in the run's report


@dataclass(frozen=True)
class Verdict:
    key: str
    outcome: str  # "linearizable" | "violation" | "undecided"
    ops: tuple[int, ...] = ()  # the operations that show a violation
    detail: str = ""
    window: tuple[float, float] = (0.0, 0.0)  # when, as far as the named operations tell

    @property
    def violation(self) -> bool:
        return self.outcome == "violation"


class _Event:
    """A node of the doubly linked list of events the search lifts operations out of."""

    __slots__ = ("call", "match", "next", "op", "prev")

    def __init__(self, op: int, call: bool) -> None:
        self.op, self.call = op, call
        self.match: _Event | None = None  # a call's completion; None: it may never happen
        self.prev: _Event | None = None
        self.next: _Event | None = None


def _lift(e: _Event) -> None:
    for x in (e, e.match):
        if x is not None:
            x.prev.next = x.next  # type: ignore[union-attr]  # the head sentinel precedes all
            if x.next is not None:
                x.next.prev = x.prev


def _unlift(e: _Event) -> None:
    for x in (e.match, e):
        if x is not None:
            x.prev.next = x  # type: ignore[union-attr]  # as in _lift
            if x.next is not None:
                x.next.prev = x


def check(ops: Iterable[Op], max_states: int = MAX_STATES) -> list[Verdict]:
    """A verdict for every key that has register operations, sorted by key."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.f in REGISTER_OPS:
            by_key[op.key].append(op)
    return [check_key(key, by_key[key], max_states) for key in sorted(by_key)]


def check_key(key: str, ops: Sequence[Op], max_states: int = MAX_STATES) -> Verdict:
    writes = {op.value: op for op in ops if op.f == "set"}
    read = {op.result for op in ops if op.f == "get" and op.status == "ok"}
    kept = [op for op in ops
            if (op.f == "get" and op.status == "ok")
            or (op.f == "set" and op.status == "ok")
            or (op.f == "set" and op.status in ("unknown", "pending") and op.value in read)]
    for r in kept:
        if r.f == "get" and r.result is not None and (
                r.result not in writes or writes[r.result].status == "fail"):
            w = writes.get(r.result)
            why = f"the value of a failed write, {w}" if w else "a value no write of the key wrote"
            return Verdict(key, "violation", (r.id, *([w.id] if w else [])),
                           f"{r} read {why}", (r.invoke, r.end))
    return _search(key, kept, writes, max_states)


def _search(key: str, ops: list[Op], writes: dict, max_states: int) -> Verdict:  # noqa: C901
    events: list[tuple[float, int, _Event]] = []
    for i, op in enumerate(ops):
        call = _Event(i, True)
        events.append((op.invoke, 0, call))  # at one instant invocations go first: concurrent
        if op.status == "ok":
            call.match = _Event(i, False)
            events.append((op.end, 1, call.match))
    events.sort(key=lambda t: (t[0], t[1]))
    head = _Event(-1, True)
    prev = head
    for _, _, e in events:
        prev.next, e.prev = e, prev
        prev = e
    returns_left = sum(1 for op in ops if op.status == "ok")
    placed, value = 0, None  # bitmask of the operations placed; the register's value
    stack: list[tuple[_Event, object]] = []  # placements, with the value before each
    seen: set[tuple[int, object]] = set()
    deepest: tuple[int, int, tuple[int, ...], object] = (-1, -1, (), None)
    entry, steps = head.next, 0
    while returns_left:
        steps += 1
        if len(seen) > max_states or steps > MAX_STEPS:
            return Verdict(key, "undecided", (), f"{len(ops)} operations: the search reached "
                           f"its limit ({max_states} states, {MAX_STEPS} steps)")
        assert entry is not None  # a completion not yet placed is always ahead
        op = ops[entry.op]
        if entry.call:
            if op.f == "set" or op.result == value:
                after = op.value if op.f == "set" else value
                moved = placed | (1 << entry.op)
                if (moved, after) not in seen:
                    seen.add((moved, after))
                    stack.append((entry, value))
                    placed, value = moved, after
                    _lift(entry)
                    if entry.match is not None:
                        returns_left -= 1
                    entry = head.next
                    continue
            entry = entry.next
            continue
        if len(stack) > deepest[0]:
            deepest = (len(stack), entry.op, tuple(e.op for e, _ in stack[-SHOWN_PREFIX:]), value)
        if not stack:
            break
        top, value = stack.pop()
        placed &= ~(1 << top.op)
        _unlift(top)
        if top.match is not None:
            returns_left += 1
        entry = top.next
    else:
        return Verdict(key, "linearizable")
    return _explain(key, ops, writes, deepest)


def _explain(key: str, ops: list[Op], writes: dict,
             deepest: tuple[int, int, tuple[int, ...], object]) -> Verdict:
    depth, stuck_i, before, value = deepest
    stuck = ops[stuck_i]
    held = writes.get(value)
    named = [stuck]
    if stuck.f == "get":
        source = writes.get(stuck.result)
        named += [source] if source is not None else []
        what = (f"it read {stuck.result!r}"
                + (f" (written by op {source.id})" if source is not None else ""))
    else:
        what = "it had to take effect by then"
    named += [held] if held is not None and held not in named else []
    named += [ops[i] for i in before if ops[i] not in named]
    holding = f"{value!r}" + (f" (written by op {held.id})" if held is not None else
                              " (no write yet)")
    detail = f"no order explains {stuck}: {what} but the register held {holding}"
    if before:
        detail += (f"; at best {depth} operations fit before it completed, the last "
                   + ", ".join(str(ops[i]) for i in before))
    return Verdict(key, "violation", tuple(op.id for op in named), detail,
                   (min(op.invoke for op in named), stuck.end))
