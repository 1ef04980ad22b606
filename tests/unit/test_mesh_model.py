"""The control plane's pure decisions as tables: failure detection (the leader's health
tracker, the checks of a Redis or a proxy), the write fence rule, the next migration step."""
from __future__ import annotations

import pytest

from core.nodes import MigrationProgress, NodeStatus
from core.view import Migration, MigrationState
from mesh.model import migrations as plans
from mesh.model.failover import DEFAULT_GRACE, Health, plan_failover, replaceable
from mesh.model.fencing import FENCE_AFTER, LEASE_GONE_WAIT, NEVER, NO_LEASE, Lease
from mesh.model.health import Checks, HealthTracker, Synced, liveness, track
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
    assert after == {"a": Health(True, 0.0, 20, gone_since=4.0),
                     "gone": Health(False, 4.0, 7, registered=False, gone_since=4.0)}
    assert before["gone"] == Health(True, 0.0, 7)


# (observations: [(now, registered?)], expected gone_since, or None while registered)
GONE = [
    ([(0, True)], None),
    ([(0, True), (5, False)], 5),  # first seen gone at 5
    ([(0, True), (5, False), (9, False)], 5),  # still gone since 5
    ([(0, False)], 0),  # a new leader: gone from its first look
    ([(0, True), (5, False), (6, True), (7, False)], 7),  # a new lease, then gone again
]


@pytest.mark.parametrize("observations,gone_since", GONE)
def test_health_tracker_knows_since_when_a_lease_is_gone(observations, gone_since):
    tracker = HealthTracker()
    for now, holds in observations:
        health = tracker.update({"a": holds}, {}, now, registered=["a"] if holds else [])
    assert (None if health["a"].registered else health["a"].gone_since) == gone_since


# -- when a dead master may be replaced ------------------------------------------------------

T = 100.0


@pytest.mark.parametrize("health,now,ok", [
    (None, T, False),  # never seen
    (Health(True, 0.0), T, False),  # alive
    # registered but its Redis is dead: only once it said it fenced (may_write False)
    (Health(False, T, may_write=True), T + 60, False),
    (Health(False, T, may_write=False), T, True),
    # its lease is gone: LEASE_GONE_WAIT after the leader saw that
    (Health(False, T, registered=False, gone_since=T), T + LEASE_GONE_WAIT - 0.01, False),
    (Health(False, T, registered=False, gone_since=T), T + LEASE_GONE_WAIT, True),
])
def test_replaceable(health, now, ok):
    states = {} if health is None else {"m": health}
    assert replaceable("m", states, now) is ok


def test_the_wait_covers_the_dead_nodes_own_fence():
    # the node's last confirming read was sent before the lease was gone, and its keys stopped
    # FENCE_AFTER later: the leader waits longer than that, with a margin for clock rates
    assert LEASE_GONE_WAIT >= FENCE_AFTER * 1.2


def test_a_new_leader_waits_for_a_lease_it_finds_gone():
    view = make_view(2, 1)  # s1: node-0 (+node-1)
    tracker = HealthTracker()
    everyone = {f"node-{i}": True for i in range(4)}
    dead_master = {**everyone, "node-0": False}
    holding = [n for n in everyone if n != "node-0"]
    health = tracker.update(dead_master, {}, 100.0, registered=holding)
    assert plan_failover(view, health, 100.0, []) is None
    later = 100.0 + LEASE_GONE_WAIT - 0.1
    health = tracker.update(dead_master, {}, later, registered=holding)
    assert plan_failover(view, health, later, []) is None
    later = 100.0 + LEASE_GONE_WAIT
    health = tracker.update(dead_master, {}, later, registered=holding)
    step = plan_failover(view, health, later, [])
    assert step is not None and step.view.shards[0].master == "node-1"


def test_a_master_that_comes_back_is_not_replaced():
    view = make_view(2, 1)
    tracker = HealthTracker()
    everyone = {f"node-{i}": True for i in range(4)}
    holding = [n for n in everyone if n != "node-0"]
    tracker.update(everyone, {}, 0.0)
    tracker.update({**everyone, "node-0": False}, {}, 10.0, registered=holding)
    health = tracker.update(everyone, {}, 11.0)  # a new lease: registered and alive again
    assert plan_failover(view, health, 11.0 + 60, []) is None


def test_a_replica_is_marked_failed_after_the_grace():
    view = make_view(2, 1)  # s1: node-0 + node-1
    tracker = HealthTracker()
    everyone = {f"node-{i}": True for i in range(4)}
    holding = [n for n in everyone if n != "node-1"]
    tracker.update(everyone, {}, 0.0)
    health = tracker.update({**everyone, "node-1": False}, {}, 10.0, registered=holding)
    assert plan_failover(view, health, 10.0 + DEFAULT_GRACE - 0.1, []) is None
    step = plan_failover(view, health, 10.0 + DEFAULT_GRACE, [])
    assert step is not None and "node-1" in step.view.failed


# -- the checks of a process (a node's Redis, a node's proxy) ----------------------------------

STALL, REFUSED = 3.0, 0.15


@pytest.mark.parametrize("checks,now,dead", [
    ([], 0.0, False),
    ([(0.0, False, False)], 0.1, False),  # one timeout
    ([(0.0, False, False), (2.0, False, False)], 2.9, False),
    ([(0.0, False, False), (2.0, False, False)], 3.0, True),  # stalled for STALL
    ([(0.0, False, False), (2.0, True, False)], 3.0, False),  # one success starts over
    ([(0.0, False, True)], 0.0, False),  # refused once: not yet
    ([(0.0, False, True), (0.1, False, True)], 0.15, True),  # refused for REFUSED
    ([(0.0, False, False), (0.1, False, True)], 0.15, True),  # broke, then refused
    ([(0.0, False, True), (0.1, False, False)], 0.2, True),  # refused, then -LOADING: still
    ([(0.0, False, True), (0.1, False, False), (0.2, True, False)], 0.3, False),  # then passed
])
def test_checks(checks, now, dead):
    state = Checks()
    for at, ok, refused in checks:
        state = state.record(ok, at, refused)
    assert state.dead(now, STALL, REFUSED) is dead


def test_a_refused_backend_is_dead_at_once():
    assert Checks().record(False, 5.0, refused=True).dead(5.0, STALL)


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

@pytest.mark.parametrize("lease,until", [
    (Lease(100.0), 100.0 + FENCE_AFTER),  # FENCE_AFTER past the last keepalive's sending
    (Lease(100.0, expired=True), NEVER),  # etcd said it is gone (expired or revoked)
    (NO_LEASE, NEVER),
])
def test_writes_until(lease, until):
    assert lease.writes_until == until


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

