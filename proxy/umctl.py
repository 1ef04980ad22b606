"""`UMCTL SETCLUSTER` parsing (Undermoon's grammar), pure.

    UMCTL SETCLUSTER v2 <epoch> <flags> <cluster> (<backend> <slots>)* [PEER (<proxy> <slots>)*]
                     [CONFIG (<field> <value>)*]
    UMCTL SETCLUSTER <epoch> <flags> (<cluster> <backend> <slots>)* [PEER (<cluster> <proxy> <slots>)*]

    slots := <n> <range>{n}
           | MIGRATING|IMPORTING <n> <range>{n} <epoch> <src_proxy> <src_node> <dst_proxy> <dst_node>
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from core.address import Address, AddressError
from core.slots import SlotRange, SlotRangeError, normalize, overlaps, parse_range


class UmctlError(ValueError):
    """Bad UMCTL arguments; the message is the error reply text (without '-')."""


class Tag(Enum):
    STABLE = "stable"
    MIGRATING = "migrating"
    IMPORTING = "importing"


@dataclass(frozen=True, slots=True)
class MigrationMeta:
    epoch: int
    src_proxy: str
    src_node: str
    dst_proxy: str
    dst_node: str


@dataclass(frozen=True, slots=True)
class SlotEntry:
    address: str  # a backend address (local part) or a proxy address (peer part)
    ranges: tuple[SlotRange, ...]
    tag: Tag = Tag.STABLE
    migration: MigrationMeta | None = None


@dataclass(frozen=True, slots=True)
class ClusterMeta:
    epoch: int
    force: bool
    cluster: str
    local: tuple[SlotEntry, ...]
    peers: tuple[SlotEntry, ...]
    config: tuple[tuple[str, str], ...] = ()

    def owned(self) -> list[tuple[str, tuple[SlotRange, ...]]]:
        """(owner, ranges) of every entry that owns its slots now ('' = this proxy).

        A migrating range is still owned by its source; an importing one by nobody yet.
        """
        return [("" if e in self.local else e.address, e.ranges)
                for e in self.local + self.peers if e.tag is not Tag.IMPORTING]


MAX_EPOCH = 2**63 - 1


def parse_setcluster(args: list[bytes]) -> ClusterMeta:
    """Parse the arguments after `UMCTL SETCLUSTER`. Raises UmctlError."""
    try:
        words = [a.decode() for a in args]
    except UnicodeDecodeError:
        raise UmctlError("ERR invalid UMCTL SETCLUSTER arguments: not UTF-8") from None
    cursor = _Cursor(words)
    v2 = cursor.peek().lower() == "v2"
    if v2:
        cursor.take()
    epoch = cursor.integer("epoch", 0, MAX_EPOCH)
    flags = {f.upper() for f in cursor.take("flags").split(",")}
    if "COMPRESS" in flags:
        raise UmctlError("ERR the COMPRESS flag is not supported; send the ranges uncompressed")
    cluster = cursor.take("cluster name") if v2 else ""
    local: list[SlotEntry] = []
    peers: list[SlotEntry] = []
    config: list[tuple[str, str]] = []
    part = local
    while not cursor.done():
        word = cursor.peek()
        if word.upper() == "PEER":
            cursor.take()
            part = peers
            continue
        if word.upper() == "CONFIG":
            cursor.take()
            while not cursor.done():
                config.append((cursor.take("config field").lower(), cursor.take("config value")))
            break
        if not v2:
            name = cursor.take()
            if cluster and name != cluster:
                raise UmctlError(f"ERR invalid UMCTL SETCLUSTER arguments: cluster '{name}' "
                                 f"differs from '{cluster}'")
            cluster = name
        part.append(_slot_entry(cursor))
    if not cluster:
        raise UmctlError("ERR invalid UMCTL SETCLUSTER arguments: missing cluster name")
    meta = ClusterMeta(epoch=epoch, force="FORCE" in flags, cluster=cluster,
                       local=tuple(local), peers=tuple(peers), config=tuple(config))
    _validate(meta)
    return meta


def _slot_entry(cursor: _Cursor) -> SlotEntry:
    address = cursor.take("address")
    _check_address(address)
    tag = Tag.STABLE
    if cursor.peek().upper() in ("MIGRATING", "IMPORTING"):
        tag = Tag(cursor.take().lower())
    count = cursor.integer("range count", 1, 16384)
    try:
        ranges = normalize(parse_range(cursor.take("slot range")) for _ in range(count))
    except SlotRangeError as exc:
        raise UmctlError(f"ERR invalid UMCTL SETCLUSTER arguments: {exc}") from None
    migration = None
    if tag is not Tag.STABLE:
        migration = MigrationMeta(cursor.integer("migration epoch", 0, MAX_EPOCH),
                                  *(_check_address(cursor.take("migration address"))
                                    for _ in range(4)))
    return SlotEntry(address, ranges, tag, migration)


def _check_address(text: str) -> str:
    try:
        return str(Address.parse(text))
    except AddressError:
        raise UmctlError(f"ERR invalid UMCTL SETCLUSTER arguments: bad address '{text}'") from None


def _validate(meta: ClusterMeta) -> None:
    seen: list[tuple[SlotRange, ...]] = []
    for _, ranges in meta.owned():
        if any(overlaps(ranges, other) for other in seen):
            raise UmctlError("ERR invalid UMCTL SETCLUSTER arguments: a slot is owned twice")
        seen.append(ranges)
    if len({e.address for e in meta.local}) > 1:
        raise UmctlError("ERR invalid UMCTL SETCLUSTER arguments: a proxy fronts one backend")


class _Cursor:
    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.i = 0

    def done(self) -> bool:
        return self.i >= len(self.words)

    def peek(self) -> str:
        return self.words[self.i] if self.i < len(self.words) else ""

    def take(self, what: str = "argument") -> str:
        if self.done():
            raise UmctlError(f"ERR invalid UMCTL SETCLUSTER arguments: missing {what}")
        self.i += 1
        return self.words[self.i - 1]

    def integer(self, what: str, low: int, high: int) -> int:
        word = self.take(what)
        if not word.isdigit() or not low <= int(word) <= high:
            raise UmctlError(f"ERR invalid UMCTL SETCLUSTER arguments: bad {what} '{word}'")
        return int(word)
