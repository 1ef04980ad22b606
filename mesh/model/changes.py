"""View changes the leader and operators make. Pure: a view in, the next view (or None) out."""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

from core.view import ClusterView, validate


class ChangeError(Exception):
    """The change does not fit the view (any more): a one-line reason."""


def without_departed(view: ClusterView, departing: set[str],
                     offsets: dict[str, int]) -> ClusterView | None:
    """Drop nodes that are leaving cleanly. A leaving master hands its shard to the live
    replica with the highest replication offset; a master with no live replica stays (its
    slots need a new home first). None when nothing changes."""
    shards = []
    for shard in view.shards:
        replicas = [r for r in shard.replicas if r not in departing]
        master = shard.master
        live = [r for r in replicas if r not in view.failed]  # a failed node is never master
        if master in departing and live:
            master = max(live, key=lambda r: (offsets.get(r, 0), -replicas.index(r)))
            replicas.remove(master)
        shards.append(replace(shard, master=master, replicas=tuple(replicas)))
    if all(a == b for a, b in zip(shards, view.shards)):
        return None
    members = {m for s in shards for m in s.members}
    new = view.next(shards=tuple(shards),
                    nodes=tuple((nid, a) for nid, a in view.nodes if nid in members),
                    failed=tuple(n for n in view.failed if n in members))
    validate(new)
    return new


def handover_target(view: ClusterView, shard_id: str, registered: Collection[str],
                    offsets: Mapping[str, int], to: str | None = None) -> str:
    """The replica a graceful failover of `shard_id` hands the shard to: `to` if it is a live
    replica (not failed, registered), else the live replica with the highest replication
    offset. ChangeError when there is none."""
    shard = next((s for s in view.shards if s.id == shard_id), None)
    if shard is None:
        raise ChangeError(f"cluster '{view.cluster}' has no shard '{shard_id}'")
    live = [r for r in shard.replicas if r not in view.failed and r in registered]
    if to is not None and to not in live:
        raise ChangeError(f"'{to}' is not a live replica of {shard_id} "
                          f"(live: {', '.join(live) or 'none'})")
    if not live:
        raise ChangeError(f"shard {shard_id} has no live replica to hand over to")
    return to or max(live, key=lambda r: (offsets.get(r, 0), -live.index(r)))


def handed_over(view: ClusterView, shard_id: str, master: str, target: str) -> ClusterView | None:
    """The view after a graceful failover of `shard_id`: `target` (a replica) is its master,
    `master` (its master) its replica. None if that is the view already (a retried commit);
    ChangeError if the shard moved on meanwhile (so the swap must not be written)."""
    shard = next((s for s in view.shards if s.id == shard_id), None)
    if shard is None:
        raise ChangeError(f"cluster '{view.cluster}' has no shard '{shard_id}' any more")
    if shard.master == target and master in shard.replicas:
        return None
    if shard.master != master or target not in shard.replicas or target in view.failed:
        raise ChangeError(f"shard {shard_id} changed meanwhile (master {shard.master}, "
                          f"replicas {', '.join(shard.replicas) or 'none'})")
    replicas = tuple(r for r in shard.replicas if r != target) + (master,)
    new = view.next(shards=tuple(replace(s, master=target, replicas=replicas)
                                 if s.id == shard_id else s for s in view.shards))
    validate(new)
    return new
