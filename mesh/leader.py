"""Leader election and the leader's duties.

Every node campaigns on its lease; the oldest candidate leads. The duties run in one task group
that dies with the node's lease, and every write they make is fenced on the leader's election
key, so a deposed leader cannot change a view. Each pass re-reads everything: duties are
idempotent and a new leader simply carries on.
"""
from __future__ import annotations

import anyio
import structlog

from .model.changes import without_departed
from .model.nodes import NodeStatus, RecordError
from .model.view import ViewError, from_json, to_json
from .store.etcd import EtcdStore, StoreError, campaign

log = structlog.get_logger("mesh.leader")

DUTY_INTERVAL = 1.0


async def lead(store: EtcdStore, lease_id: int, node_id: str) -> None:
    fence = await campaign(store, lease_id)
    log.info("leader_elected", node=node_id, lease=f"{lease_id:x}")
    while True:
        try:
            await remove_departed_nodes(store, fence)
        except StoreError as exc:
            log.warning("leader_duty_failed", error=str(exc))
        await anyio.sleep(DUTY_INTERVAL)


async def read_statuses(store: EtcdStore) -> dict[str, NodeStatus]:
    kvs, _ = await store.get_prefix(store.keys.statuses)
    statuses = {}
    for kv in kvs:
        try:
            status = NodeStatus.decode(kv.value)
        except RecordError:
            continue
        statuses[status.node_id] = status
    return statuses


async def remove_departed_nodes(store: EtcdStore, fence: tuple[bytes, int]) -> None:
    """Take nodes that are shutting down cleanly out of their clusters' views."""
    statuses = await read_statuses(store)
    leaving = {nid for nid, s in statuses.items() if s.leaving}
    if not leaving:
        return
    offsets = {nid: s.repl_offset for nid, s in statuses.items()}
    keys = store.keys
    kvs, _ = await store.get_prefix(keys.clusters)
    for kv in kvs:
        try:
            view = from_json(kv.value)
        except ViewError:
            continue
        new = without_departed(view, leaving, offsets)
        if new is None:
            continue
        gone = tuple(keys.assignment(n) for n in set(view.node_ids) - set(new.node_ids))
        if await store.commit({kv.key: kv.mod_revision}, {kv.key: to_json(new)}, gone,
                              fence=fence):
            log.info("nodes_removed", cluster=new.cluster, epoch=new.epoch,
                     nodes=sorted(set(view.node_ids) - set(new.node_ids)))
