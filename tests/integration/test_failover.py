"""Failover, fencing and reassignment by the leader, with real processes."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from core.slots import key_slot
from mesh.model.fencing import FENCE_AFTER, LEASE_TTL
from tests.procs import blocked_clients, command, wait_for


class Writer:
    """INCRs known counters through a cluster client; remembers acknowledgements and when
    writes failed and started succeeding again."""

    def __init__(self, port: int, keys: int = 200) -> None:
        self.port, self.keys = port, keys
        self.acked: dict[str, int] = {}
        self.errors: list[str] = []
        self.failed: dict[str, int] = {}
        self.last_error = 0.0
        self.streak = 0  # writes acknowledged in a row since the last failure
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        rc = RedisCluster(host="127.0.0.1", port=self.port, socket_timeout=2,
                          socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
        i = 0
        deadline = time.monotonic() + 300
        while not self.stop.is_set() and time.monotonic() < deadline:
            key = f"fo:{i % self.keys}"
            try:
                rc.incr(key)
                self.acked[key] = self.acked.get(key, 0) + 1
                self.streak += 1
            except Exception as exc:  # noqa: BLE001 - every failure counts, whatever the client raises
                self.errors.append(type(exc).__name__)
                self.failed[key] = self.failed.get(key, 0) + 1
                self.streak = 0
                self.last_error = time.monotonic()
                time.sleep(0.05)  # pacing: retry a failing cluster 20 times a second, no faster
                with contextlib.suppress(Exception):
                    rc.close()
                try:
                    rc = RedisCluster(host="127.0.0.1", port=self.port, socket_timeout=2,
                                      socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
                except Exception:  # noqa: BLE001 - tried again on the next failure
                    pass
            i += 1

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def running(self) -> None:
        """Wait until writes are being acknowledged."""
        wait_for(lambda: self.streak >= 100, timeout=20, what="the writer to get going")

    def acknowledged(self, more: int) -> None:
        """Wait until `more` writes from now have been acknowledged."""
        target = sum(self.acked.values()) + more
        wait_for(lambda: sum(self.acked.values()) >= target, timeout=30,
                 what=f"{more} more acknowledged writes")

    def recovered(self, timeout: float = 30) -> None:
        """Wait until every key (so every shard) took a write since the last failure."""
        wait_for(lambda: self.streak >= 2 * self.keys, timeout, "writes to succeed again")

    def check(self, port: int) -> int:
        """No write beyond what was attempted; returns the acknowledged increments lost."""
        rc = RedisCluster(host="127.0.0.1", port=port, socket_timeout=5)
        lost = 0
        for key, acked in self.acked.items():
            got = int(rc.get(key) or 0)
            assert got <= acked + self.failed.get(key, 0), (key, acked, got)
            lost += max(0, acked - got)
        rc.close()
        return lost


def make_cluster(mesh_factory, shards: int, replicas: int, extra: int = 0, *options: str):
    mesh = mesh_factory(shards * (1 + replicas) + extra)
    mesh.wait_pool(shards * (1 + replicas) + extra)
    created = mesh.umctl("--json", "cluster", "create", "fo", "--shards", str(shards),
                         "--replicas", str(replicas), *options)
    return mesh, created


def wait_replication(mesh, replica: str) -> None:  # noqa: ANN001
    """The replica's Redis is in sync, and its node has said so (a replica that never
    finished its sync is never promoted)."""
    wait_for(lambda: b"master_link_status:up" in command(mesh.redis[replica].port, "INFO",
                                                           "replication"), what="replication")
    wait_for(lambda: {n["node"]: n["health"] for n in mesh.umctl("--json", "nodes")}[replica]
             == "ok", what="the replica's node to report its sync")


def master_of(shown: dict, shard: str) -> str:
    s = next(s for s in shown["shards"] if s["id"] == shard)
    return next(n["node"] for n in s["nodes"] if n["role"] == "master")


def test_killed_master_proxy_fails_over_to_its_replica(mesh_factory, capsys):
    mesh, created = make_cluster(mesh_factory, 2, 1)
    old = master_of(created, "s1")
    entry = mesh.proxies[master_of(created, "s2")].port
    with Writer(entry) as writer:
        writer.running()
        killed_at = time.monotonic()
        mesh.proxies[old].kill()
        shown = wait_for(lambda: (lambda v: v if master_of(v, "s1") != old else None)(
            mesh.umctl("--json", "cluster", "show", "fo")), what="a failover")
        writer.recovered()
    recovered = writer.last_error - killed_at if writer.last_error else 0.0
    lost = writer.check(entry)
    with capsys.disabled():
        print(f"\n[failover: proxy kill] writes failing for {recovered:.1f}s after the kill, "
              f"{len(writer.errors)} failed writes ({sorted(set(writer.errors))}), "
              f"acknowledged increments lost: {lost}, acknowledged: {sum(writer.acked.values())}")
    assert writer.errors  # the kill was felt: the measurement above means something
    # the leader (or, when the killed node was the leader, another node) saw nothing listening
    # at the proxy's port and revoked its lease rather than wait for it to expire (speed itself
    # is measured by `make bench-failover`)
    logs = "".join(p.log_path.read_text() for p in mesh.proxies.values())
    assert re.search(rf"node={old} reason='(the leader: )?nothing listens at its proxy port'", logs)
    failed = [n for s in shown["shards"] for n in s["nodes"] if n["node"] == old]
    assert failed and failed[0]["role"] == "replica"


def test_a_killed_leader_that_is_a_master_is_replaced_without_waiting_out_its_lease(
        mesh_factory):
    """The other nodes probe the leader's proxy: nothing listening there gets its lease
    revoked, so the election and the failover of its shard start at once, not after the TTL."""
    mesh, created = make_cluster(mesh_factory, 2, 1)
    leader = wait_for(lambda: next((n["node"] for n in mesh.umctl("--json", "nodes")
                                    if n["leader"]), None), what="a leader")
    shard = next(s["id"] for s in created["shards"] if leader in [n["node"] for n in s["nodes"]])
    if master_of(mesh.umctl("--json", "cluster", "show", "fo"), shard) != leader:
        wait_replication(mesh, leader)  # a handover needs its target in sync
        mesh.umctl("failover", "fo", shard, "--to", leader)
    replica = next(n["node"] for n in mesh.umctl("--json", "cluster", "show", "fo")["shards"]
                   [[s["id"] for s in created["shards"]].index(shard)]["nodes"]
                   if n["role"] == "replica")
    wait_replication(mesh, replica)
    mesh.proxies[leader].kill()
    mesh.redis[leader].kill()
    wait_for(lambda: master_of(mesh.umctl("--json", "cluster", "show", "fo"), shard) == replica,
             what="the leader's shard failed over")
    logs = "".join(p.log_path.read_text() for n, p in mesh.proxies.items() if n != leader)
    assert f"node={leader} reason='the leader: nothing listens at its proxy port'" in logs


def test_a_one_second_pause_of_a_masters_proxy_is_no_failover(mesh_factory):
    """A frozen proxy (SIGSTOP, a long GC, a VM pause) of 1 s is ridden out: no failover; it
    serves writes again once a keepalive lands after it wakes."""
    mesh, created = make_cluster(mesh_factory, 1, 1)
    master = master_of(created, "s1")
    wait_replication(mesh, next(n["node"] for n in created["shards"][0]["nodes"]
                                if n["role"] == "replica"))
    proxy = mesh.proxies[master]
    epoch = mesh.umctl("--json", "cluster", "show", "fo")["epoch"]
    proxy.popen.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.0)  # the pause is the fault injected
    finally:
        proxy.popen.send_signal(signal.SIGCONT)
    wait_for(lambda: command(proxy.port, "SET", "k", "after") == b"+OK\r\n",
             what="the master to serve writes again")
    # a suspicion (3 s without a reply) would only come now, and its failover well after;
    # the master took a write after the pause, so its lease held: no view can replace it
    shown = mesh.umctl("--json", "cluster", "show", "fo")
    assert (shown["epoch"], master_of(shown, "s1")) == (epoch, master)


def test_killed_master_redis_fails_over_and_the_old_master_rejoins_as_replica(mesh_factory):
    mesh, created = make_cluster(mesh_factory, 1, 1)
    old = master_of(created, "s1")
    new = next(n["node"] for n in created["shards"][0]["nodes"] if n["role"] == "replica")
    wait_replication(mesh, new)  # a replica that never finished its sync is never promoted
    mesh.redis[old].kill()
    shown = wait_for(lambda: (lambda v: v if master_of(v, "s1") == new else None)(
        mesh.umctl("--json", "cluster", "show", "fo")), what="a failover")
    rc = RedisCluster(host="127.0.0.1", port=mesh.proxies[new].port)
    assert rc.set("after", "1")
    # the old master's Redis comes back empty-handed: it must follow the new master
    restarted = mesh.redis[old].restart()
    wait_for(lambda: command(restarted.port, "ROLE").startswith(b"*5\r\n$5\r\nslave"),
             what="the old master to become a replica")
    wait_for(lambda: command(restarted.port, "GET", "after") == b"$1\r\n1\r\n",
             what="the old master to resync")
    assert shown["shards"][0]["nodes"][0]["node"] == new
    rc.close()


def test_partitioned_master_fences_itself_and_rejoins_as_replica(mesh_factory):
    mesh, created = make_cluster(mesh_factory, 1, 1)
    old = master_of(created, "s1")
    proxy = mesh.proxies[old]
    assert command(proxy.port, "SET", "k", "before") == b"+OK\r\n"
    proxy.popen.send_signal(signal.SIGSTOP)  # for as long as the failover takes (about 4.5 s)
    try:
        wait_for(lambda: master_of(mesh.umctl("--json", "cluster", "show", "fo"), "s1") != old,
                 what="a failover")
    finally:
        proxy.popen.send_signal(signal.SIGCONT)
    # the old master wakes up with a lapsed lease: it must not take a write on its old data
    reply = command(proxy.port, "SET", "k", "split-brain")
    assert reply.startswith((b"-CLUSTERDOWN", b"-MOVED")), reply
    wait_for(lambda: command(proxy.port, "SET", "k", "x").startswith(b"-MOVED"),
             what="the old master to follow the new view")
    new = master_of(mesh.umctl("--json", "cluster", "show", "fo"), "s1")
    assert command(mesh.redis[new].port, "GET", "k") == b"$6\r\nbefore\r\n"


def test_shard_without_replicas_gets_a_free_node_and_the_loss_is_reported(mesh_factory):
    mesh, created = make_cluster(mesh_factory, 2, 0, 1, "--reassign-after", "2")
    old = master_of(created, "s1")
    mesh.proxies[old].kill()
    shown = wait_for(lambda: (lambda v: v if master_of(v, "s1") != old else None)(
        mesh.umctl("--json", "cluster", "show", "fo")), what="a reassignment")
    assert any("lost" in line for line in shown["lost"])
    assert "DATA LOST: " in mesh.umctl("cluster", "show", "fo").stdout
    entry = mesh.proxies[master_of(shown, "s2")].port
    rc = RedisCluster(host="127.0.0.1", port=entry)
    for i in range(100):
        rc.set(f"after:{i}", i)
    assert rc.get("after:7") == b"7"
    rc.close()


def test_readonly_clients_read_from_replicas(mesh_factory):
    mesh, created = make_cluster(mesh_factory, 1, 1)
    master = master_of(created, "s1")
    replica = next(n["node"] for n in created["shards"][0]["nodes"] if n["role"] == "replica")
    assert command(mesh.proxies[master].port, "SET", "r", "1") == b"+OK\r\n"
    wait_for(lambda: command(mesh.redis[replica].port, "GET", "r") == b"$1\r\n1\r\n",
             what="replication")
    r = redis.Redis(port=mesh.proxies[replica].port)
    assert r.execute_command("READONLY")
    assert r.get("r") == b"1"
    with pytest.raises(redis.exceptions.MovedError):  # not without READONLY
        redis.Redis(port=mesh.proxies[replica].port).get("r")
    with pytest.raises(redis.exceptions.MovedError):  # writes still go to the master
        r.set("r", "2")
    rc = RedisCluster(host="127.0.0.1", port=mesh.proxies[master].port, read_from_replicas=True)
    assert rc.get("r") == b"1"
    rc.close()


def test_sync_mode_loses_no_acknowledged_write_when_a_master_dies(mesh_factory, capsys):
    mesh, created = make_cluster(mesh_factory, 2, 1, 0, "--min-replicas-ack", "1")
    old = master_of(created, "s1")
    entry = mesh.proxies[master_of(created, "s2")].port
    for shard in created["shards"]:  # replication must be up before writes can be acknowledged
        replica = next(n["node"] for n in shard["nodes"] if n["role"] == "replica")
        wait_replication(mesh, replica)
    with Writer(entry) as writer:
        writer.running()
        mesh.redis[old].kill()  # the whole node: its Redis and then its proxy
        mesh.proxies[old].kill()
        wait_for(lambda: master_of(mesh.umctl("--json", "cluster", "show", "fo"), "s1") != old,
                 what="a failover")
        # s1's new master has no replica now: its writes get -NOREPLICAS after the 1 s WAIT
        # (as with Redis's min-replicas-to-write); the other shard's go on between them
        writer.acknowledged(5)
    lost = writer.check(entry)
    with capsys.disabled():
        print(f"\n[failover: sync mode] acknowledged: {sum(writer.acked.values())}, "
              f"lost: {lost}, failed writes: {len(writer.errors)} {sorted(set(writer.errors))}")
    assert lost == 0 and sum(writer.acked.values()) > 100


SLOW_WRITERS = 12  # more than the shared backend connections, so every one has a WAIT


def test_sync_mode_waits_do_not_hold_back_other_clients_reads(mesh_factory):
    """The replica is stopped, so every sync-mode write waits the whole ack timeout (1 s) in
    WAIT. Reads of another client on the same proxy must not queue behind those WAITs."""
    mesh, created = make_cluster(mesh_factory, 1, 1, 0, "--min-replicas-ack", "1")
    master = master_of(created, "s1")
    replica = next(n["node"] for n in created["shards"][0]["nodes"] if n["role"] == "replica")
    wait_replication(mesh, replica)
    port = mesh.proxies[master].port
    key = _key_of(created, "s1")
    assert command(port, "SET", key, "v") == b"+OK\r\n"
    stop = threading.Event()

    def slow_writes(i: int) -> None:
        while not stop.is_set():
            command(port, "SET", f"{key}:{i}", "x", timeout=10)

    os.kill(mesh.redis[replica].pid, signal.SIGSTOP)
    writers = [threading.Thread(target=slow_writes, args=(i,)) for i in range(SLOW_WRITERS)]
    try:
        for t in writers:
            t.start()
        wait_for(lambda: blocked_clients(mesh.redis[master].port) > 0,
                 what="writers blocked in WAIT")
        took = []
        for _ in range(20):
            started = time.monotonic()
            assert command(port, "GET", key) == b"$1\r\nv\r\n"
            took.append(time.monotonic() - started)
    finally:
        stop.set()
        os.kill(mesh.redis[replica].pid, signal.SIGCONT)
        for t in writers:
            t.join(15)
    # a read behind a WAIT takes up to the ack timeout (1 s); alone it takes a millisecond
    assert max(took) < 0.5, f"reads held behind WAITs: {sorted(took)[-3:]}"


def test_with_etcd_gone_the_node_stops_serving_keys_at_the_lease_deadline_and_comes_back(
        mesh_factory):
    """No etcd member answers: the node cannot tell an outage from being cut off while the
    others promote its replica, so at its lease deadline it stops serving keys, reads too (the
    fence rule, mesh/model/fencing.py); it serves them again once etcd is back."""
    mesh, created = make_cluster(mesh_factory, 2, 0)
    node = master_of(created, "s1")
    port = mesh.proxies[node].port
    key = _key_of(created, "s1")
    assert command(port, "SET", key, "before") == b"+OK\r\n"
    mesh.etcd.kill()
    try:
        killed = time.monotonic()
        # a fresh connection per write, straight to the proxy: no client retries in the way
        refused = wait_for(lambda: (lambda r: r if r.startswith(b"-") else None)(
            command(port, "SET", key, "during")), timeout=LEASE_TTL + 5,
            what="writes refused once the lease may have expired")
        # the deadline is FENCE_AFTER past the last successful keepalive's sending
        assert time.monotonic() - killed < FENCE_AFTER + 0.5, refused
        assert refused.startswith(b"-CLUSTERDOWN")
        assert command(port, "GET", key).startswith(b"-CLUSTERDOWN")
    finally:
        mesh.etcd.restart()
    wait_for(lambda: command(port, "SET", key, "after") == b"+OK\r\n", timeout=30,
             what="writes taken again")
    assert command(port, "GET", key) == b"$5\r\nafter\r\n"


def _key_of(created: dict, shard: str) -> str:
    ranges = next(s["slots"] for s in created["shards"] if s["id"] == shard)
    return next(k for k in (f"outage:{i}" for i in range(10000))
                if any(a <= key_slot(k.encode()) <= b for a, b in ranges))


STALL_SCRIPT = """
local function now() local t = redis.call('TIME') return tonumber(t[1]) + tonumber(t[2]) / 1e6 end
local start = now()
while now() - start < tonumber(ARGV[1]) do end
return 1
"""
STALL = 15  # seconds: past the busy-reply threshold (5 s) and the node's backend checks


def test_a_stalled_master_redis_is_replaced_only_after_its_node_fenced(mesh_factory, capsys):
    """A long script stalls the master's Redis: the node fences and cuts the writes already
    at Redis before its status says so, the leader promotes the replica on that word, and the
    old master does not take a write again once its script ends (it had no view to apply
    while its Redis was busy). Every acknowledged write survives."""
    mesh, created = make_cluster(mesh_factory, 1, 1)
    old = master_of(created, "s1")
    replica = next(n["node"] for n in created["shards"][0]["nodes"] if n["role"] == "replica")
    wait_replication(mesh, replica)
    stalled = redis.Redis(port=mesh.redis[old].port, socket_timeout=STALL + 10)
    with Writer(mesh.proxies[old].port) as writer:
        writer.running()
        stall = threading.Thread(target=stalled.eval, args=(STALL_SCRIPT, 0, STALL))
        stall.start()
        shown = wait_for(lambda: (lambda v: v if master_of(v, "s1") == replica else None)(
            mesh.umctl("--json", "cluster", "show", "fo")), timeout=STALL + 15,
            what="the replica promoted")
        stall.join()
        writer.recovered()
        writer.acknowledged(200)
    assert old in shown["failed"] or old in {n["node"] for n in shown["shards"][0]["nodes"]}
    wait_for(lambda: command(mesh.redis[old].port, "ROLE").startswith(b"*5\r\n$5\r\nslave"),
             what="the old master a replica")
    lost = writer.check(mesh.proxies[replica].port)
    with capsys.disabled():
        print(f"\n[stalled master] acknowledged: {sum(writer.acked.values())}, lost: {lost}, "
              f"failed writes: {len(writer.errors)} {sorted(set(writer.errors))}")
    assert lost == 0
    stalled.close()


def test_graceful_failover_under_load_loses_nothing(mesh_factory, capsys):
    mesh, created = make_cluster(mesh_factory, 1, 1)
    old = master_of(created, "s1")
    replica = next(n["node"] for n in created["shards"][0]["nodes"] if n["role"] == "replica")
    wait_replication(mesh, replica)
    entry = mesh.proxies[old].port
    with Writer(entry) as writer:
        writer.running()
        out = mesh.umctl("failover", "fo", "s1", "--to", replica, check=False)
        writer.recovered()
    assert out.returncode == 0, out.stderr
    assert master_of(mesh.umctl("--json", "cluster", "show", "fo"), "s1") == replica
    lost = writer.check(mesh.proxies[replica].port)
    with capsys.disabled():
        print(f"\n[graceful failover] acknowledged: {sum(writer.acked.values())}, lost: {lost}, "
              f"failed writes: {len(writer.errors)} {sorted(set(writer.errors))}")
    assert lost == 0
    assert command(mesh.redis[old].port, "ROLE").startswith(b"*5\r\n$5\r\nslave")


def test_drain_takes_nodes_out_for_good_without_losing_keys(mesh_factory):
    mesh, created = make_cluster(mesh_factory, 2, 1)
    rc = RedisCluster(host="127.0.0.1", port=mesh.proxies[master_of(created, "s2")].port)
    for i in range(1000):
        rc.set(f"d:{i}", i)
    old = master_of(created, "s1")
    replica = next(n["node"] for n in created["shards"][0]["nodes"] if n["role"] == "replica")
    wait_replication(mesh, replica)
    out = mesh.umctl("--json", "node", "drain", old)
    assert out["how"] == "removed"
    # held out of the pool, so the leader (which keeps the declared replica per shard from
    # free nodes) does not take it straight back
    nodes = {n["node"]: n for n in mesh.umctl("--json", "nodes")}
    assert nodes[old]["role"] == "held"
    # the shard left with a lone master: draining it moves its slots away
    lone = master_of(mesh.umctl("--json", "cluster", "show", "fo"), "s1")
    out = mesh.umctl("node", "drain", lone, "--wait", "--timeout", "120", timeout=180)
    assert out.returncode == 0, out.stderr
    shown = mesh.umctl("--json", "cluster", "show", "fo")
    assert [s["id"] for s in shown["shards"]] == ["s2"]
    assert all(rc.get(f"d:{i}") == str(i).encode() for i in range(1000))
    rc.close()
    mesh.umctl("nodes", "release", old)
    assert {n["node"]: n for n in mesh.umctl("--json", "nodes")}[old]["role"] == "free"


def test_failover_completes_when_an_etcd_member_and_the_leader_die_with_the_master(mesh_factory):
    mesh = mesh_factory(4, 3)
    mesh.wait_pool(4, timeout=30)
    created = mesh.umctl("--json", "cluster", "create", "fo", "--shards", "2", "--replicas", "1")
    leader = next(n["node"] for n in mesh.umctl("--json", "nodes") if n["leader"])
    # the master of the shard the leader is not in (killing both of a shard's nodes would be
    # a reassignment, not a failover)
    shard = next(s["id"] for s in created["shards"]
                 if leader not in {n["node"] for n in s["nodes"]})
    old = master_of(created, shard)
    mesh.etcd_members[0].kill()  # the member every client talks to first
    mesh.proxies[old].kill()
    mesh.proxies[leader].kill()  # the leader dies mid-failover too
    killed = {old, leader}
    shown = wait_for(lambda: (lambda v: v if not killed & {master_of(v, s["id"])
                                                            for s in v["shards"]} else None)(
        mesh.umctl("--json", "cluster", "show", "fo")), timeout=45, what="the failovers")
    entry = mesh.proxies[master_of(shown, shard)].port
    rc = RedisCluster(host="127.0.0.1", port=entry)
    assert rc.set("after-failover", "1") and rc.get("after-failover") == b"1"
    rc.close()
