"""umctl-mesh against real meshes: `up --spare` and a scale that uses the spare nodes (with
`--wait`'s progress in keys and its plain output off a terminal), the CLUSTER NODES id beside
the node name, `slowlog` across a cluster's nodes, and what a node logs during an etcd
outage."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from redis.cluster import RedisCluster

from tests.procs import command, free_up_ports, read_until, wait_for

UMCTL = [sys.executable, "-m", "tools.umctl_mesh.cli"]


def test_up_spare_starts_free_nodes_that_a_scale_takes_with_progress_in_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MOONMESH_ETCD"}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # the bare commands below find this `up`'s etcd
    port = free_up_ports(3)
    proc = subprocess.Popen([*UMCTL, "up", "--shards", "1", "--replicas", "0", "--spare", "2",
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        lines = read_until(proc, "stop with Ctrl-C")
        output = "".join(lines)
        assert "3 nodes on" in output and "2 of them spare" in output
        assert "more capacity:" in output and f"--node-id node-{port + 3}" in output
        nodes = json.loads(subprocess.run([*UMCTL, "--json", "nodes"], capture_output=True,
                                          text=True, env=env, timeout=30).stdout)
        assert sorted(n["role"] for n in nodes) == ["free", "free", "master"]
        rc = RedisCluster(host="127.0.0.1", port=port)
        pipe = rc.pipeline()
        for i in range(3000):
            pipe.set(f"spare:{i}", i)
        pipe.execute()
        rc.close()
        scaled = subprocess.run([*UMCTL, "cluster", "scale", "mydb", "--shards", "2", "--wait",
                                 "--timeout", "120"], capture_output=True, text=True, env=env,
                                timeout=150)
        assert scaled.returncode == 0, scaled.stderr
        # off a terminal: whole lines, no ANSI codes or carriage returns
        assert "\r" not in scaled.stderr + scaled.stdout
        assert "\x1b" not in scaled.stderr + scaled.stdout
        done = re.search(r"done: (\d+) slots in \d+ migrations?, ([\d,]+) keys moved in",
                         scaled.stderr)
        assert done, scaled.stdout + scaled.stderr
        assert int(done.group(1)) == sum(int(r.split()[2]) for r in scaled.stdout.splitlines()
                                         if r.startswith("s1 ")), scaled.stdout
        # about half the keys went to the new shard, all of them counted
        assert 1000 < int(done.group(2).replace(",", "")) < 2000, scaled.stderr
        nodes = json.loads(subprocess.run([*UMCTL, "--json", "nodes"], capture_output=True,
                                          text=True, env=env, timeout=30).stdout)
        assert sorted(n["role"] for n in nodes) == ["free", "master", "master"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "\r" not in output + rest and "\x1b" not in output + rest
    status = [x for x in rest.splitlines() if x.startswith("[")]
    assert status and "free" in status[0], rest


def test_nodes_and_cluster_show_give_the_id_clients_see_in_cluster_nodes(mesh_factory):
    mesh = mesh_factory(2)
    mesh.wait_pool(2)
    mesh.umctl("cluster", "create", "ids", "--shards", "1", "--replicas", "1")
    wait_for(lambda: all(n["health"] == "ok" for n in mesh.umctl("--json", "nodes")), 30,
             "both nodes ok")
    node_table = mesh.umctl("nodes").stdout.splitlines()
    show_table = mesh.umctl("cluster", "show", "ids").stdout.splitlines()
    node_json = {n["node"]: n["cluster_node_id"] for n in mesh.umctl("--json", "nodes")}
    show_json = {n["node"]: n["cluster_node_id"] for shard in
                 mesh.umctl("--json", "cluster", "show", "ids")["shards"] for n in shard["nodes"]}
    assert node_table[0].split()[-4:] == ["HEALTH", "CLUSTER", "NODES", "ID"]
    assert show_table[1].split()[-4:] == ["APPLIED", "CLUSTER", "NODES", "ID"]
    for node_id, proxy in mesh.proxies.items():
        lines = command(proxy.port, "CLUSTER", "NODES").decode().splitlines()
        # the line flagged myself is this node as its clients see it
        mine = next(x.split()[0] for x in lines[1:] if "myself" in x)
        shown = next(x.split()[-1] for x in node_table if x.lstrip("*").startswith(node_id))
        in_show = next(x.split()[-1] for x in show_table if f" {node_id} " in x)
        assert shown == in_show == mine == node_json[node_id] == show_json[node_id], \
            (node_id, shown, in_show, lines)


def test_slowlog_merges_every_nodes_slow_commands_naming_node_and_shard(mesh_factory):
    mesh = mesh_factory(2)
    mesh.wait_pool(2)
    mesh.umctl("cluster", "create", "slow", "--shards", "2")
    nodes = list(mesh.redis)
    for node in nodes:  # straight to the node's Redis, as an operator would
        backend = mesh.redis[node].port
        assert command(backend, "CONFIG", "SET", "slowlog-log-slower-than", "0") == b"+OK\r\n"
        assert command(backend, "SLOWLOG", "RESET") == b"+OK\r\n"
    sleeper = nodes[1]  # DEBUG SLEEP is disabled in Redis 7: at threshold 0 any command logs
    assert command(mesh.redis[sleeper].port, "ECHO", "slowlog-probe") == b"$13\r\nslowlog-probe\r\n"
    doc = mesh.umctl("--json", "slowlog", "slow", "--count", "500")
    assert doc["unreadable"] == {}
    times = [e["time"] for e in doc["entries"]]
    assert times == sorted(times, reverse=True)
    slept = [e for e in doc["entries"] if e["args"] == ["ECHO", "slowlog-probe"]]
    shown = mesh.umctl("--json", "cluster", "show", "slow")
    shard = next(s["id"] for s in shown["shards"] if s["nodes"][0]["node"] == sleeper)
    assert len(slept) == 1 and slept[0]["node"] == sleeper and slept[0]["shard"] == shard
    assert slept[0]["duration_us"] >= 0 and slept[0]["role"] == "master"
    assert {e["node"] for e in doc["entries"]} == set(nodes)  # the CONFIG SETs after RESET
    text = mesh.umctl("slowlog", "slow", "--count", "1").stdout.splitlines()
    assert text[0].split()[:4] == ["TIME", "NODE", "SHARD", "ROLE"] and len(text) == 2
    bad = mesh.umctl("slowlog", "slow", "--count", "0", check=False)
    assert bad.returncode == 2 and "--count must be 1 to" in bad.stderr
    missing = mesh.umctl("slowlog", "nosuch", check=False)
    assert missing.returncode == 1 and "unknown cluster 'nosuch'" in missing.stderr


# what a node may log while etcd is away for OUTAGE seconds: etcd_unreachable, fenced,
# lease_lost, lease_lost_reregistering, one etcd_still_unreachable at most, and the way back
# (etcd_reachable_again, node_registered, unfenced); each watch restart, failed call and
# agent restart logged a line of its own before
OUTAGE = 6.0
MAX_OUTAGE_LINES = 10


def test_an_etcd_outage_is_logged_when_its_state_changes_not_per_poll(mesh_factory):
    mesh = mesh_factory(2, proxy_args=("--log-level", "info"))
    mesh.wait_pool(2)
    mesh.umctl("cluster", "create", "calm", "--shards", "1", "--replicas", "1")
    wait_for(lambda: all(n["health"] == "ok" for n in mesh.umctl("--json", "nodes")), 30,
             "both nodes ok")
    before = {n: len(p.log().splitlines()) for n, p in mesh.proxies.items()}
    mesh.etcd.kill()
    time.sleep(OUTAGE)  # the outage itself is what is measured: its length is the point
    during = {n: p.log().splitlines()[before[n]:] for n, p in mesh.proxies.items()}
    mesh.etcd.restart()
    wait_for(lambda: all("etcd_reachable_again" in p.log() for p in mesh.proxies.values()),
             30, "every node saying etcd is back")
    for node, lines in during.items():
        assert sum("etcd_unreachable" in x for x in lines) == 1, (node, lines)
        assert len(lines) <= MAX_OUTAGE_LINES, (node, lines)
        assert not any("watch_restarting" in x or "agent_restarting" in x for x in lines)
