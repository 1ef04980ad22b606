from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading

import pytest

from core.secret import SECRET_ENV
from tests.procs import command, wait_for
from tools.launch import ROOT, Launcher, Process, free_port, proxy_argv
from tools.umctl_mesh.local import setcluster_commands

# a master starts a replica's full sync at once: Redis's default waits 5 s for more replicas
# to share a diskless transfer, and every test with replicas waited those out first
REDIS_ARGS = ("--repl-diskless-sync-delay", "0")
# every mesh node of the tests shares it, and so does umctl-mesh (graceful failover, drain)
MESH_SECRET = {SECRET_ENV: "test-mesh-secret"}


class Spawner:
    """Starts real processes on loopback (tools/launch.py) into one directory; `cleanup`
    stops them all and removes it."""

    def __init__(self) -> None:
        self.launcher = Launcher(prefix="mm-test-", env=MESH_SECRET)

    def redis(self, *args: str) -> Process:
        return self.launcher.redis(None, *REDIS_ARGS, *args)

    def proxy(self, backend: Process | str, *args: str, port: int | None = None) -> Process:
        return self.launcher.proxy(backend, port, "--log-level", "warning", *args)

    def proxies(self, backends: list[Process], *args: str,
                each: list[tuple[str, ...]] | None = None) -> list[Process]:
        """A proxy in front of each of `backends`, as `proxy` starts one, all spawned before
        any is waited for: a mesh-proxy spends most of its start importing, and two cores
        import two at a time. `args` may hold "{port}", replaced by each proxy's port;
        `each[i]` goes to the i-th proxy only."""
        taken = {int(a.rpartition(":")[2]) for extra in each or [] for a in extra if ":" in a}
        ports: list[int] = []
        while len(ports) < len(backends):  # distinct: none of them listens yet
            if (port := free_port()) not in ports and port not in taken:
                ports.append(port)
        started = []
        for i, (backend, port) in enumerate(zip(backends, ports)):
            p = self.launcher.process(f"proxy-{port}", proxy_argv(
                port, backend.addr, "--log-level", "warning",
                *(a.replace("{port}", str(port)) for a in args), *(each[i] if each else ())),
                port)
            p.backend = backend
            p.spawn()
            started.append(p)
        for p in started:
            p.wait_listening()
        return started

    def etcd(self, members: int = 1) -> list[Process]:
        if members == 1:
            return [self.launcher.etcd(fsync=False)]
        return self.launcher.etcd_cluster(members, fsync=False)

    def cleanup(self) -> None:
        # SIGKILL at once (no wait after the SIGTERM): a master in a cluster tries to hand
        # its shard over on SIGTERM, to replicas that stop at the same time, and used to hold
        # every mesh test's teardown for the whole grace period; a test that needs a clean
        # exit stops its processes itself and asserts on it
        self.launcher.cleanup(timeout=0)


class StandaloneCluster:
    """N redis-servers, each behind a standalone mesh-proxy, configured as one Redis Cluster."""

    def __init__(self, spawn: Spawner, shards: int) -> None:
        self.redis = [spawn.redis() for _ in range(shards)]
        self.proxies = spawn.proxies(self.redis)
        cmds = setcluster_commands("mydb", [p.addr for p in self.proxies],
                                   [r.addr for r in self.redis])
        for proxy, cmd in zip(self.proxies, cmds):
            assert command(proxy.port, *cmd) == b"+OK\r\n"

    @property
    def ports(self) -> list[int]:
        return [p.port for p in self.proxies]


@pytest.fixture
def spawn():
    """Start real processes; every one is stopped and its directory removed afterwards."""
    spawner = Spawner()
    yield spawner
    spawner.cleanup()


@pytest.fixture(scope="module")
def shared_cluster():
    """One two-proxy cluster for a whole test module (tests use keys of their own)."""
    spawner = Spawner()
    try:
        yield StandaloneCluster(spawner, 2)
    finally:
        spawner.cleanup()


# umctl-mesh commands that only read a mesh's state: the tests poll them in loops
READS = (["nodes"], ["cluster", "show"], ["cluster", "list"], ["migrations"])


def reads_only(args: tuple[str, ...]) -> bool:
    words = [a for a in args if not a.startswith("-")]
    return words == ["nodes"] or any(words[:len(r)] == r for r in READS[1:])


class UmctlWorker:
    """tests/umctl_worker.py, started on first use and kept for the session: runs the reads
    of `READS` as `python -m tools.umctl_mesh.cli` would, without a process start (and its
    half second of imports) each. One command at a time."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.umctl_worker"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                    env={**os.environ, **MESH_SECRET})
            assert self.proc.stdin is not None and self.proc.stdout is not None
            try:
                self.proc.stdin.write(json.dumps(argv) + "\n")
                self.proc.stdin.flush()
                if not select.select([self.proc.stdout], [], [], timeout)[0]:
                    raise subprocess.TimeoutExpired(["umctl-mesh", *argv], timeout)
                reply = json.loads(self.proc.stdout.readline())
            except BaseException:
                self.stop()  # a fresh worker for the next command
                raise
        return subprocess.CompletedProcess(["umctl-mesh", *argv], reply["code"],
                                           reply["stdout"], reply["stderr"])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


UMCTL_WORKER = UmctlWorker()


@pytest.fixture(scope="session", autouse=True)
def umctl_worker_stopped():
    yield
    UMCTL_WORKER.stop()


class Mesh:
    """A real etcd and `nodes` mesh nodes (redis-server + mesh-proxy --etcd) on loopback;
    `proxy_args` go to every mesh-proxy."""

    def __init__(self, spawn: Spawner, nodes: int, etcd_members: int = 1,
                 proxy_args: tuple[str, ...] = (), plain: bool = False,
                 metrics: bool = False, redis_args: tuple[str, ...] = ()) -> None:
        self.spawn = spawn
        self.proxy_args = proxy_args
        self.redis_args = redis_args
        self.plain = plain  # every node also has a plain listener (--plain-listen)
        self.plain_ports: dict[str, int] = {}
        self.metrics = metrics  # every node serves Prometheus metrics (--metrics)
        self.metrics_ports: dict[str, int] = {}
        self.etcd_members = spawn.etcd(etcd_members)
        self.etcd = self.etcd_members[0]
        self.redis: dict[str, Process] = {}
        self.proxies: dict[str, Process] = {}
        self.add_nodes(nodes)

    @property
    def endpoint(self) -> str:
        return ",".join(m.addr for m in self.etcd_members)

    def add_node(self) -> str:
        return self.add_nodes(1)[0]

    def add_nodes(self, count: int) -> list[str]:
        """`count` more nodes (their proxies started together); their node ids."""
        backends = [self.spawn.redis(*self.redis_args) for _ in range(count)]
        plain = [free_port() for _ in range(count)] if self.plain else []
        metrics = [free_port() for _ in range(count)] if self.metrics else []
        each = [(*(("--plain-listen", f"127.0.0.1:{plain[i]}") if plain else ()),
                 *(("--metrics", f"127.0.0.1:{metrics[i]}") if metrics else ()))
                for i in range(count)]
        proxies = self.spawn.proxies(backends, "--etcd", self.endpoint,
                                     "--node-id", "node-{port}", *self.proxy_args, each=each)
        for i, (backend, proxy) in enumerate(zip(backends, proxies)):
            node_id = f"node-{proxy.port}"
            self.proxies[node_id] = proxy
            self.redis[node_id] = backend
            if plain:
                self.plain_ports[node_id] = plain[i]
            if metrics:
                self.metrics_ports[node_id] = metrics[i]
        return [f"node-{p.port}" for p in proxies]

    def umctl(self, *args: str, check: bool = True, timeout: float = 60):
        """umctl-mesh with `args`: reads of the state (`reads_only`) in the resident worker,
        anything else as a process of its own, as an operator runs it."""
        if reads_only(args):
            out = UMCTL_WORKER.run(["--etcd", self.endpoint, *args], timeout)
        else:
            out = subprocess.run([sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd",
                                  self.endpoint, *args], capture_output=True, text=True,
                                 timeout=timeout, env={**os.environ, **MESH_SECRET})
        if check:
            assert out.returncode == 0, out.stderr
        if "--json" in args and out.returncode == 0:
            return json.loads(out.stdout)
        return out

    def wait_pool(self, free: int, timeout: float = 15) -> None:
        wait_for(lambda: sum(1 for n in self.umctl("--json", "nodes")
                             if n["alive"] and n["role"] == "free") >= free,
                 timeout, f"{free} free nodes in the pool")


@pytest.fixture(scope="module")
def standalone_node():
    """One standalone proxy serving all slots of its redis-server (its `backend`), for a
    whole module."""
    spawner = Spawner()
    backend = spawner.redis()
    proxy = spawner.proxy(backend)
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"
    yield proxy
    spawner.cleanup()


@pytest.fixture
def mesh_factory(spawn):
    return lambda nodes, etcd_members=1, proxy_args=(), plain=False, metrics=False, \
        redis_args=(): Mesh(spawn, nodes, etcd_members, tuple(proxy_args), plain, metrics,
                            tuple(redis_args))
