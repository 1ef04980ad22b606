"""Online scale-out speed: Moonmesh 2 -> 3 shards against native Redis Cluster's
`redis-cli --cluster reshard`, with the same data, in the same run.

    .venv/bin/python tools/bench_migration.py [--keys 2000000] [--value-size 512]

Loads `--keys` distinct keys of `--value-size` bytes, runs a client load during the move, and
prints keys/s, MB/s, total time and the load's throughput before, during and after.
Everything runs on loopback and is stopped at the end. Bounded by --keys and by --timeout.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.store.etcd import EtcdStore  # noqa: E402
from tools.launch import HOST, Launcher, free_port, port_free  # noqa: E402
from tools.umctl_mesh import ops  # noqa: E402


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def load(port: int, keys: int, size: int) -> None:
    """`keys` distinct keys spread over every slot (redis-benchmark --cluster puts a hash tag
    in its keys, which piles them into a few slots: no good for a migration benchmark)."""
    from redis.cluster import RedisCluster

    rc = RedisCluster(host=HOST, port=port, socket_timeout=60)
    value = b"v" * size
    for start in range(0, keys, 20_000):
        pipe = rc.pipeline()
        for i in range(start, min(keys, start + 20_000)):
            pipe.set(f"key:{i:012d}", value)
        pipe.execute()
    rc.close()


class LoadMeter:
    """A client load (GET/SET of existing keys) counting ops per phase."""

    def __init__(self, port: int, keys: int) -> None:
        self.port, self.keys = port, keys
        self.counts: dict[str, int] = {}
        self.errors = 0
        self.phase = "before"
        self.stop = threading.Event()

    def run(self) -> None:
        from redis.cluster import RedisCluster

        rc = RedisCluster(host=HOST, port=self.port, socket_timeout=10)
        i = 0
        while not self.stop.is_set():
            key = f"key:{i * 7919 % self.keys:012d}"
            try:
                rc.get(key) if i % 4 else rc.set(key, "x")
                self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
            except Exception:  # noqa: BLE001 - counted, never fatal for a benchmark
                self.errors += 1
            i += 1
        rc.close()

    def measure(self, phase: str, seconds: float) -> None:
        """Count the load's operations as `phase` for `seconds`."""
        self.phase = phase
        time.sleep(seconds)


def moonmesh(args: argparse.Namespace, launcher: Launcher) -> dict:
    etcd = launcher.etcd().addr
    backends: dict[str, int] = {}
    for _ in range(3):
        redis = launcher.redis()
        proxy = launcher.proxy(redis, None, "--etcd", etcd, "--log-level", "warning",
                               "--migration-rate", str(args.migration_rate))
        backends[proxy.addr] = redis.port

    async def create() -> str:
        async with EtcdStore(etcd) as store:
            while len((await ops.read_pool(store)).free()) < 3:
                await anyio.sleep(0.1)
            view = await ops.create_cluster(store, "bench", 2, 0, None)
            await ops.wait_applied(store, view, 30)
            return view.address_of(view.shards[0].master).proxy

    entry = int(anyio.run(create).rpartition(":")[2])
    return {"entry": entry, "etcd": etcd, "backends": backends}


def native(args: argparse.Namespace, launcher: Launcher) -> dict:
    ports = []
    for _ in range(3):
        port = free_port(below=55000)
        while not port_free(port + 10000):  # the cluster bus listens on port + 10000
            port = free_port(below=55000)
        d = launcher.data_dir(f"native-{port}")
        launcher.redis(port, "--cluster-enabled", "yes", "--cluster-config-file",
                       str(d / "nodes.conf"), name=f"native-{port}")
        ports.append(port)
    # a 2-master cluster by hand (redis-cli --cluster create wants 3 masters)
    cli(ports[0], "CLUSTER", "ADDSLOTSRANGE", "0", "8191")
    cli(ports[1], "CLUSTER", "ADDSLOTSRANGE", "8192", "16383")
    cli(ports[1], "CLUSTER", "MEET", HOST, str(ports[0]))
    cli(ports[2], "CLUSTER", "MEET", HOST, str(ports[0]))
    deadline = time.monotonic() + 30
    while "cluster_state:ok" not in cli(ports[0], "CLUSTER", "INFO") or \
            cli(ports[2], "CLUSTER", "NODES").count("master") < 3:
        if time.monotonic() > deadline:
            raise SystemExit("native cluster did not form")
        time.sleep(0.2)
    while True:  # redis-cli --cluster reshard wants every node to agree first
        check = subprocess.run(["redis-cli", "--cluster", "check", f"{HOST}:{ports[0]}"],
                               capture_output=True, text=True)
        if check.returncode == 0 and "All nodes agree" in check.stdout:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"native cluster nodes do not agree: {check.stdout[-500:]}")
        time.sleep(0.5)
    return {"entry": ports[0], "new": ports[2], "ports": ports}


def run_phase(name: str, entry: int, keys: int, size: int, move, dbsizes) -> dict:  # noqa: ANN001
    load(entry, keys, size)
    total = sum(dbsizes())
    meter = LoadMeter(entry, keys)
    thread = threading.Thread(target=meter.run)
    thread.start()
    try:
        time.sleep(0.5)
        meter.measure("before", 3)
        meter.phase = "during"
        started = time.monotonic()
        moved_keys, moved_bytes = move()
        elapsed = time.monotonic() - started
        meter.measure("after", 3)
    finally:
        meter.stop.set()
        thread.join()
    return {"name": name, "seconds": elapsed, "moved_keys": moved_keys, "total_keys": total,
            "moved_bytes": moved_bytes,
            "ops_before": meter.counts.get("before", 0) / 3,
            "ops_during": meter.counts.get("during", 0) / max(elapsed, 1e-6),
            "ops_after": meter.counts.get("after", 0) / 3, "errors": meter.errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2_000_000)
    parser.add_argument("--value-size", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--migration-rate", type=int, default=20_000,
                        help="mesh-proxy --migration-rate (keys/s, 0: no limit)")
    args = parser.parse_args()
    results = []
    launcher = Launcher()
    try:
        mesh = moonmesh(args, launcher)

        def scale() -> tuple[int, int]:
            async def go() -> str:
                async with EtcdStore(mesh["etcd"]) as store:
                    _, view = await ops.scale_cluster(store, "bench", 3, False)
                    if not await ops.wait_migrations(store, "bench", args.timeout):
                        raise SystemExit("scale-out did not finish")
                    return view.address_of(view.shards[-1].master).proxy
            new_proxy = anyio.run(go)
            moved = int(cli(mesh["backends"][new_proxy], "DBSIZE"))
            return moved, moved * args.value_size

        results.append(run_phase("moonmesh scale 2->3", mesh["entry"], args.keys,
                                 args.value_size, scale,
                                 lambda: [int(cli(p, "DBSIZE")) for p in mesh["backends"].values()]))
        launcher.stop("proxy")

        nat = native(args, launcher)

        def reshard() -> tuple[int, int]:
            nodes = cli(nat["new"], "CLUSTER", "MYID")
            before = int(cli(nat["new"], "DBSIZE"))
            subprocess.run(["redis-cli", "--cluster", "reshard", f"{HOST}:{nat['entry']}",
                            "--cluster-from", "all", "--cluster-to", nodes,
                            "--cluster-slots", "5461", "--cluster-yes",
                            "--cluster-pipeline", "64"], check=True, capture_output=True,
                           timeout=args.timeout)
            moved = int(cli(nat["new"], "DBSIZE")) - before
            return moved, moved * args.value_size

        results.append(run_phase("redis-cli --cluster reshard 2->3", nat["entry"], args.keys,
                                  args.value_size, reshard,
                                  lambda: [int(cli(p, "DBSIZE")) for p in nat["ports"]]))
    finally:
        launcher.cleanup()

    print(f"{args.keys} keys of {args.value_size} B, 2 -> 3 shards; load = one redis-py client; "
          f"moonmesh --migration-rate {args.migration_rate}")
    print(f"{'':34} {'keys':>8} {'moved':>8} {'time s':>7} {'keys/s':>9} {'MB/s':>6} "
          f"{'load before':>11} {'during':>8} {'after':>8} {'errors':>6}")
    for r in results:
        print(f"{r['name']:34} {r['total_keys']:>8} {r['moved_keys']:>8} {r['seconds']:>7.1f} "
              f"{r['moved_keys'] / r['seconds']:>9.0f} "
              f"{r['moved_bytes'] / r['seconds'] / 1e6:>6.1f} {r['ops_before']:>11.0f} "
              f"{r['ops_during']:>8.0f} {r['ops_after']:>8.0f} {r['errors']:>6}")
    if len(results) == 2:
        print(f"moonmesh time / reshard time: {results[0]['seconds'] / results[1]['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
