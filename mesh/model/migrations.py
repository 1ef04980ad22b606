"""Slot migration planning and the view changes that start, commit and cancel migrations.

Pure: views in, views out. The leader and umctl-mesh call these; the tests call them as tables.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from core.nodes import NodeStatus
from core.slots import SLOT_COUNT, SlotRange, normalize, ranges_of, slot_count
from core.view import ClusterView, Migration, MigrationState, Shard, validate

MAX_PARALLEL_MIGRATIONS = 2


class PlanError(ValueError):
    pass


def _slots(ranges: tuple[SlotRange, ...]) -> list[int]:
    return [s for a, b in ranges for s in range(a, b + 1)]


def plan(view: ClusterView, final_shards: list[str]) -> list[Migration]:
    """Pending migrations that leave `final_shards` with even slot counts (differing by at most
    one) moving the fewest slots: only surpluses move, from the end of each donor's ranges."""
    if not final_shards:
        raise PlanError("a cluster keeps at least one shard")
    current = {s.id: _slots(s.slots) for s in view.shards}
    for sid in final_shards:
        current.setdefault(sid, [])
    base, extra = divmod(SLOT_COUNT, len(final_shards))
    # the shards that already hold the most get the extra slot: fewer moves
    by_size = sorted(final_shards, key=lambda s: (-len(current[s]), final_shards.index(s)))
    target = {sid: base + (1 if i < extra else 0) for i, sid in enumerate(by_size)}
    for sid in current:
        target.setdefault(sid, 0)  # shards being removed give everything away
    surplus = {sid: current[sid][target[sid]:] for sid in current if len(current[sid]) > target[sid]}
    deficit = {sid: target[sid] - len(current[sid]) for sid in final_shards
               if len(current[sid]) < target[sid]}
    moves: dict[tuple[str, str], list[int]] = {}
    for donor in sorted(surplus, key=lambda d: [s.id for s in view.shards].index(d)):
        slots = surplus[donor]
        while slots:
            receiver = max(deficit, key=lambda r: (deficit[r], -final_shards.index(r)))
            take = min(deficit[receiver], len(slots))
            moves.setdefault((donor, receiver), []).extend(slots[:take])
            slots = slots[take:]
            deficit[receiver] -= take
            if not deficit[receiver]:
                del deficit[receiver]
    return [Migration(ranges_of(slots), src, dst, view.epoch + 1, MigrationState.PENDING)
            for (src, dst), slots in sorted(moves.items())]


def with_plan(view: ClusterView, migrations: list[Migration],
              new_shards: tuple[Shard, ...] = ()) -> ClusterView:
    """The next view with `migrations` queued (and shards being added), validated."""
    if view.migrations:
        raise PlanError("the cluster has migrations in progress; wait or cancel them first")
    nodes = dict(view.nodes)
    new = view.next(shards=view.shards + new_shards, migrations=tuple(migrations),
                    nodes=tuple(sorted(nodes.items())))
    validate(new)
    return new


def start_next(view: ClusterView, max_parallel: int = MAX_PARALLEL_MIGRATIONS) -> ClusterView | None:
    """Start pending migrations: at most `max_parallel` at once, one out of each source, and
    no shard sending and receiving at once. A new shard receives from several sources at
    once (each source's Redis does its share of the work). None when nothing can start."""
    active = [m for m in view.migrations if m.state is MigrationState.MIGRATING]
    sources = {m.source for m in active}
    targets = {m.target for m in active}
    epoch = view.epoch + 1
    started: list[Migration] = []
    migrations = list(view.migrations)
    for i, m in enumerate(migrations):
        if len(active) + len(started) >= max_parallel:
            break
        if m.state is MigrationState.PENDING and m.source not in sources | targets \
                and m.target not in sources:
            migrations[i] = replace(m, state=MigrationState.MIGRATING, epoch=epoch)
            sources.add(m.source)
            targets.add(m.target)
            started.append(m)
    if not started:
        return None
    new = view.next(migrations=tuple(migrations))
    validate(new)
    return new


def commit(view: ClusterView, migration_id: str) -> tuple[ClusterView, list[str]]:
    """Give a finished migration's slots to its target. Shards left with no slots and no
    migration leave the cluster; returns the new view and the nodes that left."""
    m = next((m for m in view.migrations if m.id == migration_id), None)
    if m is None or m.state is not MigrationState.MIGRATING:
        raise PlanError(f"no running migration {migration_id}")
    moving = set(_slots(m.slots))
    shards = []
    for shard in view.shards:
        if shard.id == m.source:
            shard = replace(shard, slots=ranges_of(s for s in _slots(shard.slots)
                                                   if s not in moving))
        elif shard.id == m.target:
            shard = replace(shard, slots=normalize(shard.slots + m.slots))
        shards.append(shard)
    migrations = tuple(x for x in view.migrations if x.id != migration_id)
    involved = {x.source for x in migrations} | {x.target for x in migrations}
    kept = [s for s in shards if s.slots or s.id in involved]
    left = [n for s in shards if s not in kept for n in s.members]
    members = {n for s in kept for n in s.members}
    new = view.next(shards=tuple(kept), migrations=migrations,
                    nodes=tuple((nid, a) for nid, a in view.nodes if nid in members))
    validate(new)
    return new, left


def cancel(view: ClusterView) -> ClusterView:
    """Drop pending migrations; send running ones back: the target takes the slots over and
    moves the keys it received home (the same protocol, reversed)."""
    if not view.migrations:
        raise PlanError("no migrations to cancel")
    epoch = view.epoch + 1
    shards = {s.id: s for s in view.shards}
    back = []
    for m in view.migrations:
        if m.state is not MigrationState.MIGRATING:
            continue
        moving = set(_slots(m.slots))
        src, dst = shards[m.source], shards[m.target]
        shards[m.source] = replace(src, slots=ranges_of(s for s in _slots(src.slots)
                                                        if s not in moving))
        shards[m.target] = replace(dst, slots=normalize(dst.slots + m.slots))
        back.append(Migration(m.slots, m.target, m.source, epoch, MigrationState.MIGRATING))
    new = view.next(shards=tuple(shards[s.id] for s in view.shards), migrations=tuple(back))
    validate(new)
    return new


def manual(view: ClusterView, ranges: tuple[SlotRange, ...], target: str) -> list[Migration]:
    """Pending migrations moving `ranges` to shard `target`, one per current owner."""
    if target not in {s.id for s in view.shards}:
        raise PlanError(f"unknown shard '{target}'")
    wanted = set(_slots(normalize(ranges)))
    moves = []
    for shard in view.shards:
        mine = [s for s in _slots(shard.slots) if s in wanted]
        if mine and shard.id != target:
            moves.append(Migration(ranges_of(mine), shard.id, target, view.epoch + 1,
                                   MigrationState.PENDING))
    if not moves:
        raise PlanError(f"shard '{target}' already owns those slots")
    return moves


def moved_slots(migrations: list[Migration]) -> int:
    return sum(slot_count(m.slots) for m in migrations)


@dataclass(frozen=True, slots=True)
class MigrationStep:
    view: ClusterView  # the next view
    left: tuple[str, ...] = ()  # nodes that left the cluster with it (their shard emptied)
    what: str = ""


def next_step(view: ClusterView, statuses: Mapping[str, NodeStatus]) -> MigrationStep | None:
    """The leader's next move for a cluster's migrations: commit the first running one whose
    source (the source shard's master, in this cluster) reports every key moved, else start
    pending ones. None when there is nothing to do."""
    masters = {s.id: s.master for s in view.shards}
    for m in view.migrations:
        if m.state is not MigrationState.MIGRATING:
            continue
        status = statuses.get(masters[m.source])
        if status is not None and status.serves(view.cluster, view.uid) \
                and status.progress(m.id).done:
            new, left = commit(view, m.id)
            return MigrationStep(new, tuple(left), f"commit {m.id}")
    started = start_next(view)
    if started is not None:
        return MigrationStep(started, (), "start")
    return None
