from __future__ import annotations

from dataclasses import replace

import pytest

from core.slots import slot_count
from core.view import Migration, MigrationState, NodeAddress, Shard, validate
from mesh.model.migrations import PlanError, cancel, commit, manual, moved_slots, plan, start_next, with_plan
from tests.unit.test_view import make_view


def add_shards(view, n):
    shards, nodes = [], list(view.nodes)
    for i in range(n):
        sid = f"s{len(view.shards) + i + 1}"
        nid = f"new-{i}"
        nodes.append((nid, NodeAddress(f"127.0.0.1:{8000 + i}", f"127.0.0.1:{18000 + i}")))
        shards.append(Shard(sid, nid))
    return replace(view, nodes=tuple(sorted(nodes))), tuple(shards)


def counts_after(view, migrations):
    counts = {s.id: slot_count(s.slots) for s in view.shards}
    for m in migrations:
        counts.setdefault(m.target, 0)
        counts[m.source] -= slot_count(m.slots)
        counts[m.target] += slot_count(m.slots)
    return counts


@pytest.mark.parametrize("before, after, moved", [
    (2, 4, 8192),   # half of everything moves to the two new shards
    (2, 3, 5461),   # a third moves
    (3, 4, 4096),
    (4, 3, 4096),   # scale in: the removed shard's slots, nothing else
    (3, 3, 0),      # already even
])
def test_plan_moves_only_the_surplus_and_evens_out(before, after, moved):
    view = make_view(before, 0)
    final = [f"s{i + 1}" for i in range(after)]
    if after > before:
        view, _ = add_shards(view, after - before)
    migrations = plan(view, final)
    assert moved_slots(migrations) == moved
    counts = counts_after(view, migrations)
    kept = [counts.get(s, 0) for s in final]
    assert max(kept) - min(kept) <= 1 and sum(kept) == 16384
    assert all(counts[s] == 0 for s in counts if s not in final)
    assert all(m.state is MigrationState.PENDING for m in migrations)


def test_scale_out_runs_to_completion_through_start_and_commit():
    view, new = add_shards(make_view(2, 0), 2)
    view = with_plan(view, plan(view, ["s1", "s2", "s3", "s4"]), new)
    steps = 0
    while view.migrations:
        started = start_next(view)
        if started is not None:
            running = [m for m in started.migrations if m.state is MigrationState.MIGRATING]
            assert len(running) <= 2
            assert len({m.source for m in running}) == len(running)  # one out of each source
            view = started
        m = next(m for m in view.migrations if m.state is MigrationState.MIGRATING)
        view, left = commit(view, m.id)
        assert left == []
        steps += 1
    assert steps == 2 and sorted(slot_count(s.slots) for s in view.shards) == [4096] * 4


def test_scale_in_removes_the_emptied_shard_and_its_nodes():
    view = make_view(3, 1)
    view = with_plan(view, plan(view, ["s1", "s2"]))
    left = []
    while view.migrations:
        view = start_next(view) or view
        m = next(m for m in view.migrations if m.state is MigrationState.MIGRATING)
        view, gone = commit(view, m.id)
        left += gone
    assert [s.id for s in view.shards] == ["s1", "s2"]
    assert sorted(left) == ["node-4", "node-5"] and "node-4" not in view.node_ids


def test_a_new_shard_receives_from_every_source_at_once_and_no_shard_sends_and_receives():
    view, new = add_shards(make_view(2, 0), 1)
    started = start_next(with_plan(view, plan(view, ["s1", "s2", "s3"]), new))
    assert started is not None
    running = {(m.source, m.target) for m in started.migrations
               if m.state is MigrationState.MIGRATING}
    assert running == {("s1", "s3"), ("s2", "s3")}
    # s2 receives from s1: it may not send to s3 meanwhile, nor s1 receive from s3
    view = make_view(3, 0)
    s1_to_s2 = replace(Migration(((0, 10),), "s1", "s2", 0), state=MigrationState.MIGRATING)
    waiting = (Migration(((11000, 11010),), "s2", "s3", 0), Migration(((11020, 11030),), "s3", "s1", 0))
    assert start_next(replace(view, migrations=(s1_to_s2, *waiting)), 3) is None


def test_cancel_sends_a_running_migration_back_and_drops_pending_ones():
    view, new = add_shards(make_view(2, 0), 2)
    view = start_next(with_plan(view, plan(view, ["s1", "s2", "s3", "s4"]), new), 1)
    running = next(m for m in view.migrations if m.state is MigrationState.MIGRATING)
    back = cancel(view)
    assert len(back.migrations) == 1
    [rev] = back.migrations
    assert (rev.source, rev.target, rev.slots) == (running.target, running.source, running.slots)
    owner = next(s for s in back.shards if s.id == running.target)
    assert set(running.slots) <= set(owner.slots)
    validate(back)


def test_manual_migration_splits_by_owner_and_refuses_nonsense():
    view = make_view(2, 0)  # s1: 0-8191, s2: 8192-16383
    moves = manual(view, ((8000, 8300),), "s2")
    assert [(m.source, m.slots) for m in moves] == [("s1", ((8000, 8191),))]
    with pytest.raises(PlanError, match="unknown shard"):
        manual(view, ((0, 1),), "s9")
    with pytest.raises(PlanError, match="already owns"):
        manual(view, ((9000, 9001),), "s2")
    with pytest.raises(PlanError, match="in progress"):
        with_plan(with_plan(view, moves), moves)
