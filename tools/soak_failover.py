"""`make soak-failover`: false failovers under load. A 3x1 Moonmesh cluster on loopback takes
`redis-benchmark --cluster` at full tilt (2 cores shared with Redis, the proxies and etcd: a
CPU-starved machine) plus a redis-py `RedisCluster` writer of known counters, for --minutes,
with no fault injected. It prints, per minute and in total: view epochs moved (every epoch
change here is a failover or a replica marked failed), leases revoked by the leader, fences,
the writer's errors, and at the end the acknowledged increments lost (read back).

Expected: 0 failovers, 0 revocations, 0 lost. Fences (a node's keepalives late by > 0.8 s
under the load) are counted and reported, not hidden: each is a short pause of keys on one
node, not a failover.

    .venv/bin/python tools/soak_failover.py --minutes 30
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from redis.cluster import RedisCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_failover import CLUSTER, HOST, Moonmesh, commit  # noqa: E402

BENCH_REQUESTS = 2_000_000  # one redis-benchmark run; runs repeat until the time is up
BENCH_CLIENTS, BENCH_PIPELINE = 50, 16
WRITER_KEYS = 300
EVENTS = {  # log line -> what it counts
    "lease_revoked": "revocations",
    "failover ": "failovers logged",
    "] fenced ": "fences",
    "node_suspected": "suspicions",
    "lease_lost": "leases lost",
}


class Writer(threading.Thread):
    """INCRs known counters through a cluster client with its default retries."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.stop = port, stop
        self.acked: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def run(self) -> None:
        rc = RedisCluster(host=HOST, port=self.port, socket_timeout=5)
        i = 0
        while not self.stop.is_set():
            key = f"soak:{i % WRITER_KEYS}"
            try:
                rc.incr(key)
                self.acked[key] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                self.errors[type(exc).__name__] += 1
                time.sleep(0.05)
            i += 1

    def lost(self) -> int:
        rc = RedisCluster(host=HOST, port=self.port, socket_timeout=5)
        return sum(max(0, n - int(rc.get(k) or 0)) for k, n in self.acked.items())


def count_events(mm: Moonmesh) -> Counter[str]:
    seen: Counter[str] = Counter()
    for proxy in mm.proxies.values():
        text = proxy.log_path.read_text(errors="replace")
        for pattern, name in EVENTS.items():
            seen[name] += text.count(pattern)
    return seen


def benchmark(port: int, stop: threading.Event, requests: Counter[str]) -> None:
    """redis-benchmark runs one after another until `stop` (the last one is cut short)."""
    while not stop.is_set():
        run = subprocess.Popen(
            ["redis-benchmark", "--cluster", "-h", HOST, "-p", str(port), "-c",
             str(BENCH_CLIENTS), "-P", str(BENCH_PIPELINE), "-n", str(BENCH_REQUESTS), "-r",
             "100000", "-t", "set,get", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        while run.poll() is None and not stop.wait(0.5):
            pass
        if run.poll() is None:
            run.terminate()
        out, _ = run.communicate(timeout=30)
        for line in out.replace("\r", "\n").splitlines():
            if m := re.match(r"(SET|GET): ([\d.]+) requests per second", line):
                requests[m.group(1)] += BENCH_REQUESTS
        requests["runs"] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    args = parser.parse_args()
    print(f"commit {commit()}; {args.minutes:g} min of load, no fault injected", flush=True)
    mm = Moonmesh()
    stop = threading.Event()
    try:
        entry = mm.ports()[0]
        requests: Counter[str] = Counter()
        writer = Writer(entry, stop)
        writer.start()
        load = threading.Thread(target=benchmark, args=(entry, stop, requests), daemon=True)
        load.start()
        start_epoch = mm.umctl("cluster", "show", CLUSTER)["epoch"]
        began = time.monotonic()
        end = began + args.minutes * 60
        minute = 0
        while time.monotonic() < end:
            time.sleep(min(60.0, end - time.monotonic()))
            minute += 1
            epoch = mm.umctl("cluster", "show", CLUSTER)["epoch"]
            print(f"minute {minute}: epoch moves {epoch - start_epoch}, "
                  f"{dict(count_events(mm))}, writer acked {sum(writer.acked.values())} "
                  f"errors {dict(writer.errors)}", flush=True)
        stop.set()
        load.join(60)
        writer.join(30)
        epoch = mm.umctl("cluster", "show", CLUSTER)["epoch"]
        events = count_events(mm)
        lost = writer.lost()
        took = time.monotonic() - began
        print(f"\nsoak: {took / 60:.1f} min, redis-benchmark runs {requests['runs']} "
              f"({requests['SET'] + requests['GET']} requests counted from finished runs), "
              f"writer acknowledged {sum(writer.acked.values())} increments")
        print(f"view epoch moves (failovers, replicas marked failed): {epoch - start_epoch}")
        for name in EVENTS.values():
            print(f"{name}: {events[name]}")
        print(f"writer errors: {dict(writer.errors) or 0}; acknowledged increments lost: {lost}")
        ok = epoch == start_epoch and events["revocations"] == 0 and lost == 0
        print("verdict:", "no false failover" if ok else "FALSE FAILOVER OR LOSS")
        return 0 if ok else 1
    finally:
        stop.set()
        mm.close()


if __name__ == "__main__":
    raise SystemExit(main())
