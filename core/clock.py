"""The clock that lease deadlines and write permissions are measured on.

CLOCK_BOOTTIME, not time.monotonic() (CLOCK_MONOTONIC): the monotonic clock stops while the
host is suspended, etcd's does not. A node resumed after a suspend would otherwise believe a
lease that expired at etcd meanwhile still holds, and take writes while its replica is
promoted. Both are equally cheap (vDSO) and never jump.
"""
from __future__ import annotations

import time


def now() -> float:
    """Seconds on CLOCK_BOOTTIME: monotonic, and counting time the host spent suspended."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)
