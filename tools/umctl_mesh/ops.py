"""What umctl-mesh does to the mesh: reads of the pool and clusters, fenced-free CAS edits."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

import anyio

from core.nodes import Assignment, NodeRecord, NodeStatus, RecordError
from core.slots import slot_count
from core.view import (
    CLUSTER_NAME,
    ClusterConfig,
    ClusterView,
    NodeAddress,
    Shard,
    ViewError,
    even_split,
    from_json,
    hash_password,
    to_json,
    validate,
)
from mesh.leader import read_nodes, read_statuses
from mesh.model import migrations as plans
from mesh.model.placement import PlacementError, place
from mesh.store.etcd import EtcdStore

RACE_RETRIES = 5


class OpError(Exception):
    """A one-line error for the operator; the CLI exits non-zero with it."""


@dataclass(frozen=True)
class Pool:
    nodes: dict[str, NodeRecord]
    statuses: dict[str, NodeStatus]
    assignments: dict[str, tuple[Assignment, int]]  # node id -> (assignment, mod revision)
    views: dict[str, tuple[ClusterView, int]]  # cluster -> (view, mod revision)
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
    keys = store.keys
    registered = await read_nodes(store)
    nodes = {nid: record for nid, (record, _) in registered.items()}
    lease_owner = {lease: nid for nid, (_, lease) in registered.items()}
    assignments = {}
    for kv in (await store.get_prefix(keys.assignments))[0]:
        try:
            assignments[keys.last_part(kv.key)] = (Assignment.decode(kv.value), kv.mod_revision)
        except RecordError:
            continue
    views = {}
    for kv in (await store.get_prefix(keys.clusters))[0]:
        name = keys.cluster_of_view_key(kv.key)
        try:
            views[name] = (from_json(kv.value), kv.mod_revision)
        except ViewError:
            continue
    candidates = sorted((await store.get_prefix(keys.election))[0],
                        key=lambda kv: kv.create_revision)
    leader = lease_owner.get(candidates[0].lease) if candidates else None
    return Pool(nodes, await read_statuses(store), assignments, views, leader)  # type: ignore[arg-type]


def build_view(name: str, pool: Pool, shards: int, replicas: int,
               password: str | None, min_replicas_ack: int = 0) -> ClusterView:
    if not CLUSTER_NAME.fullmatch(name):
        raise OpError(f"invalid cluster name '{name}' (letters, digits, '_', '.', '-'; "
                      "at most 64)")
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
    if min_replicas_ack > replicas:
        raise OpError(f"--min-replicas-ack {min_replicas_ack} needs at least as many replicas")
    config = ClusterConfig(password_hash=hash_password(password) if password else None,
                           min_replicas_ack=min_replicas_ack)
    return ClusterView(name, 1, shard_list, nodes, config, uid=uuid.uuid4().hex)


async def create_cluster(store: EtcdStore, name: str, shards: int, replicas: int,
                         password: str | None, min_replicas_ack: int = 0) -> ClusterView:
    keys = store.keys
    for _ in range(RACE_RETRIES):
        pool = await read_pool(store)
        if name in pool.views:
            raise OpError(f"cluster '{name}' already exists")
        view = build_view(name, pool, shards, replicas, password, min_replicas_ack)
        checks = {keys.view(name): 0, **{keys.assignment(n): 0 for n in view.node_ids}}
        puts = {keys.view(name): to_json(view),
                **{keys.assignment(n): Assignment(name).encode() for n in view.node_ids}}
        if await store.commit(checks, puts):
            return view
    raise OpError("lost the race for free nodes 5 times in a row; try again")


async def delete_cluster(store: EtcdStore, name: str, keep_data: bool) -> ClusterView:
    keys = store.keys
    for _ in range(RACE_RETRIES):
        kv = await store.get(keys.view(name))
        if kv is None:
            raise OpError(f"unknown cluster '{name}'")
        try:
            view = from_json(kv.value)
        except ViewError as exc:
            raise OpError(f"the view of '{name}' in etcd is invalid: {exc}") from None
        checks = {keys.view(name): kv.mod_revision}
        if keep_data:
            puts = {keys.assignment(n): Assignment(name, held=True).encode()
                    for n in view.node_ids}
            deletes: tuple[bytes, ...] = (keys.view(name),)
        else:
            puts = {}
            deletes = (keys.view(name), *(keys.assignment(n) for n in view.node_ids))
        if await store.commit(checks, puts, deletes):
            return view
    raise OpError(f"cluster '{name}' kept changing; try again")


async def release_node(store: EtcdStore, node_id: str) -> None:
    kv = await store.get(store.keys.assignment(node_id))
    if kv is None:
        raise OpError(f"node '{node_id}' is not held")
    assignment = Assignment.decode(kv.value)
    if not assignment.held:
        raise OpError(f"node '{node_id}' serves cluster '{assignment.cluster}'; "
                      "delete the cluster first")
    if not await store.cas(kv.key, None, kv.mod_revision):
        raise OpError(f"node '{node_id}' changed meanwhile; try again")


async def wait_applied(store: EtcdStore, view: ClusterView, timeout: float,
                       progress=None) -> list[str]:  # noqa: ANN001
    """Wait until every node of `view` reports it applied; returns the nodes still behind."""
    behind = list(view.node_ids)
    with anyio.move_on_after(timeout):
        while True:
            statuses = await read_statuses(store)
            behind = [n for n in view.node_ids
                      if not (statuses.get(n) and statuses[n].cluster == view.cluster
                              and statuses[n].epoch >= view.epoch)]
            if progress is not None:
                progress(len(view.node_ids) - len(behind), len(view.node_ids))
            if not behind:
                break
            await anyio.sleep(0.2)
    return behind


# -- scaling and migrations ------------------------------------------------------------------

async def _edit_view(store: EtcdStore, name: str, change, dry_run: bool = False):  # noqa: ANN001, ANN202
    """Read the view, let `change(pool, view)` return (new view, new assignments), write it
    with one compare-and-swap (retried on a lost race). Returns (old, new)."""
    keys = store.keys
    for _ in range(RACE_RETRIES):
        pool = await read_pool(store)
        if name not in pool.views:
            raise OpError(f"unknown cluster '{name}'")
        view, revision = pool.views[name]
        new, claimed = change(pool, view)
        if dry_run:
            return view, new
        checks = {keys.view(name): revision, **{keys.assignment(n): 0 for n in claimed}}
        puts = {keys.view(name): to_json(new),
                **{keys.assignment(n): Assignment(name).encode() for n in claimed}}
        if await store.commit(checks, puts):
            return view, new
    raise OpError(f"cluster '{name}' kept changing; try again")


def _planned(view: ClusterView, migrations, new_shards=()):  # noqa: ANN001, ANN202
    try:
        return plans.with_plan(view, migrations, tuple(new_shards))
    except (plans.PlanError, ViewError) as exc:
        raise OpError(str(exc)) from None


async def scale_cluster(store: EtcdStore, name: str, shards: int, dry_run: bool):  # noqa: ANN201
    if shards < 1:
        raise OpError("--shards must be at least 1")

    def change(pool: Pool, view: ClusterView):  # noqa: ANN202
        current = [s.id for s in view.shards]
        if shards == len(current):
            raise OpError(f"cluster '{name}' already has {shards} shards")
        if shards < len(current):
            return _planned(view, plans.plan(view, current[:shards])), []
        replicas = len(view.shards[0].replicas)
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


async def rebalance_cluster(store: EtcdStore, name: str, dry_run: bool):  # noqa: ANN201
    def change(pool: Pool, view: ClusterView):  # noqa: ANN202
        migrations = plans.plan(view, [s.id for s in view.shards])
        if not migrations:
            raise OpError(f"cluster '{name}' is already balanced")
        return _planned(view, migrations), []

    return await _edit_view(store, name, change, dry_run)


async def migrate_slots(store: EtcdStore, name: str, ranges, target: str, dry_run: bool):  # noqa: ANN001, ANN201
    def change(pool: Pool, view: ClusterView):  # noqa: ANN202
        try:
            migrations = plans.manual(view, ranges, target)
        except plans.PlanError as exc:
            raise OpError(str(exc)) from None
        return _planned(view, migrations), []

    return await _edit_view(store, name, change, dry_run)


async def cancel_migrations(store: EtcdStore, name: str):  # noqa: ANN201
    def change(pool: Pool, view: ClusterView):  # noqa: ANN202
        try:
            return plans.cancel(view), []
        except plans.PlanError as exc:
            raise OpError(str(exc)) from None

    return await _edit_view(store, name, change)


def migration_rows(view: ClusterView, pool: Pool) -> list[dict]:
    masters = {s.id: s.master for s in view.shards}
    rows = []
    for m in view.migrations:
        status = pool.statuses.get(masters[m.source])
        progress = status.migrations.get(m.id, {}) if status else {}
        rows.append({"id": m.id, "slots": [list(r) for r in m.slots],
                     "slot_count": slot_count(m.slots), "from": m.source, "to": m.target,
                     "state": m.state.value if not progress.get("done") else "committing",
                     "moved_keys": progress.get("moved_keys", 0),
                     "left_keys": progress.get("left_keys"),
                     "eta_sec": progress.get("eta_sec"),
                     "moved_bytes": progress.get("moved_bytes", 0),
                     "keys_per_sec": progress.get("keys_per_sec", 0.0),
                     "error": progress.get("error", "")})
    return rows


async def wait_migrations(store: EtcdStore, name: str, timeout: float, progress=None) -> bool:  # noqa: ANN001
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


HANDOVER_TIMEOUT_MS = 5000


async def graceful_failover(store: EtcdStore, name: str, shard_id: str,
                            to: str | None) -> ClusterView:
    """Make a replica the master without losing a write: the master's Redis pauses writes and
    waits for the replica (Redis FAILOVER, driven through the master's proxy), then the view
    records the swap."""
    from mesh.redisctl import RedisCtl, RedisCtlError

    pool = await read_pool(store)
    if name not in pool.views:
        raise OpError(f"unknown cluster '{name}'")
    view, _ = pool.views[name]
    shard = next((s for s in view.shards if s.id == shard_id), None)
    if shard is None:
        raise OpError(f"cluster '{name}' has no shard '{shard_id}'")
    live = [r for r in shard.replicas if r not in view.failed and r in pool.nodes]
    if to is not None and to not in live:
        raise OpError(f"'{to}' is not a live replica of {shard_id} (live: {', '.join(live) or 'none'})")
    if not live:
        raise OpError(f"shard {shard_id} has no live replica to hand over to")
    target = to or max(live, key=lambda r: pool.statuses[r].repl_offset
                       if r in pool.statuses else 0)
    host, _, port = view.address_of(target).backend.rpartition(":")
    ctl = RedisCtl(view.address_of(shard.master).proxy)
    try:
        with anyio.fail_after(60):  # the proxy retries FAILOVER for up to 6 x (5 + 2) s
            if view.config.password_hash:
                await ctl.call("UMCTL", "AUTHPEER", view.config.password_hash)
            await ctl.call("UMCTL", "HANDOVER", host, port, HANDOVER_TIMEOUT_MS)
    except (RedisCtlError, TimeoutError, OSError) as exc:
        raise OpError(f"the handover from {shard.master} to {target} failed: {exc}") from None
    finally:
        await ctl.aclose()

    def change(pool: Pool, view: ClusterView):  # noqa: ANN202
        shards = tuple(replace(s, master=target, replicas=tuple(
            r for r in s.replicas if r != target) + (s.master,)) if s.id == shard_id else s
            for s in view.shards)
        new = view.next(shards=shards)
        validate(new)
        return new, []

    _, new = await _edit_view(store, name, change)
    return new


async def drain_node(store: EtcdStore, node: str) -> tuple[str, ClusterView | None]:
    """Take `node` out of its cluster without losing data and return it to the pool: a replica
    just leaves; a master hands over to a replica first; a master without replicas has its
    slots migrated away (its shard then leaves when the last migration commits)."""
    pool = await read_pool(store)
    cluster, role = pool.role_of(node)
    if not cluster:
        raise OpError(f"node '{node}' serves no cluster")
    view = pool.views[cluster][0]
    shard = view.shard_of(node)
    assert shard is not None
    if role == "master" and [r for r in shard.replicas if r not in view.failed]:
        await graceful_failover(store, cluster, shard.id, None)
        role = "replica"
    if role == "replica":
        def change(pool: Pool, view: ClusterView):  # noqa: ANN202
            shards = tuple(replace(s, replicas=tuple(r for r in s.replicas if r != node))
                           for s in view.shards)
            new = view.next(shards=shards, nodes=tuple((n, a) for n, a in view.nodes if n != node),
                            failed=tuple(n for n in view.failed if n != node))
            validate(new)
            return new, []

        _, new = await _edit_view(store, cluster, change)
        await store.delete(store.keys.assignment(node))
        return "removed", new
    others = [s.id for s in view.shards if s.id != shard.id]
    if not others:
        raise OpError(f"node '{node}' holds the only shard of '{cluster}'; delete the cluster")

    def plan_away(pool: Pool, view: ClusterView):  # noqa: ANN202
        return _planned(view, plans.plan(view, others)), []

    _, new = await _edit_view(store, cluster, plan_away)
    return "migrating", new
