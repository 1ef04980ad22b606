"""The faults: each picks its targets with the run's random generator, starts, holds for a
bounded time chosen the same way, and is healed (rules removed, processes continued or
started again). Every fault is named so a summary can count it and a seed replays the
schedule.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos import netns
from chaos.hosts import REDIS_PORT, Deployment, NsProcess
from chaos.workload import Conn
from core.slots import SLOT_COUNT, key_slot

# migration faults: a range of slots holding workload keys moves between two shards
MIGRATION_RATE = 2_000  # keys/s: the chaos nodes' mesh-proxy --migration-rate
MIGRATE_SLOTS = 4096  # slots one migration fault moves (fewer if the source's range is shorter)
MIGRATE_FILL_KEYS = 16_000  # written into those slots first: seconds of moving at that rate
FILL_VALUE = b"f" * 64
TAG_TRIES = 400_000  # "t0", "t1", ...: these cover every slot (170 000 or so do)
FILL_BATCH = 1000  # commands per pipelined round trip to a Redis
MIGRATE_MIDWAY = (0.1, 0.6)  # the fault strikes when this share of the keys moved (uniform)
MIGRATE_START_TIMEOUT = 20.0  # seconds for the mover to start; then the fault strikes anyway
# a Redis stalled by a script: longer than its busy-reply threshold (5 s), so PING says -BUSY
STALL_SECONDS = (7.0, 9.0)
STALL_END_TIMEOUT = 5.0  # after the hold, for the script to end by itself before SCRIPT KILL
STALL_SCRIPT = ("local t = redis.call('TIME') "
                "local stop = t[1] * 1000000 + t[2] + tonumber(ARGV[1]) * 1000 "
                "while t[1] * 1000000 + t[2] < stop do t = redis.call('TIME') end "
                "return 1")
LATENCY_MS = (200, 500)  # netem delay of one node's packets; jitter a quarter of it
LOSS_PERCENT = (20, 40)  # packets one node loses, each way


@dataclass(frozen=True)
class Topology:
    """Who is who in the cluster now (from `umctl-mesh cluster show` and `nodes`)."""

    masters: dict[str, str]  # shard -> master node
    replicas: dict[str, list[str]]  # shard -> replica nodes
    leader: str | None
    slots: dict[str, list[tuple[int, int]]]  # shard -> its slot ranges

    @classmethod
    def read(cls, dep: Deployment, cluster: str) -> Topology:
        shown = dep.show(cluster)
        masters, replicas, slots = {}, {}, {}
        for s in shown["shards"]:
            masters[s["id"]] = next(n["node"] for n in s["nodes"] if n["role"] == "master")
            replicas[s["id"]] = [n["node"] for n in s["nodes"] if n["role"] == "replica"]
            slots[s["id"]] = [(a, b) for a, b in s["slots"]]
        return cls(masters, replicas, dep.leader(), slots)


@dataclass(frozen=True)
class Migration:
    source: str  # shard
    target: str
    slots: tuple[int, int]
    moved: str  # how far it got when the fault struck


@dataclass
class Fault:
    kind: str
    targets: list[str] = field(default_factory=list)
    hold: float = 0.0
    detail: str = ""
    _undo: list = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(self.targets)}) for {self.hold:.1f}s" + (
            f" [{self.detail}]" if self.detail else "")


PARTITIONS = ("part-node-etcd", "part-masters-etcd", "part-master-replica", "part-leader",
              "part-halves", "one-way", "loss")
MIGRATIONS = ("migrate-kill-source", "migrate-failover-source", "migrate-kill-target",
              "migrate-cancel")


class Nemesis:
    """Starts and heals faults on one deployment."""

    KINDS = ("part-node-etcd", "part-masters-etcd", "part-master-replica", "part-leader",
             "part-halves", "one-way", "pause-proxy", "pause-proxy-short", "kill-proxy",
             "kill-replica-proxy", "kill-redis", "kill-etcd", *MIGRATIONS, "stall-redis",
             "latency", "loss")

    def __init__(self, dep: Deployment, cluster: str, rng: random.Random,
                 keys: Callable[[], list[str]] = list) -> None:
        self.dep, self.cluster, self.rng = dep, cluster, rng
        self.net = dep.net
        self.keys = keys  # the keys the clients use now: migrations move their slots
        self.filled: list[bytes] = []  # the last migration's filler keys
        self.fill_count = 0
        self.tags: list[str] = []  # slot -> a hash tag of that slot, made when first needed

    def hosts(self) -> list[str]:
        return list(self.net.hosts)

    def etcd_hosts(self) -> list[str]:
        return [p.host.name for p in self.dep.etcd]

    def pick_node(self, topo: Topology) -> str:
        """A master more often than not (that is where faults hurt), else any node."""
        if topo.masters and self.rng.random() < 0.6:
            return topo.masters[self.rng.choice(sorted(topo.masters))]
        return self.rng.choice(sorted(self.dep.nodes))

    def start(self, kind: str) -> Fault:
        topo = Topology.read(self.dep, self.cluster)
        fault = Fault(kind)
        getattr(self, "_" + kind.replace("-", "_"))(fault, topo)
        return fault

    def heal(self, fault: Fault) -> None:
        """Undo a fault (in reverse order of its steps); safe to call twice."""
        while fault._undo:
            fault._undo.pop()()

    def heal_all(self) -> None:
        """After a round that did not recover: rules gone, processes continued, and a
        migration still under way sent back."""
        self.net.heal()
        for p in self.dep.processes:
            if p.alive():
                os.kill(p.pid, signal.SIGCONT)
        try:
            if self.dep.show(self.cluster)["migrations"]:
                self.dep.umctl("migrate", "cancel", self.cluster, check=False, timeout=20)
        except Exception:  # noqa: BLE001 - etcd may be the thing that is down
            pass

    # ------------------------------------------------------------------ partitions

    def _partition(self, fault: Fault, *groups: list[str]) -> None:
        self.net.partition(*groups)
        fault._undo.append(self.net.heal)

    def _part_node_etcd(self, fault: Fault, topo: Topology) -> None:
        node = self.pick_node(topo)
        fault.targets, fault.hold = [node], self.rng.uniform(2, 10)
        fault.detail = "node cut from every etcd member, still talks to peers and clients"
        self._partition(fault, [node], self.etcd_hosts())

    def _part_masters_etcd(self, fault: Fault, topo: Topology) -> None:
        """Every master cut from etcd together (a rack, a zone): they still reach each
        other, their replicas and the clients, and could vouch for each other."""
        masters = sorted(set(topo.masters.values()))
        fault.targets, fault.hold = masters, self.rng.uniform(4, 12)
        fault.detail = "every master from every etcd member, together"
        self._partition(fault, masters, self.etcd_hosts())

    def _part_master_replica(self, fault: Fault, topo: Topology) -> None:
        shard = self.rng.choice(sorted(s for s in topo.masters if topo.replicas[s]))
        master = topo.masters[shard]
        fault.targets, fault.hold = [master, *topo.replicas[shard]], self.rng.uniform(2, 10)
        fault.detail = f"shard {shard}: master from its replicas"
        self._partition(fault, [master], topo.replicas[shard])

    def _part_leader(self, fault: Fault, topo: Topology) -> None:
        leader = topo.leader or self.rng.choice(sorted(self.dep.nodes))
        fault.targets, fault.hold = [leader], self.rng.uniform(3, 10)
        fault.detail = "the leader from every other host" + ("" if topo.leader else
                                                             " (no leader: a random node)")
        self._partition(fault, [leader], [h for h in self.hosts() if h != leader])

    def _part_halves(self, fault: Fault, topo: Topology) -> None:
        hosts = self.hosts()
        self.rng.shuffle(hosts)
        half = len(hosts) // 2
        a, b = sorted(hosts[:half]), sorted(hosts[half:])
        fault.targets, fault.hold = a, self.rng.uniform(3, 10)
        fault.detail = f"{' '.join(a)} | {' '.join(b)}"
        self._partition(fault, a, b)

    def _one_way(self, fault: Fault, topo: Topology) -> None:
        node = self.pick_node(topo)
        others = [h for h in self.hosts() if h != node]
        fault.targets, fault.hold = [node], self.rng.uniform(2, 10)
        fault.detail = "node receives nothing; what it sends still arrives"
        self.net.block(node, others, inbound=True, outbound=False)
        fault._undo.append(self.net.heal)

    # ------------------------------------------------------------------ processes

    def _pause(self, fault: Fault, p: NsProcess) -> None:
        os.kill(p.pid, signal.SIGSTOP)

        def resume() -> None:
            if p.alive():
                os.kill(p.pid, signal.SIGCONT)

        fault._undo.append(resume)

    def _kill(self, fault: Fault, p: NsProcess) -> None:
        assert p.popen is not None
        p.popen.kill()  # SIGKILL
        p.popen.wait(5)

        def restart() -> None:
            if not p.alive():
                p.start(30)

        fault._undo.append(restart)

    def _pause_proxy(self, fault: Fault, topo: Topology) -> None:
        node = self.pick_node(topo)
        fault.targets, fault.hold = [node], self.rng.uniform(1, 10)
        self._pause(fault, self.dep.nodes[node].proxy)

    def _pause_proxy_short(self, fault: Fault, topo: Topology) -> None:
        """A master's proxy stopped for less than half the lease TTL: no failover is due."""
        node = topo.masters[self.rng.choice(sorted(topo.masters))]
        fault.targets, fault.hold = [node], self.rng.uniform(0.5, 2.0)
        fault.detail = "master proxy, shorter than the lease"
        self._pause(fault, self.dep.nodes[node].proxy)

    def _kill_proxy(self, fault: Fault, topo: Topology) -> None:
        node = self.pick_node(topo)
        fault.targets, fault.hold = [node], self.rng.uniform(0.5, 8)
        self._kill(fault, self.dep.nodes[node].proxy)

    def _kill_replica_proxy(self, fault: Fault, topo: Topology) -> None:
        replicas = sorted(r for rs in topo.replicas.values() for r in rs)
        node = self.rng.choice(replicas)
        fault.targets, fault.hold = [node], self.rng.uniform(0.5, 2.0)
        fault.detail = "replica proxy"
        self._kill(fault, self.dep.nodes[node].proxy)

    def _kill_redis(self, fault: Fault, topo: Topology) -> None:
        node = self.pick_node(topo)
        role = "master" if node in topo.masters.values() else "replica"
        fault.targets, fault.hold = [node], self.rng.uniform(0.5, 5)
        fault.detail = f"{role} redis-server, restarted from its append-only file"
        self._kill(fault, self.dep.nodes[node].redis)

    def _kill_etcd(self, fault: Fault, topo: Topology) -> None:
        p = self.rng.choice(self.dep.etcd)
        fault.targets, fault.hold = [p.host.name], self.rng.uniform(1, 8)
        self._kill(fault, p)

    # ------------------------------------------------------------------ network quality

    def _latency(self, fault: Fault, topo: Topology) -> None:
        node = self.pick_node(topo)
        ms = self.rng.randint(*LATENCY_MS)
        fault.targets, fault.hold = [node], self.rng.uniform(3, 10)
        fault.detail = f"every packet the node sends delayed {ms} ms +- {ms // 4} ms"
        self.net.delay(node, ms, ms // 4)
        fault._undo.append(self.net.heal)

    def _loss(self, fault: Fault, topo: Topology) -> None:
        node = self.pick_node(topo)
        percent = self.rng.randint(*LOSS_PERCENT)
        fault.targets, fault.hold = [node], self.rng.uniform(3, 10)
        fault.detail = f"{percent}% of the node's packets lost, each way"
        self.net.lossy(node, [h for h in self.hosts() if h != node], percent)
        fault._undo.append(self.net.heal)

    # ------------------------------------------------------------------ a stalled Redis

    def _stall_redis(self, fault: Fault, topo: Topology) -> None:
        """A master's Redis runs a read-only script that loops until its time is up: no
        other command runs meanwhile, and after 5 s the others are answered -BUSY."""
        node = topo.masters[self.rng.choice(sorted(topo.masters))]
        seconds = self.rng.uniform(*STALL_SECONDS)
        fault.targets, fault.hold = [node], seconds
        fault.detail = "master redis-server busy in a script"
        ns = self.dep.nodes[node].host.ns
        cli = [shutil.which("redis-cli") or "redis-cli", "-h", "127.0.0.1", "-p",
               str(REDIS_PORT)]
        script = subprocess.Popen([*cli, "EVAL", STALL_SCRIPT, "0", str(int(seconds * 1000))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  preexec_fn=netns.enter(ns))

        def end() -> None:
            try:
                script.wait(STALL_END_TIMEOUT)
            except subprocess.TimeoutExpired:
                subprocess.run([*cli, "SCRIPT", "KILL"], capture_output=True, timeout=10,
                               preexec_fn=netns.enter(ns))
                script.kill()
                script.wait(5)

        fault._undo.append(end)

    # ------------------------------------------------------------------ migrations

    def _redis(self, node: str, commands: list[tuple[str | bytes, ...]]) -> None:
        """Run commands on a node's redis-server directly, from the client host."""
        with netns.inside(self.dep.client.ns):
            conn = Conn(f"{self.dep.nodes[node].host.ip}:{REDIS_PORT}")
        try:
            conn.sock.settimeout(30)
            for i in range(0, len(commands), FILL_BATCH):
                conn.pipeline(commands[i:i + FILL_BATCH])
        finally:
            conn.close()

    def _fill(self, topo: Topology, source: str, lo: int, hi: int) -> None:
        """Filler keys in slots lo..hi, written to the source master's Redis (it owns them),
        so the mover has seconds of work; the previous migration's filler is deleted."""
        if not self.tags:
            tags: dict[int, str] = {}
            for n in range(TAG_TRIES):
                tags.setdefault(key_slot(f"t{n}".encode()), f"t{n}")
            self.tags = [tags[s] for s in range(SLOT_COUNT)]
        for master in sorted(set(topo.masters.values())):
            self._redis(master, [("UNLINK", k) for k in self.filled])
        self.filled = []
        for i in range(MIGRATE_FILL_KEYS):
            self.fill_count += 1
            slot = lo + i % (hi - lo + 1)
            self.filled.append(f"{{{self.tags[slot]}}}:{self.dep.run_id}:fill{self.fill_count}"
                               .encode())
        self._redis(topo.masters[source], [("SET", k, FILL_VALUE) for k in self.filled])

    def _progress(self) -> tuple[int, int] | None:
        """(moved, total) keys of the running migration, None when there is none."""
        rows = self.dep.umctl("--json", "migrations", self.cluster, timeout=20)
        if not rows:
            return None
        moved, left = rows[0]["moved_keys"], rows[0]["left_keys"]
        return moved, moved + (left if left is not None else MIGRATE_FILL_KEYS)

    def _migrate(self, fault: Fault, topo: Topology) -> Migration | None:
        """Start moving a range of slots around a key the clients use to another shard and
        wait until part of it moved; None (and why, in the fault's detail) if it would not
        start."""
        slots = sorted(key_slot(k.encode()) for k in self.keys())
        slot = self.rng.choice(slots) if slots else self.rng.randrange(SLOT_COUNT)
        source = next(s for s, ranges in topo.slots.items()
                      if any(a <= slot <= b for a, b in ranges))
        a, b = next((a, b) for a, b in topo.slots[source] if a <= slot <= b)
        # of the windows holding that key's slot, the one with most of the clients' keys
        starts = range(max(a, slot - MIGRATE_SLOTS + 1), min(slot, b - MIGRATE_SLOTS + 1) + 1)
        lo = max(starts or [a], key=lambda lo: (
            sum(1 for s in slots if lo <= s < lo + MIGRATE_SLOTS), self.rng.random()))
        hi = min(b, lo + MIGRATE_SLOTS - 1)
        target = self.rng.choice(sorted(s for s in topo.slots if s != source))
        self._fill(topo, source, lo, hi)
        out = self.dep.umctl("migrate", self.cluster, "--slots", f"{lo}-{hi}", "--to", target,
                             check=False)
        if out.returncode != 0:
            fault.detail = f"no migration: {out.stderr.strip()[-200:]}"
            return None
        share = self.rng.uniform(*MIGRATE_MIDWAY)

        def started() -> tuple[int, int] | bool:
            got = self._progress()
            return got is None or (got if got[0] > 0 else False)

        # asking umctl-mesh for progress takes a second or more on a loaded machine, so the
        # mover's rate times the share tells when to strike, counted from its first keys
        try:
            got = self.dep.wait("the mover to start", started, MIGRATE_START_TIMEOUT)
            if got is True:
                moved = "done before the fault"
            else:
                time.sleep(max(0.0, share * got[1] - got[0]) / MIGRATION_RATE)
                moved = f"{share:.0%} of {got[1]} keys moved (at the mover's rate)"
        except TimeoutError as exc:
            moved = f"not started: {exc}"
        fault.detail = f"slots {lo}-{hi} {source}->{target}, {moved}"
        return Migration(source, target, (lo, hi), moved)

    def _migrate_kill_source(self, fault: Fault, topo: Topology) -> None:
        m = self._migrate(fault, topo)
        if m is None:
            return
        node = topo.masters[m.source]
        fault.targets, fault.hold = [node], self.rng.uniform(0.5, 3)
        fault.detail += "; the source master's proxy killed"
        self._kill(fault, self.dep.nodes[node].proxy)

    def _migrate_failover_source(self, fault: Fault, topo: Topology) -> None:
        """Held past the lease (5 s), so the source's replica is promoted."""
        m = self._migrate(fault, topo)
        if m is None:
            return
        node = topo.masters[m.source]
        what = self.rng.choice(("proxy", "redis"))
        fault.targets, fault.hold = [node], self.rng.uniform(8, 12)
        fault.detail += f"; the source master's {what} killed until its replica takes over"
        node_ = self.dep.nodes[node]
        self._kill(fault, node_.proxy if what == "proxy" else node_.redis)

    def _migrate_kill_target(self, fault: Fault, topo: Topology) -> None:
        m = self._migrate(fault, topo)
        if m is None:
            return
        node = topo.masters[m.target]
        fault.targets, fault.hold = [node], self.rng.uniform(0.5, 5)
        fault.detail += "; the target master's proxy killed"
        self._kill(fault, self.dep.nodes[node].proxy)

    def _migrate_cancel(self, fault: Fault, topo: Topology) -> None:
        m = self._migrate(fault, topo)
        if m is None:
            return
        fault.targets, fault.hold = [topo.masters[m.source], topo.masters[m.target]], 1.0
        self.dep.umctl("migrate", "cancel", self.cluster)
        fault.detail += "; cancelled"
