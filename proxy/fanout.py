"""Fan-out for plain (non-cluster) clients, sans-IO: which sub-commands to send, and how to
merge the shards' raw replies back into one reply.

Theory of operation: the session splits a multi-key command by slot (`split`), sends each
part to the node owning its slot, and hands the parts' raw replies, in part order, to `merge`.
Keyspace-wide commands go to every master and merge with `sum_integers` (DBSIZE),
`concat_arrays` (KEYS) or `sum_keyspace` (INFO keyspace). SCAN walks the masters one after
the other behind one client cursor (`scan_order`, `scan_step`, `scan_argv`, `scan_reply`).

Replies are spliced, never re-encoded (as everywhere in the proxy, see proxy/resp.py): a part's
reply already comes in the client's protocol, so its elements (values, RESP2 `$-1` or RESP3
`_` nulls, keys) are copied byte for byte and no function here needs to know the protocol.
An error reply from any part (`-...`, or a RESP3 `!` blob error) is the answer, unchanged.
A reply of an unexpected shape becomes an `-ERR unexpected reply ...` error, so the client's
stream stays well formed.

No sockets, no clock, no asyncio: values in, values out.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import hiredis

from core.slots import key_slot

from .resp import OK, BackendProtocolError, ReplyScanner, bulk, error, integer

__all__ = [
    "MAX_MERGED_REPLY_BYTES",
    "MAX_SCAN_SHARDS",
    "MAX_CLIENT_CURSOR",
    "Merge",
    "SPLITTABLE",
    "Part",
    "Split",
    "split",
    "merge",
    "first_error",
    "sum_integers",
    "concat_arrays",
    "sum_keyspace",
    "ScanTarget",
    "ScanOrder",
    "ScanStep",
    "scan_order",
    "scan_step",
    "scan_argv",
    "scan_reply",
]

# A merged reply bigger than this is refused with an error (Redis's proto-max-bulk-len, the
# largest single value Redis itself accepts).
MAX_MERGED_REPLY_BYTES = 512 * 1024 * 1024

# The SCAN cursor given to the client: (redis_cursor << 18) | (tag << 6) | index.
SCAN_INDEX_BITS = 6
SCAN_TAG_BITS = 12
MAX_SCAN_SHARDS = 1 << SCAN_INDEX_BITS
_INDEX_MASK = MAX_SCAN_SHARDS - 1
_TAG_MASK = (1 << SCAN_TAG_BITS) - 1
_REDIS_SHIFT = SCAN_INDEX_BITS + SCAN_TAG_BITS
# Redis's cursors are unsigned 64-bit, and so are some clients' (go-redis, redis-cli --scan).
MAX_CLIENT_CURSOR = (1 << 64) - 1
_MAX_CURSOR_DIGITS = len(str(MAX_CLIENT_CURSOR))

_NEED_DATA = Ellipsis
_INVALID_CURSOR = error("ERR invalid cursor")
_CLUSTER_DOWN = error("CLUSTERDOWN The cluster is down")


def _unexpected(command: str) -> bytes:
    return error(f"ERR unexpected reply to {command} from a shard")


def _too_large(command: str, limit: int, advice: str) -> bytes:
    return error(f"ERR the merged {command} reply would exceed {limit} bytes; {advice}")


# ---------------------------------------------------------------------------------------------
# Multi-key commands split by slot


class Merge(Enum):
    """How the parts' replies of a split command become one reply."""

    VALUES = "values"  # an array of the values, in the client's key order (MGET)
    SUM = "sum"  # the sum of the integers (DEL, UNLINK, EXISTS, TOUCH)
    ALL_OK = "all_ok"  # +OK when every part said +OK (MSET)


# command -> (how its replies merge, arguments per key)
SPLITTABLE: dict[bytes, tuple[Merge, int]] = {
    b"MGET": (Merge.VALUES, 1),
    b"MSET": (Merge.ALL_OK, 2),
    b"DEL": (Merge.SUM, 1),
    b"UNLINK": (Merge.SUM, 1),
    b"EXISTS": (Merge.SUM, 1),
    b"TOUCH": (Merge.SUM, 1),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Part:
    """One sub-command: the keys of one slot, in the client's order, repeats kept.

    `positions` are the indices of this part's keys among the client's keys (for MSET, of its
    key-value pairs), so `merge` can put each answer back where the client expects it.
    """

    slot: int
    argv: tuple[bytes, ...]
    positions: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Split:
    """A multi-key command cut into parts, in order of each slot's first key."""

    command: str  # upper case, for error texts
    merge: Merge
    parts: tuple[Part, ...]
    key_count: int


def split(argv: Sequence[bytes]) -> Split | None:
    """Cut MGET, MSET, DEL, UNLINK, EXISTS or TOUCH into one sub-command per slot.

    Returns None when there is nothing to split: another command, all keys in one slot, or a
    wrong number of arguments (left for Redis to answer). A sub-command keeps the client's
    spelling of the command name.
    """
    if len(argv) < 2:
        return None
    name = bytes(argv[0]).upper()
    entry = SPLITTABLE.get(name)
    if entry is None:
        return None
    how, step = entry
    args = argv[1:]
    if len(args) % step:
        return None
    groups: dict[int, tuple[list[bytes], list[int]]] = {}
    for position, i in enumerate(range(0, len(args), step)):
        slot = key_slot(args[i])
        group = groups.get(slot)
        if group is None:
            group = groups[slot] = ([argv[0]], [])
        group[0].extend(args[i : i + step])
        group[1].append(position)
    if len(groups) == 1:
        return None
    parts = tuple(Part(slot=slot, argv=tuple(sub), positions=tuple(positions))
                  for slot, (sub, positions) in groups.items())
    return Split(command=name.decode(), merge=how, parts=parts, key_count=len(args) // step)


def merge(plan: Split, replies: Sequence[bytes], *,
          max_bytes: int = MAX_MERGED_REPLY_BYTES) -> bytes:
    """The client's reply from the parts' raw replies (one complete reply each, in part order).

    The first error among them wins, raw. MSET is not atomic once split: when a part fails,
    the other parts may have written. Raises ValueError if there is not one reply per part.
    """
    if len(replies) != len(plan.parts):
        raise ValueError(f"{len(replies)} replies for {len(plan.parts)} parts")
    failed = first_error(replies)
    if failed is not None:
        return failed
    if plan.merge is Merge.SUM:
        return _sum(replies, plan.command)
    if plan.merge is Merge.ALL_OK:
        return OK if all(reply == OK for reply in replies) else _unexpected(plan.command)
    return _merge_values(plan, replies, max_bytes)


def _merge_values(plan: Split, replies: Sequence[bytes], max_bytes: int) -> bytes:
    header = b"*%d\r\n" % plan.key_count
    # the merged reply is exactly the parts' elements under one header
    size = len(header) + sum(len(reply) - len(b"*%d\r\n" % len(part.positions))
                             for part, reply in zip(plan.parts, replies))
    if size > max_bytes:
        return _too_large(plan.command, max_bytes, "ask for fewer keys at a time")
    values = [b""] * plan.key_count
    for part, reply in zip(plan.parts, replies):
        elements = _array_elements(reply)
        if elements is None or len(elements) != len(part.positions):
            return _unexpected(plan.command)
        for position, element in zip(part.positions, elements):
            values[position] = element
    return header + b"".join(values)


def first_error(replies: Iterable[bytes]) -> bytes | None:
    """The first error reply (`-...`, or a RESP3 `!` blob error), raw; None if there is none."""
    for reply in replies:
        if reply[:1] in (b"-", b"!"):
            return reply
    return None


def sum_integers(replies: Sequence[bytes]) -> bytes:
    """One integer reply, the sum of the replies (DBSIZE of every master); the first error wins."""
    failed = first_error(replies)
    if failed is not None:
        return failed
    return _sum(replies, "DBSIZE")


def _sum(replies: Iterable[bytes], command: str) -> bytes:
    total = 0
    for reply in replies:
        if reply[:1] != b":" or reply[-2:] != b"\r\n":
            return _unexpected(command)
        try:
            total += int(reply[1:-2])
        except ValueError:
            return _unexpected(command)
    return integer(total)


def concat_arrays(replies: Sequence[bytes], *, max_bytes: int = MAX_MERGED_REPLY_BYTES) -> bytes:
    """One array of every reply's elements, in reply order (KEYS of every master).

    The first error wins. A result over `max_bytes` becomes an error that points to SCAN.
    """
    failed = first_error(replies)
    if failed is not None:
        return failed
    count = 0
    bodies = []
    for reply in replies:
        head = _array_header(reply)
        if head is None:
            return _unexpected("KEYS")
        n, start = head
        count += n
        bodies.append(memoryview(reply)[start:])
    header = b"*%d\r\n" % count
    if len(header) + sum(len(body) for body in bodies) > max_bytes:
        return _too_large("KEYS", max_bytes, "iterate with SCAN instead")
    return header + b"".join(bodies)


def _array_header(reply: bytes) -> tuple[int, int] | None:
    """(element count, offset of the first element) of an array reply; None if not one."""
    nl = reply.find(b"\r\n")
    if reply[:1] != b"*" or nl < 0:
        return None
    digits = reply[1:nl]
    if not digits.isdigit():  # also refuses the null array *-1
        return None
    return int(digits), nl + 2


def _array_elements(reply: bytes) -> list[bytes] | None:
    """The elements of one array reply, each as its raw bytes; None if `reply` is not exactly
    one well-formed array."""
    head = _array_header(reply)
    if head is None:
        return None
    count, start = head
    scanner = ReplyScanner()
    scanner.pos = start
    elements = []
    try:
        for _ in range(count):
            end = scanner.next_end(reply)
            if end < 0:
                return None
            elements.append(reply[start:end])
            start = end
    except BackendProtocolError:
        return None
    return elements if start == len(reply) else None


# ---------------------------------------------------------------------------------------------
# INFO keyspace


def sum_keyspace(info_replies: Sequence[bytes]) -> bytes:
    """The `# Keyspace` section of the whole cluster, as text (not an encoded reply).

    `info_replies` are the raw replies of `INFO keyspace` from every master: a bulk string
    (RESP2) or a verbatim string (RESP3). Per db, `keys`, `expires` and any other count are
    summed; `avg_ttl` is the mean of the shards' non-zero ones weighted by their `expires`
    (it is the mean TTL of the keys that have one), rounded to an integer. Dbs come in number
    order; a db missing on a shard counts as empty there.
    Raises ValueError for a reply that is not a string: check `first_error` first.
    """
    dbs: dict[int, dict[str, int]] = {}
    ttl_weight: dict[int, int] = {}
    for reply in info_replies:
        for line in _string_reply(reply).splitlines():
            name, sep, rest = line.partition(b":")
            if not sep or not name.startswith(b"db") or not name[2:].isdigit():
                continue
            db = int(name[2:])
            fields = _keyspace_fields(rest)
            totals = dbs.setdefault(db, {})
            for field, value in fields.items():
                if field != "avg_ttl":
                    totals[field] = totals.get(field, 0) + value
            ttl, expires = fields.get("avg_ttl", 0), fields.get("expires", 0)
            totals.setdefault("avg_ttl", 0)
            if ttl and expires:
                totals["avg_ttl"] += ttl * expires  # divided by the weights below
                ttl_weight[db] = ttl_weight.get(db, 0) + expires
    lines = [b"# Keyspace\r\n"]
    for db in sorted(dbs):
        totals = dbs[db]
        weight = ttl_weight.get(db, 0)
        if weight:
            totals["avg_ttl"] = (totals["avg_ttl"] + weight // 2) // weight
        text = ",".join(f"{field}={value}" for field, value in _keyspace_order(totals))
        lines.append(b"db%d:%s\r\n" % (db, text.encode()))
    return b"".join(lines)


def _string_reply(reply: bytes) -> bytes:
    if reply[:1] not in (b"$", b"="):
        raise ValueError(f"not a string reply: {reply[:20]!r}")
    reader = hiredis.Reader(notEnoughData=_NEED_DATA)
    reader.feed(reply)
    value = reader.gets()
    if not isinstance(value, bytes):  # a null bulk, or incomplete
        raise ValueError(f"not a string reply: {reply[:20]!r}")
    return value


def _keyspace_fields(text: bytes) -> dict[str, int]:
    """'keys=3,expires=1,avg_ttl=500' -> {'keys': 3, ...}; fields that are not integers are
    skipped."""
    fields = {}
    for item in text.split(b","):
        field, _, value = item.partition(b"=")
        if value.isdigit():
            fields[field.decode("ascii", "replace")] = int(value)
    return fields


def _keyspace_order(totals: dict[str, int]) -> list[tuple[str, int]]:
    """Redis's order first (keys, expires, avg_ttl), then any newer field as first seen."""
    known = ("keys", "expires", "avg_ttl")
    return ([(field, totals[field]) for field in known if field in totals]
            + [(field, value) for field, value in totals.items() if field not in known])


# ---------------------------------------------------------------------------------------------
# SCAN over every master behind one cursor


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanTarget:
    """A master to scan. `receiving`: its shard is the target of a running slot migration;
    `layout`: the slots it serves, as text (a change of any shard's slots restarts a scan)."""

    node_id: str
    address: str
    receiving: bool
    layout: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanOrder:
    """The masters in the order a cluster-wide SCAN visits them, and the tag naming that order."""

    masters: tuple[ScanTarget, ...]
    tag: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanStep:
    """Send SCAN with `redis_cursor` to `target`, the master at `index` of the order."""

    index: int
    redis_cursor: int
    target: ScanTarget


def scan_order(masters: Iterable[ScanTarget]) -> ScanOrder:
    """Order the masters: shards not receiving first, receiving ones last, ties by node id.

    Keys only move from a migration's source to its target, so a key that moves during the
    scan is still found at least once when every target comes after every source. (Not so
    between two receiving shards when keys also move from the later one to the earlier.)
    The tag is a 12-bit CRC of the ordered ids, addresses and slot layouts (stable across
    processes): a cursor made under another order or layout restarts the scan, so a migration
    that starts and ends between two calls cannot hide keys in a shard already scanned.
    """
    ordered = tuple(sorted(masters, key=lambda m: (m.receiving, m.node_id)))
    names = "\n".join(f"{m.node_id}@{m.address}/{m.layout}" for m in ordered)
    return ScanOrder(masters=ordered, tag=zlib.crc32(names.encode()) & _TAG_MASK)


def scan_step(client_cursor: bytes, order: ScanOrder) -> ScanStep | bytes:
    """Which master to SCAN next, and from which Redis cursor; or an error reply to send.

    Cursor 0 starts at the first master. A cursor whose tag is not `order.tag` was made under
    another order (a migration started or ended, a shard came or went, a failover): the scan
    restarts from the first master, which may return keys again but misses none.
    """
    if not order.masters:
        return _CLUSTER_DOWN
    if len(order.masters) > MAX_SCAN_SHARDS:
        return error(f"ERR SCAN over the whole cluster supports at most {MAX_SCAN_SHARDS} "
                     "shards")
    cursor = _parse_cursor(client_cursor)
    if cursor is None:
        return _INVALID_CURSOR
    index = cursor & _INDEX_MASK
    tag = (cursor >> SCAN_INDEX_BITS) & _TAG_MASK
    if cursor == 0 or tag != order.tag:
        return ScanStep(index=0, redis_cursor=0, target=order.masters[0])
    if index >= len(order.masters):
        return _INVALID_CURSOR
    return ScanStep(index=index, redis_cursor=cursor >> _REDIS_SHIFT,
                    target=order.masters[index])


def _parse_cursor(raw: bytes) -> int | None:
    if not raw.isdigit() or len(raw) > _MAX_CURSOR_DIGITS:  # isdigit: ASCII digits, no sign
        return None
    cursor = int(raw)
    return cursor if cursor <= MAX_CLIENT_CURSOR else None


def scan_argv(client_argv: Sequence[bytes], step: ScanStep) -> list[bytes]:
    """The SCAN to send to `step.target`: the client's (`SCAN cursor [MATCH p] [COUNT n]
    [TYPE t]`), options unchanged, with the Redis cursor in place of the client's."""
    return [client_argv[0], b"%d" % step.redis_cursor, *client_argv[2:]]


def scan_reply(step: ScanStep, order: ScanOrder, part_reply: bytes) -> bytes:
    """The client's reply from one master's raw SCAN reply (`[next_cursor, [keys...]]`).

    The cursor becomes the combined one: the same master while its scan goes on, the next
    master from Redis cursor 0 when it ended, 0 after the last master. Keys are copied raw;
    an error reply is returned unchanged.
    """
    if first_error([part_reply]) is not None:
        return part_reply
    elements = _array_elements(part_reply)
    if elements is None or len(elements) != 2 or elements[1][:1] != b"*":
        return _unexpected("SCAN")
    cursor_element, keys = elements
    head = cursor_element.find(b"\r\n")
    digits = cursor_element[head + 2 : -2]
    if cursor_element[:1] != b"$" or not digits.isdigit():
        return _unexpected("SCAN")
    redis_cursor = int(digits)
    if redis_cursor:
        index = step.index
    elif step.index + 1 < len(order.masters):
        index = step.index + 1
    else:
        return b"*2\r\n$1\r\n0\r\n" + keys
    cursor = (redis_cursor << _REDIS_SHIFT) | (order.tag << SCAN_INDEX_BITS) | index
    if cursor > MAX_CLIENT_CURSOR:
        return error("ERR a shard's SCAN cursor is too large to combine into a cluster cursor")
    return b"*2\r\n" + bulk(b"%d" % cursor) + keys
