"""When to say that something a node depends on (etcd, its Redis) is unreachable: once when
it goes, at most every OUTAGE_REPEAT seconds while it stays away, and once when it is back.
Pure: the callers report each failure and success with the time, and the answer says what to
log (if anything).

Without it every watch restart, retried call and agent restart logged its own line during an
etcd outage, and every pooled backend connection each reconnect attempt while Redis was
down: several lines a second on every node."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

OUTAGE_REPEAT = 30.0  # seconds between "still unreachable" lines


class Say(Enum):
    LOST = "lost"
    STILL = "still"


@dataclass
class OutageLog:
    repeat: float = OUTAGE_REPEAT
    down_since: float | None = None
    last_said: float = float("-inf")
    failures: int = 0  # since the outage began

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, now: float) -> Say | None:
        """A call, watch or connection failed at `now`: what to log, if anything."""
        self.failures += 1
        if self.down_since is None:
            self.down_since, self.last_said, self.failures = now, now, 1
            return Say.LOST
        if now - self.last_said >= self.repeat:
            self.last_said = now
            return Say.STILL
        return None

    def succeeded(self, now: float) -> float | None:
        """It answered at `now`: how long it was away if this ends an outage, else None."""
        if self.down_since is None:
            return None
        away, self.down_since = now - self.down_since, None
        return away
