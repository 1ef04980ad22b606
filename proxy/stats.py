"""The data path's statistics: plain ints, dicts and lists, bumped in protocol callbacks and
read at scrape time (node/metrics.py turns them into Prometheus metric families; UMCTL HOTKEYS
and CLUSTER SLOT-STATS read them too).

What the hot path pays per read of commands (proxy/session.py): one dict update for the
read's command names (a read whose first and last commands share a name is counted under
it: every command of a pipeline of one kind, exactly; a read that starts and ends with the
same command and mixes others in between is counted under that name too), a C-level count of
each name otherwise, and one countdown. Everything else is sampled:

- one command in SAMPLE_EVERY on average (counted across all clients, at random gaps) is a
  sample point: its key goes to the hot-key table (proxy/hotkeys.py) and its request bytes
  to its slot's `network-bytes-in`, weighted SAMPLE_EVERY, so the counts estimate the
  totals (a long pipeline gives as many samples as it holds points, not one);
- a read holding a point, made while its client waited for no other reply, is also
  *timed*: from the read to its last reply written (the latency histogram, under the first
  point's command name), the proxy's time handling the read (`cpu-usec`) and the bytes
  written back (`network-bytes-out`), both divided evenly among the read's commands and
  weighted like the rest.

Bounds: a name that is no command of the Redis command table (longer than its longest
name, LONGEST_NAME bytes, or unknown) is counted as `other` at once, so the names kept take
at most MAX_COMMAND_NAMES * LONGEST_NAME bytes; the spellings of known names are folded to
the table's names once more than MAX_COMMAND_NAMES distinct ones were seen; error kinds are
capped at MAX_ERROR_KINDS; per-slot counters are three lists of 16384 numbers.

Tenancy: the statistics are the served cluster's. `reset()` clears them in place when the
node serves another tenant (proxy/context.py), and only clients of the served tenant that
passed its authentication (or proved the admin secret) give samples (proxy/session.py).
"""
from __future__ import annotations

import collections
import random
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import itemgetter

from core.slots import SLOT_COUNT, key_slot

from .commands import COMMANDS
from .hotkeys import HALF_LIFE as HOTKEYS_HALF_LIFE
from .hotkeys import SpaceSaving
from .resp import encode_command

# one command in this many, on average, is a sample point (hot keys, slot statistics,
# latency); a read's points are all hot-key samples, its first one is timed. A sample
# costs about 3-4 fast-path commands, so this keeps it near 1-2% (docs/architecture.md,
# "Metrics"). The gaps between points are random (uniform, 1 to 2*SAMPLE_EVERY-1): a fixed
# stride would see one key only of a client cycling through a multiple of it.
SAMPLE_EVERY = 256


def next_gap(random: Callable[[], float] = random.random) -> int:
    return 1 + int(random() * (2 * SAMPLE_EVERY - 1))
MAX_COMMAND_NAMES = 512  # distinct raw command names kept before folding to known ones
MAX_ERROR_KINDS = 64  # distinct error kinds (the first word of an error reply) kept
OTHER = "other"
_OTHER = OTHER.encode()
# the longest command name of the command table: any longer argv[0] is `other` at once
LONGEST_NAME = max(map(len, COMMANDS))
# latency histogram upper bounds, seconds (Prometheus `le`); +Inf is implied
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)
REDIRECT_KINDS = frozenset({"MOVED", "ASK", "TRYAGAIN"})

# the C helper Counter.update uses: counts an iterable into a dict in one call
count_into: Callable[[dict, Iterable], None] = collections._count_elements  # type: ignore[attr-defined]


_first = itemgetter(0)


def command_name(raw: bytes) -> str:
    """The name a raw argv[0] is counted under: the command table's, or `other`."""
    upper = raw.upper()
    return upper.decode() if upper in COMMANDS else OTHER


def is_command(raw: bytes) -> bool:
    """A name of the command table in any spelling (the length is checked first: a huge
    made-up name is not upper-cased)."""
    return len(raw) <= LONGEST_NAME and raw.upper() in COMMANDS


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
    return len(encode_command(argv))


# raw argv[0] -> (the name it is counted under, its first key's index or 0), for samples;
# cleared when it holds this many spellings
MAX_SPELLINGS = 1024
_spellings: dict[bytes, tuple[str, int]] = {}


def name_and_key(argv: list[bytes]) -> tuple[str, bytes | None]:
    """The command's name (as `command_name`) and first key by the command table's legacy
    key position, or None."""
    known = _spellings.get(argv[0])
    if known is None:
        if not is_command(argv[0]):  # not kept: made-up names would fill the cache
            return OTHER, None
        spec = COMMANDS[argv[0].upper()]
        known = (spec.name.decode(), spec.first_key)
        if len(_spellings) >= MAX_SPELLINGS:
            _spellings.clear()
        _spellings[argv[0]] = known
    name, at = known
    return name, argv[at] if 0 < at < len(argv) else None


def key_of(argv: list[bytes]) -> bytes | None:
    return name_and_key(argv)[1]


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    buckets: tuple[int, ...]  # cumulative counts per LATENCY_BUCKETS bound, then +Inf
    total: float  # seconds
    count: int


class Sample:
    """A timed read in flight (proxy/session.py): what to charge when its last reply is out."""

    __slots__ = ("t0", "cpu", "wrote", "last", "name", "slot", "weight", "commands")

    def __init__(self, t0: float, name: str, slot: int, weight: int, commands: int) -> None:
        self.t0 = t0
        self.cpu = 0.0  # seconds the proxy spent handling the read
        self.wrote = 0  # bytes written to the client since the read
        self.last: object = None  # the read's last reply slot (a Pending), once handled
        self.name = name  # the sampled command's
        self.slot = slot  # ... and its key's slot (-1: keyless)
        self.weight = weight  # the commands it stands for
        self.commands = commands  # in the read


class ProxyStats:
    """Sessions keep a reference to the one instance of their proxy (ProxyContext.stats):
    it is cleared in place (`reset`), never replaced."""

    def __init__(self) -> None:
        self.clients_accepted = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything counted for the tenant served so far (the node serves another
        one now, or none). `clients_accepted` is the process's and stays."""
        self.commands: dict[bytes, int] = {}  # raw argv[0] -> commands read
        self.errors: dict[str, int] = {}  # kind -> error replies the proxy made itself
        self.countdown = next_gap()  # commands until the next sample point (1 or more)
        self.hotkeys = SpaceSaving()
        self.hotkeys_aged_at = 0.0  # time.monotonic() the hot keys were last halved (as of)
        self.slot_cpu_usec = [0.0] * SLOT_COUNT
        self.slot_bytes_in = [0] * SLOT_COUNT
        self.slot_bytes_out = [0.0] * SLOT_COUNT
        self.latency: dict[str, list[int]] = {}  # name -> per-bucket (not cumulative) counts
        self.latency_sum: dict[str, float] = {}

    # -- the hot path's helpers, called off its common case ---------------------------------
    def count_new(self, name: bytes, n: int) -> None:
        """A name (spelling) not counted yet: made-up names go to `other` at once."""
        if not is_command(name):
            name = _OTHER
            n += self.commands.get(name, 0)
        self.commands[name] = n
        if len(self.commands) > MAX_COMMAND_NAMES:
            self.commands = fold_commands(self.commands)

    def count_each(self, batch: list[list[bytes]]) -> None:
        """A read of several kinds of command: each name counted (in C); names new to the
        table that are no commands are moved to `other` at once."""
        commands = self.commands
        before = len(commands)
        count_into(commands, map(_first, batch))
        if len(commands) != before:
            for argv in batch:
                name = argv[0]
                if name != _OTHER and name in commands and not is_command(name):
                    commands[_OTHER] = commands.get(_OTHER, 0) + commands.pop(name)
        if len(self.commands) > MAX_COMMAND_NAMES:
            self.commands = fold_commands(self.commands)

    def count_error(self, reply: bytes) -> None:
        kind = error_kind(reply)
        errors = self.errors
        if kind not in errors and len(errors) >= MAX_ERROR_KINDS:
            kind = OTHER
        errors[kind] = errors.get(kind, 0) + 1

    def age_hotkeys(self, now: float) -> None:
        """Halve the hot keys once for every HOTKEYS_HALF_LIFE passed since they last were
        (`now`: time.monotonic()); a table idle for an hour is emptied."""
        times = int((now - self.hotkeys_aged_at) // HOTKEYS_HALF_LIFE)
        if times > 0:
            self.hotkeys.halve(times)
            self.hotkeys_aged_at += times * HOTKEYS_HALF_LIFE

    def sample(self, batch: list[list[bytes]], now: float) -> tuple[str, int, int]:
        """The read reached the countdown (at `now`, time.monotonic()): each command at a
        sample point goes to the hot keys and to its slot's bytes in, weighted SAMPLE_EVERY;
        draw the points after the read. The first point's name and slot (-1: keyless), and
        the weight of all the read's points (what a timed read's cost is shared by)."""
        if now - self.hotkeys_aged_at >= HOTKEYS_HALF_LIFE:  # age_hotkeys' test, saving a call
            self.age_hotkeys(now)
        n = len(batch)
        at = self.countdown - 1
        first_name, first_slot, points = "", -1, 0
        offer, bytes_in = self.hotkeys.offer, self.slot_bytes_in
        while at < n:
            argv = batch[at]
            name, key = name_and_key(argv)
            slot = -1
            if key is not None:
                offer(key, SAMPLE_EVERY)
                slot = key_slot(key)
                bytes_in[slot] += len(encode_command(argv)) * SAMPLE_EVERY
            if not points:
                first_name, first_slot = name, slot
            points += 1
            at += next_gap()
        self.countdown = at - n + 1
        return first_name, first_slot, points * SAMPLE_EVERY

    def skip(self, n: int) -> int:
        """A read of `n` commands reached the countdown: draw the sample points after it;
        the weight of its sample (alone: a read whose sample is not taken, see
        proxy/session.py)."""
        at = self.countdown - 1
        points = 0
        while at < n:
            points += 1
            at += next_gap()
        self.countdown = at - n + 1
        return points * SAMPLE_EVERY

    def finish(self, sample: Sample, elapsed: float) -> None:
        """A timed read's last reply is out: charge the sampled command's slot its share of
        the read's cost, and record its latency."""
        if sample.slot >= 0:
            share = sample.weight / sample.commands
            self.slot_cpu_usec[sample.slot] += sample.cpu * 1e6 * share
            self.slot_bytes_out[sample.slot] += sample.wrote * share
        counts = self.latency.get(sample.name)
        if counts is None:  # names are the command table's (bounded) or `other`
            counts = self.latency[sample.name] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.latency_sum[sample.name] = 0.0
        counts[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        self.latency_sum[sample.name] += elapsed

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
