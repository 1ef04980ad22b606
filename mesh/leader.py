"""Leader election and the leader's duties.

Every node campaigns on its lease; the oldest candidate leads. The duties run in one task group
that dies with the node's lease, and every write they make is fenced on the leader's election
key, so a deposed leader cannot change a view. Each pass re-reads everything: duties are
idempotent and a new leader simply carries on.
"""
from __future__ import annotations

import anyio
import structlog

from core.nodes import Assignment, NodeRecord, NodeStatus, RecordError
from core.view import ClusterView, MigrationState, NodeAddress, ViewError, from_json, to_json

from .model import migrations as plans
from .model.changes import without_departed
from .model.failover import Health, plan_failover
from .store.etcd import EtcdStore, StoreError, campaign

log = structlog.get_logger("mesh.leader")

DUTY_INTERVAL = 0.5


async def lead(store: EtcdStore, lease_id: int, node_id: str) -> None:
    fence = await campaign(store, lease_id)
    log.info("leader_elected", node=node_id, lease=f"{lease_id:x}")
    tracker = HealthTracker()
    while True:
        try:
            await remove_departed_nodes(store, fence)
            await handle_failures(store, fence, tracker)
            await drive_migrations(store, fence)
        except StoreError as exc:
            log.warning("leader_duty_failed", error=str(exc))
        await anyio.sleep(DUTY_INTERVAL)


async def read_nodes(store: EtcdStore) -> dict[str, tuple[NodeRecord, int]]:
    """Every registered node: its record and the lease it lives on."""
    nodes = {}
    for kv in (await store.get_prefix(store.keys.nodes))[0]:
        try:
            record = NodeRecord.decode(kv.value)
        except RecordError:
            continue
        nodes[record.node_id] = (record, kv.lease)
    return nodes


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


def next_migration_step(view: ClusterView, statuses: dict[str, NodeStatus]
                        ) -> tuple[ClusterView, list[str], str] | None:
    """The leader's next move for a cluster's migrations: commit one whose source reports all
    its keys moved, else start pending ones. (new view, nodes that left, what) or None."""
    masters = {s.id: s.master for s in view.shards}
    for m in view.migrations:
        if m.state is not MigrationState.MIGRATING:
            continue
        status = statuses.get(masters[m.source])
        progress = status.migrations.get(m.id, {}) if status else {}
        if status and status.cluster == view.cluster and progress.get("done"):
            new, left = plans.commit(view, m.id)
            return new, left, f"commit {m.id}"
    started = plans.start_next(view)
    if started is not None:
        return started, [], "start"
    return None


async def drive_migrations(store: EtcdStore, fence: tuple[bytes, int]) -> None:
    keys = store.keys
    kvs, _ = await store.get_prefix(keys.clusters)
    statuses = None
    for kv in kvs:
        try:
            view = from_json(kv.value)
        except ViewError:
            continue
        if not view.migrations:
            continue
        statuses = statuses if statuses is not None else await read_statuses(store)
        step = next_migration_step(view, statuses)
        if step is None:
            continue
        new, left, what = step
        if await store.commit({kv.key: kv.mod_revision}, {kv.key: to_json(new)},
                              tuple(keys.assignment(n) for n in left), fence=fence):
            log.info("migration_step", cluster=new.cluster, epoch=new.epoch, step=what,
                     nodes_left=left)


class HealthTracker:
    """Since when each node has been alive or dead, by the leader's clock. A new leader starts
    with no history, so it waits a whole grace before acting: blips are never failovers."""

    def __init__(self) -> None:
        self.state: dict[str, Health] = {}

    def update(self, alive: dict[str, bool], offsets: dict[str, int], now: float) -> dict[str, Health]:
        for node, ok in alive.items():
            before = self.state.get(node)
            since = before.since if before is not None and before.alive == ok else now
            self.state[node] = Health(ok, since, offsets.get(node, 0))
        for node in list(self.state):
            if node not in alive:
                before = self.state[node]
                since = before.since if not before.alive else now
                self.state[node] = Health(False, since, before.repl_offset)
        return self.state


async def handle_failures(store: EtcdStore, fence: tuple[bytes, int],
                          tracker: HealthTracker) -> None:
    keys = store.keys
    registered = {nid: record for nid, (record, _) in (await read_nodes(store)).items()}
    statuses = await read_statuses(store)
    assigned = {keys.last_part(kv.key) for kv in (await store.get_prefix(keys.assignments))[0]}
    kvs, _ = await store.get_prefix(keys.clusters)
    views = []
    members: set[str] = set()
    for kv in kvs:
        try:
            view = from_json(kv.value)
        except ViewError:
            continue
        views.append((kv, view))
        members |= set(view.node_ids)
    alive = {n: n in registered and statuses.get(n) is not None and statuses[n].backend_ok
             and not statuses[n].leaving for n in members | set(registered)}
    offsets = {n: s.repl_offset for n, s in statuses.items()}
    health = tracker.update(alive, offsets, anyio.current_time())
    free = [(n, NodeAddress(r.proxy, r.backend)) for n, r in registered.items()
            if n not in assigned and alive.get(n)]
    for kv, view in views:
        step = plan_failover(view, health, anyio.current_time(), free)
        if step is None:
            continue
        puts = {kv.key: to_json(step.view),
                **{keys.assignment(n): Assignment(view.cluster).encode() for n in step.claimed}}
        checks = {kv.key: kv.mod_revision, **{keys.assignment(n): 0 for n in step.claimed}}
        deletes = tuple(k for n in step.released
                        for k in (keys.assignment(n), keys.data_owner(n)))
        if await store.commit(checks, puts, deletes, fence=fence):
            log.warning("failover", cluster=view.cluster, epoch=step.view.epoch, step=step.what)
            free = [f for f in free if f[0] not in step.claimed]
