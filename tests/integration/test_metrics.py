"""Metrics, hot keys and CLUSTER SLOT-STATS on a real mesh (etcd, redis-servers, mesh-proxies
with --metrics): what clients do moves the counts by exactly that much."""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import hiredis
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import MovedError

from core import secret
from core.slots import key_slot
from node.metrics import HEAD_TIMEOUT, MAX_SCRAPES, SCRAPE_CACHE_SECONDS
from tests.conftest import MESH_SECRET, Mesh, Spawner
from tests.procs import command, free_port, fresh_body, http, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "moonmesh-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "moonmesh-alerts.yml"


@pytest.fixture(scope="module")
def mesh():
    spawner = Spawner()
    try:
        m = Mesh(spawner, 2, metrics=True)
        m.wait_pool(2)
        created = m.umctl("--json", "cluster", "create", "mydb", "--shards", "2")
        assert created["not_applied"] == []
        yield m
    finally:
        spawner.cleanup()


def samples(body: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                  if k not in ("cluster", "node", "shard")))
            out[(sample.name, labels)] = sample.value
    return out


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample the node serves, rendered after this call began: (name, sorted labels
    without cluster/node/shard) -> value."""
    return samples(fresh_body(port))


def served_names(port: int) -> set[str]:
    """The names of every sample the node serves, and of every family it declares (a
    migration's have samples only while one runs)."""
    body = fresh_body(port, b"GET /metrics HTTP/1.0\r\n\r\n")
    names = set()
    for family in text_string_to_metric_families(body):
        names.add(family.name)
        names |= {s.name for s in family.samples}
    return names


def owned_keys(client: redis.Redis, prefix: str, count: int) -> list[str]:
    """`count` keys whose slots this node serves as master."""
    mine = []
    for row in client.execute_command("CLUSTER SLOTS"):
        start, end, master = row[0], row[1], row[2]
        if master[1] == client.connection_pool.connection_kwargs["port"]:
            mine.append((start, end))
    keys, i = [], 0
    while len(keys) < count:
        key = f"{prefix}:{i}"
        if any(a <= key_slot(key.encode()) <= b for a, b in mine):
            keys.append(key)
        i += 1
    return keys


def foreign_key(client: redis.Redis) -> str:
    port = client.connection_pool.connection_kwargs["port"]
    theirs = [(r[0], r[1]) for r in client.execute_command("CLUSTER SLOTS") if r[2][1] != port]
    return next(k for k in (f"far:{i}" for i in range(10_000))
                if any(a <= key_slot(k.encode()) <= b for a, b in theirs))


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def node_and_ports(mesh: Mesh) -> tuple[str, int, int]:
    node = sorted(mesh.proxies)[0]
    return node, mesh.proxies[node].port, mesh.metrics_ports[node]


def test_counts_move_by_what_clients_did(mesh):
    node, port, metrics = node_and_ports(mesh)
    client = redis.Redis(port=port, socket_timeout=10)
    keys = owned_keys(client, "m", 100)
    elsewhere = foreign_key(client)
    before = scrape(metrics)
    for i in range(3000):  # one at a time: each read is one command
        client.set(keys[i % 100], "v")
    for key in keys:
        assert client.get(key) == b"v"
    with pytest.raises(MovedError):
        client.get(elsewhere)
    with pytest.raises(redis.ResponseError, match="hash to the same slot"):
        client.mget(keys[0], next(k for k in keys if key_slot(k.encode())
                                  != key_slot(keys[0].encode())))
    with pytest.raises(redis.ResponseError, match="unknown command"):
        client.execute_command("NOSUCHCOMMAND")
    pipe = client.pipeline(transaction=False)  # one read of mixed commands: each counted
    counter = owned_keys(client, "cnt", 1)[0]
    pipe.set(keys[0], "w").get(keys[0]).incr(counter).delete(counter)
    assert pipe.execute() == [True, b"w", 1, 1]
    after = scrape(metrics)

    assert delta(after, before, "moonmesh_commands_total", command="SET") == 3001
    assert delta(after, before, "moonmesh_commands_total", command="GET") == 102
    assert delta(after, before, "moonmesh_commands_total", command="INCRBY") == 1  # redis-py's incr
    assert delta(after, before, "moonmesh_commands_total", command="DEL") == 1
    assert delta(after, before, "moonmesh_commands_total", command="MGET") == 1
    assert delta(after, before, "moonmesh_commands_total", command="other") == 1
    assert delta(after, before, "moonmesh_redirects_total", kind="MOVED") == 1
    assert delta(after, before, "moonmesh_redirects_total", kind="TRYAGAIN") == 0
    assert delta(after, before, "moonmesh_errors_total", kind="MOVED") == 1
    assert delta(after, before, "moonmesh_errors_total", kind="CROSSSLOT") == 1
    assert delta(after, before, "moonmesh_errors_total", kind="ERR") == 1
    # latency: one command in SAMPLE_EVERY (256) on average is sampled, at random gaps
    # (about 12 of these SETs; fewer than 2 is a 1-in-10,000 chance)
    assert delta(after, before, "moonmesh_command_latency_seconds_count", command="SET") >= 2
    assert delta(after, before, "moonmesh_command_latency_seconds_bucket", command="SET",
                 le="+Inf") == delta(after, before, "moonmesh_command_latency_seconds_count",
                                     command="SET")
    assert after[("moonmesh_client_connections", ())] >= 1
    assert after[("moonmesh_backend_up", ())] == 1
    assert after[("moonmesh_backend_connections", (("kind", "pooled"),))] >= 1
    assert after[("moonmesh_view_epoch", ())] >= 1
    assert after[("moonmesh_role", (("role", "master"),))] == 1
    assert after[("moonmesh_fenced", ())] == 0
    assert 0 < after[("moonmesh_lease_seconds_left", ())] <= 3.0
    assert after[("moonmesh_replication_lag_bytes", ())] == 0
    client.close()


def test_labels_name_the_cluster_node_and_shard(mesh):
    node, _, metrics = node_and_ports(mesh)
    body = http(metrics, b"GET /metrics HTTP/1.0\r\n\r\n").partition(b"\r\n\r\n")[2].decode()
    epoch = next(s for f in text_string_to_metric_families(body) for s in f.samples
                 if s.name == "moonmesh_view_epoch")
    assert epoch.labels["cluster"] == "mydb" and epoch.labels["node"] == node
    assert re.fullmatch(r"s\d+", epoch.labels["shard"])


def test_bad_http_requests_get_4xx_and_the_proxy_keeps_serving(mesh):
    _, port, metrics = node_and_ports(mesh)
    assert http(metrics, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n") \
        .startswith(b"HTTP/1.1 431")
    assert http(metrics, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert http(metrics, b"GET /secret HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert http(metrics, b"\x00\xff garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert http(metrics, b"GET /metrics HTTP/1.1\r\n").startswith(b"HTTP/1.1 400")  # cut short
    assert redis.Redis(port=port).ping()
    assert ("moonmesh_view_epoch", ()) in scrape(metrics)


def test_idle_connections_do_not_lock_out_a_scrape(mesh):
    """Twice the cap of connections that never send a request: a scrape still gets 200 at
    once (the oldest idle one is closed for it), and every idle one is closed within
    HEAD_TIMEOUT."""
    _, _, metrics = node_and_ports(mesh)
    idle = [socket.create_connection(("127.0.0.1", metrics), timeout=HEAD_TIMEOUT + 5)
            for _ in range(2 * MAX_SCRAPES)]
    try:
        started = time.monotonic()
        for _ in range(3):
            assert http(metrics, b"GET /metrics HTTP/1.1\r\n\r\n",
                        timeout=HEAD_TIMEOUT / 2).startswith(b"HTTP/1.1 200")
        for conn in idle:
            try:
                while conn.recv(65536):  # a 400 (head timed out) or nothing (closed)
                    pass
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < HEAD_TIMEOUT + 2
    finally:
        for conn in idle:
            conn.close()


def test_a_scrape_flood_renders_once_per_window(mesh):
    _, _, metrics = node_and_ports(mesh)
    renders = ("moonmesh_metrics_renders_total", ())
    before = scrape(metrics)[renders]
    statuses: list[bytes] = []
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            statuses.append(http(metrics, b"GET /metrics HTTP/1.1\r\n\r\n")[:12])

    threads = [threading.Thread(target=flood) for _ in range(2)]
    started = time.monotonic()
    for t in threads:
        t.start()
    stop.wait(2.5 * SCRAPE_CACHE_SECONDS)
    stop.set()
    for t in threads:
        t.join(10)
    took = time.monotonic() - started
    after = scrape(metrics)[renders]  # the first body rendered after the flood
    assert set(statuses) == {b"HTTP/1.1 200"} and len(statuses) >= 20
    # one render per window the flood spanned (and the one after it), not one per scrape
    assert 1 <= after - before <= took / SCRAPE_CACHE_SECONDS + 2, (after - before, took)


def prove(client: redis.Redis) -> None:
    nonce = client.execute_command("UMCTL", "CHALLENGE")
    key = MESH_SECRET[secret.SECRET_ENV].encode()
    assert client.execute_command("UMCTL", "PROVE", secret.proof(key, nonce)) == b"OK"


def test_hotkeys_find_the_hot_key_and_need_the_secret(mesh):
    _, port, _ = node_and_ports(mesh)
    client = redis.Redis(port=port, socket_timeout=10)
    hot, *cold = owned_keys(client, "hk", 1001)
    client.set(hot, "x")
    pipe = client.pipeline(transaction=False)
    for i in range(8000):  # the hot key 8 times as often as all the others together
        pipe.get(hot)
        if i % 8 == 0:
            pipe.get(cold[i // 8])
    pipe.execute()
    with pytest.raises(redis.ResponseError, match="needs the admin secret"):
        client.execute_command("UMCTL", "HOTKEYS")
    admin = redis.Redis(port=port, socket_timeout=10)
    prove(admin)
    top = admin.execute_command("UMCTL", "HOTKEYS", "3")
    assert len(top) == 3 and all(len(pair) == 2 and isinstance(pair[1], int) for pair in top)
    assert top[0][0] == hot.encode()
    # 8001 GETs and a SET, estimated from one command in 256 (about 35 samples of it)
    assert 4000 <= top[0][1] <= 14000
    assert top[0][1] >= top[1][1] >= top[2][1]
    with pytest.raises(redis.ResponseError, match="usage"):
        admin.execute_command("UMCTL", "HOTKEYS", "0")
    client.close()
    admin.close()


def test_cluster_slot_stats_counts_keys_and_traffic_per_slot(mesh):
    _, port, _ = node_and_ports(mesh)
    client = redis.Redis(port=port, socket_timeout=10)
    keys = [f"{{ss}}:{i}" for i in range(50)]  # one slot
    slot = key_slot(b"ss")
    if not any(r[0] <= slot <= r[1] and r[2][1] == port
               for r in client.execute_command("CLUSTER SLOTS")):
        port = next(p.port for p in mesh.proxies.values() if p.port != port)
        client = redis.Redis(port=port, socket_timeout=10)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.set(key, "x" * 100)
    pipe.execute()
    for _ in range(160):  # 8000 GETs: about 31 samples at one in 256
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        pipe.execute()

    rows = resp2(port, "CLUSTER", "SLOT-STATS", "SLOTSRANGE", slot, slot)
    assert len(rows) == 1 and rows[0][0] == slot
    stats = dict(zip(rows[0][1][::2], rows[0][1][1::2]))  # RESP2: a flat array
    assert list(stats) == [b"key-count", b"cpu-usec", b"network-bytes-in",
                           b"network-bytes-out"]
    assert stats[b"key-count"] == 50
    # 8050 commands, estimated from one in 256: GET {ss}:N is 33-34 bytes in, 107 out
    assert 0.5 * 8000 * 33 <= stats[b"network-bytes-in"] <= 2 * 8050 * 160
    assert 0.5 * 8000 * 107 <= stats[b"network-bytes-out"] <= 2 * 8050 * 107
    assert stats[b"cpu-usec"] > 0

    ordered = resp2(port, "CLUSTER", "SLOT-STATS", "ORDERBY", "key-count", "LIMIT", "2")
    assert len(ordered) == 2 and ordered[0][0] == slot
    assert ordered[0][1][1] >= ordered[1][1][1]
    # a range of slots another node serves: no rows
    theirs = next(r for r in client.execute_command("CLUSTER SLOTS") if r[2][1] != port)
    assert resp2(port, "CLUSTER", "SLOT-STATS", "SLOTSRANGE", theirs[0], theirs[0]) == []
    for args, message in [
        (("ORDERBY", "nope"), "Unrecognized sort metric for ORDERBY."),
        (("SLOTSRANGE", "5", "1"), "Start slot number 5 is greater than end slot number 1"),
        (("SLOTSRANGE", "0", "16384"), "Invalid or out of range slot"),
        (("ORDERBY", "key-count", "LIMIT", "0"), "Limit has to lie in between 1 and 16384"),
    ]:
        with pytest.raises(redis.ResponseError, match=re.escape(message)):
            client.execute_command("CLUSTER", "SLOT-STATS", *args)
    resp3 = redis.Redis(port=port, protocol=3, socket_timeout=10)
    row = resp3.execute_command("CLUSTER", "SLOT-STATS", "SLOTSRANGE", slot, slot)[0]
    assert row[0] == slot and row[1][b"key-count"] == 50  # a map in RESP3
    client.close()
    resp3.close()


def resp2(port: int, *args: object) -> object:
    """A command's RESP2 reply, parsed as sent (no client library's reshaping)."""
    reader = hiredis.Reader()
    reader.feed(command(port, *args))
    return reader.gets()


def used_metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bmoonmesh_[a-z_]+\b", text))


def test_dashboard_and_alerts_use_only_metrics_a_proxy_serves(mesh):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and all("targets" in p for p in dashboard["panels"]
                                       if p.get("type") != "row")
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {r["alert"] for r in alerts} >= {
        "MoonmeshNodeDown", "MoonmeshFenced", "MoonmeshLeaseShort",
        "MoonmeshReplicationLagHigh", "MoonmeshErrorRate", "MoonmeshMigrationStuck"}
    used = used_metric_names(DASHBOARD.read_text()) | used_metric_names(ALERTS.read_text())
    assert len(used) >= 10
    served = set()
    for metrics in mesh.metrics_ports.values():
        served |= served_names(metrics)
    assert used - served == set()


def test_a_standalone_proxy_serves_metrics_without_the_mesh(spawn):
    backend = spawn.redis()
    port = free_port()
    proxy = spawn.proxy(backend, "--metrics", f"127.0.0.1:{port}")
    redis.Redis(port=proxy.port).ping()
    wait_for(lambda: ("moonmesh_commands_total", (("command", "PING"),)) in scrape(port),
             10, "the PING counted")
    got = scrape(port)
    assert ("moonmesh_role", (("role", "master"),)) not in got  # no agent, no role
    assert ("moonmesh_lease_seconds_left", ()) not in got  # no lease either


def test_a_replica_reports_its_role_shard_and_lag(mesh):
    added = mesh.add_nodes(2)
    mesh.wait_pool(2)
    shown = mesh.umctl("--json", "cluster", "create", "rep", "--shards", "1", "--replicas", "1")
    assert shown["not_applied"] == []
    nodes = mesh.umctl("--json", "cluster", "show", "rep")["shards"][0]["nodes"]
    master = next(n["node"] for n in nodes if n["role"] == "master")
    replica = next(n["node"] for n in nodes if n["role"] == "replica")
    assert {master, replica} == set(added)
    client = redis.Redis(port=mesh.proxies[master].port, socket_timeout=10)
    pipe = client.pipeline(transaction=False)
    for i in range(2000):
        pipe.set(f"r:{i}", "x" * 100)
    pipe.execute()

    def offsets():
        m, r = scrape(mesh.metrics_ports[master]), scrape(mesh.metrics_ports[replica])
        done = r[("moonmesh_role", (("role", "replica"),))] == 1 \
            and r[("moonmesh_replication_offset_bytes", ())] > 200_000 \
            and r[("moonmesh_replication_offset_bytes", ())] \
            == m[("moonmesh_replication_offset_bytes", ())]
        return (m, r) if done else None
    m, r = wait_for(offsets, 20, "the replica's status to catch up with its master's")
    assert m[("moonmesh_role", (("role", "master"),))] == 1
    assert r[("moonmesh_role", (("role", "master"),))] == 0
    assert m[("moonmesh_replication_lag_bytes", ())] == 0
    assert r[("moonmesh_replication_lag_bytes", ())] == 0  # caught up: the offsets agree
    body = http(mesh.metrics_ports[replica], b"GET /metrics HTTP/1.0\r\n\r\n").decode()
    assert f'moonmesh_view_epoch{{cluster="rep",node="{replica}",shard="s1"}}' in body
    client.close()
