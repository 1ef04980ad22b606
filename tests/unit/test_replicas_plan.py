"""mesh/model/replicas.py as tables: a view (2 shards; s1 = node-0 + node-1, s2 = node-2 +
node-3 with one replica each), who is dead since when, who is a synced replica, the free
pool; the shards after, and what was claimed and released."""
from __future__ import annotations

from dataclasses import replace

import pytest

from core.nodes import NodeRecord, NodeStatus
from core.view import ClusterConfig, Migration, NodeAddress
from mesh.model.failover import Health
from mesh.model.replicas import FreeNode, Seen, free_nodes, observe, plan_replicas
from tests.unit.test_view import make_view

NOW = 1000.0
WAIT = 60  # the cluster's reassign_after


def view_of(replicas: int = 1, declared: int = 1, failed: tuple[str, ...] = ()):
    view = make_view(2, replicas)
    return replace(view, config=ClusterConfig(replicas=declared, reassign_after=WAIT),
                   failed=failed)


def replacing():
    """s1's replica node-1 failed, and free node-4 joined s1 to replace it."""
    view = view_of(failed=("node-1",))
    s1 = replace(view.shards[0], replicas=("node-1", "node-4"))
    return replace(view, shards=(s1, view.shards[1]), nodes=tuple(sorted(
        view.nodes + (("node-4", NodeAddress("127.0.0.1:7100", "127.0.0.1:17100")),))))


def seen(view, dead: dict[str, float] = {}, unsynced: tuple[str, ...] = (),  # noqa: B006
         hosts: dict[str, str] = {}) -> dict[str, Seen]:  # noqa: B006
    """Every member alive since long ago and, if a replica, synced; `dead`: node -> since."""
    replicas = {r for s in view.shards for r in s.replicas}
    return {n: Seen(n not in dead, dead.get(n, 0.0),
                    n in replicas and n not in dead and n not in unsynced,
                    hosts.get(n, "h-" + n)) for n in view.node_ids}


def free(*ids: str, hosts: dict[str, str] = {}) -> list[FreeNode]:  # noqa: B006
    return [FreeNode(i, NodeAddress(f"127.0.0.1:{9000 + n}", f"127.0.0.1:{19000 + n}"),
                     hosts.get(i, "h-" + i)) for n, i in enumerate(ids)]


def shape(step) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {s.id: (s.master, s.replicas) for s in step.view.shards}


# (name, view, dead, unsynced, free ids, shards after (None: no step), claimed, released)
CASES = [
    ("all there: nothing", view_of(), {}, (), ["f1"], None, (), ()),
    ("a replica restarting (failed, dead 5 s) is not replaced",
     view_of(failed=("node-1",)), {"node-1": NOW - 5}, (), ["f1"], None, (), ()),
    ("a replica dead longer than reassign_after gets a free node first",
     view_of(failed=("node-1",)), {"node-1": NOW - WAIT - 1}, (), ["f1"],
     {"s1": ("node-0", ("node-1", "f1")), "s2": ("node-2", ("node-3",))}, ("f1",), ()),
    ("... and leaves once the replacement is synced",
     replacing(),
     {"node-1": NOW - WAIT - 1}, (), [],
     {"s1": ("node-0", ("node-4",)), "s2": ("node-2", ("node-3",))}, (), ("node-1",)),
    ("... but stays while the replacement is still syncing",
     replacing(),
     {"node-1": NOW - WAIT - 1}, ("node-4",), [], None, (), ()),
    ("a long-dead replica with no free node to replace it stays",
     view_of(failed=("node-1",)), {"node-1": NOW - WAIT - 1}, (), [], None, (), ()),
    ("a shard whose master is dead waits for failover",
     view_of(0, 1), {"node-0": NOW - 100}, (), ["f1", "f2"],
     {"s1": ("node-0", ()), "s2": ("node-1", ("f1",))}, ("f1",), ()),
    ("more declared: each shard takes a free node",
     view_of(1, 2), {}, (), ["f1", "f2", "f3"],
     {"s1": ("node-0", ("node-1", "f1")), "s2": ("node-2", ("node-3", "f2"))}, ("f1", "f2"), ()),
    ("not enough free nodes: as many as there are",
     view_of(0, 1), {}, (), ["f1"],
     {"s1": ("node-0", ("f1",)), "s2": ("node-1", ())}, ("f1",), ()),
    ("fewer declared: the surplus leaves, the newest first",
     view_of(2, 1), {}, (), [],
     {"s1": ("node-0", ("node-1",)), "s2": ("node-3", ("node-4",))}, (), ("node-2", "node-5")),
    ("fewer declared: a failed replica leaves first, then an unsynced one",
     replace(view_of(2, 1), failed=("node-1",)), {"node-1": NOW - 3}, ("node-4",), [],
     {"s1": ("node-0", ("node-2",)), "s2": ("node-3", ("node-5",))}, (), ("node-1", "node-4")),
    ("zero declared: every replica leaves",
     view_of(1, 0), {}, (), ["f1"],
     {"s1": ("node-0", ()), "s2": ("node-2", ())}, (), ("node-1", "node-3")),
]


@pytest.mark.parametrize("name,view,dead,unsynced,pool,after,claimed,released", CASES,
                         ids=[c[0] for c in CASES])
def test_plan(name, view, dead, unsynced, pool, after, claimed, released):
    step = plan_replicas(view, seen(view, dead, unsynced), free(*pool), NOW)
    if after is None:
        assert step is None
        return
    assert step is not None
    assert shape(step) == after
    assert (step.claimed, step.released) == (claimed, released)
    assert step.view.epoch == view.epoch + 1
    assert set(step.view.node_ids) == {m for s in step.view.shards for m in s.members}
    assert set(step.view.failed) <= set(step.view.node_ids)


def test_a_free_node_on_another_host_is_preferred():
    view = view_of(0, 1)
    hosts = {"node-0": "a", "node-1": "b"}
    step = plan_replicas(view, seen(view, hosts=hosts),
                         free("f1", "f2", "f3", hosts={"f1": "a", "f2": "b", "f3": "c"}), NOW)
    assert shape(step) == {"s1": ("node-0", ("f2",)), "s2": ("node-1", ("f1",))}


def test_a_shard_migrating_all_its_slots_away_gets_no_replica():
    view = view_of(0, 1)
    s1 = view.shards[0]
    view = replace(view, migrations=(Migration(s1.slots, "s1", "s2", 1),))
    step = plan_replicas(view, seen(view), free("f1", "f2"), NOW)
    assert shape(step) == {"s1": ("node-0", ()), "s2": ("node-1", ("f1",))}


def test_a_dead_replica_is_replaced_only_after_the_wait_then_removed_after_its_sync():
    """The whole life: a dead replica, a replacement, its sync, the dead one out."""
    view = view_of(failed=("node-1",))
    dead = {"node-1": NOW}
    assert plan_replicas(view, seen(view, dead), free("f1"), NOW + WAIT - 1) is None
    step = plan_replicas(view, seen(view, dead), free("f1"), NOW + WAIT)
    assert step is not None and step.claimed == ("f1",)
    grown = step.view
    assert plan_replicas(grown, seen(grown, dead, ("f1",)), [], NOW + WAIT + 1) is None
    done = plan_replicas(grown, seen(grown, dead), [], NOW + WAIT + 2)
    assert done is not None and shape(done)["s1"] == ("node-0", ("f1",))
    assert done.view.failed == () and "node-1" not in done.view.node_ids
    assert plan_replicas(done.view, seen(done.view), [], NOW + WAIT + 3) is None


def test_observe_and_free_nodes_from_records():
    view = view_of()
    records = {n: NodeRecord(n, a.proxy, a.backend, host="x" if n == "node-1" else "")
               for n, a in view.nodes if n != "node-3"}
    records["spare"] = NodeRecord("spare", "127.0.0.1:9999", "127.0.0.1:19999")
    statuses = {"node-1": NodeStatus("node-1", view.cluster, view.uid, 1, role="replica"),
                "node-3": NodeStatus("node-3", view.cluster, view.uid, 1, role="replica")}
    health = {n: Health(n != "node-3", 5.0) for n in view.node_ids}
    got = observe(view, health, records, statuses)
    assert got["node-1"] == Seen(True, 5.0, True, "x")
    assert got["node-3"] == Seen(False, 5.0, False, "127.0.0.1")  # unregistered: not in sync
    assert got["node-0"].in_sync is False  # no status: a master here anyway
    alive = {n: True for n in records}
    assert [f.node_id for f in free_nodes(records, view.node_ids, alive)] == ["spare"]
    assert free_nodes(records, view.node_ids, {**alive, "spare": False}) == []


def test_a_view_from_before_declared_counts_declares_what_its_shards_have():
    import json

    from core.view import from_json, to_json

    view = view_of(2, 2)
    doc = json.loads(to_json(view))
    assert doc["config"]["replicas"] == 2
    del doc["config"]["replicas"]
    doc["shards"][1]["replicas"] = doc["shards"][1]["replicas"][:1]  # one lost to a restart
    doc["nodes"] = {n: a for n, a in doc["nodes"].items() if n != "node-5"}
    assert from_json(json.dumps(doc)).config.replicas == 2
    assert from_json(to_json(view)) == view
