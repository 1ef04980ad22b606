"""What umctl-mesh does to the mesh: reads of the pool and clusters, and view edits, each one
compare-and-swap through `MeshRepo.commit_view` (retried on a lost race; never fenced: the
operator is not the leader)."""
from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import anyio

from core.nodes import Assignment, MigrationProgress, NodeRecord, NodeStatus
from core.slots import SlotRange, slot_count
from core.view import (
    CLUSTER_NAME,
    MAX_MIGRATION_RATE,
    MAX_REPLICAS,
    REASSIGN_AFTER,
    ClusterConfig,
    ClusterView,
    Migration,
    NodeAddress,
    Shard,
    ViewError,
    even_split,
    hash_password,
    validate,
)
from mesh import handover
from mesh.model import migrations as plans
from mesh.model.placement import PlacementError, place
from mesh.model.replicas import FreeNode, Seen, plan_replicas
from mesh.store.etcd import EtcdStore
from mesh.store.repo import MeshRepo, ViewCommit

RACE_RETRIES = 5


class OpError(Exception):
    """A one-line error for the operator; the CLI exits non-zero with it (1)."""


class UsageError(OpError):
    """The arguments themselves are wrong, whatever the mesh holds: the CLI exits 2, as
    argparse does."""


class ViewAt(NamedTuple):
    """A cluster's view and the mod revision it was read at (a tuple: callers unpack it)."""

    view: ClusterView
    revision: int


class Held(NamedTuple):
    assignment: Assignment
    revision: int


@dataclass(frozen=True)
class Pool:
    nodes: dict[str, NodeRecord]
    statuses: dict[str, NodeStatus]
    assignments: dict[str, Held]  # node id -> (assignment, mod revision)
    views: dict[str, ViewAt]  # cluster -> (view, mod revision)
    leader: str | None

    def free(self) -> list[NodeRecord]:
        """Registered, in no cluster, not held, and not shutting down."""
        return [n for nid, n in self.nodes.items() if nid not in self.assignments
                and not (nid in self.statuses and self.statuses[nid].leaving)]

    def role_of(self, node_id: str) -> tuple[str, str]:
        """(cluster, role) from the views."""
        for name, (view, _) in self.views.items():
            shard = view.shard_of(node_id)
            if shard is not None:
                return name, "master" if shard.master == node_id else "replica"
        return "", ""


async def read_pool(store: EtcdStore) -> Pool:
    repo = MeshRepo(store)
    registered = await repo.nodes()
    nodes = {nid: r.record for nid, r in registered.items()}
    assignments = {nid: Held(a.assignment, a.revision)
                   for nid, a in (await repo.assignments()).items()}
    views = {name: ViewAt(v.view, v.revision) for name, v in (await repo.views()).items()}
    leader = await repo.leader(registered)
    return Pool(nodes, await repo.statuses(), assignments, views, leader)


def build_view(name: str, pool: Pool, shards: int, replicas: int,
               password: str | None, min_replicas_ack: int = 0,
               reassign_after: int = REASSIGN_AFTER,
               migration_rate: int | None = None) -> ClusterView:
    if not CLUSTER_NAME.fullmatch(name):
        raise UsageError(f"invalid cluster name '{name}' (letters, digits, '_', '.', '-'; "
                      "at most 64)")
    _check_rate(migration_rate, "--migration-rate")
    if shards < 1:
        raise UsageError("--shards must be at least 1")
    if min_replicas_ack > replicas:
        raise UsageError(f"--min-replicas-ack {min_replicas_ack} needs at least as many "
                         "replicas")
    if not 0 <= replicas <= MAX_REPLICAS:
        raise UsageError(f"--replicas must be 0 to {MAX_REPLICAS}")
    try:
        layout = place(pool.free(), shards, replicas)
    except PlacementError as exc:
        raise OpError(str(exc)) from None
    ranges = even_split(shards)
    shard_list = tuple(Shard(f"s{i + 1}", master, tuple(reps), ranges[i])
                       for i, (master, reps) in enumerate(layout))
    members = sorted(m for s in shard_list for m in s.members)
    nodes = tuple((nid, NodeAddress(pool.nodes[nid].proxy, pool.nodes[nid].backend))
                  for nid in members)
    config = ClusterConfig(password_hash=hash_password(password) if password else None,
                           min_replicas_ack=min_replicas_ack, reassign_after=reassign_after,
                           replicas=replicas, migration_rate=migration_rate)
    view = ClusterView(name, 1, shard_list, nodes, config, uid=uuid.uuid4().hex)
    try:
        validate(view)
    except ViewError as exc:
        raise OpError(f"cannot create '{name}': {exc}") from None
    return view


async def create_cluster(store: EtcdStore, name: str, shards: int, replicas: int,
                         password: str | None, min_replicas_ack: int = 0,
                         reassign_after: int = REASSIGN_AFTER,
                         migration_rate: int | None = None) -> ClusterView:
    """Write the view and claim its nodes in one transaction that requires both absent."""
    repo = MeshRepo(store)
    for _ in range(RACE_RETRIES):
        pool = await read_pool(store)
        if name in pool.views:
            raise OpError(f"cluster '{name}' already exists")
        view = build_view(name, pool, shards, replicas, password, min_replicas_ack,
                          reassign_after, migration_rate)
        if await repo.commit_view(name, 0, view, ViewCommit(claim=view.node_ids)):
            return view
    raise OpError("lost the race for free nodes 5 times in a row; try again")


async def delete_cluster(store: EtcdStore, name: str, keep_data: bool) -> ClusterView:
    """Delete the view; its nodes return to the pool, or are held with their data."""
    repo = MeshRepo(store)
    for _ in range(RACE_RETRIES):
        try:
            stored = await repo.view(name)
        except ViewError as exc:
            raise OpError(f"the view of '{name}' in etcd is invalid: {exc}") from None
        if stored is None:
            raise OpError(f"unknown cluster '{name}'")
        nodes = stored.view.node_ids
        change = ViewCommit(hold=nodes) if keep_data else ViewCommit(unassign=nodes)
        if await repo.commit_view(name, stored.revision, None, change):
            return stored.view
    raise OpError(f"cluster '{name}' kept changing; try again")


async def release_node(store: EtcdStore, node_id: str) -> None:
    repo = MeshRepo(store)
    stored = await repo.assignment(node_id)
    if stored is None:
        raise OpError(f"node '{node_id}' is not held")
    if not stored.assignment.held:
        raise OpError(f"node '{node_id}' serves cluster '{stored.assignment.cluster}'; "
                      "delete the cluster first")
    if not await repo.release(node_id, stored.revision):
        raise OpError(f"node '{node_id}' changed meanwhile; try again")


async def wait_applied(store: EtcdStore, view: ClusterView, timeout: float,
                       progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Wait until every node of `view` reports it applied; returns the nodes still behind."""
    repo = MeshRepo(store)
    behind = list(view.node_ids)
    with anyio.move_on_after(timeout):
        while True:
            statuses = await repo.statuses()
            behind = [n for n in view.node_ids
                      if not (statuses.get(n)
                              and statuses[n].applied(view.cluster, view.uid) >= view.epoch)]
            if progress is not None:
                progress(len(view.node_ids) - len(behind), len(view.node_ids))
            if not behind:
                break
            await anyio.sleep(0.2)
    return behind


# -- scaling and migrations ------------------------------------------------------------------

# (new view, the free nodes it claims) or, for a change that also returns nodes to the pool
# as it reads them, (new view, ViewCommit(claim=..., unassign=...))
Change = Callable[[Pool, ClusterView], tuple[ClusterView, Sequence[str] | ViewCommit]]


async def _edit_view(store: EtcdStore, name: str, change: Change, dry_run: bool = False,
                     unassign: tuple[str, ...] = (), hold: tuple[str, ...] = ()
                     ) -> tuple[ClusterView, ClusterView]:
    """Read the view, let `change(pool, view)` return (new view, free nodes it claims, or a
    whole ViewCommit: see `Change`), write it with one compare-and-swap (retried on a lost
    race), the nodes in `unassign` returning to the pool in the same transaction (those in
    `hold` held out of it). A change that returns the view itself ("already so") writes
    nothing. Returns (old, new)."""
    repo = MeshRepo(store)
    for _ in range(RACE_RETRIES):
        pool = await read_pool(store)
        if name not in pool.views:
            raise OpError(f"unknown cluster '{name}'")
        view, revision = pool.views[name]
        new, nodes = change(pool, view)
        if dry_run or new is view:
            return view, new
        commit = nodes if isinstance(nodes, ViewCommit) else ViewCommit(claim=tuple(nodes))
        if await repo.commit_view(name, revision, new,
                                  replace(commit, unassign=commit.unassign + unassign,
                                          hold=commit.hold + hold)):
            return view, new
    raise OpError(f"cluster '{name}' kept changing; try again")


def _planned(view: ClusterView, migrations: list[Migration],
             new_shards: Sequence[Shard] = ()) -> ClusterView:
    try:
        return plans.with_plan(view, migrations, tuple(new_shards))
    except (plans.PlanError, ViewError) as exc:
        raise OpError(str(exc)) from None


async def scale_cluster(store: EtcdStore, name: str, shards: int,
                        dry_run: bool) -> tuple[ClusterView, ClusterView]:
    if shards < 1:
        raise UsageError("--shards must be at least 1")

    def change(pool: Pool, view: ClusterView) -> tuple[ClusterView, list[str]]:
        current = [s.id for s in view.shards]
        if shards == len(current):
            return view, []  # already so
        if shards < len(current):
            return _planned(view, plans.plan(view, current[:shards])), []
        replicas = view.config.replicas
        try:
            layout = place(pool.free(), shards - len(current), replicas)
        except PlacementError as exc:
            raise OpError(str(exc)) from None
        next_id = max(int(s[1:]) for s in current if s[1:].isdigit()) + 1
        new_shards = [Shard(f"s{next_id + i}", master, tuple(reps))
                      for i, (master, reps) in enumerate(layout)]
        claimed = [n for s in new_shards for n in s.members]
        grown = replace(view, nodes=tuple(sorted(
            list(view.nodes) + [(n, NodeAddress(pool.nodes[n].proxy, pool.nodes[n].backend))
                                for n in claimed])))
        grown_with_shards = replace(grown, shards=grown.shards + tuple(new_shards))
        migrations = plans.plan(grown_with_shards, current + [s.id for s in new_shards])
        return _planned(grown, migrations, new_shards), claimed

    return await _edit_view(store, name, change, dry_run)


async def rebalance_cluster(store: EtcdStore, name: str,
                            dry_run: bool) -> tuple[ClusterView, ClusterView]:
    def change(pool: Pool, view: ClusterView) -> tuple[ClusterView, list[str]]:
        migrations = plans.plan(view, [s.id for s in view.shards])
        if not migrations:
            return view, []  # already balanced
        return _planned(view, migrations), []

    return await _edit_view(store, name, change, dry_run)


async def migrate_slots(store: EtcdStore, name: str, ranges: tuple[SlotRange, ...], target: str,
                        dry_run: bool) -> tuple[ClusterView, ClusterView]:
    def change(pool: Pool, view: ClusterView) -> tuple[ClusterView, list[str]]:
        shard = next((s for s in view.shards if s.id == target), None)
        if shard is not None and all(any(a <= lo and hi <= b for a, b in shard.slots)
                                     for lo, hi in ranges):
            return view, []  # the target owns them already
        try:
            migrations = plans.manual(view, ranges, target)
        except plans.PlanError as exc:
            raise OpError(str(exc)) from None
        return _planned(view, migrations), []

    return await _edit_view(store, name, change, dry_run)


async def cancel_migrations(store: EtcdStore, name: str) -> tuple[ClusterView, ClusterView]:
    def change(pool: Pool, view: ClusterView) -> tuple[ClusterView, list[str]]:
        if not view.migrations:
            return view, []  # nothing to cancel
        try:
            return plans.cancel(view), []
        except plans.PlanError as exc:
            raise OpError(str(exc)) from None

    return await _edit_view(store, name, change)


def _check_rate(rate: int | None, option: str) -> None:
    if rate is not None and not 0 <= rate <= MAX_MIGRATION_RATE:
        raise UsageError(f"{option} must be 0 (no limit) to {MAX_MIGRATION_RATE} keys/s")


async def set_migration_rate(store: EtcdStore, name: str, rate: int | None,
                             dry_run: bool = False) -> tuple[ClusterView, ClusterView]:
    """Declare the cluster's migration rate (keys/s, 0: no limit; None: each node's
    `mesh-proxy --migration-rate`) in a new epoch. A running migration's source takes it
    when it applies that epoch (its marker carries it: proxy/routing.py); later migrations
    start with it. Returns (old, new); `new` is `old` itself when the cluster already has
    that rate (nothing written)."""
    _check_rate(rate, "--rate")

    def change(pool: Pool, view: ClusterView) -> tuple[ClusterView, list[str]]:
        if view.config.migration_rate == rate:
            return view, []
        new = view.next(config=replace(view.config, migration_rate=rate))
        try:
            validate(new)
        except ViewError as exc:
            raise OpError(f"cannot change '{name}': {exc}") from None
        return new, []

    return await _edit_view(store, name, change, dry_run)


@dataclass(frozen=True)
class ReplicaPlan:
    old: ClusterView
    new: ClusterView  # `old` itself when the cluster already declares that count
    added: dict[str, tuple[str, ...]]  # shard id -> free nodes that join it
    removed: dict[str, tuple[str, ...]]  # shard id -> replicas that leave it


def _seen_now(pool: Pool, view: ClusterView) -> dict[str, Seen]:
    """What the operator sees of a cluster's members: alive (registered, Redis up) or not,
    with no history (so nothing counts as dead for long: replacing dead replicas is the
    leader's), and in sync if its status says it follows its master with a finished sync."""
    seen = {}
    for nid in view.node_ids:
        st = pool.statuses.get(nid)
        alive = nid in pool.nodes and st is not None and st.backend_ok
        rec = pool.nodes.get(nid)
        seen[nid] = Seen(alive, float("inf"), alive and st is not None
                         and st.serves(view.cluster, view.uid) and st.role == "replica"
                         and st.synced, rec.host if rec else "")
    return seen


def _replica_change(pool: Pool, view: ClusterView, replicas: int) -> ReplicaPlan:
    if not 0 <= replicas <= MAX_REPLICAS:
        raise UsageError(f"--replicas must be 0 to {MAX_REPLICAS}")
    if replicas < view.config.min_replicas_ack:
        raise OpError(f"cluster '{view.cluster}' acknowledges writes once "
                      f"{view.config.min_replicas_ack} replicas have them (synchronous mode): "
                      f"it needs at least {view.config.min_replicas_ack} replicas")
    if replicas == view.config.replicas:
        return ReplicaPlan(view, view, {}, {})
    free = [FreeNode(n.node_id, NodeAddress(n.proxy, n.backend), n.host) for n in pool.free()
            if pool.statuses.get(n.node_id) and pool.statuses[n.node_id].backend_ok]
    missing = sum(max(0, replicas - len(s.replicas)) for s in view.shards)
    if missing > len(free):
        raise OpError(f"cluster '{view.cluster}' needs {missing} free nodes for {replicas} "
                      f"replicas per shard; the pool has {len(free)}: "
                      f"{missing - len(free)} missing")
    declared = view.next(config=replace(view.config, replicas=replicas))
    step = plan_replicas(declared, _seen_now(pool, view), free, 0.0)
    if step is None:
        return ReplicaPlan(view, declared, {}, {})
    new = replace(step.view, epoch=view.epoch + 1)  # one epoch: the count and its nodes
    before = {s.id: s.replicas for s in view.shards}
    added = {s.id: tuple(r for r in s.replicas if r not in before[s.id]) for s in new.shards}
    removed = {s.id: tuple(r for r in before[s.id] if r not in s.replicas) for s in new.shards}
    return ReplicaPlan(view, new, {k: v for k, v in added.items() if v},
                       {k: v for k, v in removed.items() if v})


async def scale_replicas(store: EtcdStore, name: str, replicas: int,
                         dry_run: bool) -> ReplicaPlan:
    """Declare `replicas` per shard, and in the same commit claim the free nodes that need
    (or return to the pool the replicas that exceed) it; the leader keeps the count from
    then on (mesh/model/replicas.py)."""
    made: list[ReplicaPlan] = []  # the plan of each try: the last one is what was written

    def change(pool: Pool, view: ClusterView) -> tuple[ClusterView, ViewCommit]:
        plan = _replica_change(pool, view, replicas)
        made.append(plan)
        return plan.new, ViewCommit(claim=tuple(n for ns in plan.added.values() for n in ns),
                                    unassign=tuple(n for ns in plan.removed.values() for n in ns))

    await _edit_view(store, name, change, dry_run)
    return made[-1]


def replicas_in_sync(view: ClusterView, pool: Pool) -> dict[str, list[str]]:
    """Shard id -> its replicas that are alive, not failed, applied the view and synced."""
    out = {}
    for shard in view.shards:
        out[shard.id] = [r for r in shard.replicas if r in pool.nodes and r not in view.failed
                         and (st := pool.statuses.get(r)) is not None and st.backend_ok
                         and st.applied(view.cluster, view.uid) >= view.epoch
                         and st.role == "replica" and st.synced]
    return out


async def wait_replicas(store: EtcdStore, name: str, timeout: float,
                        progress: Callable[[ClusterView, dict[str, list[str]]], None] | None
                        = None) -> bool:
    """Wait until every shard has exactly its declared replicas, each in sync."""
    with anyio.move_on_after(timeout):
        while True:
            pool = await read_pool(store)
            if name not in pool.views:
                raise OpError(f"unknown cluster '{name}'")
            view = pool.views[name][0]
            synced = replicas_in_sync(view, pool)
            if progress is not None:
                progress(view, synced)
            if all(len(s.replicas) == view.config.replicas == len(synced[s.id])
                   for s in view.shards):
                return True
            await anyio.sleep(0.5)
    return False


def migration_rows(view: ClusterView, pool: Pool) -> list[dict]:
    masters = {s.id: s.master for s in view.shards}
    rows = []
    for m in view.migrations:
        status = pool.statuses.get(masters[m.source])
        progress = status.progress(m.id) if status else MigrationProgress()
        rows.append({"id": m.id, "slots": [list(r) for r in m.slots],
                     "slot_count": slot_count(m.slots), "from": m.source, "to": m.target,
                     "state": m.state.value if not progress.done else "committing",
                     "moved_keys": progress.moved_keys,
                     "left_keys": progress.left_keys,
                     "eta_sec": progress.eta_sec,
                     "moved_bytes": progress.moved_bytes,
                     "keys_per_sec": progress.keys_per_sec,
                     "method": progress.method, "chunked_keys": progress.chunked_keys,
                     "error": progress.error})
    return rows


def finished_reports(pool: Pool) -> dict[str, int]:
    """Migration id -> keys moved, from the final reports sources keep for a while after a
    migration finished (core/nodes.py, NodeStatus.finished_migrations)."""
    return {mid: p.moved_keys for st in pool.statuses.values()
            for mid, p in st.finished_migrations.items()}


async def wait_migrations(store: EtcdStore, name: str, timeout: float,
                          progress: Callable[[ClusterView, Pool], None] | None = None) -> bool:
    """Wait until the cluster has no migrations and every node applied the final view."""
    with anyio.move_on_after(timeout):
        while True:
            pool = await read_pool(store)
            if name not in pool.views:
                raise OpError(f"unknown cluster '{name}'")
            view = pool.views[name][0]
            if progress is not None:
                progress(view, pool)
            if not view.migrations:
                return not await wait_applied(store, view, max(1.0, timeout / 10))
            await anyio.sleep(0.5)
    return False


async def graceful_failover(store: EtcdStore, name: str, shard_id: str,
                            to: str | None, mesh_secret: bytes | None) -> ClusterView:
    """Make a replica the master without losing a write (mesh/handover.py: the master's Redis
    pauses writes and waits for the replica, then the view records the swap)."""
    try:
        return await handover.graceful_failover(MeshRepo(store), name, shard_id, to,
                                                mesh_secret)
    except handover.HandoverError as exc:
        raise OpError(str(exc)) from None


async def drain_node(store: EtcdStore, node: str,
                     mesh_secret: bytes | None) -> tuple[str, ClusterView]:
    """Take `node` out of its cluster for good without losing data: a replica just leaves; a
    master hands over to a replica first. Either is then held out of the pool (`nodes
    release` returns it), so the leader, which keeps the cluster's declared replica count
    from free nodes, does not take it straight back. A master without replicas has its slots
    migrated away (its shard then leaves, and the node returns to the pool, when the last
    migration commits)."""
    pool = await read_pool(store)
    cluster, role = pool.role_of(node)
    if not cluster:
        raise OpError(f"node '{node}' serves no cluster")
    view = pool.views[cluster][0]
    shard = view.shard_of(node)
    assert shard is not None
    if role == "master" and [r for r in shard.replicas if r not in view.failed]:
        await graceful_failover(store, cluster, shard.id, None, mesh_secret)
        role = "replica"
    if role == "replica":
        def change(pool: Pool, view: ClusterView) -> tuple[ClusterView, list[str]]:
            shards = tuple(replace(s, replicas=tuple(r for r in s.replicas if r != node))
                           for s in view.shards)
            new = view.next(shards=shards, nodes=tuple((n, a) for n, a in view.nodes if n != node),
                            failed=tuple(n for n in view.failed if n != node))
            validate(new)
            return new, []

        _, new = await _edit_view(store, cluster, change, hold=(node,))
        return "removed", new
    others = [s.id for s in view.shards if s.id != shard.id]
    if not others:
        raise OpError(f"node '{node}' holds the only shard of '{cluster}'; delete the cluster")

    def plan_away(pool: Pool, view: ClusterView) -> tuple[ClusterView, list[str]]:
        return _planned(view, plans.plan(view, others)), []

    _, new = await _edit_view(store, cluster, plan_away)
    return "migrating", new
