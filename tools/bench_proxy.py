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
  plain-3    mesh-3's first proxy's plain listener (--plain-listen) with redis-benchmark
             without --cluster, every key in another proxy's slots: each command forwarded
and MGET of 10 keys: across all 3 shards through plain-3, of one slot through mesh-3 (the
owner-proxy path), and through twemproxy and direct Redis (one server: no split).
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
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import secret  # noqa: E402
from core.slots import SLOT_COUNT, key_slot  # noqa: E402
from core.view import even_split  # noqa: E402
from proxy.resp import encode_command  # noqa: E402
from tools.launch import HOST, Launcher, Process, die_with_parent, free_port  # noqa: E402
from tools.umctl_mesh.local import setcluster_commands  # noqa: E402

# the fairness run's background load: this many clients, each pipelining this many SETs
HEAVY_CLIENTS = 20
HEAVY_PIPELINE = 256
BENCH_ADMIN = b"bench-admin"  # mesh-3's proxies' admin password
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


def benchmark_command(port: int, requests: int, pipeline: int, argv: list[str],
                      cluster: bool = False) -> dict:
    """redis-benchmark of one command line (`__rand_int__` in it is replaced per request)."""
    cmd = ["redis-benchmark", "-h", HOST, "-p", str(port), "-n", str(requests), "-c", "50",
           "-P", str(pipeline), "-r", "100000", "--csv", *(["--cluster"] if cluster else []),
           *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or '"test"' not in done.stdout:
        raise SystemExit(f"{' '.join(cmd[:12])}...: {done.stderr.strip() or done.stdout[-300:]}")
    out = done.stdout
    row = next(csv.DictReader(io.StringIO(out[out.index('"test"'):])))
    return {"rps": float(row["rps"]), "p50": float(row["p50_latency_ms"]),
            "p99": float(row["p99_latency_ms"])}


def tag_in(slots: range) -> str:
    """A hash tag whose keys hash into `slots`."""
    return next(f"t{i}" for i in range(100_000) if key_slot(f"t{i}".encode()) in slots)


def spread_keys(count: int, thirds: int = 3) -> list[str]:
    """`count` keys, as evenly as can be over the thirds of the slot space (3 shards)."""
    size = (SLOT_COUNT + thirds - 1) // thirds
    keys: list[str] = []
    for i in range(10_000):
        key = f"mget:{i}"
        if sum(key_slot(k.encode()) // size == key_slot(key.encode()) // size
               for k in keys) < (count + thirds - 1) // thirds:
            keys.append(key)
        if len(keys) == count:
            return keys
    raise AssertionError("no spread found")


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


def statistics_median(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in ("rps", "p50", "p99")}


def setcluster(ports: list[int], backends: list[int], admin: bytes | None = None) -> None:
    """Configure the proxies as one cluster (proving `admin`, their admin password)."""
    cmds = setcluster_commands("bench", [f"{HOST}:{p}" for p in ports],
                               [f"{HOST}:{b}" for b in backends])
    for port, cmd in zip(ports, cmds):
        with socket.create_connection((HOST, port), timeout=10) as s:
            if admin is not None:
                s.sendall(encode_command([b"UMCTL", b"CHALLENGE"]))
                nonce = s.recv(4096).split(b"\r\n")[1]
                s.sendall(encode_command([b"UMCTL", b"PROVE", secret.proof(admin, nonce)]))
                assert s.recv(4096) == b"+OK\r\n"
            s.sendall(encode_command([c.encode() for c in cmd]))
            assert s.recv(4096) == b"+OK\r\n"


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
    parser.add_argument("--mget-keys", type=int, default=10, help="keys of the MGET rows")
    args = parser.parse_args()
    pipelines = [int(p) for p in args.pipelines.split(",")]
    # started processes get SIGTERM if this script dies, even by SIGKILL
    launcher = Launcher(prefix="moonmesh-bench-", die_with_parent=True)

    def redis() -> int:
        return launcher.redis().port

    def proxy(backend: int, *extra: str) -> tuple[int, Process]:
        p = launcher.proxy(f"{HOST}:{backend}", None, "--log-level", "warning", *extra)
        return p.port, p

    results: dict[tuple[str, int], dict] = {}
    cpu: dict[str, float] = {}
    fair: dict[str, dict[str, dict]] = {}
    mget: dict[tuple[str, int], dict] = {}
    try:
        direct = redis()
        moonmesh, moonmesh_proc = proxy(direct)
        setcluster([moonmesh], [direct])
        targets = [("direct", direct, False), ("moonmesh", moonmesh, False)]
        nut = twemproxy(launcher, direct)
        if nut is not None:
            targets.append(("twemproxy", nut, False))
        mesh_procs = []
        plain = 0
        if not args.no_cluster:
            backends = [redis() for _ in range(3)]
            plain = free_port()
            # peers prove the admin password to each other (a plain client's MGET part for
            # one node then runs there as one command)
            started = [proxy(b, "--admin-password", BENCH_ADMIN.decode(),
                             *(["--plain-listen", f"{HOST}:{plain}"] if i == 0 else []))
                       for i, b in enumerate(backends)]
            mesh_procs = [p for _, p in started]
            setcluster([p for p, _ in started], backends, BENCH_ADMIN)
            targets += [("mesh-3", started[0][0], True), ("native-3", native_cluster(launcher), True),
                        ("plain-3", plain, False)]
        # plain-3's keys are all in the second proxy's slots (setcluster splits evenly)
        elsewhere = tag_in(range(SLOT_COUNT // 3 + 1, 2 * SLOT_COUNT // 3))
        for name, port, cluster in targets:
            watched = {"moonmesh": [moonmesh_proc], "mesh-3": mesh_procs,
                       "plain-3": mesh_procs}.get(name, [])
            before = sum(cpu_seconds(p.pid) for p in watched)
            for pipeline in pipelines:
                if name == "plain-3":
                    results[(name, pipeline)] = {
                        test: statistics_median([benchmark_command(
                            port, args.requests, pipeline, argv) for _ in range(args.runs)])
                        for test, argv in (("SET", ["SET", f"{{{elsewhere}}}:__rand_int__", "x"]),
                                           ("GET", ["GET", f"{{{elsewhere}}}:__rand_int__"]))}
                else:
                    results[(name, pipeline)] = median_runs(port, args.requests, pipeline,
                                                            args.runs, cluster)
            if watched:
                spent = sum(cpu_seconds(p.pid) for p in watched) - before
                total = args.requests * 2 * len(pipelines) * args.runs
                cpu[name] = spent / total * 1e6
        if args.mget_keys:
            spread = spread_keys(args.mget_keys)
            tagged = [f"{{m}}:{i}" for i in range(args.mget_keys)]
            for name, port, cluster in targets:
                if name in ("native-3", "moonmesh"):  # cluster mode: CROSSSLOT, as Redis
                    continue
                keys = tagged if name == "mesh-3" else spread
                if name == "mesh-3":  # straight to the owner of the tag's slot
                    owner = next(i for i, (a, b) in enumerate(r[0] for r in even_split(3))
                                 if a <= key_slot(b"m") <= b)
                    port, cluster = started[owner][0], False
                subprocess.run(["redis-cli", *(["-c"] if cluster else []), "-p", str(port),
                                "MSET", *[x for k in keys for x in (k, "v" * 16)]],
                               check=True, capture_output=True)
                for pipeline in pipelines:
                    mget[(name, pipeline)] = statistics_median([benchmark_command(
                        port, args.requests, pipeline, ["MGET", *keys], cluster)
                        for _ in range(args.runs)])
        if args.probe_requests:
            for name, port, cluster in targets:
                if not cluster and name != "plain-3":
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
             ("mesh-3 / native-3", "mesh-3", "native-3"),
             ("plain-3 forwarded / mesh-3 owner", "plain-3", "mesh-3"),
             ("plain-3 forwarded / twemproxy", "plain-3", "twemproxy")]
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
    if mget:
        lines += ["", f"MGET of {args.mget_keys} keys (plain-3: across the 3 shards; mesh-3: "
                  "one slot, --cluster; twemproxy and direct: one server)", "",
                  "| target | -P | ops/s | p50/p99 ms |", "| --- | --- | --- | --- |"]
        for (name, pipeline), row in mget.items():
            lines.append(f"| {name} | {pipeline} | {row['rps']:,.0f} | "
                         f"{row['p50']:.3f}/{row['p99']:.3f} |")
        lines += ["", "| MGET ratio | -P | ops/s |", "| --- | --- | --- |"]
        for label, a, b in [("plain-3 across shards / mesh-3 one slot", "plain-3", "mesh-3"),
                            ("plain-3 across shards / twemproxy", "plain-3", "twemproxy")]:
            for pipeline in pipelines:
                if (a, pipeline) in mget and (b, pipeline) in mget:
                    lines.append(f"| {label} | {pipeline} | "
                                 f"{mget[(a, pipeline)]['rps'] / mget[(b, pipeline)]['rps']:.2f} |")
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
