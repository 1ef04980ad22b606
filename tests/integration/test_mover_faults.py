"""Adversarial tests of the key mover (proxy/mover.py) against real redis-servers: a source
master P with a replica R, a target T. The mover's functions run in the test with a stand-in
gate; a fault is injected at an exact step, then the source "fails over" (P killed, R
promoted) and R's mover settles the journal as a promoted source's would.

Each test checks one guarantee of DESIGN.md 12.1: a key the gate released to clients (its
commands then go to the target) must not be overwritten or brought back there by a promoted
source replica that never learned the key left."""
from __future__ import annotations

import os
import signal

import pytest
import redis

from proxy.link import Link
from proxy.mover import (
    Batch,
    DirectCopy,
    MigrationProgress,
    Side,
    move_batch,
    read_journal,
    settle,
)
from tests.procs import wait_for

pytestmark = pytest.mark.anyio

MID = "review-1"
KEYS = (b"k0", b"k1", b"k2")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class StandInGate:
    """What the mover needs of SlotGate; `fenced` is the node's fence (refusal)."""

    def __init__(self) -> None:
        self.moving: set[bytes] = set()
        self.fenced = False
        self.released: list[bytes] = []

    async def hold(self, keys: list[bytes]) -> None:
        self.moving.update(keys)

    def release(self, keys: list[bytes]) -> None:
        self.moving.difference_update(keys)
        self.released += keys

    def refusal(self) -> bytes | None:
        return b"-FENCED\r\n" if self.fenced else None


class Servers:
    def __init__(self, spawn) -> None:  # noqa: ANN001
        self.p, self.r, self.t = spawn.redis(), spawn.redis(), spawn.redis()
        self.P = redis.Redis(port=self.p.port)
        self.R = redis.Redis(port=self.r.port)
        self.T = redis.Redis(port=self.t.port)
        self.R.replicaof("127.0.0.1", self.p.port)
        wait_for(lambda: self.R.info("replication")["master_link_status"] == "up",
                 what="the replica to sync")
        self.r_stopped = False

    def stop_replica(self) -> None:
        """R stops taking the replication stream: stopped, and its link dropped (what P
        sends from now on stays in P's buffers and dies with P; a stopped R alone would
        still find it in its socket buffer)."""
        os.kill(self.r.pid, signal.SIGSTOP)
        self.r_stopped = True
        self.P.client_kill_filter(_type="replica")

    def fail_over(self) -> None:
        """P dies (kill -9) while R lags; R is promoted."""
        self.p.kill()
        if self.r_stopped:
            os.kill(self.r.pid, signal.SIGCONT)
            self.r_stopped = False
        self.R.replicaof("NO", "ONE")

    def close(self) -> None:
        if self.r_stopped:
            os.kill(self.r.pid, signal.SIGCONT)
        for c in (self.P, self.R, self.T):
            c.close()


@pytest.fixture
def servers(spawn):
    s = Servers(spawn)
    yield s
    s.close()


class StopsReplicaFirst(DirectCopy):
    """DirectCopy; the source's replica stops right before the copy (after it confirmed the
    journal): it lags from here on."""

    def __init__(self, servers: Servers, *args) -> None:  # noqa: ANN002
        super().__init__(*args)
        self.servers = servers

    async def copy(self, keys: tuple[bytes, ...], move: bool = False) -> None:
        if not self.servers.r_stopped:
            self.servers.stop_replica()
        await super().copy(keys, move)


async def _promoted_source_settles(servers: Servers) -> None:
    """R, promoted, settles its journal as a promoted source's mover does first."""
    backend = Link("127.0.0.1", servers.r.port)
    target = Link("127.0.0.1", servers.t.port)
    await backend.connect()
    await target.connect()
    try:
        entries, journaled = await read_journal(backend, MID)
        gate = StandInGate()
        gate.moving.update(journaled)
        await settle(gate, entries, journaled, backend, DirectCopy(backend, target, None, MID),
                     Side(MID, lambda: 0, lambda: 0), MigrationProgress(MID))
    finally:
        backend.close()
        target.close()


async def _links(servers: Servers) -> tuple[Link, Link]:
    backend = Link("127.0.0.1", servers.p.port)
    target = Link("127.0.0.1", servers.t.port)
    await backend.connect()
    await target.connect()
    return backend, target


async def _a_write_once_released_survives_the_failover(servers: Servers, gate: StandInGate) -> None:
    """k0 held still: no client could have written it (the fix). Released: a client's write
    forwarded to the target must survive the source's failover and the promoted source's
    settling."""
    if b"k0" in gate.moving:
        return
    servers.T.set(b"k0", b"acknowledged")  # a client's write, forwarded by the gate
    servers.fail_over()
    await _promoted_source_settles(servers)
    assert servers.T.get(b"k0") == b"acknowledged", \
        "the promoted source copied k0's old value over an acknowledged write"


async def test_a_partly_failed_migrate_releases_keys_only_once_the_replica_has_their_delete(
        servers):
    """No replicas at the target: MIGRATE moves (no COPY). It moves k0 and k1, then the target
    refuses k2 (OOM). k0 is gone here, so the gate releases it and a client's write of k0
    goes to the target. The failed batch never WAITs for the source's replica: if the master
    dies before the replica got MIGRATE's DEL (and the HDEL), the promoted replica has k0's old
    value and the journal entry, settles it, and overwrites the client's acknowledged write."""
    servers.P.set(b"k0", b"old")
    servers.P.set(b"k1", b"x" * 600_000)
    servers.P.set(b"k2", b"old")
    wait_for(lambda: servers.R.get(b"k2") == b"old", what="the replica to have the keys")
    used = int(servers.T.info("memory")["used_memory"])
    servers.T.config_set("maxmemory", used + 200_000)  # k0, k1 land; k2 is refused (OOM)
    backend, target = await _links(servers)
    gate = StandInGate()
    copier = StopsReplicaFirst(servers, backend, target, None, MID)
    try:
        with pytest.raises(OSError):
            await move_batch(gate, Batch(KEYS, 700_000), backend, copier,
                             Side(MID, lambda: 1, lambda: 0), MigrationProgress(MID))
    finally:
        backend.close()
        target.close()
    servers.T.config_set("maxmemory", 0)
    assert servers.P.exists(b"k0") == 0, "MIGRATE did not move k0: the fault did not land"
    await _a_write_once_released_survives_the_failover(servers, gate)


async def test_keys_whose_unlink_is_unconfirmed_stay_held_across_the_retry(servers,
                                                                            monkeypatch):
    """The batch's UNLINK (and HDEL) never reach the source's replica: the batch raises with
    its keys held, as documented. The mover's retry reads the journal (no entry: the HDEL
    ran), settles gate.moving, finds the keys gone here and releases them without a WAIT.
    A client's write then goes to the target; the master dies; the promoted replica still
    has the keys and the journal entry, and its settle overwrites the write."""
    monkeypatch.setattr("proxy.mover.MOVE_ACK_TIMEOUT_MS", 100)
    monkeypatch.setattr("proxy.mover.MOVE_ACK_ATTEMPTS", 2)
    for k in KEYS:
        servers.P.set(k, b"old")
    wait_for(lambda: servers.R.get(b"k2") == b"old", what="the replica to have the keys")
    backend, target = await _links(servers)
    gate = StandInGate()
    side = Side(MID, lambda: 1, lambda: 0)
    copier = StopsReplicaFirst(servers, backend, target, None, MID)
    try:
        with pytest.raises(OSError, match="UNLINK"):
            await move_batch(gate, Batch(KEYS, 100), backend, copier, side,
                             MigrationProgress(MID))
        assert set(KEYS) <= gate.moving  # held, as the docstring says
        # the mover's next attempt (Migrations._move_keys), the replica still lagging
        entries, journaled = await read_journal(backend, MID)
        unsettled = sorted(set(journaled) | gate.moving)
        await settle(gate, entries, unsettled, backend, copier, side, MigrationProgress(MID))
    except OSError:
        pass  # a fixed settle may refuse to release while the replica lags
    finally:
        backend.close()
        target.close()
    await _a_write_once_released_survives_the_failover(servers, gate)


class FencedDuringWait(Link):
    """The source's link; the node's write deadline passes while the journal's WAIT is out
    (a stall of the proxy process, a GC pause, a slow replica plus a partition)."""

    gate: StandInGate
    sent_after_fence: list[bytes]

    async def call_many(self, commands):  # noqa: ANN001, ANN201
        if self.gate.fenced:
            self.sent_after_fence += [bytes(c[0]) for c in commands]
        replies = await super().call_many(commands)
        if any(c[0] == b"WAIT" for c in commands):
            self.gate.fenced = True
        return replies


async def test_a_batch_copies_nothing_once_the_node_is_fenced(servers):
    """move_batch asks the fence once, before the hold. The journal's WAIT (up to 1 s, or a
    stall of the proxy) can take the node past its write deadline; MIGRATE still goes out.
    By then the source's replica (which confirmed the journal) may be the new master, have
    settled the keys and released them, and a client may have written them at the target:
    the stale MIGRATE ... REPLACE puts the old values back there."""
    servers.P.set(b"k0", b"old")
    wait_for(lambda: servers.R.get(b"k0") == b"old", what="the replica to have the key")
    gate = StandInGate()
    backend = FencedDuringWait("127.0.0.1", servers.p.port)
    backend.gate, backend.sent_after_fence = gate, []
    target = Link("127.0.0.1", servers.t.port)
    await backend.connect()
    await target.connect()
    try:
        try:
            await move_batch(gate, Batch((b"k0",), 100), backend,
                             DirectCopy(backend, target, None, MID),
                             Side(MID, lambda: 1, lambda: 0), MigrationProgress(MID))
        except OSError:
            pass
    finally:
        backend.close()
        target.close()
    assert b"MIGRATE" not in backend.sent_after_fence, \
        f"a fenced node sent {backend.sent_after_fence} (the copy went to the target)"
