"""The benchmark suite: Moonmesh against direct Redis, twemproxy and native Redis Cluster, in
ONE run, on loopback.

    .venv/bin/python tools/bench_proxy.py [--requests 200000] [--runs 3] [--markdown FILE]

Targets, each measured with redis-benchmark (-c 50, -t set,get, -P 1 and -P 16, --runs runs,
median):
  direct     one redis-server
  moonmesh   one standalone mesh-proxy in front of it
  twemproxy  nutcracker (Debian's twemproxy) in front of it, when installed
  mesh-3     3 standalone mesh-proxies as one cluster (redis-benchmark --cluster)
  native-3   a native 3-master Redis Cluster (redis-benchmark --cluster)
It prints ops/s, p50/p99 latency, the ratios the targets are judged by, and the proxy's CPU
seconds per million requests (from /proc, steadier than ops/s on a shared machine).
Everything it starts is stopped at the end; every run is bounded by --requests.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.launch import HOST, Launcher, Process, die_with_parent, free_port  # noqa: E402
from tools.umctl_mesh.local import setcluster_commands  # noqa: E402

# the fairness run's background load: this many clients, each pipelining this many SETs
HEAVY_CLIENTS = 20
HEAVY_PIPELINE = 256
NATIVE_PORT_BELOW = 55000  # a native cluster node's bus listens on port + 10000


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def benchmark(port: int, requests: int, pipeline: int, cluster: bool = False,
              clients: int = 50, tests: str = "set,get") -> dict[str, dict]:
    argv = ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", tests, "-n", str(requests),
            "-c", str(clients), "-P", str(pipeline), "-r", "100000", "--csv"]
    if cluster:
        argv.append("--cluster")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True).stdout
    out = out[out.index('"test"'):]  # --cluster prints the node list first
    rows = {}
    for row in csv.DictReader(io.StringIO(out)):
        name = row["test"].split()[0]
        rows[name] = {"rps": float(row["rps"]), "p50": float(row["p50_latency_ms"]),
                      "p99": float(row["p99_latency_ms"])}
    return rows


def fairness(port: int, requests: int, connections: int) -> dict[str, dict]:
    """One client's GET latency alone and beside clients pushing deep pipelines of 1 KB SETs,
    and GETs from many connections at once."""
    alone = benchmark(port, requests, 1, clients=1, tests="get")["GET"]
    heavy = subprocess.Popen(
        ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", "set", "-d", "1024",
         "-c", str(HEAVY_CLIENTS), "-P", str(HEAVY_PIPELINE), "-n", "20000000", "-r", "100000",
         "--csv"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent)
    try:
        time.sleep(1)  # the pipelines are in full flow
        loaded = benchmark(port, requests, 1, clients=1, tests="get")["GET"]
    finally:
        heavy.kill()
        heavy.wait()
    many = benchmark(port, requests * 10, 1, clients=connections, tests="get")["GET"]
    return {"alone": alone, "loaded": loaded, "many": many}


def median_runs(port: int, requests: int, pipeline: int, runs: int,
                cluster: bool = False) -> dict[str, dict]:
    results = [benchmark(port, requests, pipeline, cluster) for _ in range(runs)]
    return {test: {k: statistics.median(r[test][k] for r in results) for k in ("rps", "p50", "p99")}
            for test in results[0]}


def setcluster(ports: list[int], backends: list[int]) -> None:
    cmds = setcluster_commands("bench", [f"{HOST}:{p}" for p in ports],
                               [f"{HOST}:{b}" for b in backends])
    for port, cmd in zip(ports, cmds):
        assert cli(port, *cmd) == "OK"


def native_cluster(launcher: Launcher) -> int:
    ports = []
    for _ in range(3):
        port = free_port(below=NATIVE_PORT_BELOW)
        d = launcher.data_dir(f"native-{port}")
        launcher.redis(port, "--cluster-enabled", "yes", "--cluster-config-file",
                       str(d / "nodes.conf"), name=f"native-{port}")
        ports.append(port)
    subprocess.run(["redis-cli", "--cluster", "create", *[f"{HOST}:{p}" for p in ports],
                    "--cluster-yes"], check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while "cluster_state:ok" not in cli(ports[0], "CLUSTER", "INFO"):
        if time.monotonic() > deadline:
            raise SystemExit("the native cluster did not become ok")
        time.sleep(0.2)
    time.sleep(1)
    return ports[0]


def twemproxy(launcher: Launcher, backend: int) -> int | None:
    binary = shutil.which("nutcracker") or (
        "/usr/sbin/nutcracker" if Path("/usr/sbin/nutcracker").exists() else None)
    if binary is None:
        return None
    port = free_port()
    conf = launcher.workdir / "nutcracker.yml"
    conf.write_text(f"bench:\n  listen: {HOST}:{port}\n  redis: true\n  hash: fnv1a_64\n"
                    f"  distribution: ketama\n  servers:\n   - {HOST}:{backend}:1\n")
    launcher.start("nutcracker", [binary, "-c", str(conf), "-o",
                                  str(launcher.workdir / "nutcracker.log")], port)
    return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pipelines", default="1,16")
    parser.add_argument("--no-cluster", action="store_true", help="skip mesh-3 and native-3")
    parser.add_argument("--probe-requests", type=int, default=20_000,
                        help="GETs of the one-client latency probe in the fairness run "
                             "(0: skip that run)")
    parser.add_argument("--connections", type=int, default=1000,
                        help="clients of the many-connections part of the fairness run")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables here")
    args = parser.parse_args()
    pipelines = [int(p) for p in args.pipelines.split(",")]
    # started processes get SIGTERM if this script dies, even by SIGKILL
    launcher = Launcher(prefix="moonmesh-bench-", die_with_parent=True)

    def redis() -> int:
        return launcher.redis().port

    def proxy(backend: int) -> tuple[int, Process]:
        p = launcher.proxy(f"{HOST}:{backend}", None, "--log-level", "warning")
        return p.port, p

    results: dict[tuple[str, int], dict] = {}
    cpu: dict[str, float] = {}
    fair: dict[str, dict[str, dict]] = {}
    try:
        direct = redis()
        moonmesh, moonmesh_proc = proxy(direct)
        setcluster([moonmesh], [direct])
        targets = [("direct", direct, False), ("moonmesh", moonmesh, False)]
        nut = twemproxy(launcher, direct)
        if nut is not None:
            targets.append(("twemproxy", nut, False))
        mesh_procs = []
        if not args.no_cluster:
            backends = [redis() for _ in range(3)]
            started = [proxy(b) for b in backends]
            mesh_procs = [p for _, p in started]
            setcluster([p for p, _ in started], backends)
            targets += [("mesh-3", started[0][0], True), ("native-3", native_cluster(launcher), True)]
        for name, port, cluster in targets:
            watched = {"moonmesh": [moonmesh_proc], "mesh-3": mesh_procs}.get(name, [])
            before = sum(cpu_seconds(p.pid) for p in watched)
            for pipeline in pipelines:
                results[(name, pipeline)] = median_runs(port, args.requests, pipeline,
                                                        args.runs, cluster)
            if watched:
                spent = sum(cpu_seconds(p.pid) for p in watched) - before
                total = args.requests * 2 * len(pipelines) * args.runs
                cpu[name] = spent / total * 1e6
        if args.probe_requests:
            for name, port, cluster in targets:
                if not cluster:
                    fair[name] = fairness(port, args.probe_requests, args.connections)
    finally:
        launcher.cleanup()

    lines = [f"redis-benchmark -c 50 -n {args.requests} -r 100000 -t set,get, median of "
             f"{args.runs} runs; {os.cpu_count()} cores shared by everything", "",
             "| target | -P | SET ops/s | SET p50/p99 ms | GET ops/s | GET p50/p99 ms |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (name, pipeline), rows in results.items():
        s, g = rows["SET"], rows["GET"]
        lines.append(f"| {name} | {pipeline} | {s['rps']:,.0f} | {s['p50']:.3f}/{s['p99']:.3f} | "
                     f"{g['rps']:,.0f} | {g['p50']:.3f}/{g['p99']:.3f} |")
    lines += ["", "| ratio | -P | SET | GET |", "| --- | --- | --- | --- |"]
    pairs = [("moonmesh / direct", "moonmesh", "direct"),
             ("moonmesh / twemproxy", "moonmesh", "twemproxy"),
             ("mesh-3 / native-3", "mesh-3", "native-3")]
    for label, a, b in pairs:
        for pipeline in pipelines:
            if (a, pipeline) in results and (b, pipeline) in results:
                ra, rb = results[(a, pipeline)], results[(b, pipeline)]
                lines.append(f"| {label} | {pipeline} | {ra['SET']['rps'] / rb['SET']['rps']:.2f} | "
                             f"{ra['GET']['rps'] / rb['GET']['rps']:.2f} |")
    for pipeline in pipelines:
        if ("moonmesh", pipeline) in results:
            m, d = results[("moonmesh", pipeline)], results[("direct", pipeline)]
            lines.append(f"| moonmesh / direct p99 | {pipeline} | "
                         f"{m['SET']['p99'] / max(d['SET']['p99'], 1e-9):.2f} | "
                         f"{m['GET']['p99'] / max(d['GET']['p99'], 1e-9):.2f} |")
    lines += ["", "| proxy | CPU seconds per million requests |", "| --- | --- |"]
    lines += [f"| {name} | {value:.2f} |" for name, value in cpu.items()]
    if fair:
        lines += ["", f"Fairness: one client's GET (-c 1 -P 1, {args.probe_requests} requests) "
                  f"alone and while {HEAVY_CLIENTS} clients pipeline {HEAVY_PIPELINE} SETs of "
                  f"1 KB each; then GETs from {args.connections} connections at once", "",
                  "| target | alone p50/p99 ms | beside the pipelines p50/p99 ms | "
                  f"{args.connections} connections ops/s | p50/p99 ms |",
                  "| --- | --- | --- | --- | --- |"]
        for name, f in fair.items():
            a, lo, m = f["alone"], f["loaded"], f["many"]
            lines.append(f"| {name} | {a['p50']:.3f}/{a['p99']:.3f} | "
                         f"{lo['p50']:.3f}/{lo['p99']:.3f} | {m['rps']:,.0f} | "
                         f"{m['p50']:.3f}/{m['p99']:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
