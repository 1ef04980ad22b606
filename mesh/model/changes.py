"""View changes the leader and operators make. Pure: a view in, the next view (or None) out."""
from __future__ import annotations

from dataclasses import replace

from core.view import ClusterView, validate


def without_departed(view: ClusterView, departing: set[str],
                     offsets: dict[str, int]) -> ClusterView | None:
    """Drop nodes that are leaving cleanly. A leaving master hands its shard to the replica
    with the highest replication offset; a master with no replica stays (its slots need a
    new home first). None when nothing changes."""
    shards = []
    for shard in view.shards:
        replicas = [r for r in shard.replicas if r not in departing]
        master = shard.master
        if master in departing and replicas:
            master = max(replicas, key=lambda r: (offsets.get(r, 0), -replicas.index(r)))
            replicas.remove(master)
        shards.append(replace(shard, master=master, replicas=tuple(replicas)))
    if all(a == b for a, b in zip(shards, view.shards)):
        return None
    members = {m for s in shards for m in s.members}
    new = view.next(shards=tuple(shards),
                    nodes=tuple((nid, a) for nid, a in view.nodes if nid in members))
    validate(new)
    return new
