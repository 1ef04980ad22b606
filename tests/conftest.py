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
