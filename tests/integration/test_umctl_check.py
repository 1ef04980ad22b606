"""`umctl-mesh check` on a real mesh: a healthy cluster passes (0), then a key written straight
into the wrong master's Redis and a replica whose Redis was killed are each named (1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from redis.cluster import RedisCluster

from core.slots import key_slot
from tests.conftest import MESH_SECRET
from tests.procs import wait_for


def check(mesh, *args: str, secret: bool = True) -> subprocess.CompletedProcess:  # noqa: ANN001
    """`umctl-mesh check`, with the mesh secret (as Mesh.umctl runs it) or without."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MOONMESH_SECRET", "MOONMESH_CLUSTER_PASSWORD")}
    if secret:
        env.update(MESH_SECRET)
    return subprocess.run([sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd", mesh.endpoint,
                           "check", *args], capture_output=True, text=True, timeout=60, env=env)


def test_check_passes_a_healthy_cluster_then_names_what_was_broken(mesh_factory):
    mesh = mesh_factory(6)
    mesh.wait_pool(6)
    mesh.umctl("--json", "cluster", "create", "chk", "--shards", "3", "--replicas", "1",
               "--password", "pw")
    shown = mesh.umctl("--json", "cluster", "show", "chk")
    shards = {s["id"]: s for s in shown["shards"]}
    master = {sid: next(n["node"] for n in s["nodes"] if n["role"] == "master")
              for sid, s in shards.items()}
    replica = {sid: next(n["node"] for n in s["nodes"] if n["role"] == "replica")
               for sid, s in shards.items()}
    rc = RedisCluster(host="127.0.0.1", port=mesh.proxies[master["s1"]].port, password="pw")
    for i in range(3000):
        rc.set(f"chk:{i}", i)
    rc.close()

    # healthy: every check passes (a replica's first sync may take a moment after create)
    wait_for(lambda: check(mesh, "chk").returncode == 0, timeout=30, what="a healthy check")
    out = check(mesh, "chk", "--json", "--sample", "0")
    doc = json.loads(out.stdout)
    assert out.returncode == 0 and doc["healthy"] and doc["problems"] == []
    assert set(doc["passed"]) == {"nodes", "epochs", "slots", "replicas", "keys", "migrations"}
    assert doc["passed"]["keys"] == ("3000 keys read on 3 masters (every key), none in a slot "
                                     "its shard does not own")
    assert "INFO replication through the masters' proxies" in doc["passed"]["replicas"]
    text = check(mesh, "chk", "--sample", "100")
    assert text.returncode == 0 and text.stdout.splitlines()[-1] == "healthy"
    assert "[ok]   keys: 300 keys read on 3 masters (the first 100 keys" in text.stdout
    # the cluster's password instead of the mesh secret reads as much; neither: less, said so
    with_password = check(mesh, "chk", "--password", "pw", "--json", secret=False)
    assert with_password.returncode == 0, with_password.stderr
    assert json.loads(with_password.stdout)["skipped"] == {}
    without = check(mesh, "chk", secret=False)
    assert without.returncode == 0, without.stdout
    assert "[skip] keys: not sampled on" in without.stdout and "NOAUTH" in without.stdout
    assert "the mesh secret" in without.stdout

    # a key in s3's slots, written straight into s1's master's Redis
    lo, hi = shards["s3"]["slots"][0]
    key = next(k for k in (f"stray:{i}" for i in range(100_000)) if lo <= key_slot(k.encode()) <= hi)
    s1_redis = mesh.redis[master["s1"]]
    assert subprocess.run(["redis-cli", "-p", str(s1_redis.port), "SET", key, "x"],
                          capture_output=True, text=True).stdout.strip() == "OK"
    s1_keys = int(subprocess.run(["redis-cli", "-p", str(s1_redis.port), "DBSIZE"],
                                 capture_output=True, text=True).stdout)
    out = check(mesh, "chk", "--sample", "0")
    assert out.returncode == 1, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("[FAIL]"))
    assert line == (f"[FAIL] keys: {master['s1']} (s1 master): holds keys in slots its shard "
                    f"does not own: 1 of {s1_keys} sampled, e.g. '{key}' (slot "
                    f"{key_slot(key.encode())}, owned by s3)")
    assert out.stdout.splitlines()[-1] == "1 problem found"
    doc = json.loads(check(mesh, "chk", "--sample", "0", "--json").stdout)
    assert [(p["check"], p["subject"]) for p in doc["problems"]] == [
        ("keys", f"{master['s1']} (s1 master)")]
    subprocess.run(["redis-cli", "-p", str(s1_redis.port), "DEL", key], check=True,
                   capture_output=True)
    wait_for(lambda: check(mesh, "chk", "--sample", "0").returncode == 0, timeout=10,
             what="healthy again")

    # a replica's Redis killed: its node fences itself, the leader marks it failed
    gone = replica["s2"]
    mesh.redis[gone].kill()

    def named() -> bool:
        out = check(mesh, "chk")
        return out.returncode == 1 and f"[FAIL] nodes: {gone} (s2 replica): its Redis is down" \
            in out.stdout

    wait_for(named, timeout=20, what="the dead replica named")
    doc = json.loads(check(mesh, "chk", "--json").stdout)
    assert {p["subject"] for p in doc["problems"]} == {f"{gone} (s2 replica)"}
    assert {p["check"] for p in doc["problems"]} <= {"nodes", "replicas"}
    assert "slots" in doc["passed"] and "keys" in doc["passed"]

    # output cut short by its reader ends quietly
    proc = subprocess.Popen([sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd",
                             mesh.endpoint, "cluster", "show", "chk", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it prints anything
    assert proc.wait(60) == 141 and proc.stderr.read() == b""
    proc.stderr.close()


def test_check_of_an_unknown_cluster_or_without_etcd(mesh_factory):
    mesh = mesh_factory(1)
    out = check(mesh, "nosuch")
    assert out.returncode == 1 and out.stderr.strip() == "umctl-mesh: unknown cluster 'nosuch'"
    mesh.etcd.kill()
    out = check(mesh, "nosuch")
    assert out.returncode == 3 and "etcd unreachable" in out.stderr
