"""Leader election and the leader's duties.

Every node campaigns on its lease; the oldest candidate leads. The duties run in one task group
that dies with the node's lease, and every view they write goes through `MeshRepo.commit_view`
fenced on the leader's election key, so a deposed leader cannot change a view. Each pass
re-reads everything: duties are idempotent and a new leader simply carries on. The decisions
themselves are pure (`mesh/model/`); this module reads, decides and commits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import structlog

from core.view import NodeAddress

from .model import migrations as plans
from .model.changes import without_departed
from .model.failover import plan_failover
from .model.health import SUSPECT_SILENT, HealthTracker, liveness, may_write
from .model.replicas import free_nodes, observe, plan_replicas
from .notify import Changed, first_of
from .prober import Prober
from .store.etcd import Fence, StoreError, campaign
from .store.repo import MeshRepo, ViewCommit

log = structlog.get_logger("mesh.leader")

DUTY_INTERVAL = 0.5  # seconds between two passes when every member is well
DUTY_INTERVAL_PENDING = 0.05  # ... while a member is dead or suspected (a failover is near)
REVOKE_AGAIN_AFTER = 10.0  # a node whose lease was revoked is not revoked again before this
LEADER_LOOK_INTERVAL = 0.5  # seconds between two reads of who leads (watch_the_leader)


@dataclass
class FailureState:
    """What the leader's failure duty keeps between passes (its own clock)."""

    tracker: HealthTracker = field(default_factory=HealthTracker)
    prober: Prober = field(default_factory=lambda: Prober(Changed()))
    revoked: dict[str, float] = field(default_factory=dict)  # node -> when its lease was
    # node -> (its status key's revision, when the leader first saw that revision)
    status_seen: dict[str, tuple[int, float]] = field(default_factory=dict)

    def saw_statuses(self, revisions: dict[str, int], now: float) -> None:
        self.status_seen = {n: self.status_seen[n] if n in self.status_seen
                            and self.status_seen[n][0] == rev else (rev, now)
                            for n, rev in revisions.items()}

    def speaks(self, node: str, now: float) -> bool:
        """The node wrote its status lately: it reaches etcd, whatever the probes say."""
        seen = self.status_seen.get(node)
        return seen is not None and now - seen[1] < SUSPECT_SILENT


async def lead(repo: MeshRepo, lease_id: int, node_id: str,
               statuses_changed: Changed | None = None) -> None:
    """Campaign on `lease_id`, then run the duties forever (cancelled with the lease)."""
    fence = await campaign(repo.store, lease_id)
    log.info("leader_elected", node=node_id, lease=f"{lease_id:x}")
    state = FailureState()
    wakes = [state.prober.wake] + ([statuses_changed] if statuses_changed else [])
    async with anyio.create_task_group() as tg:
        tg.start_soon(state.prober.run)
        while True:
            waiters = [w.waiter() for w in wakes]
            pending = False
            try:
                await remove_departed_nodes(repo, fence)
                pending = await handle_failures(repo, fence, state)
                await fill_replicas(repo, fence, state.tracker)
                await drive_migrations(repo, fence)
            except StoreError as exc:
                log.warning("leader_duty_failed", error=str(exc))
            await first_of(*waiters, timeout=DUTY_INTERVAL_PENDING if pending else DUTY_INTERVAL)


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


async def handle_failures(repo: MeshRepo, fence: Fence, state: FailureState) -> bool:
    """Revoke the leases of nodes the probes suspect, then fail over dead masters, mark dead
    replicas, reassign dead shards (mesh/model/failover.py). True while a member is dead or
    suspected: the next pass comes sooner."""
    now = anyio.current_time()
    nodes = await repo.nodes()
    statuses, status_revisions, _ = await repo.statuses_as_read()
    state.saw_statuses(status_revisions, now)
    views = list((await repo.views()).values())
    members = {n for stored in views for n in stored.view.node_ids}
    state.prober.watch({n: nodes[n].record.proxy for n in members if n in nodes})
    suspects = state.prober.suspects(now) & members
    for node in sorted(suspects):
        checks = state.prober.checks.get(node)
        refused = checks is not None and checks.refused
        if node not in nodes or now - state.revoked.get(node, float("-inf")) < REVOKE_AGAIN_AFTER \
                or (not refused and state.speaks(node, now)):
            continue  # gone already, just revoked, or silent to the leader alone
        # the node's keys stop FENCE_AFTER past its last read that found its lease, which was
        # sent before this revocation (mesh/model/fencing.py); the failover waits for that
        try:
            await repo.store.revoke(nodes[node].lease)
        except StoreError as exc:  # it may have landed: the next pass reads the nodes
            log.warning("lease_revoke_failed", node=node, error=str(exc))
            continue
        state.revoked[node] = now
        state.prober.forget(node)
        log.warning("lease_revoked", node=node, lease=f"{nodes[node].lease:x}",
                    reason="nothing listens at its proxy port" if refused
                    else "its proxy does not answer")
        del nodes[node]  # and its status, on the same lease
        statuses.pop(node, None)
        status_revisions.pop(node, None)
    registered = {nid: r.record for nid, r in nodes.items()}
    assigned = await repo.assigned()
    alive = liveness(members, registered, statuses)
    offsets = {n: s.repl_offset for n, s in statuses.items()}
    now = anyio.current_time()
    health = state.tracker.update(alive, offsets, now, may_write(registered, statuses),
                                  unsynced=[n for n, s in statuses.items() if not s.synced],
                                  registered=registered)
    free = [(n, NodeAddress(r.proxy, r.backend)) for n, r in registered.items()
            if n not in assigned and alive.get(n)]
    for stored in views:
        step = plan_failover(stored.view, health, now, free)
        if step is None:
            continue
        # the replaced master must still be as read: unregistered, or fenced by its own word
        # (a node back from a partition registers and speaks before it reads the views)
        old = step.replaced
        registered_at = nodes[old].revision if old is not None and old in nodes else 0
        change = ViewCommit(
            claim=step.claimed, unassign=step.released, fence=fence,
            statuses_as_read=() if old is None else ((old, status_revisions.get(old, 0)),),
            nodes_as_read=() if old is None else ((old, registered_at),))
        if await repo.commit_view(stored.cluster, stored.revision, step.view, change):
            log.warning("failover", cluster=stored.view.cluster, epoch=step.view.epoch,
                        step=step.what)
            free = [f for f in free if f[0] not in step.claimed]
    return bool(suspects) or not all(alive.get(n) for n in members)


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


async def watch_the_leader(repo: MeshRepo, node_id: str) -> None:
    """Every node but the leader probes the leader's proxy; one whose port refuses
    connections (its process is gone) has its lease revoked at once, so the election moves on
    instead of waiting out the lease TTL, and the next leader's failover of its shard starts
    from that revocation (the fence rule makes a wrong revocation a failover, never a second
    master). A leader that listens but does not answer is left to its lease's expiry: a
    partition between it and one node must not depose it."""
    prober = Prober(Changed())
    revoked: set[int] = set()  # leases revoked from here
    async with anyio.create_task_group() as tg:
        tg.start_soon(prober.run)
        while True:
            woken = prober.wake.waiter()
            try:
                nodes = await repo.nodes()
                leader = await repo.leader(nodes)
            except StoreError:  # etcd is away: nothing to revoke through it either
                leader = None
            if leader is None or leader == node_id:
                prober.watch({})
            else:
                prober.watch({leader: nodes[leader].record.proxy})
                checks = prober.checks.get(leader)
                lease = nodes[leader].lease
                if checks is not None and checks.refused and leader in prober.suspects(
                        anyio.current_time()) and lease not in revoked:
                    revoked.add(lease)
                    prober.forget(leader)
                    try:
                        await repo.store.revoke(lease)
                        log.warning("lease_revoked", node=leader, lease=f"{lease:x}",
                                    reason="the leader: nothing listens at its proxy port")
                    except StoreError as exc:  # another node did it, or it expired
                        log.info("leader_revoke_failed", node=leader, error=str(exc))
            await first_of(woken, timeout=LEADER_LOOK_INTERVAL)
