"""Throughput of a standalone mesh-proxy against the Redis behind it, in the same run.

    .venv/bin/python tools/bench_proxy.py [--requests 200000] [--clients 50]

Starts one redis-server and one mesh-proxy on free loopback ports, runs redis-benchmark
against each with the same settings, and prints ops/s and the proxy/direct ratio. Every run is
bounded by --requests; everything it starts is stopped at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def benchmark(port: int, tests: str, requests: int, clients: int, pipeline: int) -> dict[str, float]:
    out = subprocess.run(
        ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", tests, "-n", str(requests),
         "-c", str(clients), "-P", str(pipeline), "-r", "100000", "--csv"],
        capture_output=True, text=True, timeout=600, check=True).stdout
    results = {}
    for line in out.splitlines():
        m = re.match(r'"([A-Z]+)[^"]*","([0-9.]+)"', line)
        if m:
            results[m.group(1)] = float(m.group(2))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pipelines", default="1,16", help="comma-separated -P values")
    parser.add_argument("--tests", default="set,get")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="moonmesh-bench-")
    redis_port, proxy_port = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL))
        wait_port(redis_port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "proxy.main", "--listen", f"{HOST}:{proxy_port}",
             "--backend", f"{HOST}:{redis_port}", "--log-level", "warning"],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        wait_port(proxy_port)
        setcluster = ["redis-cli", "-p", str(proxy_port), "UMCTL", "SETCLUSTER", "v2", "1",
                      "NOFLAGS", "bench", f"{HOST}:{redis_port}", "1", "0-16383"]
        subprocess.run(setcluster, check=True, capture_output=True)
        print(f"redis-benchmark -n {args.requests} -c {args.clients} -r 100000, "
              f"{os.cpu_count()} cores shared by redis, the proxy and the load generator")
        print(f"{'test':<6} {'-P':>3} {'direct ops/s':>14} {'proxy ops/s':>14} {'ratio':>7}")
        for pipeline in (int(p) for p in args.pipelines.split(",")):
            direct = benchmark(redis_port, args.tests, args.requests, args.clients, pipeline)
            proxied = benchmark(proxy_port, args.tests, args.requests, args.clients, pipeline)
            for test, ops in direct.items():
                ratio = proxied.get(test, 0.0) / ops if ops else 0.0
                print(f"{test:<6} {pipeline:>3} {ops:>14,.0f} {proxied.get(test, 0):>14,.0f} "
                      f"{ratio:>7.2f}")
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
