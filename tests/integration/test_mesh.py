"""The mesh: real etcd, redis-servers and mesh-proxies, driven by umctl-mesh and cluster clients."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError

from tests.procs import command, free_port, wait_for


def cluster_client(port: int, **kwargs) -> RedisCluster:
    return RedisCluster(host="127.0.0.1", port=port, socket_timeout=10, **kwargs)


def test_cluster_create_serves_clients_and_every_proxy_agrees(mesh_factory):
    mesh = mesh_factory(6)
    mesh.wait_pool(6)
    created = mesh.umctl("--json", "cluster", "create", "mydb", "--shards", "3",
                         "--replicas", "1")
    assert created["not_applied"] == [] and created["epoch"] == 1
    shown = mesh.umctl("--json", "cluster", "show", "mydb")
    masters = {s["id"]: next(n for n in s["nodes"] if n["role"] == "master") for s in shown["shards"]}
    assert all(len(s["nodes"]) == 2 for s in shown["shards"])

    entry = mesh.proxies[masters["s2"]["node"]].port
    rc = cluster_client(entry)
    pipe = rc.pipeline()
    for i in range(10_000):
        pipe.set(f"key:{i}", i)
    pipe.execute()
    pipe = rc.pipeline()
    for i in range(10_000):
        pipe.get(f"key:{i}")
    assert pipe.execute() == [str(i).encode() for i in range(10_000)]
    rc.close()

    # every proxy, master or replica, tells the same story as `cluster show`
    expected = sorted((s["slots"][0][0], s["slots"][0][1], masters[s["id"]]["proxy"],
                       tuple(n["proxy"] for n in s["nodes"] if n["role"] == "replica"))
                      for s in shown["shards"])
    for node_id, proxy in mesh.proxies.items():
        r = redis.Redis(port=proxy.port)
        slots = r.execute_command("CLUSTER SLOTS")
        got = sorted((row[0], row[1], f"{row[2][0].decode()}:{row[2][1]}",
                      tuple(f"{n[0].decode()}:{n[1]}" for n in row[3:])) for row in slots)
        assert got == expected, node_id
        nodes = command(proxy.port, "CLUSTER", "NODES").decode()
        assert nodes.count("master") == 3 and nodes.count("slave") == 3
        assert len(r.execute_command("CLUSTER SHARDS")) == 3

    # replicas really replicate their master
    for shard in shown["shards"]:
        replica = next(n for n in shard["nodes"] if n["role"] == "replica")
        master_keys = command(mesh.redis[masters[shard["id"]]["node"]].port, "DBSIZE")
        wait_for(lambda port=mesh.redis[replica["node"]].port, keys=master_keys:
                 command(port, "DBSIZE") == keys, what="replication")

    # redis-cli -c through a replica's proxy follows MOVED to the masters
    replica_port = mesh.proxies[shown["shards"][0]["nodes"][1]["node"]].port
    out = subprocess.run(["redis-cli", "-c", "-p", str(replica_port)],
                         input="".join(f"GET key:{i}\n" for i in range(0, 10_000, 500)),
                         capture_output=True, text=True, timeout=60).stdout
    values = [line for line in out.splitlines() if not line.startswith("-> ")]
    assert values == [str(i) for i in range(0, 10_000, 500)]


def test_two_tenants_share_a_pool_and_stay_apart(mesh_factory):
    mesh = mesh_factory(4)
    mesh.wait_pool(4)
    mesh.umctl("cluster", "create", "alpha", "--shards", "2", "--password", "pa")
    mesh.umctl("cluster", "create", "beta", "--shards", "2", "--password", "pb")
    nodes = mesh.umctl("--json", "nodes")
    by_cluster = {c: [n["node"] for n in nodes if n["cluster"] == c] for c in ("alpha", "beta")}
    assert len(by_cluster["alpha"]) == len(by_cluster["beta"]) == 2
    a_port = mesh.proxies[by_cluster["alpha"][0]].port
    b_port = mesh.proxies[by_cluster["beta"][0]].port

    alpha = cluster_client(a_port, password="pa")
    beta = cluster_client(b_port, password="pb")
    for i in range(200):
        alpha.set(f"k{i}", "alpha")
        beta.set(f"k{i}", "beta")
    assert {alpha.get(f"k{i}") for i in range(200)} == {b"alpha"}
    assert {beta.get(f"k{i}") for i in range(200)} == {b"beta"}
    # the wrong password, or none, gets nothing through any proxy of the other tenant
    for port in (a_port, b_port):
        assert command(port, "GET", "k1") == b"-NOAUTH Authentication required.\r\n"
    with pytest.raises(redis.exceptions.RedisClusterException):
        cluster_client(b_port, password="pa").get("k1")
    alpha.close()
    beta.close()

    # deleting beta returns its nodes; a new cluster on them starts empty
    mesh.umctl("cluster", "delete", "beta", "--yes")
    assert mesh.umctl("--json", "cluster", "list") == [
        {"cluster": "alpha", "epoch": 1, "shards": 2, "nodes": 2, "password": True}]
    mesh.wait_pool(2)
    mesh.umctl("cluster", "create", "gamma", "--shards", "2")
    gamma = cluster_client(b_port)
    assert gamma.dbsize() == 0 and gamma.get("k1") is None
    gamma.close()


def test_keep_data_holds_nodes_until_released(mesh_factory):
    mesh = mesh_factory(1)
    mesh.wait_pool(1)
    mesh.umctl("cluster", "create", "keep", "--shards", "1")
    node_id, proxy = next(iter(mesh.proxies.items()))
    assert command(proxy.port, "SET", "precious", "1") == b"+OK\r\n"
    mesh.umctl("cluster", "delete", "keep", "--keep-data", "--yes")
    [node] = mesh.umctl("--json", "nodes")
    assert node["role"] == "held" and node["cluster"] == "keep"
    failed = mesh.umctl("cluster", "create", "other", "--shards", "1", check=False)
    assert failed.returncode == 1 and "not enough free nodes" in failed.stderr
    assert command(mesh.redis[node_id].port, "GET", "precious") == b"$1\r\n1\r\n"
    mesh.umctl("nodes", "release", node_id)
    mesh.umctl("cluster", "create", "other", "--shards", "1")
    wait_for(lambda: command(mesh.redis[node_id].port, "DBSIZE") == b":0\r\n",
             what="the released node's data to be erased")


def test_operator_errors_are_one_line_with_exit_codes(mesh_factory):
    mesh = mesh_factory(1)
    out = mesh.umctl("cluster", "show", "nosuch", check=False)
    assert out.returncode == 1 and out.stderr.strip() == "umctl-mesh: unknown cluster 'nosuch'"
    out = mesh.umctl("cluster", "create", "big", "--shards", "5", check=False)
    assert out.returncode == 1 and "not enough free nodes" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = mesh.umctl("cluster", "create", "bad name", "--shards", "1", check=False)
    assert out.returncode == 2 and "invalid cluster name" in out.stderr  # usage
    down = subprocess.run([sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd",
                           f"127.0.0.1:{free_port()}", "cluster", "list"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 3 and "etcd unreachable" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1


def test_racing_writers_never_share_a_node(mesh_factory):
    mesh = mesh_factory(3)
    mesh.wait_pool(3)
    results = {}

    def create(name):
        results[name] = mesh.umctl("cluster", "create", name, "--shards", "2", "--no-wait",
                                   check=False)

    threads = [threading.Thread(target=create, args=(n,)) for n in ("r1", "r2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.returncode for r in results.values())
    assert codes == [0, 1]  # one got two nodes; the other found only one free and said so
    loser = next(r for r in results.values() if r.returncode == 1)
    assert "not enough free nodes" in loser.stderr
    clusters = mesh.umctl("--json", "cluster", "list")
    assert len(clusters) == 1
    nodes = mesh.umctl("--json", "nodes")
    assert sum(1 for n in nodes if n["cluster"]) == 2


def alive_nodes(mesh) -> int:
    """Nodes alive in the pool; 0 while etcd cannot be reached (umctl-mesh exits 3)."""
    nodes = mesh.umctl("--json", "nodes", check=False)
    return sum(1 for n in nodes if n["alive"]) if isinstance(nodes, list) else 0


def test_etcd_restart_costs_clients_at_most_a_retried_clusterdown_and_later_views_apply(
        mesh_factory):
    """Nodes serve while etcd is down until FENCE_AFTER (1 s) past their last confirmed
    read, then answer CLUSTERDOWN (which cluster clients retry) until etcd answers again;
    no other error, and no write lost (issue 13's fence rule: a longer outage on a loaded
    machine made the old "no error at all" version of this test fail 3 runs in 8). The one
    other answer allowed is the fence's own: a command in flight when writes are fenced is
    cut and answers -UNCERTAIN (it may have run), at most once per fencing of each node."""
    mesh = mesh_factory(2)
    mesh.wait_pool(2)
    mesh.umctl("cluster", "create", "live", "--shards", "2")
    port = next(iter(mesh.proxies.values())).port
    errors: list[Exception] = []
    done = threading.Event()
    ops = [0]  # SET+GET pairs answered
    down = [0]  # CLUSTERDOWN after the client's own retries
    uncertain: list[Exception] = []  # cut in flight by the fence

    def client_loop():
        rc = cluster_client(port)
        i = 0
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            try:
                rc.set(f"live:{i % 500}", i)
                rc.get(f"live:{i % 500}")
                ops[0] += 1
            except ClusterDownError:
                down[0] += 1  # fenced while etcd is away: the command did not run
            except redis.ResponseError as exc:
                (uncertain if str(exc).startswith("UNCERTAIN") else errors).append(exc)
            except Exception as exc:  # noqa: BLE001 - every other client error counts
                errors.append(exc)
            i += 1
        rc.close()

    def served(more: int) -> None:
        """Wait until the client has `more` round trips answered from now."""
        target = ops[0] + more
        wait_for(lambda: ops[0] >= target or errors, timeout=20, what=f"{more} round trips")

    t = threading.Thread(target=client_loop)
    t.start()
    try:
        served(200)
        mesh.etcd.kill()
        # clients served while etcd is down, until the fence (1 s after the last read)
        served(20)
        mesh.etcd.restart()
        wait_for(lambda: alive_nodes(mesh) == 2,
                 what="both nodes registered with the restarted etcd")
        served(200)
    finally:
        done.set()
        t.join()
    assert [f"{type(e).__name__}: {e}" for e in errors] == []
    assert len(uncertain) <= len(mesh.proxies), uncertain  # one client: one command in flight
    # a view written after the restart reaches every node
    out = mesh.umctl("cluster", "create", "after", "--shards", "1", check=False)
    assert out.returncode == 1 and "not enough free nodes" in out.stderr
    new_node = mesh.add_node()
    mesh.wait_pool(1)
    created = mesh.umctl("--json", "cluster", "create", "after", "--shards", "1")
    assert created["not_applied"] == []
    assert command(mesh.proxies[new_node].port, "SET", "after", "1") == b"+OK\r\n"


def test_killing_the_leader_elects_another(mesh_factory):
    mesh = mesh_factory(3)
    mesh.wait_pool(3)
    leader = wait_for(lambda: next((n["node"] for n in mesh.umctl("--json", "nodes")
                                    if n["leader"]), None), what="a leader")
    mesh.proxies[leader].kill()
    started = time.monotonic()
    new = wait_for(lambda: next((n["node"] for n in mesh.umctl("--json", "nodes")
                                 if n["leader"] and n["node"] != leader), None),
                   timeout=20, what="a new leader")
    assert time.monotonic() - started < 15, new


def test_a_replica_that_shuts_down_cleanly_stays_in_its_cluster_and_returns(mesh_factory):
    mesh = mesh_factory(2)
    mesh.wait_pool(2)
    created = mesh.umctl("--json", "cluster", "create", "tidy", "--shards", "1",
                         "--replicas", "1")
    replica = next(n["node"] for n in created["shards"][0]["nodes"] if n["role"] == "replica")
    mesh.proxies[replica].stop()  # SIGTERM: a clean shutdown (a restart, say)
    shown = wait_for(lambda: (lambda v: v if v["failed"] == [replica] else None)(
        mesh.umctl("--json", "cluster", "show", "tidy")), what="the replica marked failed")
    assert replica in {n["node"] for n in shown["shards"][0]["nodes"]}
    mesh.proxies[replica].start()  # the same node id, ports and Redis
    shown = wait_for(lambda: (lambda v: v if v["failed"] == [] else None)(
        mesh.umctl("--json", "cluster", "show", "tidy")), what="the replica back")
    assert {n["node"]: n["role"] for n in shown["shards"][0]["nodes"]}[replica] == "replica"


def test_a_cluster_created_again_under_the_same_name_starts_empty(mesh_factory):
    mesh = mesh_factory(1)
    mesh.wait_pool(1)
    mesh.umctl("cluster", "create", "acme", "--shards", "1")
    port = next(iter(mesh.proxies.values())).port
    assert command(port, "SET", "secret", "tenant-a") == b"+OK\r\n"
    mesh.umctl("cluster", "delete", "acme", "--yes")
    mesh.wait_pool(1)
    mesh.umctl("cluster", "create", "acme", "--shards", "1")
    assert command(port, "GET", "secret") == b"$-1\r\n"
