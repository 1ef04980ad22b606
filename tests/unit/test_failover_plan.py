from __future__ import annotations

from dataclasses import replace

from core.slots import slot_count
from core.view import REASSIGN_AFTER, ClusterConfig, NodeAddress
from mesh.model.failover import Health, plan_failover
from tests.unit.test_view import make_view

NOW = 100.0
LONG_AGO = NOW - REASSIGN_AFTER - 1  # dead long enough to give slots away


def health(dead: dict[str, float] = {}, offsets: dict[str, int] = {}, nodes=8):  # noqa: B006
    """Everyone alive since long ago, except `dead` (node -> when its lease was gone)."""
    return {f"node-{i}": Health(f"node-{i}" not in dead, dead.get(f"node-{i}", 0.0),
                                offsets.get(f"node-{i}", 0), registered=f"node-{i}" not in dead,
                                gone_since=dead.get(f"node-{i}", 0.0)) for i in range(nodes)}


def test_everyone_alive_means_nothing_to_do():
    assert plan_failover(make_view(2, 1), health(), NOW, []) is None


def test_a_lease_gone_for_less_than_the_wait_is_not_acted_on():
    assert plan_failover(make_view(2, 1), health({"node-0": NOW - 1}), NOW, []) is None


def test_dead_master_hands_over_to_the_most_up_to_date_replica():
    view = make_view(2, 2)  # s1: node-0 (+1, +2)
    step = plan_failover(view, health({"node-0": NOW - 5}, {"node-1": 10, "node-2": 30}), NOW, [])
    s1 = step.view.shards[0]
    assert (s1.master, s1.replicas) == ("node-2", ("node-1", "node-0"))
    assert step.view.failed == ("node-0",) and step.view.epoch == view.epoch + 1


def test_failed_master_coming_back_stays_a_replica_and_is_no_longer_failed():
    view = make_view(2, 1)
    step = plan_failover(view, health({"node-0": NOW - 5}), NOW, [])
    back = plan_failover(step.view, health(), NOW + 10, [])
    assert back.view.failed == () and back.view.shards[0].master == "node-1"
    assert "node-0" in back.view.shards[0].replicas


def test_dead_replica_is_marked_failed():
    step = plan_failover(make_view(2, 1), health({"node-3": NOW - 5}), NOW, [])
    assert step.view.failed == ("node-3",) and step.view.shards[1].master == "node-2"


def test_shard_without_live_node_gets_a_free_node_and_the_loss_is_reported():
    view = make_view(2, 0)
    free = [("spare", NodeAddress("127.0.0.1:9000", "127.0.0.1:19000"))]
    step = plan_failover(view, health({"node-0": LONG_AGO}), NOW, free)
    assert step.view.shards[0].master == "spare" and step.claimed == ("spare",)
    assert step.released == ("node-0",) and "lost" in step.view.lost[-1]


def test_with_no_free_node_the_slots_go_to_the_live_shards():
    view = make_view(3, 0)
    step = plan_failover(view, health({"node-1": LONG_AGO}), NOW, [])
    assert [s.id for s in step.view.shards] == ["s1", "s3"]
    assert sum(slot_count(s.slots) for s in step.view.shards) == 16384
    assert "node-1" not in step.view.node_ids and step.view.lost


def test_manual_failover_config_forbids_reassignment():
    view = replace(make_view(2, 0), config=ClusterConfig(failover="manual"))
    assert plan_failover(view, health({"node-0": LONG_AGO}), NOW, []) is None


def test_a_dead_master_that_may_still_write_is_not_replaced():
    """Its Redis fails checks but its lease holds and it has not said it fenced: promoting
    now would leave two masters taking writes (a stalled Redis runs queued writes later)."""
    view = make_view(2, 1)
    state = health({"node-0": NOW - 5})
    state["node-0"] = replace(state["node-0"], may_write=True, registered=True)
    assert plan_failover(view, state, NOW, []) is None
    state["node-0"] = replace(state["node-0"], may_write=False)  # it fenced, or its lease is gone
    step = plan_failover(view, state, NOW, [])
    assert step.view.shards[0].master == "node-1" and step.replaced == "node-0"


def test_a_reassigned_target_reports_the_keys_that_had_moved_into_it_as_lost():
    from core.view import Migration, MigrationState

    view = make_view(2, 0)
    view = view.next(migrations=(Migration(((0, 99),), "s1", "s2", view.epoch + 1,
                                           MigrationState.MIGRATING),))
    free = [("spare", NodeAddress("127.0.0.1:9000", "127.0.0.1:19000"))]
    step = plan_failover(view, health({"node-1": LONG_AGO}), NOW, free)
    assert step.replaced == "node-1" and "slots 0-99" in step.view.lost[-1]


def test_a_replica_that_never_finished_its_sync_is_not_promoted():
    view = make_view(2, 1)
    state = health({"node-0": NOW - 5})
    state["node-1"] = replace(state["node-1"], synced=False)
    assert plan_failover(view, state, NOW, []) is None  # the shard waits for its master
    state["node-1"] = replace(state["node-1"], synced=True)
    assert plan_failover(view, state, NOW, []).view.shards[0].master == "node-1"


def test_a_shard_dead_for_a_short_while_keeps_its_slots():
    """A partition of a few seconds must not cost a shard its data: the slots are given
    away EMPTY only after reassign_after, and never in synchronous mode."""
    view = make_view(2, 0)
    free = [("spare", NodeAddress("127.0.0.1:9000", "127.0.0.1:19000"))]
    assert plan_failover(view, health({"node-0": NOW - 5}), NOW, free) is None
    assert plan_failover(view, health({"node-0": LONG_AGO}), NOW, free) is not None
    sync = replace(view, config=ClusterConfig(min_replicas_ack=1))
    assert plan_failover(sync, health({"node-0": LONG_AGO}), NOW, free) is None
