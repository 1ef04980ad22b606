"""Real cluster clients (redis-py RedisCluster, redis-cli -c, redis-benchmark --cluster) use two
standalone proxies as one Redis Cluster."""
from __future__ import annotations

import subprocess
import threading
import time

import pytest
import redis
from redis.cluster import RedisCluster

from core.slots import key_slot
from tests.procs import command

KEYS = 10_000


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def rc(request, shared_cluster):
    client = RedisCluster(host="127.0.0.1", port=shared_cluster.ports[0],
                          protocol=request.param, socket_timeout=10)
    yield client
    client.close()


def test_ten_thousand_keys_round_trip(rc):
    prefix = f"bulk:{rc.get_connection_kwargs().get('protocol')}:"
    pipe = rc.pipeline()
    for i in range(KEYS):
        pipe.set(f"{prefix}{i}", i)
    assert all(pipe.execute())
    pipe = rc.pipeline()
    for i in range(KEYS):
        pipe.get(f"{prefix}{i}")
    assert pipe.execute() == [str(i).encode() for i in range(KEYS)]
    # and one by one, each command following the slot map
    for i in range(0, KEYS, 97):
        assert rc.get(f"{prefix}{i}") == str(i).encode()


def test_keys_land_on_the_node_that_owns_their_slot(rc, shared_cluster):
    rc.set("owner-check-a", 1)
    rc.set("owner-check-b", 1)
    for key in ("owner-check-a", "owner-check-b"):
        slot = key_slot(key.encode())
        backend = shared_cluster.redis[0] if slot <= 8191 else shared_cluster.redis[1]
        assert command(backend.port, "EXISTS", key) == b":1\r\n"


def test_hash_tagged_multi_key_commands(rc):
    assert rc.mset({"{user:1}:name": "ann", "{user:1}:age": "33"})
    assert rc.mget("{user:1}:name", "{user:1}:age") == [b"ann", b"33"]
    assert rc.delete("{user:1}:name", "{user:1}:age") == 2


def test_cross_slot_mget_gets_redis_text(shared_cluster):
    port = shared_cluster.ports[0]
    # two keys this node owns but in different slots
    keys = [k for k in (f"x{i}" for i in range(200)) if key_slot(k.encode()) <= 8191][:2]
    assert command(port, "MGET", *keys) == b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"


def test_transaction_in_one_slot(rc):
    with rc.pipeline(transaction=True) as tx:
        tx.set("{tx}a", 1)
        tx.incr("{tx}a")
        tx.get("{tx}a")
        first, *rest = tx.execute()
    assert first == b"OK"  # redis-py applies no reply callback inside cluster MULTI
    assert rest == [2, b"2"]


def test_raw_multi_exec_and_a_moved_command_aborts_the_transaction(shared_cluster):
    port = shared_cluster.ports[0]
    r = redis.Redis(port=port)
    mine = next(k for k in (f"m{i}" for i in range(100)) if key_slot(k.encode()) <= 8191)
    theirs = next(k for k in (f"m{i}" for i in range(100)) if key_slot(k.encode()) > 8191)
    p = r.pipeline(transaction=True)
    p.set(mine, "v")
    p.get(mine)
    assert p.execute() == [True, b"v"]
    p = r.pipeline(transaction=True)
    p.set(mine, "w")
    p.set(theirs, "w")
    with pytest.raises(redis.exceptions.ResponseError):
        p.execute()
    assert r.get(mine) == b"v"  # nothing of the aborted transaction ran


def test_lua_script(rc):
    script = rc.register_script("redis.call('set', KEYS[1], ARGV[1]); return redis.call('get', KEYS[1])")
    assert script(keys=["lua:k"], args=["42"]) == b"42"
    rc.delete("lua:n")
    assert rc.eval("return redis.call('incrby', KEYS[1], 5)", 1, "lua:n") == 5


def test_blpop_is_woken_by_a_push_from_another_client(rc, shared_cluster):
    other = RedisCluster(host="127.0.0.1", port=shared_cluster.ports[1])
    threading.Timer(0.3, lambda: other.rpush("queue:1", "job")).start()
    started = time.monotonic()
    assert list(rc.blpop(["queue:1"], timeout=5)) == [b"queue:1", b"job"]
    assert time.monotonic() - started < 4
    # the connection still serves ordinary commands afterwards
    assert rc.set("after-blpop", 1)
    other.close()


def test_pubsub_message_reaches_subscriber(rc):
    ps = rc.pubsub()
    ps.subscribe("news")
    assert ps.get_message(timeout=2)["type"] == "subscribe"
    assert rc.publish("news", "hello") == 1
    msg = ps.get_message(timeout=2)
    assert msg["type"] == "message" and msg["data"] == b"hello"
    ps.close()


def test_redis_cli_cluster_mode_follows_redirects(shared_cluster):
    lines = "".join(f"SET cli:{i} {i}\n" for i in range(KEYS))
    lines += "".join(f"GET cli:{i}\n" for i in range(0, KEYS, 1000))
    out = subprocess.run(["redis-cli", "-c", "-p", str(shared_cluster.ports[1])], input=lines,
                         capture_output=True, text=True, timeout=120)
    replies = [line for line in out.stdout.splitlines() if not line.startswith("-> Redirected")]
    assert "-> Redirected" in out.stdout
    assert replies[:KEYS] == ["OK"] * KEYS
    assert replies[KEYS:] == [str(i) for i in range(0, KEYS, 1000)]


def test_redis_benchmark_cluster_runs_clean(shared_cluster):
    out = subprocess.run(["redis-benchmark", "--cluster", "-p", str(shared_cluster.ports[0]),
                          "-t", "set,get", "-n", "20000", "-c", "20", "-q"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "SET:" in out.stdout and "GET:" in out.stdout, out.stdout + out.stderr
    assert "error" not in (out.stdout + out.stderr).lower()


@pytest.mark.parametrize("argv", [
    ["EVAL", "return 1", "1", "{K}"],
    ["FCALL", "nofunc", "1", "{K}"],
    ["XREAD", "STREAMS", "{K}", "0"],
    ["ZUNIONSTORE", "{K}d", "2", "{K}a", "{K}b"],
    ["SORT", "{K}", "STORE", "{K}dst"],
    ["OBJECT", "ENCODING", "{K}"],
    ["SPUBLISH", "{K}", "msg"],
    ["SSUBSCRIBE", "{K}"],
    ["BLPOP", "{K}", "0"],
])
def test_every_key_position_is_routed(shared_cluster, argv):
    """Commands whose keys are not at argv[1] get MOVED for a slot the node does not own."""
    theirs = next(t for t in (f"t{i}" for i in range(100)) if key_slot(t.encode()) > 8191)
    argv = [a.replace("{K}", "{" + theirs + "}") for a in argv]
    reply = command(shared_cluster.ports[0], *argv)
    assert reply == b"-MOVED %d %s\r\n" % (key_slot(theirs.encode()),
                                           shared_cluster.proxies[1].addr.encode())


def test_cross_slot_keys_in_a_movable_command(shared_cluster):
    reply = command(shared_cluster.ports[0], "EVAL", "return 1", "2", "a", "b")
    assert reply.startswith(b"-CROSSSLOT")
