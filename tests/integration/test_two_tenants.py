"""Two tenants on one mesh: a client of one cluster never reads, writes or reconfigures
anything of the other, before and after a node moves from one cluster to the other."""
from __future__ import annotations

import socket

import redis
from redis.cluster import RedisCluster

from proxy.resp import encode_command
from tests.procs import command, read_replies, wait_for

KEYS = 300


def node_of(created: dict) -> str:
    return created["shards"][0]["nodes"][0]["node"]


def authed(port: int, password: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(encode_command([b"AUTH", password.encode()]))
    assert read_replies(s, 1) == [b"+OK\r\n"]
    return s


def test_two_clusters_share_a_pool_and_never_meet(mesh_factory):
    mesh = mesh_factory(3)
    mesh.wait_pool(3)
    alpha = node_of(mesh.umctl("--json", "cluster", "create", "alpha", "--shards", "1",
                               "--password", "pa"))
    beta = node_of(mesh.umctl("--json", "cluster", "create", "beta", "--shards", "1",
                              "--password", "pb"))
    a_port, b_port = mesh.proxies[alpha].port, mesh.proxies[beta].port
    a = RedisCluster(host="127.0.0.1", port=a_port, password="pa")
    b = RedisCluster(host="127.0.0.1", port=b_port, password="pb")
    for i in range(KEYS):
        a.set(f"alpha:{i}", "a")
        b.set(f"beta:{i}", "b")
    # one tenant's password opens nothing of the other's
    other = redis.Redis(port=a_port, password="pb")
    try:
        other.get("alpha:1")
        raise AssertionError("beta's password opened alpha")
    except redis.exceptions.AuthenticationError:
        pass
    assert b.get("alpha:1") is None and a.get("beta:1") is None
    assert command(a_port, "CLUSTER", "NODES").startswith(b"-NOAUTH")  # nor its layout
    # alpha's clients, connected while alpha owns the node
    plain = authed(a_port, "pa")
    subscriber = authed(a_port, "pa")
    subscriber.sendall(encode_command([b"SUBSCRIBE", b"news"]))
    read_replies(subscriber, 1)
    blocked = authed(a_port, "pa")
    blocked.sendall(encode_command([b"BLPOP", b"beta:queue", b"0"]))
    wait_for(lambda: b"blocked_clients:1" in command(mesh.redis[alpha].port, "INFO", "clients"),
             what="alpha's client blocked")
    a.close()

    mesh.umctl("cluster", "delete", "alpha", "--yes")
    # the node is free: no slots, no password, not alpha's any more
    wait_for(lambda: b"cluster_state:fail" in command(a_port, "CLUSTER", "INFO"),
             what="the node freed")
    assert command(a_port, "AUTH", "pa").startswith(b"-ERR AUTH <password> called without")
    # cut off with their tenant: the blocked command ends with an error, nothing popped
    assert subscriber.recv(1) == b""
    assert read_replies(blocked, 1)[0].startswith(b"-") and blocked.recv(1) == b""
    plain.sendall(encode_command([b"GET", b"alpha:1"]))
    assert read_replies(plain, 1)[0].startswith(b"-CLUSTERDOWN")

    # beta grows onto the freed node: alpha's data never shows up in beta
    mesh.umctl("cluster", "scale", "beta", "--shards", "2", "--wait", "--timeout", "120",
               timeout=180)
    shown = mesh.umctl("--json", "cluster", "show", "beta")
    assert {s["nodes"][0]["node"] for s in shown["shards"]} == {beta, alpha}
    assert int(command(mesh.redis[alpha].port, "DBSIZE")[1:-2]) > 0  # beta's keys moved there
    b2 = RedisCluster(host="127.0.0.1", port=a_port, password="pb")
    assert all(b2.get(f"alpha:{i}") is None for i in range(KEYS))
    assert all(b2.get(f"beta:{i}") == b"b" for i in range(KEYS))
    total = sum(int(command(mesh.redis[n].port, "DBSIZE")[1:-2]) for n in (alpha, beta))
    assert total == KEYS
    # alpha's old connection reads nothing of beta's, on the node that is beta's now
    try:
        plain.sendall(encode_command([b"GET", b"beta:1"]))
        assert plain.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    assert b2.lpush("beta:queue", "x") == 1 and b2.rpop("beta:queue") == b"x"
    b.close()
    b2.close()
    for s in (plain, subscriber, blocked):
        s.close()
