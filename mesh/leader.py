"""Leader election and the leader's duties.

Every node campaigns on its lease; the oldest candidate leads. The duties run in one task group
that dies with the node's lease, and every view they write goes through `MeshRepo.commit_view`
fenced on the leader's election key, so a deposed leader cannot change a view. Each pass
re-reads everything: duties are idempotent and a new leader simply carries on. The decisions
themselves are pure (`mesh/model/`); this module reads, decides and commits.
"""
from __future__ import annotations

import anyio
import structlog

from core.view import NodeAddress

from .model import migrations as plans
from .model.changes import without_departed
from .model.failover import plan_failover
from .model.health import HealthTracker, liveness, may_write
from .model.replicas import free_nodes, observe, plan_replicas
from .store.etcd import Fence, StoreError, campaign
from .store.repo import MeshRepo, ViewCommit

log = structlog.get_logger("mesh.leader")

DUTY_INTERVAL = 0.5


async def lead(repo: MeshRepo, lease_id: int, node_id: str) -> None:
    """Campaign on `lease_id`, then run the duties forever (cancelled with the lease)."""
    fence = await campaign(repo.store, lease_id)
    log.info("leader_elected", node=node_id, lease=f"{lease_id:x}")
    tracker = HealthTracker()
    while True:
        try:
            await remove_departed_nodes(repo, fence)
            await handle_failures(repo, fence, tracker)
            await fill_replicas(repo, fence, tracker)
            await drive_migrations(repo, fence)
        except StoreError as exc:
            log.warning("leader_duty_failed", error=str(exc))
        await anyio.sleep(DUTY_INTERVAL)


async def remove_departed_nodes(repo: MeshRepo, fence: Fence) -> None:
    """Take nodes that are shutting down cleanly out of their clusters' views."""
    statuses = await repo.statuses()
    leaving = {nid for nid, s in statuses.items() if s.leaving}
    if not leaving:
        return
    offsets = {nid: s.repl_offset for nid, s in statuses.items()}
    for stored in (await repo.views()).values():
        view = stored.view
        new = without_departed(view, leaving, offsets)
        if new is None:
            continue
        gone = sorted(set(view.node_ids) - set(new.node_ids))
        if await repo.commit_view(stored.cluster, stored.revision, new,
                                  ViewCommit(unassign=tuple(gone), fence=fence)):
            log.info("nodes_removed", cluster=new.cluster, epoch=new.epoch, nodes=gone)


async def drive_migrations(repo: MeshRepo, fence: Fence) -> None:
    """Start pending migrations and commit finished ones (mesh/model/migrations.py)."""
    statuses = None
    for stored in (await repo.views()).values():
        if not stored.view.migrations:
            continue
        statuses = statuses if statuses is not None else await repo.statuses()
        step = plans.next_step(stored.view, statuses)
        if step is None:
            continue
        if await repo.commit_view(stored.cluster, stored.revision, step.view,
                                  ViewCommit(unassign=step.left, fence=fence)):
            log.info("migration_step", cluster=step.view.cluster, epoch=step.view.epoch,
                     step=step.what, nodes_left=list(step.left))


async def handle_failures(repo: MeshRepo, fence: Fence, tracker: HealthTracker) -> None:
    """Fail over dead masters, mark dead replicas, reassign dead shards
    (mesh/model/failover.py), after the grace the tracker measures."""
    nodes = await repo.nodes()
    registered = {nid: r.record for nid, r in nodes.items()}
    statuses, status_revisions, _ = await repo.statuses_as_read()
    assigned = await repo.assigned()
    views = list((await repo.views()).values())
    members = {n for stored in views for n in stored.view.node_ids}
    alive = liveness(members, registered, statuses)
    offsets = {n: s.repl_offset for n, s in statuses.items()}
    health = tracker.update(alive, offsets, anyio.current_time(),
                            may_write(registered, statuses),
                            unsynced=[n for n, s in statuses.items() if not s.synced])
    free = [(n, NodeAddress(r.proxy, r.backend)) for n, r in registered.items()
            if n not in assigned and alive.get(n)]
    for stored in views:
        step = plan_failover(stored.view, health, anyio.current_time(), free)
        if step is None:
            continue
        # the replaced master must still be as read: unregistered, or fenced by its own word
        # (a node back from a partition registers and speaks before it reads the views)
        old = step.replaced
        registered_at = nodes[old].revision if old is not None and old in nodes else 0
        change = ViewCommit(
            claim=step.claimed, unassign=step.released, forget_data=step.released, fence=fence,
            statuses_as_read=() if old is None else ((old, status_revisions.get(old, 0)),),
            nodes_as_read=() if old is None else ((old, registered_at),))
        if await repo.commit_view(stored.cluster, stored.revision, step.view, change):
            log.warning("failover", cluster=stored.view.cluster, epoch=step.view.epoch,
                        step=step.what)
            free = [f for f in free if f[0] not in step.claimed]


async def fill_replicas(repo: MeshRepo, fence: Fence, tracker: HealthTracker) -> None:
    """Keep each cluster's declared replica count (mesh/model/replicas.py): free nodes join
    shards short of replicas, a replica dead for the cluster's reassign_after leaves once its
    replacement synced, a surplus leaves. Uses the health `handle_failures` just tracked."""
    nodes = {nid: r.record for nid, r in (await repo.nodes()).items()}
    statuses = await repo.statuses()
    free = free_nodes(nodes, await repo.assigned(),
                      {n: h.alive for n, h in tracker.state.items()})
    for stored in (await repo.views()).values():
        seen = observe(stored.view, tracker.state, nodes, statuses)
        step = plan_replicas(stored.view, seen, free, anyio.current_time())
        if step is None:
            continue
        if await repo.commit_view(stored.cluster, stored.revision, step.view,
                                  ViewCommit(claim=step.claimed, unassign=step.released,
                                             fence=fence)):
            log.info("replicas", cluster=stored.cluster, epoch=step.view.epoch, step=step.what)
            free = [f for f in free if f.node_id not in step.claimed]
