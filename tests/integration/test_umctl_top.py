"""umctl-mesh top on a real mesh: the hot key, its slot and its master found from the nodes'
own statistics (UMCTL HOTKEYS, CLUSTER SLOT-STATS, INFO)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import redis
from redis.cluster import RedisCluster

from core.slots import key_slot
from tests.conftest import SECRET_ENV

HOT = "{hot}counter"
HOT_INCRS = 20_000  # the proxies sample about 1 command in 256
PLAIN_HOT = "{plainhot}counter"
PLAIN_INCRS = 10_000


def test_top_names_the_hot_key_its_slot_and_the_busiest_master(mesh_factory):
    mesh = mesh_factory(4, plain=True)
    mesh.wait_pool(4)
    created = mesh.umctl("--json", "cluster", "create", "hot", "--shards", "2", "--replicas", "1")
    port = mesh.proxies[created["shards"][0]["nodes"][0]["node"]].port
    rc = RedisCluster(host="127.0.0.1", port=port)
    pipe = rc.pipeline(transaction=False)
    for i in range(HOT_INCRS):
        pipe.incr(HOT)
        if i % 10 == 0:
            pipe.set(f"cold:{i}", i)
    pipe.execute()
    slot = key_slot(HOT.encode())
    owner = next(s for s in created["shards"] if any(a <= slot <= b for a, b in s["slots"]))
    master = owner["nodes"][0]["node"]
    # another hot key, through the plain listener of a node of the other shard: that node
    # samples it on its way to the owner, which samples it again
    plain_slot = key_slot(PLAIN_HOT.encode())
    plain_owner = next(s for s in created["shards"]
                       if any(a <= plain_slot <= b for a, b in s["slots"]))
    entry = next(n["node"] for s in created["shards"] if s is not plain_owner
                 for n in s["nodes"])
    plain = redis.Redis(port=mesh.plain_ports[entry])
    pipe = plain.pipeline(transaction=False)
    for _ in range(PLAIN_INCRS):
        pipe.incr(PLAIN_HOT)
    pipe.execute()

    # the hot key keeps being hit while top measures the ops/s
    stop = threading.Event()

    def hammer() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            rc.incr(HOT)

    load = threading.Thread(target=hammer)
    load.start()
    try:
        report = mesh.umctl("--json", "top", "hot", "--count", "3", "--interval", "1",
                            timeout=60)
    finally:
        stop.set()
        load.join()
    assert report["problems"] == {}
    top_key = report["hot_keys"][0]
    assert (top_key["key"], top_key["shard"], top_key["nodes"]) == (HOT, owner["id"], [master])
    # an estimate from the samples: the right order of magnitude, not exact
    assert HOT_INCRS / 4 <= top_key["ops"] <= HOT_INCRS * 4
    plain_key = next(k for k in report["hot_keys"] if k["key"] == PLAIN_HOT)
    assert (plain_key["shard"], plain_key["nodes"]) == (plain_owner["id"],
                                                        [plain_owner["nodes"][0]["node"]])
    assert PLAIN_INCRS / 4 <= plain_key["ops"] <= PLAIN_INCRS * 4
    hot_slot = report["hot_slots"][0]
    assert (hot_slot["slot"], hot_slot["shard"]) == (slot, owner["id"])
    assert hot_slot["key-count"] >= 1 and hot_slot["cpu-usec"] > 0
    busiest = report["nodes"][0]
    assert (busiest["node"], busiest["role"]) == (master, "master")
    assert busiest["ops_per_sec"] > 50
    assert len(report["nodes"]) == 4

    # without the mesh secret: the slot and ops tables still, and the reason for no keys
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    out = subprocess.run([sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd",
                          mesh.endpoint, "top", "hot"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "needs the mesh secret" in out.stdout and str(slot) in out.stdout
    assert master in out.stdout
    # bad usage and an unknown cluster
    assert mesh.umctl("top", "hot", "--count", "0", check=False).returncode == 2
    assert mesh.umctl("top", "nope", check=False).returncode == 1
    rc.close()
