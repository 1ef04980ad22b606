"""The pure parts of a graceful failover (mesh/model/changes.py) and of a clean leave."""
from __future__ import annotations

from dataclasses import replace

import pytest

from mesh.model.changes import ChangeError, handed_over, handover_target, without_departed
from tests.unit.test_view import make_view


def test_the_target_is_the_live_replica_with_the_highest_offset_or_the_one_asked_for():
    view = make_view(1, 3)  # s1: node-0, replicas node-1..3
    registered = {"node-0", "node-1", "node-2", "node-3"}
    offsets = {"node-1": 5, "node-2": 9, "node-3": 9}
    assert handover_target(view, "s1", registered, offsets) == "node-2"  # ties: the first
    assert handover_target(view, "s1", registered, offsets, "node-1") == "node-1"
    failed = replace(view, failed=("node-2",))
    assert handover_target(failed, "s1", registered, offsets) == "node-3"
    assert handover_target(view, "s1", registered - {"node-2", "node-3"}, offsets) == "node-1"


@pytest.mark.parametrize(("shard", "registered", "to", "message"), [
    ("s9", {"node-1"}, None, "has no shard 's9'"),
    ("s1", set(), None, "no live replica"),
    ("s1", {"node-1"}, "node-0", "'node-0' is not a live replica of s1 (live: node-1)"),
])
def test_no_target_is_a_one_line_error(shard, registered, to, message):
    with pytest.raises(ChangeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        handover_target(make_view(1, 1), shard, registered, {}, to)


def test_the_swap_is_written_only_onto_the_shard_as_it_was():
    view = make_view(2, 2)  # s1: node-0 (+1, +2)
    new = handed_over(view, "s1", "node-0", "node-2")
    assert new is not None and new.epoch == view.epoch + 1
    assert (new.shards[0].master, new.shards[0].replicas) == ("node-2", ("node-1", "node-0"))
    assert new.shards[1] == view.shards[1]
    assert handed_over(new, "s1", "node-0", "node-2") is None  # already recorded
    # the view moved on meanwhile (the leader failed the shard over, or dropped the target)
    with pytest.raises(ChangeError):
        handed_over(handed_over(view, "s1", "node-0", "node-1"), "s1", "node-0", "node-2")
    dropped = replace(view, shards=(replace(view.shards[0], replicas=("node-1",)),
                                    view.shards[1]))
    with pytest.raises(ChangeError):
        handed_over(dropped, "s1", "node-0", "node-2")
    with pytest.raises(ChangeError):
        handed_over(replace(view, failed=("node-2",)), "s1", "node-0", "node-2")


def test_a_leaving_master_never_hands_its_shard_to_a_failed_replica():
    view = replace(make_view(1, 2), failed=("node-2",))  # node-2 has the higher offset
    new = without_departed(view, {"node-0"}, {"node-1": 1, "node-2": 99})
    assert new is not None and new.shards[0].master == "node-1"
    assert without_departed(replace(make_view(1, 1), failed=("node-1",)), {"node-0"}, {}) is None


def test_a_failed_replica_that_leaves_is_no_longer_listed_failed():
    view = replace(make_view(1, 2), failed=("node-2",))
    new = without_departed(view, {"node-2"}, {})
    assert new is not None and new.failed == () and "node-2" not in new.node_ids
