from __future__ import annotations

import pytest

from tests import procs


class Spawner:
    """Starts real processes on loopback and remembers them for cleanup."""

    def __init__(self) -> None:
        self.started: list[procs.Process] = []

    def redis(self, *args: str) -> procs.Process:
        p = procs.start_redis(None, *args)
        self.started.append(p)
        return p

    def proxy(self, backend, *args: str) -> procs.Process:
        p = procs.start_proxy(backend, None, *args)
        self.started.append(p)
        return p

    def cleanup(self) -> None:
        procs.cleanup(self.started)


class StandaloneCluster:
    """N redis-servers, each behind a standalone mesh-proxy, configured as one Redis Cluster."""

    def __init__(self, spawn: Spawner, shards: int, name: str = "mydb") -> None:
        from tools.umctl_mesh.local import setcluster_commands

        self.redis = [spawn.redis() for _ in range(shards)]
        self.proxies = [spawn.proxy(r) for r in self.redis]
        self.name = name
        cmds = setcluster_commands(name, [p.addr for p in self.proxies],
                                   [r.addr for r in self.redis])
        for proxy, cmd in zip(self.proxies, cmds):
            assert procs.command(proxy.port, *cmd) == b"+OK\r\n"

    @property
    def ports(self) -> list[int]:
        return [p.port for p in self.proxies]


@pytest.fixture
def spawn():
    """Start real processes; every one is stopped and its directory removed afterwards."""
    spawner = Spawner()
    yield spawner
    spawner.cleanup()


@pytest.fixture
def redis_server(spawn) -> procs.Process:
    return spawn.redis()


@pytest.fixture
def cluster(spawn) -> StandaloneCluster:
    return StandaloneCluster(spawn, 2)


@pytest.fixture(scope="module")
def shared_cluster():
    """One two-proxy cluster for a whole test module (tests use keys of their own)."""
    spawner = Spawner()
    try:
        yield StandaloneCluster(spawner, 2)
    finally:
        spawner.cleanup()


class Mesh:
    """A real etcd and `nodes` mesh nodes (redis-server + mesh-proxy --etcd) on loopback."""

    def __init__(self, spawn: Spawner, nodes: int, etcd_members: int = 1) -> None:
        self.spawn = spawn
        if etcd_members == 1:
            self.etcd_members = [procs.start_etcd()]
        else:
            self.etcd_members = procs.start_etcd_cluster(etcd_members)
        self.etcd = self.etcd_members[0]
        spawn.started.extend(self.etcd_members)
        self.redis: dict[str, procs.Process] = {}
        self.proxies: dict[str, procs.Process] = {}
        for _ in range(nodes):
            self.add_node()

    @property
    def endpoint(self) -> str:
        return ",".join(m.addr for m in self.etcd_members)

    def add_node(self, host: str = "") -> str:
        backend = self.spawn.redis()
        port = procs.free_port()
        node_id = f"node-{port}"
        extra = ["--etcd", self.endpoint, "--node-id", node_id]
        if host:
            extra += ["--host-tag", host]
        self.proxies[node_id] = procs.start_proxy(backend, port, *extra)
        self.spawn.started.append(self.proxies[node_id])
        self.redis[node_id] = backend
        return node_id

    def umctl(self, *args: str, check: bool = True, timeout: float = 60):
        import json
        import subprocess
        import sys

        out = subprocess.run([sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd",
                              self.endpoint, *args], capture_output=True, text=True,
                             timeout=timeout)
        if check:
            assert out.returncode == 0, out.stderr
        if "--json" in args and out.returncode == 0:
            return json.loads(out.stdout)
        return out

    def wait_pool(self, free: int, timeout: float = 15) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.umctl("--json", "nodes")
            if sum(1 for n in nodes if n["alive"] and n["role"] == "free") >= free:
                return
            time.sleep(0.2)
        raise AssertionError(f"the pool never had {free} free nodes")


@pytest.fixture(scope="module")
def standalone_node():
    """One standalone proxy serving all slots of its redis-server, for a whole module;
    `extra["backend"]` is the redis-server."""
    spawner = Spawner()
    backend = spawner.redis()
    proxy = spawner.proxy(backend)
    assert procs.command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                         backend.addr, "1", "0-16383") == b"+OK\r\n"
    proxy.extra["backend"] = backend
    yield proxy
    spawner.cleanup()


@pytest.fixture
def mesh_factory(spawn):
    return lambda nodes, etcd_members=1: Mesh(spawn, nodes, etcd_members)
