"""Restarts keep the cluster whole: a SIGTERMed node stays a member and returns to its place
when it starts again with the same identity; the leader keeps each cluster's declared
replica count from free nodes; `cluster scale --replicas` changes it. Real processes."""
from __future__ import annotations

import threading
import time

import pytest
from redis.cluster import RedisCluster

from tests.integration.test_failover import make_cluster, master_of, wait_replication
from tests.procs import command, wait_for

EXIT_TIMEOUT = 40.0  # a stopping master hands over first (mesh/agent.py bounds it)
BACK_TIMEOUT = 60.0  # a restarted node: registered, out of `failed`, resynced
REASSIGN_AFTER = 4  # seconds: the short wait of the replacement test
LOAD_KEYS = 500  # keys the rolling-restart load SETs with increasing values
LOAD_COUNTERS = 50  # counters it INCRs
LOAD_PAUSE = 0.001  # between two writes: the load must not starve the restarts of CPU


def show(mesh) -> dict:  # noqa: ANN001
    return mesh.umctl("--json", "cluster", "show", "fo")


def members(shown: dict) -> dict[str, tuple[str, str, bool]]:
    """node -> (shard, role, failed)."""
    return {n["node"]: (s["id"], n["role"], n["failed"]) for s in shown["shards"]
            for n in s["nodes"]}


def restart(mesh, node: str) -> None:  # noqa: ANN001
    """SIGTERM the node's proxy (its Redis keeps running), wait for it to exit, start it
    again: same node id, same ports, same Redis."""
    proxy = mesh.proxies[node]
    proxy.terminate()
    proxy.popen.wait(EXIT_TIMEOUT)
    assert proxy.popen.returncode == 0
    proxy.start()


def back_in_place(mesh, node: str, shard: str) -> dict:  # noqa: ANN001
    """Wait until `node` is a live, synced member of `shard` again (not failed); returns the
    view then."""
    def ready():  # noqa: ANN202
        shown = show(mesh)
        place = members(shown).get(node)
        if place is None or place[0] != shard or place[2]:
            return None
        health = {n["node"]: n["health"] for n in mesh.umctl("--json", "nodes")}
        return shown if health.get(node) == "ok" else None

    shown = wait_for(ready, BACK_TIMEOUT, f"{node} back in {shard}")
    if members(shown)[node][1] == "replica":
        wait_replication(mesh, node)
    return shown


def test_a_restarted_master_returns_as_a_replica_of_its_shard_and_no_free_node_is_taken(
        mesh_factory):
    mesh, created = make_cluster(mesh_factory, 1, 1, 1)
    old = master_of(created, "s1")
    replica = next(n for n, (_, role, _) in members(created).items() if role == "replica")
    spare = next(n for n in mesh.proxies if n not in members(created))
    wait_replication(mesh, replica)
    assert command(mesh.proxies[old].port, "SET", "k", "before") == b"+OK\r\n"
    proxy = mesh.proxies[old]
    proxy.terminate()
    proxy.popen.wait(EXIT_TIMEOUT)
    assert proxy.popen.returncode == 0
    # gone, but still a member: a (failed) replica, its place kept by the promoted replica
    shown = wait_for(lambda: (lambda v: v if members(v)[old][2] else None)(show(mesh)),
                     what="the stopped node marked failed")
    assert master_of(shown, "s1") == replica and members(shown)[old] == ("s1", "replica", True)
    assert command(mesh.proxies[replica].port, "SET", "k", "during") == b"+OK\r\n"
    proxy.start()
    shown = back_in_place(mesh, old, "s1")
    assert members(shown) == {replica: ("s1", "master", False), old: ("s1", "replica", False)}
    assert shown["failed"] == [] and shown["replicas_declared"] == 1
    wait_for(lambda: show(mesh)["shards"][0]["replicas_live"] == 1,
             what="the returned replica counted live (synced, the newest view applied)")
    wait_for(lambda: command(mesh.redis[old].port, "GET", "k") == b"$6\r\nduring\r\n",
             what="the returned node to hold what was written while it was away")
    free = {n["node"] for n in mesh.umctl("--json", "nodes") if n["role"] == "free"}
    assert free == {spare}


def test_a_killed_replica_that_stays_dead_is_replaced_after_reassign_after(mesh_factory):
    mesh, created = make_cluster(mesh_factory, 1, 1, 1, "--reassign-after", str(REASSIGN_AFTER))
    master = master_of(created, "s1")
    dead = next(n for n, (_, role, _) in members(created).items() if role == "replica")
    spare = next(n for n in mesh.proxies if n not in members(created))
    wait_replication(mesh, dead)
    rc = RedisCluster(host="127.0.0.1", port=mesh.proxies[master].port)
    for i in range(200):
        rc.set(f"r:{i}", i)
    mesh.proxies[dead].kill()
    mesh.redis[dead].kill()
    killed = time.monotonic()
    joined = wait_for(lambda: time.monotonic() if spare in members(show(mesh)) else None,
                      30, "the spare to join")
    shown = wait_for(lambda: (lambda v: v if dead not in members(v) else None)(show(mesh)),
                     30, "the dead replica to leave")
    wait_replication(mesh, spare)
    assert joined - killed >= REASSIGN_AFTER  # never before the wait
    assert members(shown) == {master: ("s1", "master", False), spare: ("s1", "replica", False)}
    assert shown["failed"] == []
    assert command(mesh.redis[spare].port, "GET", "r:199") == b"$3\r\n199\r\n"
    rc.close()


def test_scale_replicas_up_and_down(mesh_factory):
    mesh, created = make_cluster(mesh_factory, 2, 0, 2)
    assert created["replicas_declared"] == 0
    rc = RedisCluster(host="127.0.0.1", port=mesh.proxies[master_of(created, "s1")].port)
    for i in range(300):
        rc.set(f"s:{i}", i)
    dry = mesh.umctl("--json", "cluster", "scale", "fo", "--replicas", "1", "--dry-run")
    assert dry["dry_run"] and sorted(len(v) for v in dry["added"].values()) == [1, 1]
    assert show(mesh)["replicas_declared"] == 0  # a dry run changes nothing
    out = mesh.umctl("cluster", "scale", "fo", "--replicas", "1", "--wait", "--timeout", "60",
                     timeout=90)
    assert "declares 1 replica per shard" in out.stdout
    shown = show(mesh)
    assert shown["replicas_declared"] == 1
    assert [s["replicas_live"] for s in shown["shards"]] == [1, 1]
    for s in shown["shards"]:
        replica = next(n["node"] for n in s["nodes"] if n["role"] == "replica")
        assert b"role:slave" in command(mesh.redis[replica].port, "INFO", "replication")
    again = mesh.umctl("cluster", "scale", "fo", "--replicas", "1")
    assert "already declares 1" in again.stdout
    short = mesh.umctl("cluster", "scale", "fo", "--replicas", "2", check=False)
    assert short.returncode == 1 and "2 missing" in short.stderr, short.stderr
    usage = mesh.umctl("cluster", "scale", "fo", check=False)
    assert usage.returncode == 2
    out = mesh.umctl("--json", "cluster", "scale", "fo", "--replicas", "0", "--wait")
    assert sorted(len(v) for v in out["removed"].values()) == [1, 1]
    shown = show(mesh)
    assert shown["replicas_declared"] == 0
    assert all(len(s["nodes"]) == 1 for s in shown["shards"])
    wait_for(lambda: sum(1 for n in mesh.umctl("--json", "nodes") if n["role"] == "free") == 2,
             what="the removed replicas back in the pool")
    assert all(rc.get(f"s:{i}") == str(i).encode() for i in range(300))
    rc.close()


class Load:
    """A redis-py RedisCluster with its default retries: SETs keys to increasing values and
    INCRs counters, one write after the other; keeps every acknowledgement and every error."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: dict[str, int] = {}  # key -> the last value acknowledged
        self.attempted: dict[str, int] = {}
        self.incr_acked: dict[str, int] = {}
        self.incr_failed: dict[str, int] = {}
        self.errors: list[tuple[float, str, str]] = []  # (when, type, message)
        self.writes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        rc = RedisCluster(host="127.0.0.1", port=self.port)
        i = 0
        deadline = time.monotonic() + 600
        while not self.stop.is_set() and time.monotonic() < deadline:
            key, counter = f"rr:{i % LOAD_KEYS}", f"rc:{i % LOAD_COUNTERS}"
            self.attempted[key] = i
            try:
                rc.set(key, i)
                self.acked[key] = i
            except Exception as exc:  # noqa: BLE001 - every failure counts
                self.errors.append((time.monotonic(), type(exc).__name__, str(exc)[:200]))
            try:
                rc.incr(counter)
                self.incr_acked[counter] = self.incr_acked.get(counter, 0) + 1
            except Exception as exc:  # noqa: BLE001
                self.errors.append((time.monotonic(), type(exc).__name__, str(exc)[:200]))
                self.incr_failed[counter] = self.incr_failed.get(counter, 0) + 1
            self.writes += 2
            i += 1
            time.sleep(LOAD_PAUSE)
        rc.close()

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def more(self, n: int) -> None:
        target = self.writes + n
        wait_for(lambda: self.writes >= target, 60, f"{n} more writes")

    def lost(self, port: int) -> list[str]:
        """Acknowledged writes not found, read back through a fresh cluster client."""
        rc = RedisCluster(host="127.0.0.1", port=port)
        lost = []
        for key, value in self.acked.items():
            got = int(rc.get(key) or -1)
            if not value <= got <= self.attempted[key]:
                lost.append(f"{key}: acknowledged {value}, read {got}")
        for counter, n in self.incr_acked.items():
            got = int(rc.get(counter) or 0)
            if not n <= got <= n + self.incr_failed.get(counter, 0):
                lost.append(f"{counter}: acknowledged {n} INCRs, read {got}")
        rc.close()
        return lost


def test_rolling_restart_of_every_node_under_load(mesh_factory, capsys):
    mesh, created = make_cluster(mesh_factory, 3, 1)
    for node, (_, role, _) in members(created).items():
        if role == "replica":
            wait_replication(mesh, node)
    # replicas and masters mixed: s1's replica then master, s2's master then replica (a
    # master by then: the handover made it one), s3 as s1
    order = [n for i, s in enumerate(created["shards"])
             for n in (lambda ns: ns if i % 2 else ns[::-1])([x["node"] for x in s["nodes"]])]
    places = {n: place[0] for n, place in members(created).items()}
    entry = mesh.proxies[order[-1]].port
    timings: list[tuple[str, str, float]] = []
    with Load(entry) as load:
        load.more(500)
        for node in order:
            role = members(show(mesh))[node][1]
            began = time.monotonic()
            restart(mesh, node)
            back_in_place(mesh, node, places[node])
            timings.append((node, role, time.monotonic() - began))
            load.more(200)
    shown = show(mesh)
    lost = load.lost(mesh.proxies[order[0]].port)
    with capsys.disabled():
        print(f"\n[rolling restart, 3x1] writes: {load.writes}, client errors: "
              f"{len(load.errors)}, acknowledged writes lost: {len(lost)}")
        for node, role, took in timings:
            print(f"  {node} ({role}) stopped, restarted, back and synced in {took:.1f}s")
        for when, kind, message in load.errors[:20]:
            print(f"  error at +{when - load.errors[0][0]:.2f}s: {kind}: {message}")
    assert lost == []
    assert load.errors == []
    assert len(shown["shards"]) == 3 and shown["failed"] == []
    assert {n: place[0] for n, place in members(shown).items()} == places
    assert [s["replicas_live"] for s in shown["shards"]] == [1, 1, 1]
    assert all(len(s["nodes"]) == 2 for s in shown["shards"])


@pytest.mark.parametrize("leaves_by", ["scale-in", "drain-and-release"])
def test_a_node_that_rejoins_its_cluster_is_emptied_and_deleted_keys_stay_deleted(
        mesh_factory, leaves_by):
    # a replica that left (dropped by a scale-in, or drained, held and released) keeps its
    # Redis's copy; the cluster deletes keys meanwhile; a scale-out takes the same node back
    # as the new shard's master. It served the deleted keys again when its old data
    # ownership survived the scale-in or the release
    mesh = mesh_factory(2)
    mesh.wait_pool(2)
    created = mesh.umctl("--json", "cluster", "create", "back", "--shards", "1", "--replicas", "1")
    nodes = created["shards"][0]["nodes"]
    master = next(n["node"] for n in nodes if n["role"] == "master")
    replica = next(n["node"] for n in nodes if n["role"] != "master")
    rc = RedisCluster(host="127.0.0.1", port=mesh.proxies[master].port)
    keys = [f"k:{i}" for i in range(200)]
    for k in keys:
        rc.set(k, "old")
    wait_for(lambda: command(mesh.redis[replica].port, "DBSIZE") == b":200\r\n",
             what="the replica to hold every key")
    if leaves_by == "drain-and-release":
        assert mesh.umctl("nodes", "drain", replica).returncode == 0
    out = mesh.umctl("cluster", "scale", "back", "--replicas", "0")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: command(mesh.proxies[replica].port, "UMCTL", "GETEPOCH") == b":0\r\n",
             what="the replica to leave")
    assert rc.delete(*keys[:100]) == 100  # one shard: every key is on the master
    if leaves_by == "drain-and-release":
        assert mesh.umctl("nodes", "release", replica).returncode == 0
    out = mesh.umctl("cluster", "scale", "back", "--shards", "2", "--wait", "--timeout", "60",
                     timeout=90)
    assert out.returncode == 0, out.stderr
    assert set(members(mesh.umctl("--json", "cluster", "show", "back"))) == \
        {master, replica}  # the same node came back, as the new shard's master
    rc.close()
    rc = RedisCluster(host="127.0.0.1", port=mesh.proxies[master].port)
    assert [k for k in keys[:100] if rc.get(k) is not None] == []
    assert all(rc.get(k) == b"old" for k in keys[100:])
    rc.close()
