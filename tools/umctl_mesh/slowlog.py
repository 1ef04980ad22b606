"""`umctl-mesh slowlog CLUSTER`: SLOWLOG GET from the Redis of every node of a cluster, merged
newest first, each entry naming its node and shard.

`parse_entries` and `merge` are pure (tested as tables); `read_cluster` is the I/O shell: it
asks every member's Redis (its backend address from the view) at once, each within a
timeout, and reports the nodes it could not read instead of failing the whole command.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import anyio

from core.view import ClusterView
from mesh.redisctl import RedisCtl, RedisCtlError

DEFAULT_COUNT = 20  # entries shown, newest first, across the cluster
MAX_COUNT = 10_000  # per node asked (SLOWLOG GET N) and shown
READ_TIMEOUT = 3.0  # seconds for one node's Redis
ARGS_SHOWN = 8  # arguments of a command shown in the table (Redis keeps at most 32)


class SlowlogError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    node: str
    shard: str
    role: str
    id: int
    time: int  # unix seconds
    duration_us: int
    args: tuple[str, ...]
    client: str
    client_name: str

    def doc(self) -> dict:
        return {"node": self.node, "shard": self.shard, "role": self.role, "id": self.id,
                "time": self.time, "duration_us": self.duration_us, "args": list(self.args),
                "client": self.client, "client_name": self.client_name}


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def parse_entries(reply: object, node: str, shard: str, role: str) -> list[Entry]:
    """SLOWLOG GET's reply (Redis 4+: id, time, microseconds, args, client, name)."""
    if not isinstance(reply, list):
        raise SlowlogError(f"unexpected SLOWLOG GET reply {reply!r}")
    entries = []
    for item in reply:
        if not (isinstance(item, list) and len(item) >= 4 and isinstance(item[0], int)
                and isinstance(item[1], int) and isinstance(item[2], int)
                and isinstance(item[3], list)):
            raise SlowlogError(f"unexpected SLOWLOG entry {item!r}")
        client = _text(item[4]) if len(item) > 4 else ""
        name = _text(item[5]) if len(item) > 5 else ""
        entries.append(Entry(node, shard, role, item[0], item[1], item[2],
                             tuple(_text(a) for a in item[3]), client, name))
    return entries


def merge(per_node: Iterable[Sequence[Entry]], count: int) -> list[Entry]:
    """Newest first (time, then the longer first within a second), at most `count`."""
    everything = [e for entries in per_node for e in entries]
    everything.sort(key=lambda e: (e.time, e.duration_us, e.node, e.id), reverse=True)
    return everything[:count]


def members(view: ClusterView) -> list[tuple[str, str, str, str]]:
    """(node, shard, role, backend address) of every member of the view."""
    out = []
    for shard in view.shards:
        for nid in shard.members:
            out.append((nid, shard.id, "master" if nid == shard.master else "replica",
                        view.address_of(nid).backend))
    return out


async def read_node(address: str, password: str | None, count: int) -> object:
    ctl = RedisCtl(address, password)
    try:
        with anyio.fail_after(READ_TIMEOUT):
            return await ctl.call("SLOWLOG", "GET", count)
    finally:
        await ctl.aclose()


async def read_cluster(view: ClusterView, password: str | None,
                       count: int) -> tuple[list[Entry], dict[str, str]]:
    """(the merged entries, node -> why it could not be read)."""
    got: dict[str, list[Entry]] = {}
    failed: dict[str, str] = {}

    async def one(nid: str, shard: str, role: str, address: str) -> None:
        try:
            got[nid] = parse_entries(await read_node(address, password, count), nid, shard,
                                     role)
        except TimeoutError:
            failed[nid] = f"{address}: no answer in {READ_TIMEOUT:g}s"
        except (RedisCtlError, SlowlogError, OSError) as exc:
            failed[nid] = str(exc)

    async with anyio.create_task_group() as tg:
        for member in members(view):
            tg.start_soon(one, *member)
    return merge(got.values(), count), failed
