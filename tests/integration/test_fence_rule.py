"""The fence rule on real hosts (network namespaces, chaos/hosts.py), both sides of it:

- masters cut off from etcd together with each other, while the leader outside the cut
  promotes their replicas, stop taking writes before any replica takes one (the old peer rule
  let them vouch for each other: two masters per slot);
- when etcd's members are up but cut off from each other (no leader anywhere), a master keeps
  taking writes well past its lease TTL: nothing can expire its lease then.

Both watch one clock (the client's): every write is timed, and the old master's last
acknowledged write must come before the new master's first.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chaos import netns
from chaos.hosts import PROXY_PORT, REDIS_PORT, Deployment
from chaos.workload import Conn
from core.slots import key_slot
from mesh.model.fencing import FENCE_AFTER, LEASE_TTL

pytestmark = pytest.mark.integration
CLUSTER = "fence"
WRITE_EVERY = 0.05  # seconds between two writes of one writer
WRITER_LIMIT = 120.0  # seconds a writer runs at most


def deployment(nodes: int) -> Deployment:
    try:
        netns.check_available()
    except netns.NetnsUnavailable as exc:
        pytest.fail(f"network namespaces unavailable: {exc}", pytrace=False)
    run_id = uuid.uuid4().hex[:6]
    dep = Deployment(run_id, nodes, workdir=Path(f"/tmp/moonmesh-fence-{run_id}")).start()
    dep.wait("the pool", lambda: sum(1 for n in dep.pool() if n["alive"]) >= nodes, 30)
    for name in dep.nodes:
        first_sync_at_once(dep, name)
    return dep


def first_sync_at_once(dep: Deployment, node: str) -> None:
    """The node's Redis starts a replica's full sync at once, as the other tests' do
    (tests/conftest.py, REDIS_ARGS), not after Redis's 5 s diskless-sync delay."""
    with netns.inside(dep.client.ns):
        conn = Conn(f"{dep.nodes[node].host.ip}:{REDIS_PORT}")
    try:
        assert conn.call("CONFIG", "SET", "repl-diskless-sync-delay", "0") == b"OK"
    finally:
        conn.close()


def key_in(shard: dict, tag: str) -> str:
    ranges = shard["slots"]
    for i in range(100000):
        key = f"{{{tag}{i}}}:k"
        if any(a <= key_slot(key.encode()) <= b for a, b in ranges):
            return key
    raise AssertionError("no key found for the shard")


@dataclass
class Writer:
    """Writes one key through one node's proxy over and over, timing every acknowledgement."""

    dep: Deployment
    node: str
    key: str
    acked: list[float] = field(default_factory=list)  # client clock of each acknowledgement
    refused: list[tuple[float, str]] = field(default_factory=list)  # (client clock, reply)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Writer:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        addr = f"{self.dep.nodes[self.node].host.ip}:{PROXY_PORT}"
        deadline = time.monotonic() + WRITER_LIMIT
        conn = None
        i = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            i += 1
            try:
                if conn is None:
                    with netns.inside(self.dep.client.ns):
                        conn = Conn(addr)
                reply = conn.call("SET", self.key, str(i))
                if reply == b"OK":
                    self.acked.append(time.monotonic())
                else:
                    self.refused.append((time.monotonic(), str(reply)))
            except OSError as exc:
                self.refused.append((time.monotonic(), repr(exc)))
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(WRITE_EVERY)
        if conn is not None:
            conn.close()

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(10)


def masters(dep: Deployment) -> dict[str, str]:
    """shard id -> its master, as the view says."""
    return {s["id"]: next(n["node"] for n in s["nodes"] if n["role"] == "master")
            for s in dep.show(CLUSTER)["shards"]}


@pytest.mark.timeout(240)
def test_masters_cut_off_together_stop_writing_before_their_replicas_are_promoted():
    with deployment(4) as dep:
        created = dep.umctl("--json", "cluster", "create", CLUSTER, "--shards", "2",
                            "--replicas", "1")
        old = masters(dep)
        cut = sorted(old.values())
        rest = sorted(set(dep.nodes) - set(cut))
        # the leader must be outside the cut to promote; move leadership there if needed
        dep.wait("a leader outside the cut", lambda: dep.leader() in rest or _kill_leader(dep),
                 60)
        dep.wait("replicas in sync", lambda: _synced(dep, rest), 30)
        shards = {s["id"]: s for s in created["shards"]}
        writers = {sid: Writer(dep, node, key_in(shards[sid], sid)).start()
                   for sid, node in old.items()}
        dep.wait("writes acknowledged", lambda: all(w.acked for w in writers.values()), 20)
        cut_at = time.monotonic()
        # the masters reach each other but neither etcd nor the other nodes
        dep.net.partition(cut, [*rest, *(f"etcd{i}" for i in range(3))])
        try:
            dep.wait("both replicas promoted",
                     lambda: set(masters(dep).values()) == set(rest), 60)
            new = {sid: Writer(dep, node, key_in(shards[sid], sid)).start()
                   for sid, node in masters(dep).items()}
            dep.wait("the new masters take writes", lambda: all(w.acked for w in new.values()),
                     30)
        finally:
            dep.net.heal()
        for w in [*writers.values(), *new.values()]:
            w.halt()
        for sid, w in writers.items():
            last_old, first_new = max(w.acked), min(new[sid].acked)
            assert last_old < first_new, (
                f"shard {sid}: the cut-off master acknowledged a write "
                f"{last_old - first_new:.2f}s after its replica took its first")
            # and it stopped no later than FENCE_AFTER past its last keepalive, sent before
            # the cut (plus the writer's own delay in noting the time)
            assert last_old - cut_at < FENCE_AFTER + 0.3, last_old - cut_at
            assert any("CLUSTERDOWN" in r for _, r in w.refused), w.refused[-3:]


@pytest.mark.timeout(180)
def test_a_master_stops_serving_keys_while_etcd_has_no_leader_and_serves_again_after():
    """A node cannot tell etcd without a leader from its own lease revoked by a new etcd
    leader on the other side of a cut: FENCE_AFTER without a successful keepalive fences it
    (docs/architecture.md, "The fence rule": the cost of fast failover)."""
    with deployment(1) as dep:
        created = dep.umctl("--json", "cluster", "create", CLUSTER, "--shards", "1")
        node = created["shards"][0]["nodes"][0]["node"]
        writer = Writer(dep, node, "{k}:x").start()
        dep.wait("writes acknowledged", lambda: writer.acked, 20)
        # the members answer the node but not each other: no leader can be elected
        members = [[f"etcd{i}"] for i in range(3)]
        dep.net.partition(*members)
        cut_at = time.monotonic()
        try:
            dep.wait("writes refused", lambda: any(t > cut_at for t, _ in writer.refused), 20)
            # and they stay refused: time passing is the test (a lease TTL and more)
            time.sleep(LEASE_TTL + 1)
            healed_at = time.monotonic()
        finally:
            dep.net.heal()
        dep.wait("writes after the heal", lambda: writer.acked[-1] > healed_at, 30)
        writer.halt()
        late = [t for t in writer.acked if cut_at + FENCE_AFTER + 0.3 < t < healed_at]
        assert late == [], f"{len(late)} writes acknowledged with no etcd leader"
        assert any("CLUSTERDOWN" in r for t, r in writer.refused if t > cut_at)
        back = min(t for t in writer.acked if t > healed_at) - healed_at
        print(f"\n[no etcd leader] writes refused from the cut until the heal; served again "
              f"{back:.2f}s after it")


def _kill_leader(dep: Deployment) -> bool:
    """Restart the leader's proxy so that leadership moves (once per call)."""
    leader = dep.leader()
    if leader is None:
        return False
    proxy = dep.nodes[leader].proxy
    proxy.kill()
    proxy.spawn()
    proxy.wait_listening(30)
    return False


def _synced(dep: Deployment, replicas: list[str]) -> bool:
    for node in replicas:
        info = dep.redis_info(node, "replication")
        if info.get("master_link_status") != "up":
            return False
    return True
