"""The proxy's statistics are the served tenant's: a node that leaves cluster A shows none
of A's keys or traffic (free, then serving B), a client that has not authenticated gives
no samples, made-up command names cost no memory, and CLUSTER SLOT-STATS' key counts are
reused instead of a SCAN per call, and dropped with the client that asked."""
from __future__ import annotations

import socket
import time

import hiredis
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from core import secret
from proxy.jobs import SLOT_COUNTS_FRESH
from tests.conftest import MESH_SECRET, Mesh, Spawner
from tests.procs import command, free_port, fresh_body, read_replies, wait_for

A_KEY = "A:customer:4242:credit-card"


def send(s: socket.socket, *words: bytes | str) -> object:
    parts = [w if isinstance(w, bytes) else w.encode() for w in words]
    s.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p)
                                                for p in parts))
    reader = hiredis.Reader()
    reader.feed(read_replies(s, 1, timeout=30)[0])
    return reader.gets()


def hotkeys(port: int) -> list:
    """UMCTL HOTKEYS on a connection that proved the admin secret."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        nonce = send(s, "UMCTL", "CHALLENGE")
        key = MESH_SECRET[secret.SECRET_ENV].encode()
        assert send(s, "UMCTL", "PROVE", secret.proof(key, nonce)) == b"OK"
        return send(s, "UMCTL", "HOTKEYS", "3")  # type: ignore[return-value]


def command_counts(metrics_port: int) -> dict[str, float]:
    body = fresh_body(metrics_port)
    return {s.labels["command"]: s.value for f in text_string_to_metric_families(body)
            for s in f.samples if s.name == "moonmesh_commands_total"}


def slot_stats(port: int, password: str, *args: str | int) -> list:
    """CLUSTER SLOT-STATS's RESP2 reply as sent: rows of [slot, [name, value, ...]]."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        assert send(s, "AUTH", password) == b"OK"
        return send(s, "CLUSTER", "SLOT-STATS", *map(str, args))  # type: ignore[return-value]


def bytes_in(rows: list) -> list[int]:
    return [dict(zip(r[1][::2], r[1][1::2]))[b"network-bytes-in"] for r in rows]


def hammer(client: redis.Redis, key: str, reads: int = 10) -> None:
    for _ in range(reads):  # 5000 GETs: about 20 samples at one in 256
        pipe = client.pipeline(transaction=False)
        for _ in range(500):
            pipe.get(key)
        pipe.execute()


@pytest.fixture(scope="module")
def mesh():
    spawner = Spawner()
    try:
        m = Mesh(spawner, 1, metrics=True)
        m.wait_pool(1)
        yield m
    finally:
        spawner.cleanup()


def test_a_node_that_leaves_a_cluster_shows_none_of_its_statistics(mesh):
    node = next(iter(mesh.proxies))
    port, metrics = mesh.proxies[node].port, mesh.metrics_ports[node]
    mesh.umctl("--json", "cluster", "create", "A", "--shards", "1", "--password", "pwA")
    a = redis.Redis(port=port, password="pwA", socket_timeout=10)
    hammer(a, A_KEY)
    a.close()
    assert hotkeys(port)[0][0] == A_KEY.encode()
    assert command_counts(metrics).get("GET", 0) >= 5000

    mesh.umctl("cluster", "delete", "A", "--yes")
    mesh.wait_pool(1)  # free: nothing of A's is left to show
    assert hotkeys(port) == []
    assert "GET" not in command_counts(metrics)

    mesh.umctl("--json", "cluster", "create", "B", "--shards", "1", "--password", "pwB")
    b = redis.Redis(port=port, password="pwB", socket_timeout=10)
    assert bytes_in(slot_stats(port, "pwB", "ORDERBY", "network-bytes-in", "LIMIT", "3")) \
        == [0, 0, 0]
    assert hotkeys(port) == []
    assert "GET" not in command_counts(metrics)

    # a stranger without B's password: its commands are counted, its keys are no samples
    stranger = socket.create_connection(("127.0.0.1", port))
    stranger.sendall(b"*2\r\n$3\r\nGET\r\n$13\r\nstranger-junk\r\n" * 20000)
    read_replies(stranger, 20000, timeout=20)
    stranger.close()
    assert command_counts(metrics).get("GET", 0) >= 20000
    assert hotkeys(port) == []
    assert bytes_in(slot_stats(port, "pwB", "ORDERBY", "network-bytes-in", "LIMIT", "1")) \
        == [0]
    # ... while B's own client does
    hammer(b, "B:key")
    assert hotkeys(port)[0][0] == b"B:key"
    assert bytes_in(slot_stats(port, "pwB", "ORDERBY", "network-bytes-in", "LIMIT", "1"))[0] \
        > 0
    b.close()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(x for x in status if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def test_made_up_command_names_cost_no_memory(spawn):
    backend = spawn.redis()
    metrics = free_port()
    proxy = spawn.proxy(backend, "--metrics", f"127.0.0.1:{metrics}")
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"
    before = rss_mb(proxy.pid)
    names, size = 100, 1 << 20
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        for i in range(names):  # 100 distinct 1 MB names, one at a time
            name = b"%06d" % i + b"x" * (size - 6)
            s.sendall(b"*1\r\n$%d\r\n%s\r\n" % (len(name), name))
            assert read_replies(s, 1, timeout=10)[0].startswith(b"-")
    # kept, they would be 100 MB (the read buffer's reuse is a few MB)
    assert rss_mb(proxy.pid) - before < 40
    assert command_counts(metrics)["other"] == names


def key_count(port: int, slot: int) -> int:
    reader = hiredis.Reader()
    reader.feed(command(port, "CLUSTER", "SLOT-STATS", "SLOTSRANGE", slot, slot))
    (row,) = reader.gets()
    return dict(zip(row[1][::2], row[1][1::2]))[b"key-count"]


def scan_count(backend_port: int) -> int:
    info = redis.Redis(port=backend_port).info("commandstats")
    return info.get("cmdstat_scan", {}).get("calls", 0)


def test_slot_stats_reuses_key_counts_and_scans_nothing_for_a_free_node(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    # a free node serves no slots: no rows, and no SCAN
    assert command(proxy.port, "CLUSTER", "SLOT-STATS", "ORDERBY", "key-count") == b"*0\r\n"
    assert scan_count(backend.port) == 0
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"
    client = redis.Redis(port=proxy.port, socket_timeout=10)
    direct = redis.Redis(port=backend.port)
    direct.mset({f"{{k}}:{i}": "v" for i in range(5)})
    slot = client.execute_command("CLUSTER", "KEYSLOT", "k")
    assert key_count(proxy.port, slot) == 5
    scans = scan_count(backend.port)
    assert scans >= 1
    direct.set("{k}:more", "v")  # within SLOT_COUNTS_FRESH the counts are reused
    started = time.monotonic()
    counts = [key_count(proxy.port, slot) for _ in range(20)]
    assert time.monotonic() - started < SLOT_COUNTS_FRESH
    assert counts == [5] * 20 and scan_count(backend.port) == scans
    # a new epoch of the table is counted anew
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "2", "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"
    assert key_count(proxy.port, slot) == 6 and scan_count(backend.port) > scans
    client.close()
    direct.close()


def test_a_slot_stats_scan_ends_with_its_client(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"
    direct = redis.Redis(port=backend.port)
    for batch in range(20):  # 200k keys: a SCAN of them is 200 batches
        pipe = direct.pipeline(transaction=False)
        for i in range(batch * 10_000, (batch + 1) * 10_000):
            pipe.set(b"k:%d" % i, b"v")
        pipe.execute()
    request = b"*4\r\n$7\r\nCLUSTER\r\n$10\r\nSLOT-STATS\r\n$7\r\nORDERBY\r\n$9\r\nkey-count\r\n"
    def scan_calls() -> int:  # on one connection, polled closely: each scan is hung up on at once
        return direct.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)

    for _ in range(2):  # both scans the proxy allows at once: asked for, then hung up on
        calls = scan_calls()
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(request)
            deadline = time.monotonic() + 10
            while scan_calls() == calls:
                assert time.monotonic() < deadline, "the scan did not start"
                time.sleep(0.005)

    def scans_stopped() -> bool:
        calls = scan_count(backend.port)
        time.sleep(0.2)  # a batch of SCAN takes well under a millisecond
        return scan_count(backend.port) == calls

    wait_for(scans_stopped, 60, "the scans stopped")
    # one full scan is 200 SCAN batches (and the Redis's own, for INFO: none); both scans
    # together, each cut off where its client went, made fewer than that
    assert scan_count(backend.port) < 200
    # and a new caller is not told BUSY
    reader = hiredis.Reader()
    reader.feed(command(proxy.port, "CLUSTER", "SLOT-STATS", "SLOTSRANGE", "0", "0",
                        timeout=30))
    assert reader.gets()[0][0] == 0
    direct.close()
