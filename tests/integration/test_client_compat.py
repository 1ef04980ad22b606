"""Cluster clients other than the newest redis-py, against a real 3-proxy standalone cluster:
redis-py 4.x-8.x (RedisCluster, one virtualenv each), ioredis and node-redis 4/5 (npm),
redis-cli -c, redis-cli --cluster check|info and redis-benchmark --cluster.

Each client connects from one startup node and runs tests/clients/redis_py_client.py or
node_client.js: a few hundred keys over all shards, hash-tagged MSET/MGET, a pipeline and a
one-slot MULTI/EXEC, then (after the test moved half of the first shard's slots, keys
included, to the second shard under a new epoch) reads them again through its stale slot map,
so MOVED is followed, and writes more. The test compares everything printed with what Redis
Cluster would give and checks on each backend redis-server that every key is on the backend
of its slot's owner, and nowhere else.

The clients are installed by tools/install_clients.sh (`make clients`; the module fixture runs
it too, which costs nothing once they are there).
"""
from __future__ import annotations

import csv
import io
import json
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from core.slots import SLOT_COUNT, key_slot
from tests.conftest import StandaloneCluster
from tests.procs import HOST, command

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "tests" / "clients"
VENVS = ROOT / ".venv-clients"
N = 300  # keys per phase, spread over every shard
CLIENT_TIMEOUT = 60.0  # seconds for one client phase (2 shared cores, other tests running)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
Layout = dict[int, list[tuple[int, int]]]  # proxy port -> its slot ranges


class ClusterModeNotAdvertised(AssertionError):
    """The client refused the proxy because its INFO says `cluster_enabled:0`."""


# redis-py < 5 (NodesManager.initialize) and redis-cli --cluster (clusterManagerNodeIsCluster)
# read `cluster_enabled` from INFO first: the proxy must say 1, as a cluster node does
REFUSALS = ("Cluster mode is not enabled on this node",  # redis-py 4
            "is not configured as a cluster node")  # redis-cli --cluster


@pytest.fixture(scope="module", autouse=True)
def clients_installed():
    """tools/install_clients.sh: idempotent, well under a second when all is installed."""
    out = subprocess.run(["bash", str(ROOT / "tools" / "install_clients.sh")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def cluster(spawn) -> StandaloneCluster:
    return StandaloneCluster(spawn, 3)


# --------------------------------------------------------------------------- the cluster


def layout_of(port: int) -> Layout:
    """Slot ranges per master, as CLUSTER NODES of the proxy at `port` prints them."""
    reply = command(port, "CLUSTER", "NODES")
    body = reply[reply.index(b"\r\n") + 2: -2].decode()
    layout: Layout = {}
    for line in body.splitlines():
        fields = line.split()
        ranges = []
        for r in fields[8:]:
            lo, _, hi = r.partition("-")
            ranges.append((int(lo), int(hi or lo)))
        layout[int(fields[1].split("@")[0].rsplit(":", 1)[1])] = ranges
    return layout


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and out[-1][1] + 1 == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def owner(layout: Layout, slot: int) -> int:
    return next(port for port, ranges in layout.items()
                if any(lo <= slot <= hi for lo, hi in ranges))


def setcluster(cluster: StandaloneCluster, layout: Layout, epoch: int, only=None) -> None:
    def entry(addr: str, ranges: list[tuple[int, int]]) -> list[str]:
        return [addr, str(len(ranges)), *(f"{lo}-{hi}" for lo, hi in ranges)]

    for i, proxy in enumerate(cluster.proxies):
        if only is not None and i not in only:
            continue
        cmd = ["UMCTL", "SETCLUSTER", "v2", str(epoch), "NOFLAGS", "mydb",
               *entry(cluster.redis[i].addr, layout[proxy.port]), "PEER"]
        for other in cluster.proxies:
            if other is not proxy:
                cmd += entry(other.addr, layout[other.port])
        assert command(proxy.port, *cmd) == b"+OK\r\n"


def split_first_shard(layout: Layout, ports: list[int]) -> tuple[Layout, tuple[int, int]]:
    """The layout with the upper half of the first proxy's slots given to the second."""
    (lo, hi), = layout[ports[0]]
    moved = ((lo + hi) // 2 + 1, hi)
    new = dict(layout)
    new[ports[0]] = [(lo, moved[0] - 1)]
    new[ports[1]] = merged([moved, *layout[ports[1]]])
    return new, moved


def move_slots(cluster: StandaloneCluster) -> Layout:
    """Move the upper half of the first shard's slots, with their keys, to the second shard,
    under epoch 2 on every proxy; returns the new layout."""
    new, (lo, hi) = split_first_shard(layout_of(cluster.ports[0]), cluster.ports)
    src = redis.Redis(port=cluster.redis[0].port)
    keys = [k for k in src.scan_iter(count=1000) if lo <= key_slot(k) <= hi]
    assert keys, "no key in the moved slots: MOVED would not be exercised"
    assert src.migrate(HOST, cluster.redis[1].port, keys, 0, 10_000) in (b"OK", "OK", True)
    setcluster(cluster, new, epoch=2)
    for port in cluster.ports:
        assert layout_of(port) == new
    return new


def assert_placed(cluster: StandaloneCluster, layout: Layout, expected: set[str]) -> None:
    """Every expected key is on the backend of its slot's owner and nowhere else, every
    backend has some, and there is no other key."""
    held = []
    for proxy, backend in zip(cluster.proxies, cluster.redis):
        r = redis.Redis(port=backend.port, decode_responses=True)
        keys = set(r.scan_iter(count=1000))
        assert r.dbsize() == len(keys) > 0, f"backend of {proxy.addr} holds nothing"
        held.append(keys)
        mine = {k for k in expected if owner(layout, key_slot(k.encode())) == proxy.port}
        assert keys == mine, (f"{proxy.addr}: missing {sorted(mine - keys)[:5]}, "
                              f"not its own {sorted(keys - mine)[:5]}")
    assert sum(len(k) for k in held) == len(expected)


# --------------------------------------------------------------------------- running a client


def read_line(proc: subprocess.Popen, what: str) -> dict:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], CLIENT_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        if any(refusal in err for refusal in REFUSALS):
            raise ClusterModeNotAdvertised(err[-2000:])
        raise AssertionError(f"{what}: no output ({'exited' if ready else 'timed out'}); "
                             f"stderr:\n{err[-3000:]}")
    return json.loads(line)


def run_two_phases(argv: list[str], cluster: StandaloneCluster) -> tuple[dict, dict, Layout]:
    """Phase 1 on the first layout, move slots, phase 2 with the client's stale map."""
    proc = subprocess.Popen(argv, cwd=CLIENTS, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = read_line(proc, "phase 1")
        layout = move_slots(cluster)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        second = read_line(proc, "phase 2")
        _, err = proc.communicate(timeout=CLIENT_TIMEOUT)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return first, second, layout


def check_common(first: dict, second: dict, cluster: StandaloneCluster, ok) -> None:
    ports = sorted(cluster.ports)
    assert first["set"] == [ok] * N
    assert first["get"] == [str(i) for i in range(N)]
    assert first["mset"] == ok
    assert first["mget"] == ["A", "B", "C"]
    assert first["tagged_del"] == 3
    assert first["pipeline"] == [x for i in range(N) for x in (1, str(i))]
    assert second["get_old"] == [str(i) for i in range(N)]  # the moved ones after MOVED
    assert second["set_new"] == [ok] * N
    assert second["get_new"] == [str(i) for i in range(N)]
    assert second["nodes_known"] == ports


def written_keys(prefix: str) -> set[str]:
    return {f"{prefix}:{kind}{i}" for kind in ("", "ctr:", "new:") for i in range(N)}


# --------------------------------------------------------------------------- redis-py


REDIS_PY = [
    pytest.param("redis4", None, "4.", id="redis-py-4.6"),
    pytest.param("redis5", None, "5.", id="redis-py-5.3"),
    # not redis5 with RESP3: before 6.0 MOVED/ASK are known only to the RESP2 ClusterParser, so
    # over RESP3 a MOVED reaches the caller as ResponseError, from Redis Cluster as from here
    pytest.param("redis6", None, "6.", id="redis-py-6.4"),
    pytest.param("redis6", 3, "6.", id="redis-py-6.4-resp3"),
    pytest.param("redis7", None, "7.", id="redis-py-7.4"),
    pytest.param("redis8", None, "8.", id="redis-py-8.0"),
    pytest.param(None, None, "", id="redis-py-newest"),
    pytest.param(None, 3, "", id="redis-py-newest-resp3"),
]


@pytest.mark.parametrize("venv, protocol, version", REDIS_PY)
def test_redis_py(cluster, venv, protocol, version):
    python = str(VENVS / venv / "bin" / "python") if venv else sys.executable
    prefix = f"py{venv or 'newest'}"
    argv = [python, "redis_py_client.py", str(cluster.ports[0]), prefix, str(N)]
    first, second, layout = run_two_phases(argv + ([str(protocol)] if protocol else []),
                                           cluster)

    assert first["version"].startswith(version)
    assert first["startup_nodes_known"] == sorted(cluster.ports)
    check_common(first, second, cluster, True)
    expected = written_keys(prefix)
    if int(first["version"].split(".")[0]) >= 6:
        assert first["tx"] == ["OK", 2, "2"]  # no reply callbacks inside a cluster MULTI
        expected.add(f"{{{prefix}:tx}}:a")
    else:  # refused by the client itself, before anything is sent
        assert first["tx"] == ("unsupported: RedisClusterException: "
                               "transaction is deprecated in cluster mode")
    assert_placed(cluster, layout, expected)


# --------------------------------------------------------------------------- node.js


@pytest.mark.parametrize("package, version", [("ioredis", "5.11.1"), ("redis", "5.12.1"),
                                              ("redis4", "4.7.1")],
                         ids=["ioredis-5.11", "node-redis-5.12", "node-redis-4.7"])
def test_node_client(cluster, package, version):
    prefix = f"js{package}"
    first, second, layout = run_two_phases(
        ["node", "node_client.js", package, str(cluster.ports[0]), prefix, str(N)], cluster)

    assert first["version"] == version
    assert first["nodes_known"] == sorted(cluster.ports)
    check_common(first, second, cluster, "OK")
    assert first["tagged_pipeline"] == ["OK", 2, "xy"]
    assert first["tx"] == ["OK", 2, "2"]
    assert second["tx2"] == ["OK", 2, "2"]
    assert_placed(cluster, layout, written_keys(prefix) | {
        f"{{{prefix}:pipe}}:p1", f"{{{prefix}:tx}}:a", f"{{{prefix}:tx2}}:a"})


# --------------------------------------------------------------------------- redis-cli, redis-benchmark


def test_redis_cli_follows_redirects(cluster):
    layout = layout_of(cluster.ports[0])
    script = "".join(f"SET cli:{i} {i}\n" for i in range(N))
    script += "".join(f"GET cli:{i}\n" for i in range(N))
    script += "MSET {cli}:a 1 {cli}:b 2\nMGET {cli}:a {cli}:b\n"
    out = subprocess.run(["redis-cli", "-c", "-p", str(cluster.ports[0])], input=script,
                         capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    redirects = [line for line in lines if line.startswith("-> Redirected")]
    replies = [line for line in lines if not line.startswith("-> Redirected")]
    assert replies == ["OK"] * N + [str(i) for i in range(N)] + ["OK", "1", "2"]
    assert redirects, "one startup node, keys of three shards: some must be redirected"
    for line in redirects:
        m = re.fullmatch(r"-> Redirected to slot \[(\d+)\] located at 127\.0\.0\.1:(\d+)", line)
        assert m, line
        assert owner(layout, int(m[1])) == int(m[2])
    assert_placed(cluster, layout, {f"cli:{i}" for i in range(N)} | {"{cli}:a", "{cli}:b"})


def fill(cluster: StandaloneCluster) -> None:
    rc = RedisCluster(host=HOST, port=cluster.ports[0])
    pipe = rc.pipeline()
    for i in range(N):
        pipe.set(f"fill:{i}", i)
    assert all(pipe.execute())
    rc.close()


def dbsizes(cluster: StandaloneCluster) -> dict[int, int]:
    return {p.port: redis.Redis(port=r.port).dbsize()
            for p, r in zip(cluster.proxies, cluster.redis)}


def redis_cli_cluster(*args: str) -> tuple[int, str]:
    out = subprocess.run(["redis-cli", "--cluster", *args], capture_output=True, text=True,
                         timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL)
    text = ANSI.sub("", out.stdout + out.stderr)
    if any(refusal in text for refusal in REFUSALS):
        raise ClusterModeNotAdvertised(text)
    return out.returncode, text


def check_summary(text: str, cluster: StandaloneCluster, layout: Layout) -> None:
    """The per-master lines `--cluster info` and `--cluster check` both begin with."""
    sizes = dbsizes(cluster)
    for port, ranges in layout.items():
        slots = sum(hi - lo + 1 for lo, hi in ranges)
        assert re.search(rf"^127\.0\.0\.1:{port} \(mydb_*\.\.\.\) -> {sizes[port]} keys \| "
                         rf"{slots} slots \| 0 slaves\.$", text, re.M), text
    assert f"[OK] {sum(sizes.values())} keys in 3 masters." in text, text


def test_redis_cli_cluster_info(cluster):
    fill(cluster)
    code, text = redis_cli_cluster("info", f"{HOST}:{cluster.ports[1]}")
    assert code == 0, text
    check_summary(text, cluster, layout_of(cluster.ports[0]))


def test_redis_cli_cluster_check(cluster):
    fill(cluster)
    layout = layout_of(cluster.ports[0])
    code, text = redis_cli_cluster("check", f"{HOST}:{cluster.ports[0]}")
    assert code == 0, text
    check_summary(text, cluster, layout)
    for port, ranges in layout.items():
        node_id = command(port, "CLUSTER", "MYID").split(b"\r\n")[1].decode()
        spans = ",".join(f"{lo}-{hi}" for lo, hi in ranges)
        slots = sum(hi - lo + 1 for lo, hi in ranges)
        assert f"M: {node_id} 127.0.0.1:{port}\n   slots:[{spans}] ({slots} slots) master" \
            in text, text
    assert "[OK] All nodes agree about slots configuration." in text, text
    assert f"[OK] All {SLOT_COUNT} slots covered." in text, text
    assert "[ERR]" not in text and "[WARNING]" not in text, text

    # the check really compares what the nodes say: one proxy told of another layout
    new, _ = split_first_shard(layout, cluster.ports)
    setcluster(cluster, new, epoch=2, only={0})
    code, text = redis_cli_cluster("check", f"{HOST}:{cluster.ports[0]}")
    assert code != 0 and "[ERR] Nodes don't agree about configuration!" in text, text


def test_redis_benchmark_cluster(cluster):
    started = time.monotonic()
    out = subprocess.run(["redis-benchmark", "--cluster", "-h", HOST, "-p", str(cluster.ports[0]),
                          "-n", "2000", "-c", "10", "-t", "set,get", "--csv"],
                         capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "error" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    rows = {row[0]: row for row in csv.reader(io.StringIO(out.stdout)) if row}
    assert {"SET", "GET"} <= rows.keys(), out.stdout
    assert float(rows["SET"][1]) > 0 and float(rows["GET"][1]) > 0, out.stdout
    assert "Cluster has 3 master nodes:" in out.stdout, out.stdout
    for port in cluster.ports:  # the masters it read from CLUSTER NODES
        node_id = command(port, "CLUSTER", "MYID").split(b"\r\n")[1].decode()
        assert re.search(rf"^Master \d: {node_id} 127\.0\.0\.1:{port}$", out.stdout, re.M), out.stdout
    # one key per master, hash-tagged into that master's slots, holding 3 bytes (-d 3)
    layout = layout_of(cluster.ports[0])
    for proxy, backend in zip(cluster.proxies, cluster.redis):
        r = redis.Redis(port=backend.port)
        keys = list(r.scan_iter(count=1000))
        assert keys and all(k.startswith(b"key:{") for k in keys), keys
        for key in keys:
            assert owner(layout, key_slot(key)) == proxy.port
            assert r.strlen(key) == 3
    assert time.monotonic() - started < CLIENT_TIMEOUT
