"""Plain clients (`--plain-listen`): any proxy serves the whole cluster to clients that know
nothing of Redis Cluster: plain redis-py, redis-cli without -c, node-redis's createClient and
redis-benchmark without --cluster, against a real 3-shard mesh."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import redis
from redis.exceptions import ClusterCrossSlotError

from core.slots import key_slot
from proxy.resp import MAX_MULTIBULK_LEN, encode_command
from tests.conftest import Mesh, Spawner
from tests.procs import blocked_clients, command, read_replies, wait_for

CLIENTS = Path(__file__).parent.parent / "clients"


@pytest.fixture(scope="module")
def mesh():
    """A 3 x 1 cluster whose nodes all have a plain listener; tests use keys of their own."""
    spawner = Spawner()
    try:
        mesh = Mesh(spawner, 6, plain=True)
        mesh.wait_pool(6)
        mesh.umctl("cluster", "create", "mydb", "--shards", "3", "--replicas", "1")
        for shard in shards(mesh):  # replicas get what their master publishes once linked
            wait_for(lambda port=mesh.redis[shard["replica"]].port: b"master_link_status:up"
                     in command(port, "INFO", "replication"), what="replicas in sync")
        yield mesh
    finally:
        spawner.cleanup()


def shards(mesh: Mesh) -> list[dict]:
    """Each shard's slot ranges and its master's and replica's node ids."""
    shown = mesh.umctl("--json", "cluster", "show", "mydb")
    return [{"ranges": s["slots"],
             "master": next(n["node"] for n in s["nodes"] if n["role"] == "master"),
             "replica": next((n["node"] for n in s["nodes"] if n["role"] == "replica"), None)}
            for s in shown["shards"]]


def owner(mesh: Mesh, key: str) -> str:
    slot = key_slot(key.encode())
    return next(s["master"] for s in shards(mesh)
                if any(a <= slot <= b for a, b in s["ranges"]))


def plain_port(mesh: Mesh, role: str = "replica", shard: int = 0) -> int:
    return mesh.plain_ports[shards(mesh)[shard][role]]


def test_plain_redis_py_writes_and_reads_10000_keys_through_a_replica_node(mesh):
    r = redis.Redis(port=plain_port(mesh), socket_timeout=10)
    pipe = r.pipeline(transaction=False)
    for i in range(10_000):
        pipe.set(f"plain:{i}", i)
    assert all(pipe.execute())
    pipe = r.pipeline(transaction=False)
    for i in range(10_000):
        pipe.get(f"plain:{i}")
    assert pipe.execute() == [str(i).encode() for i in range(10_000)]
    # and each key is at its slot's owner, nowhere else
    layout = shards(mesh)
    for shard in layout:
        backend = redis.Redis(port=mesh.redis[shard["master"]].port)
        here = [k.decode() for k in backend.scan_iter("plain:*", count=1000)]
        assert here, "every shard got some keys"
        assert all(any(a <= key_slot(k.encode()) <= b for a, b in shard["ranges"])
                   for k in here)
    assert sum(redis.Redis(port=mesh.redis[s["master"]].port).eval(
        "return #redis.call('keys', 'plain:*')", 0) for s in layout) == 10_000


def test_multi_key_commands_are_split_by_slot_and_merged_in_order(mesh):
    r = redis.Redis(port=plain_port(mesh, "master", 1), socket_timeout=10)
    keys = [f"multi:{i}" for i in range(100)]
    assert len({owner(mesh, k) for k in keys}) == 3, "the keys cover every shard"
    assert r.mset({k: f"v{i}" for i, k in enumerate(keys)}) is True
    asked = keys + ["multi:missing"] + keys[:3]
    assert r.mget(asked) == [f"v{i}".encode() for i in range(100)] + [None] + \
        [b"v0", b"v1", b"v2"]
    assert r.exists(*keys, *keys[:5]) == 105
    assert r.touch(*keys) == 100
    assert r.delete(*keys[:50], "multi:missing") == 50
    assert r.unlink(*keys) == 50
    assert r.mget(keys[:10]) == [None] * 10
    # what cannot be split without lying about atomicity keeps Redis's answer
    with pytest.raises(ClusterCrossSlotError):
        r.msetnx({"multi:a": 1, "multi:b": 2, "multi:c": 3})
    with pytest.raises(ClusterCrossSlotError):
        r.rename("multi:a", "multi:b")
    # a hash tag keeps one slot: one command, one owner, atomic as in Redis
    assert r.msetnx({"{t}multi:a": 1, "{t}multi:b": 2}) is True
    assert r.mget("{t}multi:a", "{t}multi:b") == [b"1", b"2"]


def lease_trouble(mesh: Mesh) -> int:
    """How many times the mesh's nodes fenced themselves or lost a lease, from their logs."""
    logs = "".join(p.log() for p in mesh.proxies.values())
    return len(re.findall(r"\b(fenced|lease_lost)\b", logs))


def test_the_biggest_command_allowed_costs_no_node_its_lease_and_a_bigger_one_is_refused(mesh):
    """A node handles a command's arguments in one turn of its loop. A DEL of 1M keys (Redis's
    own limit) took ~2 s of it on the plain listener: the node fenced itself, lost its lease and
    its shard failed over, for one tenant's command. Now a command takes at most
    MAX_MULTIBULK_LEN arguments, and the largest, split over every shard, fences nobody."""
    layout, trouble = shards(mesh), lease_trouble(mesh)
    keys = [b"huge:%d" % i for i in range(MAX_MULTIBULK_LEN)]
    with socket.create_connection(("127.0.0.1", plain_port(mesh)), timeout=60) as s:
        s.sendall(encode_command([b"DEL"] + keys[:-1]))
        assert read_replies(s, 1, timeout=60) == [b":0\r\n"]
    with socket.create_connection(("127.0.0.1", plain_port(mesh)), timeout=60) as s:
        # its start is enough: the header says how many arguments follow
        s.sendall(encode_command([b"DEL"] + keys)[:64 * 1024])
        refused = read_replies(s, 1, timeout=60)[0]
        assert refused.startswith(b"-ERR Protocol error") and b"at most" in refused, refused
        s.settimeout(10)
        assert s.recv(1) == b""  # and hangs up, as Redis does after a protocol error
    # the confirming reads of every node went on: nothing fenced, no lease or shard changed
    assert command(plain_port(mesh), "PING") == b"+PONG\r\n"
    assert lease_trouble(mesh) == trouble
    assert shards(mesh) == layout


def test_resp3_clients_get_resp3_replies_through_forwards(mesh):
    r = redis.Redis(port=plain_port(mesh), protocol=3, socket_timeout=10)
    keys = [f"r3:{i}" for i in range(30)]
    r.mset({k: "x" for k in keys[:15]})
    assert r.mget(keys) == [b"x"] * 15 + [None] * 15
    r.hset("r3:hash", mapping={"a": "1", "b": "2"})
    assert r.hgetall("r3:hash") == {b"a": b"1", b"b": b"2"}


def test_scan_returns_every_key_exactly_once_on_a_quiet_cluster(mesh):
    r = redis.Redis(port=plain_port(mesh, "master", 2), socket_timeout=10)
    keys = {f"scan:{i}" for i in range(3000)}
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.set(k, 1)
    pipe.execute()
    seen = [k.decode() for k in r.scan_iter(match="scan:*", count=200)]
    assert len(seen) == len(keys) and set(seen) == keys
    typed = list(r.scan_iter(match="scan:*", count=500, _type="string"))
    assert len(typed) == len(keys)
    assert sorted(k.decode() for k in r.keys("scan:*")) == sorted(keys)
    total = sum(redis.Redis(port=mesh.redis[s["master"]].port).dbsize() for s in shards(mesh))
    assert r.dbsize() == total
    assert r.randomkey() is not None
    keyspace = r.info("keyspace")
    assert keyspace["db0"]["keys"] == total
    with pytest.raises(redis.ResponseError, match="invalid cursor"):
        r.scan(cursor="not-a-number")


def test_redis_cli_without_cluster_mode_sees_one_redis(mesh):
    port = plain_port(mesh)
    script = "".join(f"SET cli:{i} {i}\n" for i in range(300)) + \
        "MGET " + " ".join(f"cli:{i}" for i in range(0, 300, 30)) + "\nGET cli:7\n"
    out = subprocess.run(["redis-cli", "-p", str(port)], input=script, capture_output=True,
                         text=True, timeout=60)
    lines = out.stdout.split()
    assert lines[:300] == ["OK"] * 300, out.stdout[-500:]
    assert lines[300:] == [str(i) for i in range(0, 300, 30)] + ["7"]
    assert "MOVED" not in out.stdout and not out.stderr


def test_node_redis_plain_client(mesh):
    out = subprocess.run(["node", "node_plain.js", str(plain_port(mesh)), "nodeplain", "500"],
                         cwd=CLIENTS, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["read"] == [str(i) for i in range(500)]
    assert result["mget"] == [str(i) for i in range(0, 500, 5)]
    assert sorted(result["scanned"]) == sorted(f"nodeplain:{i}" for i in range(500))


def test_redis_benchmark_without_cluster_mode_spreads_keys_over_every_shard(mesh):
    port = plain_port(mesh)
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "set,get", "-n", "20000",
                          "-r", "100000", "-P", "16", "-q", "--csv"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and '"SET"' in out.stdout and '"GET"' in out.stdout, out
    for shard in shards(mesh):
        backend = redis.Redis(port=mesh.redis[shard["master"]].port)
        assert list(backend.scan_iter("key:*", count=1000)), "every shard got keys"


def test_blocking_commands_and_scripts_run_at_the_owner(mesh):
    port = plain_port(mesh)
    r = redis.Redis(port=port, socket_timeout=10)
    other = redis.Redis(port=port, socket_timeout=10)
    key = next(f"bl:{i}" for i in range(100)
               if owner(mesh, f"bl:{i}") != shards(mesh)[0]["master"])
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(r.blpop([key], timeout=5)))
    waiter.start()
    wait_for(lambda: blocked_clients(mesh.redis[owner(mesh, key)].port) == 1,
             what="the BLPOP blocked at the owner")
    assert other.get("bl:unrelated") is None, "another client is not held by the BLPOP"
    other.rpush(key, "x")
    waiter.join(10)
    assert got == [(key.encode(), b"x")]
    assert other.eval("return redis.call('incr', KEYS[1])", 1, key + ":n") == 1
    # a transaction runs on this node's keys only, and says so
    here = next(f"tx:{i}" for i in range(100)
                if owner(mesh, f"tx:{i}") != shards(mesh)[0]["master"])
    pipe = other.pipeline(transaction=True)
    pipe.set(here, 1)
    with pytest.raises(redis.RedisError, match="transaction"):
        pipe.execute()


def test_a_plain_client_rides_through_a_failover_of_another_shard(mesh_factory):
    mesh = mesh_factory(6, plain=True)
    mesh.wait_pool(6)
    mesh.umctl("cluster", "create", "fo", "--shards", "3", "--replicas", "1")
    shown = mesh.umctl("--json", "cluster", "show", "fo")
    layout = [{"ranges": s["slots"],
               "master": next(n["node"] for n in s["nodes"] if n["role"] == "master"),
               "replica": next(n["node"] for n in s["nodes"] if n["role"] == "replica")}
              for s in shown["shards"]]
    entry, victim = layout[0], layout[1]
    r = redis.Redis(port=mesh.plain_ports[entry["master"]], socket_timeout=15)
    wait_for(lambda: "master_link_status:up" in command(
        mesh.redis[victim["replica"]].port, "INFO", "replication").decode(),
        what="the victim's replica in sync")
    acked: dict[str, int] = {}
    errors: list[str] = []
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set() and i < 200_000:
            key = f"fo:{i % 300}"
            try:
                acked[key] = r.incr(key)
            except redis.RedisError as exc:
                errors.append(str(exc))
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    wait_for(lambda: len(acked) >= 300, what="writes before the kill")
    mesh.proxies[victim["master"]].popen.send_signal(signal.SIGKILL)
    mesh.redis[victim["master"]].popen.send_signal(signal.SIGKILL)
    wait_for(lambda: mesh.umctl("--json", "cluster", "show", "fo")["epoch"] > shown["epoch"],
             30, "the failover")
    written = sum(acked.values())
    wait_for(lambda: sum(acked.values()) > written + 600, what="writes after the failover")
    stop.set()
    writer.join(30)
    # the forward retried while the shard had no master: the client saw no error, except
    # for commands in flight when the master died (they may have run: -UNCERTAIN)
    assert all("UNCERTAIN" in e for e in errors), errors[:5]
    assert len(errors) <= 2, errors
    # asynchronous replication may lose the dead master's last writes; nothing else
    lost_shard = victim["ranges"]
    for key, value in acked.items():
        if not any(a <= key_slot(key.encode()) <= b for a, b in lost_shard):
            assert int(r.get(key)) >= value, key


def test_scan_while_slots_migrate_returns_every_key_and_flushall_waits(mesh_factory):
    """A scale 2 -> 3 moves a third of the keys while a plain client scans again and again:
    every scan that starts and ends during the move returns every key (duplicates allowed),
    MGETs across the moving slots read every key, and FLUSHALL is refused meanwhile (keys in
    flight would come back)."""
    mesh = mesh_factory(3, plain=True)
    mesh.wait_pool(3)
    mesh.umctl("cluster", "create", "mig", "--shards", "2", "--migration-rate", "1000")

    shown = mesh.umctl("--json", "cluster", "show", "mig")
    r = redis.Redis(port=mesh.plain_ports[shown["shards"][0]["nodes"][0]["node"]],
                    socket_timeout=15)
    keys = {f"mig:{i}" for i in range(20_000)}
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.set(k, 1)
    pipe.execute()

    def migrating() -> bool:
        return bool(mesh.umctl("--json", "migrations", "mig"))

    def entry_node_sees_it() -> bool:
        """The migration runs and the client's node has applied its view (its guard and
        its SCAN order are this node's view's)."""
        epoch = mesh.umctl("--json", "cluster", "show", "mig")["epoch"]
        return migrating() and int(r.execute_command("UMCTL", "GETEPOCH")) >= epoch

    scale = threading.Thread(target=lambda: mesh.umctl("cluster", "scale", "mig", "--shards",
                                                       "3", "--wait", "--timeout", "120"))
    scale.start()
    wait_for(entry_node_sees_it, what="the migration to start, seen by the client's node")
    with pytest.raises(redis.ResponseError, match="refused while slots migrate"):
        r.flushall()
    during = 0
    sample = sorted(keys)[::97]
    while scale.is_alive():
        started = migrating()
        seen = {k.decode() for k in r.scan_iter(match="mig:*", count=300)}
        if started and migrating():
            during += 1
        assert seen >= keys, f"{len(keys - seen)} keys missed"
        # a node's part of an MGET for slots it no longer serves all of goes slot by slot
        assert r.mget(sample) == [b"1"] * len(sample)
    scale.join()
    assert during >= 1, "no scan ran entirely during the migration"
    assert len(mesh.umctl("--json", "cluster", "show", "mig")["shards"]) == 3
    seen_after = [k.decode() for k in r.scan_iter(match="mig:*", count=300)]
    assert len(seen_after) == len(keys) and set(seen_after) == keys
    assert r.dbsize() == len(keys)
    assert r.flushall() is True and r.dbsize() == 0


def test_publish_through_one_plain_listener_reaches_subscribers_on_every_node(mesh):
    layout = shards(mesh)
    subscribers = []
    for node in (layout[0]["master"], layout[1]["replica"], layout[2]["master"]):
        sub = redis.Redis(port=mesh.plain_ports[node], socket_timeout=10).pubsub()
        sub.subscribe("plain-news")
        assert sub.get_message(timeout=5)["type"] == "subscribe"
        subscribers.append(sub)
    publisher = redis.Redis(port=mesh.plain_ports[layout[1]["master"]], socket_timeout=10)
    for i in range(20):
        publisher.publish("plain-news", f"m{i}")
    for sub in subscribers:
        got = []
        while len(got) < 20:
            message = sub.get_message(timeout=5)
            assert message is not None, f"only {got} arrived"
            got.append(message["data"])
        assert got == [f"m{i}".encode() for i in range(20)]
        sub.close()
