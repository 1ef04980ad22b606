"""The local launcher behind `umctl-mesh up`: processes on loopback, stopped on exit."""
from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mesh.model.view import even_split
from proxy.resp import scan_reply

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STATUS_INTERVAL = 2.0
REDIS_PORT_OFFSET = 10000


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


def wait_listening(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"{what} on port {port} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise LaunchError(f"{what} did not listen on port {port} within {START_TIMEOUT}s")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def ready_count(ports: list[int]) -> int:
    ready = 0
    for port in ports:
        with contextlib.suppress(OSError, LaunchError):
            ready += send(port, ["UMCTL", "READY"], timeout=1.0) == b":1\r\n"
    return ready


def up(args: argparse.Namespace) -> int:
    if args.shards < 1:
        raise LaunchError("--shards must be at least 1")
    if not shutil.which("redis-server"):
        raise LaunchError("redis-server is not installed (apt-get install redis-server)")
    proxy_ports = [args.port + i for i in range(args.shards)]
    redis_ports = [p + REDIS_PORT_OFFSET for p in proxy_ports]
    busy = [p for p in proxy_ports + redis_ports if not port_free(p)]
    if busy:
        raise LaunchError(f"ports already in use: {', '.join(map(str, busy))} (try --port)")

    workdir = Path(tempfile.mkdtemp(prefix="moonmesh-"))
    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(signum, frame):  # noqa: ANN001
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for port in redis_ports:
            d = workdir / f"redis-{port}"
            d.mkdir()
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                 "--appendonly", "no", "--dir", str(d)],
                stdout=open(d / "redis.log", "wb"), stderr=subprocess.STDOUT))
            wait_listening(port, procs[-1], "redis-server")
        for proxy_port, redis_port in zip(proxy_ports, redis_ports):
            log = open(workdir / f"proxy-{proxy_port}.log", "wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "proxy.main", "--listen", f"{HOST}:{proxy_port}",
                 "--backend", f"{HOST}:{redis_port}"], stdout=log, stderr=subprocess.STDOUT))
            wait_listening(proxy_port, procs[-1], "mesh-proxy")
        proxies = [f"{HOST}:{p}" for p in proxy_ports]
        backends = [f"{HOST}:{p}" for p in redis_ports]
        for port, cmd in zip(proxy_ports, setcluster_commands(args.cluster, proxies, backends)):
            reply = send(port, cmd)
            if reply != b"+OK\r\n":
                raise LaunchError(f"proxy {port} refused {' '.join(cmd)}: {reply!r}")
            print(" ".join(cmd))
        print(f"\ncluster '{args.cluster}' is up: {args.shards} proxies on {HOST}:"
              f"{proxy_ports[0]}..{proxy_ports[-1]}, logs in {workdir}")
        print(f"connect with:  redis-cli -c -p {proxy_ports[0]}")
        print("stop with Ctrl-C\n")
        while not stopping:
            dead = [" ".join(map(str, p.args[:3])) for p in procs if p.poll() is not None]
            status = (f"{ready_count(proxy_ports)}/{len(proxy_ports)} proxies ready"
                      if not dead else f"a process exited: {dead[0]}")
            print(f"\r[{time.strftime('%H:%M:%S')}] {status}   ", end="", flush=True)
            deadline = time.monotonic() + STATUS_INTERVAL
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
        print("\nstopping")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
