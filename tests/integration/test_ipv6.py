"""An IPv6 `--listen`/`--backend` works end to end: redirects, CLUSTER SLOTS and a cluster
client on ::1."""
from __future__ import annotations

import socket

import redis
from redis.cluster import RedisCluster

from tests.procs import wait_for
from tools.launch import Launcher, free_port, proxy_argv, redis_argv

V6 = "::1"


def listening_v6(port: int) -> bool:
    try:
        with socket.create_connection((V6, port), timeout=0.2):
            return True
    except OSError:
        return False


def test_a_cluster_of_proxies_on_ipv6_loopback_serves_a_cluster_client():
    launcher = Launcher(prefix="mm-ipv6-")
    try:
        backends, proxies = [], []
        for i in range(2):
            rport, pport = free_port(), free_port()
            backends.append(f"[{V6}]:{rport}")
            proxies.append(f"[{V6}]:{pport}")
            launcher.process(f"redis-{i}", redis_argv(rport, launcher.data_dir(f"redis-{i}"),
                                                      "--bind", V6), rport).spawn()
            launcher.process(f"proxy-{i}", proxy_argv(pport, backends[i], "--listen",
                                                      proxies[i]), pport).spawn()
            for port in (rport, pport):
                wait_for(lambda port=port: listening_v6(port), timeout=15, what=f"::1 {port}")
        halves = ["0-8191", "8192-16383"]
        for i, proxy in enumerate(proxies):
            peer = 1 - i
            port = int(proxy.rpartition(":")[2])
            reply = redis.Redis(host=V6, port=port).execute_command(
                "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "six", backends[i], "1", halves[i],
                "PEER", proxies[peer], "1", halves[peer])
            assert reply in (b"OK", "OK", True)
        first = int(proxies[0].rpartition(":")[2])
        plain = redis.Redis(host=V6, port=first)
        moved = None
        try:
            plain.set("a", "1")  # slot 15495: the other proxy's
        except redis.exceptions.ResponseError as exc:
            moved = str(exc)
        assert moved == f"15495 {V6}:{int(proxies[1].rpartition(':')[2])}"  # MOVED, as Redis prints it
        slots = plain.execute_command("CLUSTER", "SLOTS")
        assert {row[2][0] for row in slots} == {V6.encode()}
        client = RedisCluster(host=V6, port=first)
        for i in range(200):
            client.set(f"key:{i}", i)
        assert [int(client.get(f"key:{i}")) for i in range(200)] == list(range(200))
        held = [int(redis.Redis(host=V6, port=int(b.rpartition(":")[2])).dbsize())
                for b in backends]
        assert sum(held) == 200 and min(held) > 0  # both shards took keys
        client.close()
    finally:
        launcher.cleanup()
