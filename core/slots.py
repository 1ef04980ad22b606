"""Slot maths: which of the 16384 slots a key hashes to, and slot range sets."""
from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Iterable

SLOT_COUNT = 16384
SLOT_MASK = SLOT_COUNT - 1  # CRC16 % 16384 == CRC16 & 0x3FFF


def key_slot(key: bytes) -> int:
    """Redis Cluster's hash slot: CRC16-XMODEM of the hash tag (or the whole key) mod 16384."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key, 0) & SLOT_MASK


SlotRange = tuple[int, int]  # inclusive (start, end)


class SlotRangeError(ValueError):
    pass


def parse_range(text: str) -> SlotRange:
    """'0-8000' -> (0, 8000); a single slot '300' -> (300, 300)."""
    start_s, sep, end_s = text.partition("-")
    try:
        start = int(start_s)
        end = int(end_s) if sep else start
    except ValueError:
        raise SlotRangeError(f"invalid slot range '{text}'") from None
    if not (0 <= start <= end < SLOT_COUNT):
        raise SlotRangeError(f"invalid slot range '{text}'")
    return (start, end)


def format_range(r: SlotRange) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def normalize(ranges: Iterable[SlotRange]) -> tuple[SlotRange, ...]:
    """Sort and merge overlapping or adjacent ranges."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((s, e) for s, e in merged)


def ranges_of(slots: Iterable[int]) -> tuple[SlotRange, ...]:
    return normalize((s, s) for s in slots)


def slot_count(ranges: Iterable[SlotRange]) -> int:
    return sum(e - s + 1 for s, e in ranges)


def overlaps(a: Iterable[SlotRange], b: Iterable[SlotRange]) -> bool:
    b = list(b)
    return any(s1 <= e2 and s2 <= e1 for s1, e1 in a for s2, e2 in b)
