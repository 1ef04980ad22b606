"""Real processes for the tests (started by tools/launch.py) and small helpers around them."""
from __future__ import annotations

import shutil
import socket
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from proxy.resp import scan_reply
from tools.launch import HOST, Launcher, Process, etcd_argv, free_port, stop_all

__all__ = ["HOST", "Process", "cleanup", "command", "free_port", "read_replies", "start_etcd",
           "start_etcd_cluster", "start_redis", "wait_for"]

T = TypeVar("T")


def command(port: int, *args: bytes | str | int, timeout: float = 5.0) -> bytes:
    """Send one RESP command on a fresh connection and return the raw reply bytes."""
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(payload)
        buf = b""
        while (end := scan_reply(buf, 0)) <= 0:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {buf!r}")
            buf += chunk
        return buf[:end]


_leftover: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_replies(s: socket.socket, n: int, timeout: float = 5.0) -> list[bytes]:
    """The next n raw replies on `s`; bytes read past them are kept for the next call."""
    s.settimeout(timeout)
    buf = _leftover.pop(s, b"")
    out: list[bytes] = []
    while True:
        while len(out) < n and (end := scan_reply(buf)) > 0:
            out.append(buf[:end])
            buf = buf[end:]
        if len(out) == n:
            _leftover[s] = buf
            return out
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} replies")
        buf += chunk


def wait_for(predicate: Callable[[], T], timeout: float = 30, what: str = "condition") -> T:
    """Poll `predicate` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start_redis(port: int | None = None) -> Process:
    """A redis-server outside any fixture, in a directory of its own (see `cleanup`)."""
    return Launcher(prefix="mm-redis-").redis(port)


def start_etcd(port: int | None = None, workdir: str | Path | None = None) -> Process:
    """A single-member etcd outside any fixture; its port and workdir start it again on its
    data (as `Process.restart()` does)."""
    if workdir is None:
        return Launcher(prefix="mm-etcd-").etcd(port, fsync=False)
    assert port is not None, "a restart needs the port"
    workdir = Path(workdir)
    return Process("etcd", port, etcd_argv("etcd", port, free_port(), workdir, fsync=False),
                   workdir.parent / "etcd.log", workdir).start()


def start_etcd_cluster(members: int = 3) -> list[Process]:
    """A multi-member etcd outside any fixture; one Process per member."""
    return Launcher(prefix="mm-etcd-").etcd_cluster(members, fsync=False)


def cleanup(processes: list[Process]) -> None:
    """Stop processes started here and remove their directories."""
    stop_all(processes)
    for p in processes:
        shutil.rmtree(p.log_path.parent, ignore_errors=True)


def blocked_clients(redis_port: int) -> int:
    """How many clients a redis-server holds blocked (BLPOP and the like) now."""
    info = command(redis_port, "INFO", "clients").decode()
    return int(info.split("blocked_clients:")[1].split()[0])


def free_up_ports(nodes: int) -> int:
    """A PORT for `umctl-mesh up --port PORT` with `nodes` nodes: their proxy ports, and the
    Redis, plain-listener and metrics ports at fixed offsets from them, all free now and all
    outside the kernel's ephemeral range (`up` binds them seconds after this check, and an
    outgoing connection could take a port from that range in between)."""
    import random

    from tools.launch import ephemeral_range, port_free
    from tools.umctl_mesh.local import METRICS_PORT_OFFSET, PLAIN_PORT_OFFSET, REDIS_PORT_OFFSET

    low, high = ephemeral_range()
    offsets = (0, REDIS_PORT_OFFSET, PLAIN_PORT_OFFSET, METRICS_PORT_OFFSET)
    candidates = [port for port in range(1024, 65536 - METRICS_PORT_OFFSET - nodes)
                  if not any(low <= port + off + i <= high for off in offsets
                             for i in range(nodes))]
    assert candidates, f"no `up` layout avoids the ephemeral ports {low}-{high}"
    rng = random.Random()
    while True:
        port = rng.choice(candidates)
        if all(port_free(p + off) for p in range(port, port + nodes) for off in offsets):
            return port


def http(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def fresh_body(port: int, request: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
               ) -> str:
    """A metrics body rendered after this call began: the port serves one body to every
    scrape for SCRAPE_CACHE_SECONDS, so a count read just after a change may predate it."""
    import re

    from node.metrics import SCRAPE_CACHE_SECONDS

    since = time.time()

    def rendered_since() -> str | None:
        response = http(port, request)
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        at = re.search(rb"^moonmesh_metrics_rendered_timestamp_seconds{[^}]*} (\S+)$", body,
                       re.M)
        assert at is not None, body[:300]
        return body.decode() if float(at.group(1)) >= since else None
    return wait_for(rendered_since, SCRAPE_CACHE_SECONDS + 5, "a body rendered after the scrape")


def read_until(proc, prefix: str, timeout: float = 60) -> list[str]:  # noqa: ANN001
    """The lines `proc` (a Popen with text stdout) prints up to the first that starts with
    `prefix`, that one included; its output so far if it ends first. A reader thread does the
    reading, so a process that prints nothing more still fails here, with its lines so far."""
    import queue
    import threading

    lines: list[str] = []
    read: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # ends at `prefix` or at EOF (the caller's cleanup ends the process)
        while True:
            line = proc.stdout.readline()
            read.put(line)
            if not line or line.startswith(prefix):
                return

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = read.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line starting {prefix!r} in {timeout:g} s:\n"
                                 + "".join(lines)) from None
        assert line, "".join(lines)
        lines.append(line)
        if line.startswith(prefix):
            return lines
