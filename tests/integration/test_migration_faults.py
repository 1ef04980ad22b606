"""Faults in the middle of a migration, with a real mesh: each test attacks one guarantee of
DESIGN.md section 12.1 (no acknowledged write lost, no deleted key back, no old value read)
at the moment the fault lands, and can fail."""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import redis
from redis.cluster import RedisCluster

from core.slots import key_slot
from proxy.mover import BATCH_KEYS, MOVES_IN_FLIGHT
from tests.integration.test_migration import load_keys, missing_keys, run_with_load, wait_moving
from tests.procs import Process, command, wait_for

SLOW = ("--migration-rate", "2000")  # keys/s: a migration of ~10k keys lasts ~5 s
MOVING = "0-8191"  # the slots every test here moves from s1 to s2
LAST_MOVING_SLOT = 8191
STALL = 1.5  # seconds a stopped process stays stopped (below the 3 s of failed checks)
# ... and a stopped proxy, well inside its write deadline (lease TTL 5 s, keepalive 1.7 s)
PROXY_STALL = 0.5
# at most this many keys are in batches already in flight when a fault lands
IN_FLIGHT = BATCH_KEYS * MOVES_IN_FLIGHT
REPLY_TIMEOUT = 15.0  # a command held by the gate during a fault answers within this


def moving(key: str | bytes) -> bool:
    return key_slot(key.encode() if isinstance(key, str) else key) <= LAST_MOVING_SLOT


@contextmanager
def stopped(process: Process):
    """SIGSTOP `process` for the duration of the block."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def scan(port: int, pattern: str) -> list[bytes]:
    """The keys of the moving slots a redis-server holds now, in SCAN order (the mover's)."""
    r = redis.Redis(port=port)
    try:
        return [k for k in r.scan_iter(pattern, count=1000) if moving(k)]
    finally:
        r.close()


def keys_in(port: int, pattern: str) -> set[bytes]:
    return set(scan(port, pattern))


def epoch(proxy: Process) -> int:
    return int(command(proxy.port, "UMCTL", "GETEPOCH")[1:-2])


def create(mesh, name: str, *options: str) -> dict[str, list[str]]:  # noqa: ANN001
    created = mesh.umctl("--json", "cluster", "create", name, "--shards", "2", *options)
    return {s["id"]: [n["node"] for n in s["nodes"]] for s in created["shards"]}


def test_cancel_forwards_keys_still_at_the_old_source(mesh_factory):
    """After `migrate cancel` the old target owns the slots while most keys are still at the
    old source: it must not answer nil for them or start INCR from 1."""
    mesh = mesh_factory(2, proxy_args=SLOW)
    mesh.wait_pool(2)
    shards = create(mesh, "cx")
    src, dst = mesh.proxies[shards["s1"][0]], mesh.proxies[shards["s2"][0]]
    load_keys(dst.port, "c", 20_000)
    mesh.umctl("migrate", "cx", "--slots", MOVING, "--to", "s2")
    wait_moving(mesh, "cx")
    replies: list[bytes] = []
    with stopped(src):  # it moves nothing more and applies the cancel only when it wakes
        at_source = sorted(keys_in(mesh.redis[shards["s1"][0]].port, "c:*"))[:20]
        assert at_source
        before = epoch(dst)
        mesh.umctl("migrate", "cancel", "cx")
        wait_for(lambda: epoch(dst) > before, what="the old target to apply the cancel")

        def served(*argv: str) -> bytes:
            # as a cluster client does: CLUSTERDOWN is retried (the old source refuses keys
            # for a moment when it wakes: its lease was not confirmed while it was stopped)
            deadline = time.monotonic() + REPLY_TIMEOUT
            while True:
                reply = command(dst.port, *argv, timeout=REPLY_TIMEOUT)
                if not reply.startswith(b"-CLUSTERDOWN") or time.monotonic() > deadline:
                    return reply
                time.sleep(0.05)

        def read() -> None:
            for key in at_source:
                replies.append(served("GET", key))
            replies.append(served("INCR", at_source[0]))

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(PROXY_STALL)  # the fault's length: the reads are sent meanwhile
    reader.join(REPLY_TIMEOUT * (len(at_source) + 1))
    values = [int(k.split(b":")[1]) for k in at_source]
    assert replies[:-1] == [b"$%d\r\n%d\r\n" % (len(str(v)), v) for v in values]
    assert replies[-1] == b":%d\r\n" % (values[0] + 1)  # not 1: the key was at the old source
    wait_for(lambda: mesh.umctl("--json", "migrations", "cx") == [], timeout=60,
             what="the cancel to finish")
    rc = RedisCluster(host="127.0.0.1", port=dst.port)
    assert rc.get(at_source[0].decode()) == str(values[0] + 1).encode()
    rc.close()


def test_a_failed_copy_leaves_nothing_a_read_can_see(mesh_factory):
    """The target refuses some RESTOREs of a batch (out of memory) after taking others: a
    key deleted at the source afterwards must stay deleted, not be read from the target."""
    mesh = mesh_factory(2, proxy_args=SLOW)
    mesh.wait_pool(2)
    shards = create(mesh, "fx")
    entry = mesh.proxies[shards["s2"][0]].port
    load_keys(entry, "f", 4000)
    rc = RedisCluster(host="127.0.0.1", port=entry)
    for i in range(40):
        rc.set(f"big:{i}", "x" * 200_000)
    target = redis.Redis(port=mesh.redis[shards["s2"][0]].port)
    used = int(target.info("memory")["used_memory"])
    target.config_set("maxmemory", used + 1_000_000)  # a few big copies fit, then OOM
    mesh.umctl("migrate", "fx", "--slots", MOVING, "--to", "s2")
    wait_for(lambda: any(r["error"] for r in mesh.umctl("--json", "migrations", "fx")),
             what="a batch to fail")
    keys = [f"f:{i}" for i in range(4000) if moving(f"f:{i}")]
    pipe = rc.pipeline()
    for key in keys:
        pipe.delete(key)
    pipe.execute()
    pipe = rc.pipeline()
    for key in keys:
        pipe.get(key)
    back = [k for k, v in zip(keys, pipe.execute()) if v is not None]
    assert back == [], f"{len(back)} deleted keys came back, e.g. {back[:5]}"
    target.config_set("maxmemory", 0)
    target.close()
    rc.close()


def test_a_source_killed_between_copy_and_unlink(mesh_factory):
    """The source's proxy dies after a batch's copies reached the target but before its
    UNLINK: the keys are at both (the target's replica is stopped, so the mover waits for
    the copies to reach it). After the restart (the target refusing copies now), a key
    deleted at the source must stay deleted."""
    mesh = mesh_factory(4, proxy_args=SLOW)
    mesh.wait_pool(4)
    shards = create(mesh, "kx", "--replicas", "1")
    src = mesh.proxies[shards["s1"][0]]
    src_redis, dst_redis = mesh.redis[shards["s1"][0]], mesh.redis[shards["s2"][0]]
    entry = mesh.proxies[shards["s2"][0]].port
    wait_for(lambda: _loaded(entry, "k", 20_000), what="the replicas to confirm writes")
    mesh.umctl("migrate", "kx", "--slots", MOVING, "--to", "s2")
    wait_moving(mesh, "kx")
    with stopped(mesh.redis[shards["s2"][1]]):  # the copies' WAIT at the target waits
        both = wait_for(lambda: keys_in(src_redis.port, "k:*") & keys_in(dst_redis.port, "k:*"),
                        what="copies at the target of keys still at the source")
        src.kill()
    target = redis.Redis(port=dst_redis.port)
    target.config_set("maxmemory", 1)  # from now on every copy there fails
    src.restart()
    wait_for(lambda: any(r["error"] for r in mesh.umctl("--json", "migrations", "kx")),
             timeout=30, what="the restarted source to try a batch")
    rc = RedisCluster(host="127.0.0.1", port=entry)
    keys = sorted(k.decode() for k in both)
    for key in keys:
        rc.delete(key)
    back = [k for k in keys if rc.get(k) is not None]
    assert back == [], f"{len(back)} of {len(keys)} deleted keys came back, e.g. {back[:5]}"
    target.config_set("maxmemory", 0)
    target.close()
    rc.close()


def _loaded(port: int, prefix: str, n: int) -> bool:
    try:
        load_keys(port, prefix, n)
    except redis.RedisError:  # -UNCERTAIN until the replicas have synced
        return False
    return True


def test_the_gate_follows_a_failover_of_the_target(mesh_factory):
    """The target's master dies mid-migration; its replica is promoted: forwards and copies
    go there and the migration ends, with nothing acknowledged lost."""
    mesh = mesh_factory(4, proxy_args=SLOW)
    mesh.wait_pool(4)
    shards = create(mesh, "tx", "--replicas", "1")
    entry = mesh.proxies[shards["s2"][1]].port  # s1 gives all its slots away and leaves
    load_keys(entry, "t", 20_000)
    old = shards["s2"][0]

    def fail_over_the_target() -> None:
        mesh.umctl("migrate", "tx", "--slots", MOVING, "--to", "s2")
        wait_moving(mesh, "tx")
        mesh.redis[old].kill()
        mesh.proxies[old].kill()
        wait_for(lambda: mesh.umctl("--json", "migrations", "tx") == [], timeout=60,
                 what="the migration to finish at the promoted target")

    checker = run_with_load(entry, fail_over_the_target, workers=2)
    assert all(any(w in e for w in ("Connection", "ClusterDown", "Timeout", "UNCERTAIN",
                                    "TryAgain", "MOVED"))
               for e in checker.errors), checker.errors[:5]
    checker.verify()
    assert missing_keys(entry, "t", 20_000) == []


def test_nothing_moves_until_the_source_replica_has_it_and_gated_writes_wait(mesh_factory):
    """Synchronous mode, the source shard's replica stalled: no batch may count as moved (a
    failover would promote a replica that still has the keys), and a write through the
    gate is not acknowledged as confirmed."""
    mesh = mesh_factory(4, proxy_args=SLOW)
    mesh.wait_pool(4)
    shards = create(mesh, "sx", "--replicas", "1", "--min-replicas-ack", "1")
    src, replica = shards["s1"]
    entry = mesh.proxies[shards["s2"][0]].port  # s1 gives all its slots away and leaves
    wait_for(lambda: _loaded(entry, "s", 20_000), what="the replicas to confirm writes")
    mesh.umctl("migrate", "sx", "--slots", MOVING, "--to", "s2")
    wait_moving(mesh, "sx")
    with stopped(mesh.redis[replica]):
        order = scan(mesh.redis[src].port, "s:*")
        key = order[-1]  # the mover's last: not in a batch held now
        reply = command(mesh.proxies[src].port, "SET", key, "gated", timeout=REPLY_TIMEOUT)
        time.sleep(STALL)  # the fault's length
        gone = set(order) - keys_in(mesh.redis[src].port, "s:*")
    assert reply.startswith(b"-UNCERTAIN"), reply
    assert len(gone) <= IN_FLIGHT, f"{len(gone)} keys left the source while its replica was stalled"
    wait_for(lambda: mesh.umctl("--json", "migrations", "sx") == [], timeout=60,
             what="the migration to finish")
    assert missing_keys(entry, "s", 20_000) == [int(key.split(b":")[1])]  # it holds "gated"
