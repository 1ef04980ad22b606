"""A Moonmesh deployed on namespace hosts: 3 etcd members, N nodes, one client host.

Each node is one host, run as `deploy/` runs a node on a machine: its redis-server and its
mesh-proxy. Redis listens on the host's own 127.0.0.1 and on the host address (replicas in
other namespaces replicate from it, and the proxy's `--backend` is that address, which is what
the node advertises to its peers); as in `deploy/`, it keeps an append-only file (no RDB
snapshots), so a Redis killed and started again loads what it had. The proxy listens on and
announces the host address. etcd
members each have a host of their own. Processes are `tools.launch.Process`es whose child
enters the host's namespace before exec; their logs are in the run's directory.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from chaos import netns
from core.secret import SECRET_ENV
from tools.launch import ROOT, LaunchError, Process, die_with_parent, etcd_binary, stop_all

REDIS_PORT, PROXY_PORT, ETCD_PORT, ETCD_PEER_PORT = 6379, 7000, 2379, 2380
SECRET = {SECRET_ENV: "chaos-mesh-secret"}


def listening_in(ns: str, ip: str, port: int) -> bool:
    with netns.inside(ns):
        try:
            s = socket.create_connection((ip, port), timeout=0.3)
        except OSError:
            return False
    s.close()
    return True


class NsProcess(Process):
    """A `Process` whose child runs inside a host's namespace."""

    def __init__(self, host: netns.Host, name: str, port: int, argv: list[str], workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(name, port, argv, workdir / f"{name}.log", workdir / name,
                         die_with_parent=True, env=env)
        self.host = host

    @property
    def addr(self) -> str:
        return f"{self.host.ip}:{self.port}"

    def spawn(self) -> None:
        if self.alive():
            raise LaunchError(f"{self.name} is running already")
        ns = self.host.ns

        def preexec() -> None:
            netns.setns(ns)
            die_with_parent()

        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, env={**os.environ, **self.env} if self.env else None,
                preexec_fn=preexec)

    def listening(self) -> bool:
        return listening_in(self.host.ns, self.host.ip, self.port)

    def wait_listening(self, timeout: float = 20.0) -> None:  # a namespace starts slower
        super().wait_listening(timeout)


class Node:
    """One mesh node's host: its redis-server and its mesh-proxy."""

    def __init__(self, host: netns.Host, redis: NsProcess, proxy: NsProcess) -> None:
        self.host, self.redis, self.proxy = host, redis, proxy

    @property
    def id(self) -> str:
        return self.host.name


class Deployment:
    """etcd members, nodes and a client host, each in a namespace of one `netns.Network`."""

    def __init__(self, run_id: str, nodes: int, etcd_members: int = 3,
                 workdir: Path | None = None, proxy_args: tuple[str, ...] = ()) -> None:
        self.run_id = run_id
        self.workdir = workdir or Path(f"/tmp/moonmesh-chaos-{run_id}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proxy_args = proxy_args
        self.n_nodes, self.n_etcd = nodes, etcd_members
        self.net = netns.Network(run_id)
        self.etcd: list[NsProcess] = []
        self.nodes: dict[str, Node] = {}
        self.processes: list[Process] = []
        self.client = self.net.add_host("client")

    # ------------------------------------------------------------------ start

    def start(self) -> Deployment:
        try:
            self._start_etcd()
            for i in range(self.n_nodes):
                self._make_node(f"n{i + 1}")
            for n in self.nodes.values():
                n.redis.spawn()
            for n in self.nodes.values():
                n.redis.wait_listening()
            for n in self.nodes.values():
                n.proxy.spawn()
            for n in self.nodes.values():
                n.proxy.wait_listening(30)
        except Exception:
            self.close()
            raise
        return self

    def _process(self, host: netns.Host, name: str, port: int, argv: list[str],
                 env: dict[str, str] | None = None) -> NsProcess:
        p = NsProcess(host, name, port, argv, self.workdir, env)
        self.processes.append(p)
        return p

    def _start_etcd(self) -> None:
        hosts = [self.net.add_host(f"etcd{i}") for i in range(self.n_etcd)]
        initial = ",".join(f"m{i}=http://{h.ip}:{ETCD_PEER_PORT}" for i, h in enumerate(hosts))
        for i, h in enumerate(hosts):
            url, peer = f"http://{h.ip}:{ETCD_PORT}", f"http://{h.ip}:{ETCD_PEER_PORT}"
            data = self.workdir / f"etcd{i}"
            argv = [etcd_binary(), "--name", f"m{i}", "--data-dir", str(data),
                    "--listen-client-urls", url, "--advertise-client-urls", url,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--log-level", "warn", "--unsafe-no-fsync"]
            self.etcd.append(self._process(h, f"etcd{i}", ETCD_PORT, argv))
        for p in self.etcd:
            p.spawn()
        for p in self.etcd:
            p.wait_listening()

    @property
    def endpoints(self) -> str:
        return ",".join(p.addr for p in self.etcd)

    def _make_node(self, name: str) -> Node:
        host = self.net.add_host(name)
        data = self.workdir / f"{name}-redis"
        data.mkdir(exist_ok=True)
        redis = self._process(host, f"{name}-redis", REDIS_PORT, [
            shutil.which("redis-server") or "redis-server", "--port", str(REDIS_PORT),
            "--bind", "127.0.0.1", host.ip, "--protected-mode", "no", "--save", "",
            "--appendonly", "yes", "--dir", str(data)])
        addr = f"{host.ip}:{PROXY_PORT}"
        proxy = self._process(host, f"{name}-proxy", PROXY_PORT, [
            sys.executable, "-m", "node.main", "--listen", addr, "--announce", addr,
            "--backend", f"{host.ip}:{REDIS_PORT}", "--etcd", self.endpoints,
            "--node-id", name, "--log-level", "warning", *self.proxy_args], env=SECRET)
        node = self.nodes[name] = Node(host, redis, proxy)
        return node

    # ------------------------------------------------------------------ operating

    def umctl(self, *args: str, timeout: float = 60, check: bool = True):  # noqa: ANN201
        """umctl-mesh run on the client host; parsed JSON with --json."""
        out = subprocess.run([sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd",
                              self.endpoints, *args], capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, **SECRET}, cwd=ROOT,
                             preexec_fn=netns.enter(self.client.ns))
        if check and out.returncode != 0:
            raise RuntimeError(f"umctl-mesh {' '.join(args)} failed ({out.returncode}): "
                               f"{out.stderr.strip()[-800:]}")
        if "--json" in args and out.returncode == 0:
            return json.loads(out.stdout)
        return out

    def pool(self) -> list[dict]:
        return self.umctl("--json", "nodes", timeout=20)

    def show(self, cluster: str) -> dict:
        return self.umctl("--json", "cluster", "show", cluster, timeout=20)

    def leader(self) -> str | None:
        return next((n["node"] for n in self.pool() if n["leader"]), None)

    def wait(self, what: str, predicate, timeout: float = 60, every: float = 0.3):  # noqa: ANN001, ANN201
        """Poll `predicate` (errors count as not yet) until true; returns its value."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                got = predicate()
                if got:
                    return got
            except Exception as exc:  # noqa: BLE001 - a fault in progress; keep asking
                last = exc
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}"
                           + (f" (last error: {last})" if last else ""))

    def redis_info(self, node: str, section: str = "") -> dict[str, str]:
        """INFO of a node's redis-server, asked from the client host."""
        from chaos.workload import Conn

        host = self.nodes[node].host
        with netns.inside(self.client.ns):
            conn = Conn(f"{host.ip}:{REDIS_PORT}")
        try:
            raw = conn.call("INFO", section) if section else conn.call("INFO")
        finally:
            conn.close()
        return dict(line.split(":", 1) for line in raw.decode().splitlines()
                    if ":" in line and not line.startswith("#"))

    def dead(self) -> list[str]:
        return [p.name for p in self.processes if p.popen is not None and not p.alive()]

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        for p in self.processes:  # a stopped process would not get SIGTERM
            if p.alive():
                try:
                    os.kill(p.pid, 18)  # SIGCONT
                except OSError:
                    pass
        stop_all(self.processes, timeout=2.0)
        self.net.close()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
