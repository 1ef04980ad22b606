"""A node in no cluster lets no client reach its Redis or another node's: the review's attacks
on a node that left its cluster (deleted, or scaled in)."""
from __future__ import annotations

import redis
from redis.cluster import RedisCluster

from core.slots import key_slot
from tests.procs import command, wait_for

SECRET = "tenant A's private value"


def out_of_the_cluster(port: int) -> bool:
    return command(port, "UMCTL", "GETEPOCH") == b":0\r\n"


def test_a_node_whose_cluster_was_deleted_serves_none_of_its_keys(mesh_factory):
    # the node's Redis keeps the deleted cluster's keys until it joins another cluster (then
    # it is emptied); meanwhile a stranger, with no password, asks for them every way it can
    mesh = mesh_factory(1, plain=True)
    mesh.wait_pool(1)
    node = next(iter(mesh.proxies))
    port, plain = mesh.proxies[node].port, mesh.plain_ports[node]
    mesh.umctl("--json", "cluster", "create", "A", "--shards", "1", "--password", "pwA")
    tuned = ("hash-max-listpack-entries", "slowlog-log-slower-than")
    backend = redis.Redis(host="127.0.0.1", port=mesh.redis[node].port)
    defaults = {name: backend.config_get(name)[name] for name in tuned}
    owner = redis.Redis(host="127.0.0.1", port=port, password="pwA")
    owner.config_set("slowlog-log-slower-than", 0)  # A's commands, arguments and all, logged
    owner.config_set("hash-max-listpack-entries", 77777)  # and tuning the next must not get
    owner.set("A:secret", SECRET)
    owner.function_load("#!lua name=alib\nredis.register_function('afn', "
                        "function(keys, args) return 'A secret code' end)")
    script = owner.script_load("return 'A script'")
    owner.close()
    mesh.umctl("cluster", "delete", "A", "--yes")
    wait_for(lambda: out_of_the_cluster(port), what="the node to leave the cluster")
    assert command(mesh.redis[node].port, "DBSIZE") == b":1\r\n"  # still there, behind it
    for p in (port, plain):
        for argv in (("DBSIZE",), ("KEYS", "*"), ("SCAN", "0"), ("RANDOMKEY",),
                     ("GET", "A:secret"), ("TYPE", "A:secret"),
                     ("EVAL", "return redis.call('GET','A:secret')", "0"),
                     ("EVAL_RO", "return redis.call('GET','A:secret')", "0"),
                     ("FCALL_RO", "f", "0"), ("OBJECT", "ENCODING", "A:secret"),
                     ("SUBSCRIBE", "ch"), ("SET", "planted", "x")):
            reply = command(p, *argv)
            assert reply.startswith(b"-CLUSTERDOWN"), (p, argv, reply)
        assert command(p, "PING") == b"+PONG\r\n"  # the connection itself still works
        slot = str(key_slot(b"A:secret"))
        # a node without slots has no keys in any (its Redis still has them)
        assert command(p, "CLUSTER", "COUNTKEYSINSLOT", slot) == b":0\r\n"
        assert command(p, "CLUSTER", "GETKEYSINSLOT", slot, "10") == b"*0\r\n"
        info = command(p, "INFO", "everything")  # its server section, nothing of A's data
        assert b"# Server\r\n" in info and b"# Proxy\r\n" in info, info
        assert not any(x in info for x in (b"db0:", b"# Memory", b"cmdstat_", b"# Stats"))
        # no settings of the cluster it left, none for the next
        assert command(p, "CONFIG", "SET", "slowlog-log-slower-than", "0").startswith(
            b"-CLUSTERDOWN")
        assert command(p, "CONFIG", "GET", "hash-max-listpack-entries").startswith(
            b"-CLUSTERDOWN")
    assert command(mesh.redis[node].port, "EXISTS", "planted") == b":0\r\n"
    # the next cluster on the node sees nothing of A: not its keys, nor its slow log, nor
    # its command counts
    mesh.umctl("--json", "cluster", "create", "B", "--shards", "1")
    wait_for(lambda: not out_of_the_cluster(port), what="the node to join B")
    b = redis.Redis(host="127.0.0.1", port=port)
    assert b.dbsize() == 0
    assert SECRET.encode() not in command(port, "SLOWLOG", "GET", "1000")
    assert b"cmdstat_set" not in command(port, "INFO", "commandstats")
    # nor its functions and cached scripts, which FLUSHALL keeps, nor its settings
    assert b.function_list() == [] and b.script_exists(script) == [False]
    assert {name: b.config_get(name)[name] for name in tuned} == defaults
    assert defaults["hash-max-listpack-entries"] != "77777"
    b.close()


def test_a_plain_client_of_a_node_that_left_is_redirected_at_most_never_forwarded(mesh_factory):
    # the node that left redirects a cluster client with the old slot map; a plain client
    # must not have its commands forwarded by it (forwards go as the mesh's admin, past any
    # password of whatever cluster the owner serves by then)
    mesh = mesh_factory(2, plain=True)
    mesh.wait_pool(2)
    created = mesh.umctl("--json", "cluster", "create", "A", "--shards", "2")
    port = mesh.proxies[created["shards"][0]["nodes"][0]["node"]].port
    rc = RedisCluster(host="127.0.0.1", port=port)
    for i in range(200):
        rc.set(f"a:{i}", i)
    rc.close()
    out = mesh.umctl("cluster", "scale", "A", "--shards", "1", "--wait", "--timeout", "120",
                     timeout=150)
    assert out.returncode == 0, out.stderr
    left = next(n["node"] for n in mesh.umctl("--json", "nodes") if n["role"] == "free")
    stays = next(n for n in mesh.proxies if n != left)
    wait_for(lambda: out_of_the_cluster(mesh.proxies[left].port), what="the node to leave")
    plain = mesh.plain_ports[left]
    for i in range(20):
        reply = command(plain, "GET", f"a:{i}")
        assert reply.startswith((b"-MOVED", b"-CLUSTERDOWN")), reply
        reply = command(plain, "SET", f"planted:{i}", "x")
        assert reply.startswith((b"-MOVED", b"-CLUSTERDOWN")), reply
    assert command(mesh.redis[stays].port, "KEYS", "planted:*") == b"*0\r\n"
    # a cluster client on the cluster port is sent to the owner
    assert command(mesh.proxies[left].port, "GET", "a:1").startswith(b"-MOVED")


def test_a_redis_with_config_renamed_still_joins_a_cluster(mesh_factory):
    # joining resets the slow log and statistics after the FLUSHALL, best effort: a node
    # whose Redis hides CONFIG (a common hardening) retried its join forever
    mesh = mesh_factory(1, proxy_args=("--log-level", "info"),
                        redis_args=("--rename-command", "CONFIG", ""))
    mesh.wait_pool(1)
    port = next(iter(mesh.proxies.values())).port
    mesh.umctl("--json", "cluster", "create", "hardened", "--shards", "1")
    wait_for(lambda: not out_of_the_cluster(port), what="the node to join")
    assert redis.Redis(host="127.0.0.1", port=port).set("k", "v")
    log = next(iter(mesh.proxies.values())).log()
    assert "backend_reset_failed" in log and "CONFIG RESETSTAT" in log
