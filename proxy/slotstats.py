"""`CLUSTER SLOT-STATS` as Valkey 8 answers it: the argument parser and the reply's rows. Pure.

    CLUSTER SLOT-STATS SLOTSRANGE start end
    CLUSTER SLOT-STATS ORDERBY metric [LIMIT n] [ASC|DESC]

Each row is `[slot, {key-count, cpu-usec, network-bytes-in, network-bytes-out}]` (a map in
RESP3, a flat array in RESP2), for the slots this node serves only. Errors are Valkey's
(src/cluster_slot_stats.c, Valkey 8.0). Where the numbers come from is proxy/stats.py
(sampled, weighted estimates of the proxy's own work) and proxy/jobs.py (key counts: a SCAN
of the node's Redis).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from core.slots import SLOT_COUNT

_INTEGER = re.compile(rb"-?[1-9][0-9]*|0")  # what Redis's string2ll takes (not -0)
METRICS = ("key-count", "cpu-usec", "network-bytes-in", "network-bytes-out")

BAD_SLOT = "ERR Invalid or out of range slot"
BAD_METRIC = "ERR Unrecognized sort metric for ORDERBY."
BAD_LIMIT = "ERR Limit has to lie in between 1 and 16384 (maximum number of slots)."
SYNTAX = "ERR syntax error"
REPEATED = "ERR Multiple filters of the same type are disallowed."
ARITY = "ERR wrong number of arguments for 'cluster|slot-stats' command"


class SlotStatsError(ValueError):
    """The error reply (without '-' and CRLF)."""


@dataclass(frozen=True, slots=True)
class SlotsRange:
    start: int
    end: int  # inclusive


@dataclass(frozen=True, slots=True)
class OrderBy:
    metric: str  # one of METRICS
    limit: int = SLOT_COUNT
    desc: bool = True


def _slot(raw: bytes) -> int:
    if _INTEGER.fullmatch(raw) is None or not 0 <= int(raw) < SLOT_COUNT:
        raise SlotStatsError(BAD_SLOT)
    return int(raw)


def parse(argv: Sequence[bytes]) -> SlotsRange | OrderBy:
    """`argv` is the whole command (`CLUSTER SLOT-STATS ...`)."""
    if len(argv) < 4:
        raise SlotStatsError(ARITY)
    option = argv[2].lower()
    if len(argv) == 5 and option == b"slotsrange":
        start, end = _slot(argv[3]), _slot(argv[4])
        if start > end:
            raise SlotStatsError(f"ERR Start slot number {start} is greater than end slot "
                                 f"number {end}")
        return SlotsRange(start, end)
    if option != b"orderby":
        sub, container = (a.decode(errors="replace") for a in argv[:2][::-1])
        raise SlotStatsError(f"ERR unknown subcommand or wrong number of arguments for "
                             f"'{sub[:128]}'. Try {container.upper()} HELP.")
    metric = argv[3].decode(errors="replace").lower()
    if metric not in METRICS:
        raise SlotStatsError(BAD_METRIC)
    limit, desc = SLOT_COUNT, True
    limits = orders = 0
    i = 4
    while i < len(argv):
        word = argv[i].lower()
        if word == b"limit" and i + 1 < len(argv):
            raw = argv[i + 1]
            if _INTEGER.fullmatch(raw) is None or not 1 <= int(raw) <= SLOT_COUNT:
                raise SlotStatsError(BAD_LIMIT)
            limit = int(raw)
            i += 1
            limits += 1
        elif word == b"asc":
            desc = False
            orders += 1
        elif word == b"desc":
            desc = True
            orders += 1
        else:
            raise SlotStatsError(SYNTAX)
        if limits > 1 or orders > 1:
            raise SlotStatsError(REPEATED)
        i += 1
    return OrderBy(metric, limit, desc)


@dataclass(frozen=True, slots=True)
class SlotNumbers:
    """Every slot's statistics, indexed by slot."""

    key_count: Sequence[int]
    cpu_usec: Sequence[float]
    bytes_in: Sequence[int]
    bytes_out: Sequence[float]

    def row(self, slot: int) -> list:
        return [slot, {"key-count": int(self.key_count[slot]),
                       "cpu-usec": int(self.cpu_usec[slot]),
                       "network-bytes-in": int(self.bytes_in[slot]),
                       "network-bytes-out": int(self.bytes_out[slot])}]

    def column(self, metric: str) -> Sequence[float]:
        """The numbers of `metric` (one of METRICS), by slot."""
        return (self.key_count, self.cpu_usec, self.bytes_in, self.bytes_out)[
            METRICS.index(metric)]

    def value(self, slot: int, metric: str) -> int:
        return int(self.column(metric)[slot])


def rows(request: SlotsRange | OrderBy, served: Iterable[int], numbers: SlotNumbers) -> list:
    """The reply's rows: the served slots in the range by slot, or ordered by the metric
    (ties: the lower slot first), at most `limit`."""
    mine = sorted(set(served))
    if isinstance(request, SlotsRange):
        return [numbers.row(s) for s in mine if request.start <= s <= request.end]
    # a stable sort of the slots in order (reversed too) keeps ties by the lower slot
    column = numbers.column(request.metric)
    ordered = sorted(mine, key=lambda s: int(column[s]), reverse=request.desc)
    return [numbers.row(s) for s in ordered[:request.limit]]


def served_slots(ranges: Iterable[tuple[int, int]], within: SlotsRange | None = None
                 ) -> list[int]:
    """The slots of inclusive ranges (those `within` a range only, if given: without going
    through the others)."""
    if within is not None:
        ranges = [(max(start, within.start), min(end, within.end)) for start, end in ranges]
    return [s for start, end in ranges for s in range(start, end + 1)]
