"""The data path's statistics: plain ints, dicts and lists, bumped in protocol callbacks and
read at scrape time (node/metrics.py turns them into Prometheus metric families; UMCTL HOTKEYS
and CLUSTER SLOT-STATS read them too).

What the hot path pays per read of commands (proxy/session.py): one C-level count of the
batch's command names into a dict, one countdown. Everything else is sampled:

- every SAMPLE_EVERY-th command (counted across all clients) is a *sample*: its key goes to
  the hot-key table (proxy/hotkeys.py) and its request bytes to its slot's
  `network-bytes-in`, each with weight SAMPLE_EVERY, so the counts estimate the totals;
- a read holding a sample, made while its client waited for no other reply, is also *timed*:
  from the read to its last reply written (the latency histogram, observed once per sampled
  command, under its name), the proxy's time handling the read (`cpu-usec`) and the bytes
  written back (`network-bytes-out`), both divided evenly among the read's commands and
  weighted like the rest.

Bounds: command names are folded to the Redis command table's names (anything else is
`other`) once more than MAX_COMMAND_NAMES distinct spellings were seen; error kinds are
capped at MAX_ERROR_KINDS; per-slot counters are three lists of 16384 numbers.
"""
from __future__ import annotations

import collections
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from core.slots import SLOT_COUNT, key_slot

from .commands import COMMANDS
from .hotkeys import SpaceSaving

SAMPLE_EVERY = 16  # one command in this many is sampled (hot keys, slot statistics, latency)
MAX_COMMAND_NAMES = 512  # distinct raw command names kept before folding to known ones
MAX_ERROR_KINDS = 64  # distinct error kinds (the first word of an error reply) kept
OTHER = "other"
# latency histogram upper bounds, seconds (Prometheus `le`); +Inf is implied
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)
REDIRECT_KINDS = frozenset({"MOVED", "ASK", "TRYAGAIN"})

# the C helper Counter.update uses: counts an iterable into a dict in one call
count_into: Callable[[dict, Iterable], None] = collections._count_elements  # type: ignore[attr-defined]


def command_name(raw: bytes) -> str:
    """The name a raw argv[0] is counted under: the command table's, or `other`."""
    upper = raw.upper()
    return upper.decode() if upper in COMMANDS else OTHER


def fold_commands(raw: dict[bytes, int]) -> dict[bytes, int]:
    """`raw` counts merged under upper-case known names, anything else under b'other' (so a
    client sending endless made-up names cannot grow the dict)."""
    out: Counter[bytes] = Counter()
    for name, n in raw.items():
        upper = name.upper()
        out[upper if upper in COMMANDS else OTHER.encode()] += n
    return dict(out)


def error_kind(reply: bytes) -> str:
    """`-MOVED 3999 host:port\\r\\n` -> 'MOVED'."""
    end = len(reply)
    for stop in (b" ", b"\r"):
        at = reply.find(stop, 1)
        if 0 <= at < end:
            end = at
    return reply[1:end].decode(errors="replace") or "ERR"


def request_bytes(argv: list[bytes]) -> int:
    """The size of `argv` as a RESP request on the wire."""
    size = 3 + len(str(len(argv)))
    for arg in argv:
        n = len(arg)
        size += n + 5 + len(str(n))
    return size


def key_of(argv: list[bytes]) -> bytes | None:
    """The command's first key by the command table's legacy key position, or None."""
    spec = COMMANDS.get(argv[0].upper())
    if spec is None or spec.first_key <= 0 or spec.first_key >= len(argv):
        return None
    return argv[spec.first_key]


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    buckets: tuple[int, ...]  # cumulative counts per LATENCY_BUCKETS bound, then +Inf
    total: float  # seconds
    count: int


class Sample:
    """A timed read in flight (proxy/session.py): what to charge when its last reply is out."""

    __slots__ = ("t0", "cpu", "wrote", "last", "names", "slots", "commands")

    def __init__(self, t0: float, names: list[str], slots: list[int], commands: int) -> None:
        self.t0 = t0
        self.cpu = 0.0  # seconds the proxy spent handling the read
        self.wrote = 0  # bytes written to the client since the read
        self.last: object = None  # the read's last reply slot (a Pending), once handled
        self.names = names
        self.slots = slots
        self.commands = commands


class ProxyStats:
    def __init__(self) -> None:
        self.commands: dict[bytes, int] = {}  # raw argv[0] -> commands read
        self.errors: dict[str, int] = {}  # kind -> error replies the proxy made itself
        self.countdown = SAMPLE_EVERY  # commands until the next sample (1..SAMPLE_EVERY)
        self.hotkeys = SpaceSaving()
        self.slot_cpu_usec = [0.0] * SLOT_COUNT
        self.slot_bytes_in = [0] * SLOT_COUNT
        self.slot_bytes_out = [0.0] * SLOT_COUNT
        self.latency: dict[str, list[int]] = {}  # name -> per-bucket (not cumulative) counts
        self.latency_sum: dict[str, float] = {}
        self.clients_accepted = 0

    # -- the hot path's helpers, called off its common case ---------------------------------
    def fold(self) -> None:
        self.commands = fold_commands(self.commands)

    def count_error(self, reply: bytes) -> None:
        kind = error_kind(reply)
        errors = self.errors
        if kind not in errors and len(errors) >= MAX_ERROR_KINDS:
            kind = OTHER
        errors[kind] = errors.get(kind, 0) + 1

    def sample(self, batch: list[list[bytes]]) -> tuple[list[str], list[int]]:
        """The batch crossed the countdown: take its sampled commands (hot keys, bytes in),
        set the countdown for the next, and return their names and slots (-1: keyless)."""
        n = len(batch)
        first = self.countdown - 1
        names: list[str] = []
        slots: list[int] = []
        last = first
        for i in range(first, n, SAMPLE_EVERY):
            last = i
            argv = batch[i]
            names.append(command_name(argv[0]))
            key = key_of(argv)
            if key is None:
                slots.append(-1)
                continue
            self.hotkeys.offer(key, SAMPLE_EVERY)
            slot = key_slot(key)
            slots.append(slot)
            self.slot_bytes_in[slot] += request_bytes(argv) * SAMPLE_EVERY
        self.countdown = last + SAMPLE_EVERY - n + 1
        return names, slots

    def finish(self, sample: Sample, elapsed: float) -> None:
        """A timed read's last reply is out: charge its slots and record its latency."""
        share = SAMPLE_EVERY / max(sample.commands, 1)
        cpu = sample.cpu * 1e6 * share
        out = sample.wrote * share
        for slot in sample.slots:
            if slot >= 0:
                self.slot_cpu_usec[slot] += cpu
                self.slot_bytes_out[slot] += out
        at = bisect_left(LATENCY_BUCKETS, elapsed)
        for name in sample.names:
            counts = self.latency.get(name)
            if counts is None:  # names are the command table's (bounded) or `other`
                counts = self.latency[name] = [0] * (len(LATENCY_BUCKETS) + 1)
                self.latency_sum[name] = 0.0
            counts[at] += 1
            self.latency_sum[name] += elapsed

    # -- readers (scrape time) ---------------------------------------------------------------
    def command_counts(self) -> dict[str, int]:
        return {name.decode(): n for name, n in fold_commands(self.commands).items()}

    def latency_snapshot(self) -> dict[str, LatencySnapshot]:
        out = {}
        for name, counts in self.latency.items():
            cumulative, running = [], 0
            for c in counts:
                running += c
                cumulative.append(running)
            out[name] = LatencySnapshot(tuple(cumulative), self.latency_sum[name], running)
        return out
