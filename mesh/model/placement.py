"""Which free nodes become masters and replicas of a new cluster. Pure, deterministic.

Masters go to as many different hosts as possible; each replica goes to a host that holds no
other member of its shard when one is left, and otherwise to the least used host.
"""
from __future__ import annotations

from collections import Counter

from core.address import Address, AddressError
from core.nodes import NodeRecord


class PlacementError(ValueError):
    pass


def host_of(node: NodeRecord) -> str:
    """The node's host tag, else the host of its proxy address."""
    if node.host:
        return node.host
    try:
        return Address.parse(node.proxy).host
    except AddressError:
        return node.proxy  # not an address: at least it names one place



def place(free: list[NodeRecord], shards: int, replicas: int) -> list[tuple[str, list[str]]]:
    """[(master id, [replica ids])] for `shards` shards of 1 + `replicas` nodes each."""
    if shards < 1 or replicas < 0:
        raise PlacementError("a cluster needs at least one shard and no negative replicas")
    need = shards * (1 + replicas)
    if len(free) < need:
        raise PlacementError(f"not enough free nodes: {shards} shards x {1 + replicas} nodes "
                             f"need {need}, the pool has {len(free)} free")
    remaining = sorted(free, key=lambda n: n.node_id)
    used: Counter[str] = Counter()  # nodes taken per host

    def take(avoid: set[str]) -> NodeRecord:
        available: Counter[str] = Counter(host_of(n) for n in remaining)
        candidates = [n for n in remaining if host_of(n) not in avoid] or remaining
        best = min(candidates, key=lambda n: (used[host_of(n)], -available[host_of(n)], n.node_id))
        remaining.remove(best)
        used[host_of(best)] += 1
        return best

    masters = [take(set()) for _ in range(shards)]
    members = [[m] for m in masters]
    for _ in range(replicas):
        for shard in members:
            shard.append(take({host_of(m) for m in shard}))
    _repair(members)
    return [(shard[0].node_id, [r.node_id for r in shard[1:]]) for shard in members]


def _conflicts(shard: list[NodeRecord], i: int) -> bool:
    host = host_of(shard[i])
    return any(host_of(m) == host for j, m in enumerate(shard) if j != i)


def _repair(members: list[list[NodeRecord]]) -> None:
    """Swap replicas between shards while that removes a shared host and adds none."""
    for shard in members:
        for i in range(1, len(shard)):
            if not _conflicts(shard, i):
                continue
            for other in members:
                if other is shard:
                    continue
                for j in range(1, len(other)):
                    shard[i], other[j] = other[j], shard[i]
                    if not _conflicts(shard, i) and not _conflicts(other, j):
                        break
                    shard[i], other[j] = other[j], shard[i]
                else:
                    continue
                break
