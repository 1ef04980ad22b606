"""What `--wait` says about a cluster's migrations: slots and keys moved of the total, the
rate and an ETA. Pure: `MigrationTracker.observe(rows, now)` takes `ops.migration_rows` (one
poll) and returns a `Snapshot`.

A migration's source reports its progress (keys moved, keys left once counted) while it
runs, and for a minute after it finished its final report (`NodeStatus.finished_migrations`);
once it commits it leaves the view. The tracker keeps the last report of each migration it
saw and takes the final one when it comes, so keys moved by committed migrations count. A
migration committed with no report read is counted as `unreported`: its slots moved, its
keys are not known.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# the rate is measured over the keys moved in this many seconds (or since the start)
RATE_WINDOW = 10.0


@dataclass(frozen=True)
class Snapshot:
    slots_total: int
    slots_moved: int  # in committed migrations
    keys_moved: int  # running and committed
    keys_total: int | None  # None: some running migration has not counted its keys yet
    keys_per_sec: float
    eta_sec: float | None
    migrations_total: int
    migrations_done: int
    unreported: int  # committed with its keys never counted in a report read
    errors: tuple[str, ...]

    def line(self) -> str:
        """`1200/5461 slots, 3,000/12,000 keys, 950 keys/s, ETA 9s`."""
        keys = (f"{self.keys_moved:,}/{self.keys_total:,} keys" if self.keys_total is not None
                else f"{self.keys_moved:,} keys")
        eta = f", ETA {format_seconds(self.eta_sec)}" if self.eta_sec is not None else ""
        errors = f", error: {self.errors[0]}" if self.errors else ""
        return (f"{self.slots_moved}/{self.slots_total} slots, {keys}, "
                f"{self.keys_per_sec:,.0f} keys/s{eta}{errors}")

    def final(self, elapsed: float) -> str:
        """The summary once every migration committed."""
        unknown = (f" (and the keys of {self.unreported} migration"
                   f"{'' if self.unreported == 1 else 's'} that committed before reporting)"
                   if self.unreported else "")
        return (f"done: {self.slots_total} slots in {self.migrations_total} migration"
                f"{'' if self.migrations_total == 1 else 's'}, {self.keys_moved:,} keys moved"
                f"{unknown} in {format_seconds(elapsed)}")


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _key(row: dict[str, Any]) -> str:
    """A migration across its states: its id names the epoch it was planned, then the one
    it started in, so it is known by what it moves."""
    return f"{row['from']}>{row['to']}:{row['slots']}"


@dataclass
class _Seen:
    slots: int
    ids: set[str] = field(default_factory=set)
    moved: int = 0
    total: int | None = None  # moved + left, once the source counted
    error: str = ""


def _split(mid: str) -> tuple[str, int]:
    """`s1>s2@7` -> ("s1>s2", 7) (core/view.py, Migration.id); epoch -1 if malformed."""
    pair, _, epoch = mid.rpartition("@")
    return pair, int(epoch) if epoch.isdigit() else -1


def _final_report(ids: set[str], finished: Mapping[str, int], claimed: set[str]) -> int | None:
    """The keys moved by a migration seen under `ids`, from the final reports: its own id,
    or (seen only while planned) the same source and target started in a later epoch."""
    for mid in ids:
        if mid in finished and mid not in claimed:
            claimed.add(mid)
            return finished[mid]
    pairs = {_split(i)[0]: _split(i)[1] for i in ids}
    for mid in sorted(finished):
        pair, epoch = _split(mid)
        if mid not in claimed and pair in pairs and epoch >= pairs[pair]:
            claimed.add(mid)
            return finished[mid]
    return None


@dataclass
class MigrationTracker:
    started: float
    seen: dict[str, _Seen] = field(default_factory=dict)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, keys moved)

    def observe(self, rows: Sequence[dict[str, Any]], now: float,
                finished: Mapping[str, int] | None = None) -> Snapshot:
        """`rows`: the migrations in the view now (ops.migration_rows); `finished`: keys
        moved by migrations their sources finished lately (their final reports)."""
        running = set()
        for row in rows:
            mid = _key(row)
            running.add(mid)
            entry = self.seen.setdefault(mid, _Seen(row["slot_count"]))
            entry.ids.add(row["id"])
            moved = int(row["moved_keys"])
            left = row["left_keys"]
            entry.moved = max(entry.moved, moved)
            if left is not None:
                entry.total = max(entry.moved, moved + int(left))
            entry.error = row.get("error") or ""
        claimed: set[str] = set()
        for key, entry in self.seen.items():
            if key in running:
                continue
            final = _final_report(entry.ids, finished or {}, claimed)
            if final is not None:
                entry.moved = entry.total = final
        done = [e for mid, e in self.seen.items() if mid not in running]
        live = [e for mid, e in self.seen.items() if mid in running]
        for e in done:  # committed: every key it had moved
            if e.total is not None:
                e.moved = e.total
        keys_moved = sum(e.moved for e in self.seen.values())
        keys_total: int | None = None
        if all(e.total is not None for e in live):
            keys_total = sum(e.total if e.total is not None else e.moved
                             for e in self.seen.values())
        self.samples.append((now, keys_moved))
        self.samples = [s for s in self.samples if now - s[0] <= RATE_WINDOW] or [(now, keys_moved)]
        t0, k0 = self.samples[0]
        rate = (keys_moved - k0) / (now - t0) if now > t0 else 0.0
        slots_total = sum(e.slots for e in self.seen.values())
        slots_moved = sum(e.slots for e in done)
        eta: float | None = None
        if keys_total is not None and rate > 0:
            eta = max(0.0, (keys_total - keys_moved) / rate)
        elif slots_moved and now > self.started:  # keys not counted yet: go by slots
            eta = (now - self.started) * (slots_total - slots_moved) / slots_moved
        if not live:
            eta = 0.0
        return Snapshot(slots_total, slots_moved, keys_moved, keys_total, rate, eta,
                        len(self.seen), len(done),
                        sum(1 for e in done if e.total is None),
                        tuple(e.error for e in live if e.error))
