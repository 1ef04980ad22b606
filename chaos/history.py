"""Histories of client operations on list keys, and a checker for them (pure: no I/O).

The workload is Elle's list-append, on Redis lists: `append` is `RPUSH key value` with a value
written once in the whole history (its reply is the list's new length), `read` is
`LRANGE key 0 -1` (the whole list), `del` is `DEL key`. Every operation is recorded when it is
invoked and when it completes, as

- `ok`: the reply came back (a read's result is the list it saw, an append's the length);
- `fail`: it certainly did not take effect (the server refused it before running it);
- `unknown`: no reply (timeout, connection lost, `-UNCERTAIN`): it may take effect at any
  moment after its invocation, or never. Its completion time is infinite.

Because every value is unique and a read returns the whole list, each read tells which appends
took effect before it and in which order, and the checker needs no search. Every anomaly it
reports is a real violation of linearizability (each rule below only uses orders a
linearizable system must respect), named with the operations that show it:

- `duplicate`: a read holds one value twice (an append took effect twice);
- `phantom`: a read holds a value no append of that key wrote;
- `failed-write-visible`: a read holds the value of an append that was answered with a failure;
- `future-read`: a read holds a value whose append was invoked after the read completed;
- `lost`: a value known to be in the list (its append acknowledged, or a read saw it) is missing
  from the last read of the key, with no delete that could have removed it;
- `stale-read`: a read misses a value known to be in the list when it was invoked, although a
  later read has it again (or misses one seen before it);
- `resurrected`: a read that started after an acknowledged `DEL` completed holds a value whose
  append was acknowledged before that `DEL` was invoked;
- `divergent`: two reads (with no delete possible between them) whose lists are not one a
  prefix of the other, or a value at another position than its append's reply said, or two
  appends acknowledged at the same position: two orders of the same key, two masters.

`divergent` shows two masters only when both took writes of the same key and a read saw the
result. `two-masters` counts the moments themselves, from which node acknowledged each write
(the proxy the client's reply came from, `Op.node`), over every write of both workloads
(appends, deletes, register sets): a slot's writes acknowledged by node A, B, A again and B
again, each completed before the next was invoked, all within `TWO_MASTERS_WINDOW` seconds.
A slot may change hands twice in that time legitimately (a cancelled migration gives the slots
to the target, which moves the keys home and gives them back), never three times (rounds of
faults are longer), so each answering again after the other means both were taking writes for
the slot. Detections on one slot whose windows overlap count as one moment.

Operations with other names (`set`, `get`: the register workload) are not list operations;
`chaos/linearizable.py` checks them.
"""
from __future__ import annotations

import bisect
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.slots import key_slot

INF = float("inf")
KINDS = ("lost", "resurrected", "stale-read", "duplicate", "divergent", "phantom",
         "failed-write-visible", "future-read", "two-masters")
MAX_NAMED = 6  # operations named in one anomaly
LIST_OPS = ("append", "read", "del")
WRITES = ("append", "del", "set")  # what `two-masters` looks at
TWO_MASTERS_WINDOW = 10.0  # seconds from A's first write to its return after B's


@dataclass
class Op:
    id: int
    process: int  # the client (thread) that ran it; each runs one operation at a time
    f: str  # "append" | "read" | "del"; registers: "set" | "get"
    key: str
    value: str | None = None  # an append's value
    invoke: float = 0.0
    complete: float | None = None  # None while pending, or when the outcome is unknown
    status: str = "pending"  # "ok" | "fail" | "unknown" | "pending"
    result: Any = None  # read: list of values; append: the new length; del: keys removed
    error: str = ""
    node: str = ""  # the proxy that gave an ok reply

    @property
    def end(self) -> float:
        """When it certainly took effect if it ever did: infinite unless ok or failed."""
        return self.complete if self.status in ("ok", "fail") and self.complete is not None \
            else INF

    def __str__(self) -> str:
        what = {"append": f"append {self.value!r}", "del": "del", "set": f"set {self.value!r}",
                "get": "get"}.get(self.f, "read")
        res = f" -> {self.result!r}" if self.status == "ok" else \
            f" ({self.error})" if self.error else ""
        return f"op {self.id} [p{self.process} {what} {self.key} {self.status}{res}]"


@dataclass
class Anomaly:
    kind: str
    key: str
    ops: list[int]  # the operations that show it
    detail: str
    # when it happened, as far as the history tells (e.g. for a lost write, from when it was
    # known present to the end of the first read that missed it): to blame a fault
    window: tuple[float, float] = (0.0, 0.0)

    def __str__(self) -> str:
        return f"{self.kind} on {self.key}: {self.detail} (ops {self.ops})"


@dataclass
class Report:
    anomalies: list[Anomaly] = field(default_factory=list)
    ops: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    keys: int = 0

    @property
    def valid(self) -> bool:
        return not self.anomalies

    def counts(self) -> dict[str, int]:
        return dict(Counter(a.kind for a in self.anomalies))

    def of(self, kind: str) -> list[Anomaly]:
        return [a for a in self.anomalies if a.kind == kind]

    def summary(self) -> str:
        head = (f"{self.ops} operations on {self.keys} keys "
                + ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items())))
        if self.valid:
            return head + ": no anomaly"
        return head + ": " + ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))


class History:
    """Operations as clients record them (thread-safe), with a monotonic clock."""

    def __init__(self, ops: Iterable[Op] = (), clock=time.monotonic) -> None:  # noqa: ANN001
        self.ops: list[Op] = list(ops)
        self.clock = clock
        self.lock = threading.Lock()

    def invoke(self, process: int, f: str, key: str, value: str | None = None) -> Op:
        with self.lock:
            op = Op(len(self.ops), process, f, key, value, invoke=self.clock())
            self.ops.append(op)
        return op

    def ok(self, op: Op, result: Any, node: str = "") -> Op:
        op.complete, op.status, op.result, op.node = self.clock(), "ok", result, node
        return op

    def fail(self, op: Op, error: str) -> Op:
        op.complete, op.status, op.error = self.clock(), "fail", error
        return op

    def unknown(self, op: Op, error: str) -> Op:
        op.complete, op.status, op.error = None, "unknown", error
        return op

    def save(self, path: Path | str) -> None:
        with open(path, "w") as f:
            for op in self.ops:
                f.write(json.dumps(asdict(op)) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> History:
        with open(path) as f:
            return cls(Op(**json.loads(line)) for line in f if line.strip())


def precedes(a: Op, b: Op) -> bool:
    """Real-time order: `a` completed (ok or failed) before `b` was invoked."""
    return a.end < b.invoke


def check(history: History | Iterable[Op]) -> Report:
    """The list-append checks on the list operations, and `two-masters` on every write."""
    every = list(history.ops if isinstance(history, History) else history)
    ops = [op for op in every if op.f in LIST_OPS]
    report = Report(ops=len(ops), statuses=dict(Counter(op.status for op in ops)))
    appends: dict[str, Op] = {}
    for op in ops:
        if op.f == "append" and op.value is not None:
            if op.value in appends:
                raise ValueError(f"value {op.value!r} appended twice: ops "
                                 f"{appends[op.value].id} and {op.id}; values must be unique")
            appends[op.value] = op
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    report.keys = len(by_key)
    for key in sorted(by_key):
        report.anomalies.extend(_check_key(key, by_key[key], appends))
    report.anomalies.extend(two_masters(every))
    return report


def two_masters(ops: Iterable[Op], window: float = TWO_MASTERS_WINDOW) -> list[Anomaly]:
    """Moments when two nodes acknowledged writes for one slot (see the module's docstring)."""
    by_slot: dict[int, list[Op]] = defaultdict(list)
    for op in ops:
        if op.f in WRITES and op.status == "ok" and op.node and op.complete is not None:
            by_slot[key_slot(op.key.encode())].append(op)
    out: list[Anomaly] = []
    for slot in sorted(by_slot):
        ends: dict[str, list[float]] = defaultdict(list)  # node -> its writes' ends, ascending
        done: dict[str, list[Op]] = defaultdict(list)

        def before(node: str, t: float, ends=ends, done=done) -> Op | None:  # noqa: ANN001
            """`node`'s last write of this slot completed before `t`."""
            i = bisect.bisect_left(ends[node], t) - 1
            return done[node][i] if i >= 0 else None

        last: Anomaly | None = None
        for w in sorted(by_slot[slot], key=lambda op: op.end):
            others = [o for o in (before(n, w.invoke) for n in ends if n != w.node) if o]
            y = max(others, key=lambda o: o.end, default=None)
            x0 = before(w.node, y.invoke) if y else None
            y0 = before(y.node, x0.invoke) if y and x0 else None
            if y0 is not None and w.invoke - y0.end <= window:
                if last is not None and y0.end <= last.window[1]:
                    last.window = (last.window[0], w.end)  # the same moment, longer
                else:
                    last = Anomaly("two-masters", w.key, [y0.id, x0.id, y.id, w.id],
                                   f"slot {slot}: {y.node} acknowledged {y0}, {w.node} {x0}, "
                                   f"{y.node} again {y}, {w.node} again {w}",
                                   window=(y0.end, w.end))
                    out.append(last)
            ends[w.node].append(w.end)
            done[w.node].append(w)
    return out


def _names(ops: Iterable[Op]) -> list[int]:
    return [op.id for op in ops][:MAX_NAMED]


def _check_key(key: str, ops: list[Op], appends: dict[str, Op]) -> list[Anomaly]:
    out: list[Anomaly] = []
    reads = sorted((op for op in ops if op.f == "read" and op.status == "ok"),
                   key=lambda op: op.invoke)
    dels = [op for op in ops if op.f == "del" and op.status in ("ok", "unknown", "pending")]
    key_appends = [op for op in ops if op.f == "append"]

    def pre_delete(op: Op) -> bool:
        """No DEL could take effect before `op`."""
        return not any(d.invoke < op.end for d in dels)

    # what each read holds, value by value
    for r in reads:
        seen = Counter(r.result)
        for v, n in seen.items():
            a = appends.get(v)
            if n > 1:
                out.append(Anomaly("duplicate", key, _names([r] + ([a] if a else [])),
                                   f"{r} holds {v!r} {n} times",
                                   window=(r.invoke, r.end)))
            if a is None or a.key != key:
                where = f" (written to {a.key} by op {a.id})" if a else ""
                out.append(Anomaly("phantom", key, _names([r] + ([a] if a else [])),
                                   f"{r} holds {v!r}, which no append of {key} wrote{where}",
                                   window=(r.invoke, r.end)))
                continue
            if a.status == "fail":
                out.append(Anomaly("failed-write-visible", key, [a.id, r.id],
                                   f"{r} holds the value of {a}",
                                   window=(r.invoke, r.end)))
            if a.invoke > r.end:
                out.append(Anomaly("future-read", key, [a.id, r.id],
                                   f"{r} holds the value of {a}, invoked after the read ended",
                                   window=(r.invoke, r.end)))
        for d in dels:
            if d.status != "ok" or not precedes(d, r):
                continue
            back = [appends[v] for v in r.result
                    if v in appends and appends[v].status == "ok" and precedes(appends[v], d)]
            if back:
                out.append(Anomaly("resurrected", key, _names([d, r, *back]),
                                   f"{r} started after {d} and holds {len(back)} values "
                                   f"appended before it, first {back[0]}",
                                   window=(d.end, r.end)))

    # values known to be in the list, and the reads that should have seen them
    evidence: dict[str, Op] = {}  # value -> the op whose completion first proves it present
    for a in key_appends:
        if a.status == "ok":
            evidence[a.value] = a  # type: ignore[index]
    ev_end = {v: e.end for v, e in evidence.items()}
    for r in sorted(reads, key=lambda r: r.end):  # the earliest read that held it
        rend = r.end
        for v in r.result:
            if v not in ev_end or rend < ev_end[v]:
                a = appends.get(v)
                if a is not None and a.key == key:
                    evidence[v], ev_end[v] = r, rend
    # a read must hold every value known present before it started, unless a DEL could
    # have come between: with M the latest end of a DEL that may precede the read, the values
    # whose evidence was invoked after M and ended before the read started
    ordered = sorted(evidence, key=ev_end.__getitem__)
    ends = [ev_end[v] for v in ordered]
    ev_inv = {v: e.invoke for v, e in evidence.items()}
    sets = {r.id: set(r.result) for r in reads}

    def del_mark(r: Op) -> float:
        return max((d.end for d in dels if d.invoke < r.end), default=-INF)

    marks = {r.id: del_mark(r) for r in reads}
    missing: dict[str, list[Op]] = defaultdict(list)
    for r in reads:
        n = bisect.bisect_left(ends, r.invoke)
        m, held, start = marks[r.id], sets[r.id], r.invoke
        due = ordered[:n] if m == -INF else [v for v in ordered[:n] if ev_inv[v] > m]
        if len(held) >= len(due) and sum(1 for v in held if ev_end.get(v, INF) < start
                                         and ev_inv[v] > m) == len(due):
            continue  # it holds every value due
        for v in due:
            if v not in held:
                missing[v].append(r)
    by_invoke = sorted(reads, key=lambda r: r.invoke)
    for v, lacking in missing.items():
        e, a = evidence[v], appends[v]
        last = next(r for r in reversed(by_invoke)
                    if r.invoke > e.end and marks[r.id] < e.invoke)
        if v not in sets[last.id]:
            how = "acknowledged" if a.status == "ok" else f"{a.status}, seen by op {e.id},"
            out.append(Anomaly("lost", key, _names([a, *([e] if e is not a else []), *lacking]),
                               f"{a} ({how}) is missing from {len(lacking)} later reads, "
                               f"the last one {last}",
                               window=(e.end, lacking[0].end)))
            continue
        out.append(Anomaly("stale-read", key, _names([a, *([e] if e is not a else []), *lacking]),
                           f"{len(lacking)} reads started after {v!r} was known present "
                           f"(op {e.id}) miss it, first {lacking[0]}; a later read has it",
                           window=(e.end, lacking[0].end)))

    # one order per key: reads no DEL could separate are prefixes of one another
    chain = sorted((r for r in reads if pre_delete(r)), key=lambda r: len(r.result))
    for shorter, longer in zip(chain, chain[1:]):
        if longer.result[:len(shorter.result)] != shorter.result:
            out.append(Anomaly("divergent", key, [shorter.id, longer.id],
                               f"{shorter} is no prefix of {longer}",
                               window=(min(shorter.invoke, longer.invoke),
                                       max(shorter.end, longer.end))))
            break
    positions: dict[int, Op] = {}
    for a in key_appends:
        if a.status != "ok" or not isinstance(a.result, int) or not pre_delete(a):
            continue
        other = positions.setdefault(a.result, a)
        if other is not a:
            out.append(Anomaly("divergent", key, [other.id, a.id],
                               f"{other} and {a} were both acknowledged at length {a.result}",
                               window=(min(other.invoke, a.invoke), max(other.end, a.end))))
    # the chain is one order (else reported above): its longest read has every position
    for r in chain[-1:]:
        for i, v in enumerate(r.result):
            a = appends.get(v)
            if a is not None and a.key == key and a.status == "ok" \
                    and isinstance(a.result, int) and a.result != i + 1:
                out.append(Anomaly("divergent", key, [a.id, r.id],
                                   f"{r} holds {v!r} at position {i + 1}, but {a} said "
                                   f"the list had {a.result} values",
                                   window=(a.invoke, r.end)))
                break
    return out
