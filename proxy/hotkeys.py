"""Hot keys: a bounded top-N of keys by operations, the space-saving algorithm (Metwally,
Agrawal, El Abbadi 2005). Pure: values in, values out; no clock, no I/O.

At most `capacity` keys are tracked. A key already tracked has its count raised; a new key
takes a free entry, or replaces the entry with the smallest count and inherits that count
(its `error`, the most it may be over-counted by). Every key whose true count exceeds
total / capacity is guaranteed to be in the table, and each estimate is at most `error`
above the truth. The data path feeds it a sample (proxy/stats.py), each key with the sample's
weight, so the counts estimate operations.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

DEFAULT_CAPACITY = 128  # keys tracked per node; `top(n)` is exact for keys well above 1/128
MAX_KEY_BYTES = 256  # a longer key is tracked by its first bytes (memory stays bounded)


@dataclass(frozen=True, slots=True)
class HotKey:
    key: bytes
    count: int  # estimated operations (never below the truth)
    error: int  # the estimate may be this much above the truth


class SpaceSaving:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.counts: dict[bytes, int] = {}
        self.errors: dict[bytes, int] = {}
        self.total = 0  # weight offered so far

    def offer(self, key: bytes, weight: int = 1) -> None:
        if len(key) > MAX_KEY_BYTES:
            key = key[:MAX_KEY_BYTES]
        self.total += weight
        counts = self.counts
        count = counts.get(key)
        if count is not None:
            counts[key] = count + weight
        elif len(counts) < self.capacity:
            counts[key] = weight
            self.errors[key] = 0
        else:  # evict the smallest: O(capacity), on a sampled command only
            victim = min(counts, key=counts.__getitem__)
            floor = counts.pop(victim)
            del self.errors[victim]
            counts[key] = floor + weight
            self.errors[key] = floor

    def top(self, n: int) -> list[HotKey]:
        """The `n` keys with the highest estimates, highest first (ties: by key)."""
        if n <= 0:
            return []
        best = heapq.nsmallest(n, self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [HotKey(k, c, self.errors[k]) for k, c in best]

    def clear(self) -> None:
        self.counts.clear()
        self.errors.clear()
        self.total = 0
