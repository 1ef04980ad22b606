"""The control plane's pure decisions as tables: failure detection (the leader's health
tracker, the agent's backend misses), the write fence rule, the next migration step."""
from __future__ import annotations

import pytest

from core.nodes import MigrationProgress, NodeStatus
from core.view import Migration, MigrationState
from mesh.model import migrations as plans
from mesh.model.failover import DEFAULT_GRACE, Health, plan_failover
from mesh.model.fencing import (
    FENCE_HARD,
    FENCE_MARGIN,
    NEVER,
    NO_LEADER_GRACE,
    NO_LEASE,
    Lease,
    MemberPoll,
    writes_until,
)
from mesh.model.health import HealthTracker, Misses, Synced, liveness, track
from tests.unit.test_view import make_view

# -- liveness --------------------------------------------------------------------------------


@pytest.mark.parametrize("registered,status,alive", [
    (True, NodeStatus("n"), True),
    (False, NodeStatus("n"), False),  # its lease expired
    (True, None, False),  # registered but never reported
    (True, NodeStatus("n", backend_ok=False), False),  # its Redis does not answer
    (True, NodeStatus("n", leaving=True), False),  # shutting down cleanly
])
def test_liveness(registered, status, alive):
    statuses = {"n": status} if status is not None else {}
    assert liveness(["n"], ["n"] if registered else [], statuses) == {"n": alive}


def test_liveness_judges_members_and_registered_nodes():
    got = liveness(["member"], ["free"], {"free": NodeStatus("free")})
    assert got == {"member": False, "free": True}


# -- the leader's health tracker -------------------------------------------------------------

# (observations: [(now, {node: alive})], expected {node: (alive, since)})
TRACKS = [
    ([(0, {"a": True})], {"a": (True, 0)}),
    ([(0, {"a": True}), (5, {"a": True})], {"a": (True, 0)}),  # still alive since 0
    ([(0, {"a": True}), (5, {"a": False})], {"a": (False, 5)}),  # died at 5
    ([(0, {"a": True}), (5, {"a": False}), (7, {"a": False})], {"a": (False, 5)}),
    ([(0, {"a": False}), (5, {"a": True})], {"a": (True, 5)}),  # came back at 5
    ([(0, {"a": True}), (5, {})], {"a": (False, 5)}),  # no longer seen: dead since then
    ([(0, {"a": False}), (5, {})], {"a": (False, 0)}),  # dead all along
    ([(0, {"a": True}), (3, {"b": True})], {"a": (False, 3), "b": (True, 3)}),
]


@pytest.mark.parametrize("observations,expected", TRACKS)
def test_health_tracker(observations, expected):
    tracker = HealthTracker()
    for now, alive in observations:
        state = tracker.update(alive, {}, now)
    assert {n: (h.alive, h.since) for n, h in state.items()} == expected


def test_track_keeps_offsets_and_does_not_touch_the_previous_state():
    before = {"a": Health(True, 0.0, 10), "gone": Health(True, 0.0, 7)}
    after = track(before, {"a": True}, {"a": 20}, 4.0)
    assert after == {"a": Health(True, 0.0, 20), "gone": Health(False, 4.0, 7)}
    assert before["gone"] == Health(True, 0.0, 7)


def test_a_new_leader_waits_a_whole_grace_before_failing_over():
    view = make_view(2, 1)  # s1: node-0 (+node-1)
    tracker = HealthTracker()
    everyone = {f"node-{i}": True for i in range(4)}
    dead_master = {**everyone, "node-0": False}
    health = tracker.update(dead_master, {}, 100.0)  # first observation: dead "since now"
    assert plan_failover(view, health, 100.0, []) is None
    health = tracker.update(dead_master, {}, 100.0 + DEFAULT_GRACE - 0.1)
    assert plan_failover(view, health, 100.0 + DEFAULT_GRACE - 0.1, []) is None
    health = tracker.update(dead_master, {}, 100.0 + DEFAULT_GRACE)
    step = plan_failover(view, health, 100.0 + DEFAULT_GRACE, [])
    assert step is not None and step.view.shards[0].master == "node-1"


def test_a_blip_starts_the_grace_over():
    view = make_view(2, 1)
    tracker = HealthTracker()
    everyone = {f"node-{i}": True for i in range(4)}
    tracker.update(everyone, {}, 0.0)
    tracker.update({**everyone, "node-0": False}, {}, 10.0)
    tracker.update(everyone, {}, 11.0)
    health = tracker.update({**everyone, "node-0": False}, {}, 12.0)
    assert plan_failover(view, health, 12.0 + DEFAULT_GRACE - 0.5, []) is None


# -- the agent's backend misses --------------------------------------------------------------

@pytest.mark.parametrize("checks,healthy", [
    ([], True),
    ([False], True),
    ([False, False], True),
    ([False, False, False], False),
    ([False, False, False, True], True),  # one success starts over
    ([False, False, True, False, False], True),
    ([False] * 10, False),
])
def test_backend_misses(checks, healthy):
    misses = Misses()
    for ok in checks:
        misses = misses.record(ok)
    assert misses.healthy(3) is healthy


# -- whether a replica holds its master's data -------------------------------------------------

@pytest.mark.parametrize("seen,synced", [
    ([(None, False)], True),  # a master holds its own data
    ([("m:1", False)], False),  # the first sync is still running
    ([("m:1", False), ("m:1", True)], True),
    ([("m:1", True), ("m:1", False)], True),  # the link dropped after a sync: still a copy
    ([("m:1", True), ("m:2", False)], False),  # a new master: not synced with it yet
    ([("m:1", True), (None, False), ("m:1", False)], False),  # promoted, then a replica again
])
def test_synced(seen, synced):
    state = Synced(synced=False)
    for master, link_up in seen:
        state = state.seen(master, link_up)
    assert state.synced is synced


# -- the fence rule --------------------------------------------------------------------------

DEADLINE = 100.0
ASKED = DEADLINE + 3  # the members were asked well past the lease deadline


@pytest.mark.parametrize("lease,poll,until", [
    # the lease alone: writes until just before etcd may expire it
    (Lease(DEADLINE), None, DEADLINE - FENCE_HARD),
    (Lease(DEADLINE), MemberPoll(ASKED, 3, 1), DEADLINE - FENCE_HARD),  # a minority
    (Lease(DEADLINE), MemberPoll(ASKED, 4, 2), DEADLINE - FENCE_HARD),  # half
    # a majority of etcd's members has no leader: a grace from when they were asked
    (Lease(DEADLINE), MemberPoll(ASKED, 3, 2), ASKED + NO_LEADER_GRACE),
    (Lease(DEADLINE), MemberPoll(ASKED, 5, 3), ASKED + NO_LEADER_GRACE),
    # ... which never shortens the lease's own deadline
    (Lease(DEADLINE), MemberPoll(DEADLINE - 5, 3, 3), DEADLINE - FENCE_HARD),
    # etcd said the lease is gone, or there never was one: nothing to extend
    (Lease(DEADLINE, expired=True), MemberPoll(ASKED, 3, 3), NEVER),
    (NO_LEASE, MemberPoll(ASKED, 3, 3), NEVER),
])
def test_writes_until(lease, poll, until):
    assert writes_until(lease, poll) == until


@pytest.mark.parametrize("now,at_risk", [
    (DEADLINE - FENCE_MARGIN - 0.01, False),
    (DEADLINE - FENCE_MARGIN, True),  # close to the deadline: ask etcd's members
    (DEADLINE + 1, True),
])
def test_lease_at_risk(now, at_risk):
    assert Lease(DEADLINE).at_risk(now) is at_risk
    assert Lease(DEADLINE, expired=True).at_risk(now) and NO_LEASE.at_risk(now)


# -- the next migration step -----------------------------------------------------------------

def migrating_view():
    """s1 -> s2 running, s1 -> s3 pending (s1 is busy)."""
    view = make_view(3, 0)  # masters node-0, node-1, node-2
    planned = plans.with_plan(view, [
        Migration(((5000, 5100),), "s1", "s2", 2, MigrationState.PENDING),
        Migration(((5200, 5300),), "s1", "s3", 2, MigrationState.PENDING)])
    started = plans.start_next(planned)
    assert [m.state for m in started.migrations] == [MigrationState.MIGRATING,
                                                      MigrationState.PENDING]
    return started


def status(node, cluster="mydb", uid=None, **progress):
    return NodeStatus(node, cluster=cluster, cluster_uid=make_view(2, 0).uid if uid is None
                      else uid, migrations={mid: MigrationProgress(**p)
                                            for mid, p in progress.items()})


def test_nothing_to_do_without_migrations():
    assert plans.next_step(make_view(2, 0), {}) is None


def test_pending_migrations_start():
    view = plans.with_plan(make_view(2, 0), [
        Migration(((0, 10),), "s1", "s2", 2, MigrationState.PENDING)])
    step = plans.next_step(view, {})
    assert step.what == "start" and step.left == ()
    assert step.view.migrations[0].state is MigrationState.MIGRATING


@pytest.mark.parametrize("reported,commits", [
    ({}, False),  # no status from the source
    ({"node-0": "not done"}, False),
    ({"node-0": "done"}, True),
    ({"node-0": "done elsewhere"}, False),  # a status of another cluster does not count
    ({"node-0": "done before"}, False),  # nor one of an earlier cluster of the same name
    ({"node-1": "done"}, False),  # the target's word does not count
])
def test_a_running_migration_commits_when_its_source_reports_every_key_moved(reported, commits):
    view = migrating_view()
    running = view.migrations[0]
    statuses = {}
    for node, what in reported.items():
        statuses[node] = status(node, cluster="other" if what == "done elsewhere" else "mydb",
                                uid="an-earlier-one" if what == "done before" else None,
                                **{running.id: {"done": what != "not done", "moved_keys": 9}})
    step = plans.next_step(view, statuses)
    if commits:
        assert step.what == f"commit {running.id}"
        assert (5000, 5100) in step.view.shards[1].slots
        assert [m.id for m in step.view.migrations] == [view.migrations[1].id]
    else:
        assert step is None  # nothing else can start while s1 is busy


def test_a_scale_in_commit_reports_the_nodes_that_left():
    view = make_view(2, 1)  # s2: node-2 (+node-3)
    view = plans.start_next(plans.with_plan(view, plans.plan(view, ["s1"])))
    m = view.migrations[0]
    step = plans.next_step(view, {"node-2": status("node-2", **{m.id: {"done": True}})})
    assert step.left == ("node-2", "node-3") and [s.id for s in step.view.shards] == ["s1"]


def test_progress_defaults_for_an_unreported_migration():
    assert NodeStatus("n").progress("s1>s2@3") == MigrationProgress()
    assert MigrationProgress().left_keys is None and not MigrationProgress().done
