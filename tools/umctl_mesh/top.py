"""`umctl-mesh top CLUSTER`: the hot keys, hot slots and busiest nodes of one cluster.

Every member's proxy is asked, at once:
  - `UMCTL HOTKEYS N` (needs the mesh secret): its estimated top keys, from a sample of the
    commands it served (proxy/hotkeys.py);
  - `CLUSTER SLOT-STATS ORDERBY cpu-usec LIMIT N` (the cluster's password, or the mesh
    secret): its busiest slots; each call also counts the keys of its Redis with a SCAN;
  - `INFO proxy` twice, `interval` seconds apart: its commands per second.
The merge is pure (`merge_keys`, `merge_slots`, `node_rows`): a key or slot served by a
master and its replicas (READONLY reads) counts the work of all of them.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from core import clock
from core.slots import SLOT_COUNT, key_slot
from core.view import ClusterView
from mesh.redisctl import RedisCtl, RedisCtlError
from proxy.hotkeys import DEFAULT_CAPACITY as HOTKEYS_TRACKED
from proxy.hotkeys import MAX_KEY_BYTES as HOTKEY_BYTES

from . import api, ops
from .check import Credentials, authenticate, short_error

DEFAULT_COUNT = 10  # rows of each table
MAX_COUNT = HOTKEYS_TRACKED  # UMCTL HOTKEYS answers at most this many keys
DEFAULT_INTERVAL = 1.0  # seconds between the two INFO reads of the ops/s
DEFAULT_TIMEOUT = 10.0  # seconds for what one proxy is asked (SLOT-STATS scans its Redis)
SLOT_FIELDS = ("key-count", "cpu-usec", "network-bytes-in", "network-bytes-out")


@dataclass(frozen=True, slots=True)
class NodeReading:
    """What one member's proxy answered; `problems` says what it did not."""

    node: str
    hotkeys: tuple[tuple[bytes, int], ...] = ()
    slots: tuple[tuple[int, Mapping[str, int]], ...] = ()
    ops_per_sec: float | None = None
    problems: tuple[str, ...] = field(default_factory=tuple)


# -- pure: replies parsed, readings merged ---------------------------------------------------

def parse_hotkeys(reply: object) -> tuple[tuple[bytes, int], ...]:
    """UMCTL HOTKEYS' reply: [[key, count], ...]."""
    if not isinstance(reply, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], bytes)
            and isinstance(p[1], int) for p in reply):
        raise ValueError(f"unexpected UMCTL HOTKEYS reply {reply!r:.200}")
    return tuple((p[0], p[1]) for p in reply)


def parse_slot_stats(reply: object) -> tuple[tuple[int, dict[str, int]], ...]:
    """CLUSTER SLOT-STATS' reply in RESP2: [[slot, [name, value, ...]], ...]."""
    rows = []
    if not isinstance(reply, list):
        raise ValueError(f"unexpected CLUSTER SLOT-STATS reply {reply!r:.200}")
    for row in reply:
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], int)
                and isinstance(row[1], list) and len(row[1]) % 2 == 0):
            raise ValueError(f"unexpected CLUSTER SLOT-STATS row {row!r:.200}")
        pairs = row[1]
        fields = {pairs[i].decode(errors="replace") if isinstance(pairs[i], bytes) else
                  str(pairs[i]): pairs[i + 1] for i in range(0, len(pairs), 2)}
        rows.append((row[0], {name: int(fields.get(name, 0)) for name in SLOT_FIELDS}))
    return tuple(rows)


def merge_keys(readings: list[NodeReading], view: ClusterView, count: int) -> list[dict]:
    """The `count` keys with the most estimated ops over the nodes that served them: those of
    the shard that owns the key's slot. Another node's estimate is left out: it sampled the
    key on its way elsewhere (forwarded from a plain listener, or redirected), and the owner
    sampled the same commands again."""
    owners = _slot_owners(view)
    totals: dict[bytes, int] = {}
    served_by: dict[bytes, list[str]] = {}
    shard_of_key: dict[bytes, str | None] = {}
    for r in readings:
        here = _shard_of_node(view, r.node)
        for key, ops_count in r.hotkeys:
            # a key cut to HOTKEY_BYTES may hash elsewhere than the key: trust the node then
            shard = here if len(key) >= HOTKEY_BYTES else owners[key_slot(key)]
            if shard != here:
                continue
            totals[key] = totals.get(key, 0) + ops_count
            served_by.setdefault(key, []).append(r.node)
            shard_of_key.setdefault(key, shard)
    ranked = sorted(totals, key=lambda k: (-totals[k], k))[:count]
    return [{"key": key.decode(errors="backslashreplace"), "ops": totals[key],
             "nodes": sorted(served_by[key]), "shard": shard_of_key[key]} for key in ranked]


def merge_slots(readings: list[NodeReading], view: ClusterView, count: int) -> list[dict]:
    """The `count` slots with the most CPU time over every node that served them (a
    master's and its replicas' work added; the key count is the largest one read)."""
    merged: dict[int, dict[str, int]] = {}
    for r in readings:
        for slot, stats in r.slots:
            into = merged.setdefault(slot, dict.fromkeys(SLOT_FIELDS, 0))
            for name in ("cpu-usec", "network-bytes-in", "network-bytes-out"):
                into[name] += stats[name]
            into["key-count"] = max(into["key-count"], stats["key-count"])
    ranked = sorted(merged, key=lambda s: (-merged[s]["cpu-usec"], s))[:count]
    owners = _slot_owners(view)
    return [{"slot": slot, "shard": owners[slot], **merged[slot]} for slot in ranked]


def node_rows(readings: list[NodeReading], view: ClusterView) -> list[dict]:
    """Every member, busiest first (those whose rate is unknown last)."""
    rows = []
    for r in readings:
        shard = view.shard_of(r.node)
        role = "master" if shard is not None and shard.master == r.node else "replica"
        rows.append({"node": r.node, "shard": shard.id if shard else None, "role": role,
                     "ops_per_sec": None if r.ops_per_sec is None
                     else round(r.ops_per_sec, 1)})
    return sorted(rows, key=lambda row: (row["ops_per_sec"] is None,
                                         -(row["ops_per_sec"] or 0), row["node"]))


def _slot_owners(view: ClusterView) -> list[str | None]:
    """The id of the shard that owns each slot (None: no shard)."""
    owners: list[str | None] = [None] * SLOT_COUNT
    for shard in view.shards:
        for start, end in shard.slots:
            owners[start:end + 1] = [shard.id] * (end - start + 1)
    return owners


def _shard_of_node(view: ClusterView, node: str) -> str | None:
    shard = view.shard_of(node)
    return shard.id if shard is not None else None


# -- reading the proxies ---------------------------------------------------------------------

def _said(exc: Exception) -> str:
    return short_error(exc) if isinstance(exc, RedisCtlError) else str(exc)


async def _ops_sample(ctl: RedisCtl) -> api.Sample | None:
    info = await ctl.call("INFO", "proxy")
    sample = api.parse_proxy_info(info) if isinstance(info, bytes) else None
    return None if sample is None else api.Sample(sample.commands, sample.pid, clock.now())


async def read_node(node: str, address: str, credentials: Credentials, count: int,
                    interval: float) -> NodeReading:
    """One member's proxy (the caller owns the timeout)."""
    problems: list[str] = []
    ctl = RedisCtl(address)
    try:
        try:
            await authenticate(ctl, credentials)
            first = await _ops_sample(ctl)
        except RedisCtlError as exc:
            return NodeReading(node, problems=(f"not read: {short_error(exc)}",))
        hotkeys: tuple[tuple[bytes, int], ...] = ()
        if credentials.mesh_secret is None:
            problems.append("hot keys need the mesh secret (--mesh-secret-file)")
        else:
            try:
                hotkeys = parse_hotkeys(await ctl.call("UMCTL", "HOTKEYS", str(count)))
            except (RedisCtlError, ValueError) as exc:
                problems.append(f"hot keys: {_said(exc)}")
        slots: tuple[tuple[int, dict[str, int]], ...] = ()
        try:
            slots = parse_slot_stats(await ctl.call("CLUSTER", "SLOT-STATS", "ORDERBY",
                                                    "cpu-usec", "LIMIT", str(count)))
        except (RedisCtlError, ValueError) as exc:
            problems.append(f"slot stats: {_said(exc)}")
        rate = None
        await anyio.sleep(max(0.0, interval - (clock.now() - first.at)) if first else 0)
        try:
            second = await _ops_sample(ctl)
        except RedisCtlError as exc:
            problems.append(f"ops/s: {short_error(exc)}")
            second = None
        if first is not None and second is not None:
            # the reads between the two INFOs were ours: HOTKEYS, SLOT-STATS, the first INFO
            own = 1 + (credentials.mesh_secret is not None) + 1
            rate = api.ops_rates({node: first}, {node: api.Sample(
                second.commands, second.pid, second.at, own)})[node]
        return NodeReading(node, hotkeys, slots, rate, tuple(problems))
    finally:
        await ctl.aclose()


async def top(store: Any, name: str, credentials: Credentials, count: int, interval: float,
              timeout: float) -> dict:
    """The report `umctl-mesh top` prints (or --json)."""
    pool = await ops.read_pool(store)
    if name not in pool.views:
        raise ops.OpError(f"unknown cluster '{name}'")
    view = pool.views[name][0]
    readings: list[NodeReading] = []

    async def one(node: str) -> None:
        with anyio.move_on_after(timeout + interval) as scope:
            readings.append(await read_node(node, view.address_of(node).proxy, credentials,
                                            count, interval))
        if scope.cancelled_caught:
            readings.append(NodeReading(node, problems=(
                f"no answer within {timeout + interval:g} s",)))

    async with anyio.create_task_group() as tg:
        for node in view.node_ids:
            tg.start_soon(one, node)
    readings.sort(key=lambda r: r.node)
    return {"cluster": name, "epoch": view.epoch, "interval_sec": interval,
            "hot_keys": merge_keys(readings, view, count),
            "hot_slots": merge_slots(readings, view, count),
            "nodes": node_rows(readings, view),
            "problems": {r.node: list(r.problems) for r in readings if r.problems}}
