"""`umctl-mesh check`'s verdicts as a table: a healthy reading of a cluster (2 shards of master
and replica, as make_view builds it), then one thing broken at a time, each named by the
check it fails (tools/umctl_mesh/check.py, `evaluate`: readings in, report out)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from core.nodes import MigrationProgress, NodeRecord, NodeStatus
from core.slots import key_slot
from core.view import ClusterConfig, Migration, MigrationState
from tests.unit.test_view import make_view
from tools.umctl_mesh import ops
from tools.umctl_mesh.check import Kind, Options, Reading, evaluate, invalid_view

NOW = 1_000_000.0
S1_KEYS = (b"k2", b"k3", b"k6")  # slots 449, 4576, 325: shard s1 (0-8191)
S2_KEYS = (b"k0", b"k1", b"k4")  # slots 8579, 12706, 8455: shard s2 (8192-16383)
OFFSET = 5000


def healthy():  # noqa: ANN201
    """(view, pool, readings) of a cluster with nothing wrong: node-0 and node-2 master s1
    and s2, node-1 and node-3 their replicas."""
    view = replace(make_view(2, 1), config=ClusterConfig(replicas=1), uid="u1")
    masters = {s.master for s in view.shards}
    nodes = {nid: NodeRecord(nid, a.proxy, a.backend) for nid, a in view.nodes}
    statuses = {nid: NodeStatus(nid, view.cluster, view.uid, view.epoch,
                                "master" if nid in masters else "replica", repl_offset=OFFSET)
                for nid in view.node_ids}
    pool = ops.Pool(nodes, statuses, {}, {view.cluster: ops.ViewAt(view, 1)}, "node-0")
    readings = {}
    for shard, keys in zip(view.shards, (S1_KEYS, S2_KEYS)):
        replica = shard.replicas[0]
        port = view.address_of(replica).backend.rpartition(":")[2]
        readings[shard.master] = Reading(
            shard.master, epoch=view.epoch, keys=keys, scanned_all=True,
            replication={"role": "master", "master_repl_offset": str(OFFSET),
                         "slave0": f"ip=127.0.0.1,port={port},state=online,offset={OFFSET},"
                                   "lag=0"})
        host, _, master_port = view.address_of(shard.master).backend.rpartition(":")
        readings[replica] = Reading(
            replica, epoch=view.epoch,
            replication={"role": "slave", "master_host": host, "master_port": master_port,
                         "master_link_status": "up"})
    return view, pool, readings


def test_a_healthy_cluster_passes_every_check():
    view, pool, readings = healthy()
    report = evaluate(view, pool, readings, Options(), NOW)
    assert report.healthy and report.problems == [] and report.skipped == {}
    assert set(report.passed) == set(Kind) - {Kind.VIEW}
    assert report.lines()[-1] == "healthy"
    assert report.passed[Kind.KEYS] == ("6 keys read on 2 masters (the first 1000 keys of a "
                                        "SCAN of each master's Redis), none in a slot its "
                                        "shard does not own")
    assert report.passed[Kind.REPLICAS] == ("2 replicas linked and synced, at most 0 bytes "
                                            "behind (INFO replication through the masters' "
                                            "proxies)")
    doc = report.doc()
    assert doc["healthy"] is True and doc["problems"] == [] and doc["epoch"] == 1


def status(pool, nid, **changes):  # noqa: ANN001, ANN201
    pool.statuses[nid] = replace(pool.statuses[nid], **changes)


def reading(readings, nid, **changes):  # noqa: ANN001, ANN201
    readings[nid] = replace(readings[nid], **changes)


def info(readings, nid, **fields):  # noqa: ANN001, ANN201
    reading(readings, nid, replication={**readings[nid].replication, **fields})


def unregister(view, pool, readings, nid):  # noqa: ANN001, ANN201
    del pool.nodes[nid]
    readings.pop(nid, None)


def with_migration(view, pool, readings, progress=None, state=MigrationState.MIGRATING):  # noqa: ANN001, ANN201
    m = Migration(((0, 99),), "s1", "s2", 1, state)
    new = replace(view, migrations=(m,))
    pool.views[view.cluster] = ops.ViewAt(new, 2)
    if progress is not None:
        status(pool, "node-0", migrations={m.id: progress})
    return new


# (what breaks, the check that fails, its subject, a phrase of the problem)
BREAKS = [
    ("a node is not registered", lambda v, p, r: unregister(v, p, r, "node-1"),
     Kind.NODES, "node-1 (s1 replica)", "not registered in etcd"),
    ("a node's Redis is down", lambda v, p, r: status(p, "node-3", backend_ok=False),
     Kind.NODES, "node-3 (s2 replica)", "its Redis is down"),
    ("a node is fenced", lambda v, p, r: status(p, "node-2", fenced=True),
     Kind.NODES, "node-2 (s2 master)", "fenced"),
    ("a proxy does not answer", lambda v, p, r: reading(r, "node-2", error="refused"),
     Kind.NODES, "node-2 (s2 master)", "its proxy 127.0.0.1:7002 does not answer: refused"),
    ("no leader", lambda v, p, r: replace(p, leader=None),
     Kind.NODES, "leader", "no leader elected"),
    ("a status behind the view", lambda v, p, r: status(p, "node-1", epoch=0),
     Kind.EPOCHS, "node-1 (s1 replica)", "applied epoch 0; the view is at 1"),
    ("a node of another creation", lambda v, p, r: status(p, "node-1", cluster_uid="old"),
     Kind.EPOCHS, "node-1 (s1 replica)", "serves 'mydb' (another creation of it)"),
    ("a proxy's table behind", lambda v, p, r: reading(r, "node-3", epoch=0),
     Kind.EPOCHS, "node-3 (s2 replica)", "its proxy answers UMCTL GETEPOCH 0"),
    ("a master down", lambda v, p, r: unregister(v, p, r, "node-2"),
     Kind.SLOTS, "s2", "slots 8192-16383 are not served; its master node-2: not registered"),
    ("a replica marked failed", lambda v, p, r: p.views.update(
        mydb=ops.ViewAt(replace(v, failed=("node-1",)), 1)),
     Kind.REPLICAS, "node-1 (s1 replica)", "marked failed by the leader"),
    ("a replica's Redis is a master", lambda v, p, r: status(p, "node-1", role="master"),
     Kind.REPLICAS, "node-1 (s1 replica)", "its Redis is a master"),
    ("a replica not synced", lambda v, p, r: status(p, "node-3", synced=False),
     Kind.REPLICAS, "node-3 (s2 replica)", "has not finished a full sync"),
    ("a replica's link down", lambda v, p, r: info(r, "node-1", master_link_status="down"),
     Kind.REPLICAS, "node-1 (s1 replica)", "link to its master is down"),
    ("a replica following another", lambda v, p, r: info(r, "node-3", master_port="17000"),
     Kind.REPLICAS, "node-3 (s2 replica)", "follows 127.0.0.1:17000, not its master's Redis "
                                           "127.0.0.1:17002"),
    ("a replica unknown to its master", lambda v, p, r: info(r, "node-0", slave0=""),
     Kind.REPLICAS, "node-1 (s1 replica)", "not connected to its master's Redis 127.0.0.1:17000"),
    ("a replica far behind", lambda v, p, r: info(r, "node-2", master_repl_offset=str(
        OFFSET + (1 << 20) + 1)),
     Kind.REPLICAS, "node-3 (s2 replica)", "1048577 bytes behind its master"),
    ("a replica short", lambda v, p, r: p.views.update(
        mydb=ops.ViewAt(replace(v, config=ClusterConfig(replicas=2)), 1)),
     Kind.REPLICAS, "s1", "has 1 of 2 declared replicas"),
    ("a key on the wrong master", lambda v, p, r: reading(r, "node-0", keys=S1_KEYS + (b"k1",)),
     Kind.KEYS, "node-0 (s1 master)", "1 of 4 sampled, e.g. 'k1' (slot 12706, owned by s2)"),
    ("a migration failing", lambda v, p, r: with_migration(
        v, p, r, MigrationProgress(error="MIGRATE: IOERR", started_at=NOW - 5)),
     Kind.MIGRATIONS, "s1>s2@1 (0-99)", "failing: the source reports 'MIGRATE: IOERR'"),
    ("migrations and no leader", lambda v, p, r: (with_migration(v, p, r),
                                                  replace(p, leader=None))[1],
     Kind.MIGRATIONS, "s1>s2@1 (0-99)", "stuck: no leader drives it"),
    ("a migration that moves nothing", lambda v, p, r: with_migration(
        v, p, r, MigrationProgress(total_keys=10, started_at=NOW - 61)),
     Kind.MIGRATIONS, "s1>s2@1 (0-99)", "stuck: no key moved in 61 s"),
    ("a migration whose target is down", lambda v, p, r: [with_migration(v, p, r),
                                                          status(p, "node-2", backend_ok=False)],
     Kind.MIGRATIONS, "s1>s2@1 (0-99)", "stuck; its target s2's master node-2: its Redis is "
                                        "down, the node reports"),
]


@pytest.mark.parametrize("what, breaks, kind, subject, phrase", BREAKS,
                         ids=[b[0] for b in BREAKS])
def test_one_thing_broken_is_named_by_its_check(what, breaks, kind, subject, phrase):
    """`breaks` changes the reading in place, or returns a new pool."""
    view, pool, readings = healthy()
    changed = breaks(view, pool, readings)
    pool = changed if isinstance(changed, ops.Pool) else pool
    view = pool.views[view.cluster].view
    report = evaluate(view, pool, readings, Options(), NOW)
    assert not report.healthy
    mine = [p for p in report.problems if p.kind is kind and p.subject == subject]
    assert mine and phrase in mine[0].text, report.problems
    assert kind not in report.passed
    assert f"[FAIL] {kind.value}: {subject}: " in "\n".join(report.lines())
    assert report.lines()[-1].endswith("found")


def test_keys_of_a_migrating_slot_may_be_on_its_source_and_its_target():
    view, pool, readings = healthy()
    view = with_migration(view, pool, readings, MigrationProgress(moved_keys=1,
                                                                  started_at=NOW - 100))
    reading(readings, "node-2", keys=S2_KEYS + (b"k6",))  # slot 325: s1's, and not moving
    report = evaluate(view, pool, readings, Options(), NOW)
    assert [p.subject for p in report.problems] == ["node-2 (s2 master)"]
    moving = next(k for k in (f"m{i}".encode() for i in range(1000)) if key_slot(k) < 100)
    reading(readings, "node-2", keys=S2_KEYS + (moving,))
    report = evaluate(view, pool, readings, Options(), NOW)
    assert report.healthy, report.problems
    assert report.passed[Kind.MIGRATIONS] == ("1 migration (1 running), none failing or "
                                              "stuck, every source and target serving")


def test_a_pending_migration_with_a_leader_is_no_problem():
    view, pool, readings = healthy()
    view = with_migration(view, pool, readings, state=MigrationState.PENDING)
    assert evaluate(view, pool, readings, Options(), NOW).healthy


def test_without_credentials_the_data_checks_say_what_they_skipped():
    view, pool, readings = healthy()
    for nid in view.node_ids:
        reading(readings, nid, replication=None, keys=None, refused="NOAUTH Authentication "
                                                                    "required.")
    report = evaluate(view, pool, readings, Options(), NOW)
    assert report.healthy  # what could be read is fine
    assert report.lines()[-1] == "healthy as far as checked (see [skip])"
    assert report.passed[Kind.REPLICAS].endswith("(the nodes' replication offsets in etcd, "
                                                 "up to a second old)")
    assert "node-0 (NOAUTH Authentication required.)" in report.skipped[Kind.KEYS]
    assert "the mesh secret" in report.skipped[Kind.KEYS]
    assert "lag from the offsets in etcd" in report.skipped[Kind.REPLICAS]
    assert Kind.KEYS not in report.passed


def test_etcd_alone_still_checks_nodes_epochs_slots_replicas_and_migrations():
    view, pool, _ = healthy()
    report = evaluate(view, pool, {}, Options(proxies=False), NOW)
    assert report.healthy and report.skipped == {Kind.KEYS: "--no-proxies"}
    assert report.passed[Kind.EPOCHS] == "every node applied epoch 1 (its status in etcd)"
    status(pool, "node-2", repl_offset=OFFSET + 2_000_000)  # the master's offset, in etcd
    report = evaluate(view, pool, {}, Options(proxies=False), NOW)
    [problem] = report.problems
    assert problem.text.startswith("2000000 bytes behind its master")


def test_an_invalid_view_is_the_one_problem():
    report = invalid_view("mydb", "migration s1->s9 names unknown shards")
    assert report.lines() == ["[FAIL] view: mydb: the view in etcd is invalid: migration "
                              "s1->s9 names unknown shards", "1 problem found"]


# -- check_cluster over the in-memory store (etcd alone: no proxies to reach) ----------------

@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_an_orphaned_migration_makes_the_view_invalid_and_is_reported():
    from core.view import to_json
    from tests.unit.test_umctl_mesh import mesh_with
    from tools.umctl_mesh.check import check_cluster

    store = await mesh_with()
    view = make_view(2, 1)
    orphan = replace(view, epoch=2, migrations=(Migration(((0, 9),), "s1", "s9", 2),))
    await store.put(store.keys.view("mydb"), to_json(orphan))  # as a broken writer would
    report = await check_cluster(store, "mydb", None, Options(proxies=False))  # type: ignore[arg-type]
    assert [(p.kind, p.subject) for p in report.problems] == [(Kind.VIEW, "mydb")]
    assert "migration s1->s9 names unknown shards" in report.problems[0].text
    with pytest.raises(ops.OpError, match="unknown cluster 'nosuch'"):
        await check_cluster(store, "nosuch", None, Options(proxies=False))  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_node_that_applies_the_view_during_the_grace_is_no_problem():
    import anyio

    from mesh.store.repo import MeshRepo
    from tests.unit.test_umctl_mesh import mesh_with
    from tools.umctl_mesh.check import check_cluster

    view = make_view(2, 1)
    store = await mesh_with(view)
    repo = MeshRepo(store)  # type: ignore[arg-type]
    behind = NodeStatus("node-3", "mydb", view.uid, 0, "replica")
    await repo.put_status(behind, lease=4)
    await repo.put_status(NodeStatus("node-0", "mydb", view.uid, 1, "master"), lease=1)

    async def applies_later() -> None:
        await anyio.sleep(0.5)
        await repo.put_status(replace(behind, epoch=1), lease=4)

    async with anyio.create_task_group() as tg:
        tg.start_soon(applies_later)
        report = await check_cluster(store, "mydb", None, Options(proxies=False))  # type: ignore[arg-type]
    assert Kind.EPOCHS in report.passed, report.problems
    # one that stays behind is named once the grace is over
    await repo.put_status(behind, lease=4)
    report = await check_cluster(store, "mydb", None, Options(proxies=False))  # type: ignore[arg-type]
    assert [p.subject for p in report.problems if p.kind is Kind.EPOCHS] == ["node-3 (s2 replica)"]
