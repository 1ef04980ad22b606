"""Hot keys: a bounded top-N of keys by operations, the space-saving algorithm (Metwally,
Agrawal, El Abbadi 2005). Pure: values in, values out; no clock, no I/O.

At most `capacity` keys are tracked. A key already tracked has its count raised; a new key
takes a free entry, or replaces the entry with the smallest count and inherits that count
(its `error`, the most it may be over-counted by). Every key whose true count exceeds
total / capacity is guaranteed to be in the table, and each estimate is at most `error`
above the truth. The data path feeds it a sample (proxy/stats.py), each key with the sample's
weight, so the counts estimate operations.

The table is of recent operations: `halve` divides every count and error by two, and the data
path calls it once per HALF_LIFE seconds (ProxyStats.age_hotkeys), so a key that was hot an
hour ago and is idle now is soon out-counted by today's.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

DEFAULT_CAPACITY = 128  # keys tracked per node; `top(n)` is exact for keys well above 1/128
MAX_KEY_BYTES = 256  # a longer key is tracked by its first bytes (memory stays bounded)
HEAP_SLACK = 4  # the eviction heap is rebuilt when it holds this many entries per key tracked
HALF_LIFE = 60.0  # seconds: every estimate is halved this often (Redis's lfu-decay-time is 1 min)


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
        # (count, key) for finding the smallest in O(log n): entries whose count is no
        # longer the key's are skipped when they surface, and the heap is rebuilt from
        # `counts` when stale ones make it HEAP_SLACK times the table
        self.heap: list[tuple[int, bytes]] = []

    def offer(self, key: bytes, weight: int = 1) -> None:
        if len(key) > MAX_KEY_BYTES:
            key = key[:MAX_KEY_BYTES]
        self.total += weight
        counts = self.counts
        count = counts.get(key)
        if count is not None:
            count += weight
        elif len(counts) < self.capacity:
            count = weight
            self.errors[key] = 0
        else:  # the smallest makes room, and the newcomer inherits its count as its error
            floor = self._pop_smallest()
            count = floor + weight
            self.errors[key] = floor
        counts[key] = count
        heap = self.heap
        heapq.heappush(heap, (count, key))
        if len(heap) > HEAP_SLACK * self.capacity:
            self.heap = [(c, k) for k, c in counts.items()]
            heapq.heapify(self.heap)

    def _pop_smallest(self) -> int:
        heap, counts = self.heap, self.counts
        while True:
            count, key = heapq.heappop(heap)
            if counts.get(key) == count:
                del counts[key]
                del self.errors[key]
                return count

    def top(self, n: int) -> list[HotKey]:
        """The `n` keys with the highest estimates, highest first (ties: by key)."""
        if n <= 0:
            return []
        best = heapq.nsmallest(n, self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [HotKey(k, c, self.errors[k]) for k, c in best]

    def halve(self, times: int = 1) -> None:
        """Age the table: every count and error divided by 2**`times`, rounded down; a key
        whose count falls to 0 goes. The counts still add up to `total`."""
        if times <= 0:
            return
        counts = {k: c >> times for k, c in self.counts.items() if c >> times}
        self.errors = {k: self.errors[k] >> times for k in counts}
        self.counts = counts
        self.total = sum(counts.values())
        self.heap = [(c, k) for k, c in counts.items()]
        heapq.heapify(self.heap)

    def clear(self) -> None:
        self.counts.clear()
        self.errors.clear()
        self.heap.clear()
        self.total = 0
