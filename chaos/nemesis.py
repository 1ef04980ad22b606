"""The faults: each picks its targets with the run's random generator, starts, holds for a
bounded time chosen the same way, and is healed (rules removed, processes continued or
started again). Every fault is named so a summary can count it and a seed replays the
schedule.
"""
from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field

from chaos.hosts import Deployment, NsProcess


@dataclass
class Topology:
    """Who is who in the cluster now (from `umctl-mesh cluster show` and `nodes`)."""

    masters: dict[str, str]  # shard -> master node
    replicas: dict[str, list[str]]  # shard -> replica nodes
    leader: str | None

    @classmethod
    def read(cls, dep: Deployment, cluster: str) -> Topology:
        shown = dep.show(cluster)
        masters, replicas = {}, {}
        for s in shown["shards"]:
            masters[s["id"]] = next(n["node"] for n in s["nodes"] if n["role"] == "master")
            replicas[s["id"]] = [n["node"] for n in s["nodes"] if n["role"] == "replica"]
        return cls(masters, replicas, dep.leader())


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
              "part-halves", "one-way")


class Nemesis:
    """Starts and heals faults on one deployment."""

    KINDS = ("part-node-etcd", "part-masters-etcd", "part-master-replica", "part-leader",
             "part-halves", "one-way", "pause-proxy", "pause-proxy-short", "kill-proxy", "kill-replica-proxy",
             "kill-redis", "kill-etcd")

    def __init__(self, dep: Deployment, cluster: str, rng: random.Random) -> None:
        self.dep, self.cluster, self.rng = dep, cluster, rng
        self.net = dep.net

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
        self.net.heal()
        for p in self.dep.processes:
            if p.alive():
                os.kill(p.pid, signal.SIGCONT)

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
