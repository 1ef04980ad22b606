"""PUBLISH to the whole cluster (proxy/broadcast.py): where it goes, the reply it makes, and
the order and deadline of its parts, against fake connections (no sockets)."""
from __future__ import annotations

import anyio
import pytest

from core.slots import SLOT_COUNT
from proxy import broadcast
from proxy.backend import BACKEND_DOWN, MAYBE_RAN, Pending
from proxy.broadcast import PEER_BACKLOG_FULL, Targets, publish, publish_reply, publish_targets
from proxy.resp import encode_command
from proxy.routing import NodeInfo, RoutingTable


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

ME, M2, M3, R1, R2 = "10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.4:7000", "10.0.0.5:7000"


def table(me: str, *, me_replica: bool = False) -> RoutingTable:
    """Masters ME, M2, M3; R1 replicates ME, R2 replicates M2."""
    nodes = (NodeInfo("m1", ME, me == ME, ((0, 5000),)),
             NodeInfo("m2", M2, me == M2, ((5001, 10000),)),
             NodeInfo("m3", M3, me == M3, ((10001, SLOT_COUNT - 1),)),
             NodeInfo("r1", R1, me == R1, (), "m1"),
             NodeInfo("r2", R2, me == R2, (), "m2"))
    return RoutingTable(cluster="c", epoch=1, nodes=nodes, routes=(None,) * SLOT_COUNT,
                        tenant="c/uid")


def test_a_master_publishes_on_its_own_redis_and_sends_to_every_other_master():
    assert publish_targets(table(ME)) == Targets(local=True, peers=(M2, M3))


def test_a_replica_publishes_on_no_redis_of_its_own():
    # its master's Redis propagates the message to it: publishing here would give its
    # subscribers the message twice
    assert publish_targets(table(R2)) == Targets(local=False, peers=(ME, M2, M3))


def test_a_node_of_no_cluster_publishes_on_its_own_redis_only():
    empty = RoutingTable(cluster="", epoch=0, nodes=(), routes=(None,) * SLOT_COUNT)
    assert publish_targets(empty) == Targets(local=True, peers=())


@pytest.mark.parametrize("parts,reply", [
    ([b":2\r\n", b":1\r\n", b":0\r\n"], b":3\r\n"),
    ([b":2\r\n", None, BACKEND_DOWN], b":2\r\n"),  # the counts of those that answered
    ([b":0\r\n", MAYBE_RAN], b":0\r\n"),
    ([None, BACKEND_DOWN], b"-UNCERTAIN 1 master(s) did not answer"),  # may have published
    ([MAYBE_RAN], b"-UNCERTAIN 1 master(s)"),
    ([BACKEND_DOWN, PEER_BACKLOG_FULL], BACKEND_DOWN),  # published nowhere: may be retried
    ([b"-NOPERM no secret\r\n"], b"-NOPERM no secret\r\n"),
    ([], b":0\r\n"),
])
def test_the_reply_sums_the_counts_of_the_masters_that_answered(parts, reply):
    assert publish_reply(parts).startswith(reply)


class FakeConn:
    """A peer or backend connection: records what is queued; the test answers."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.transport = None
        self.queued: list[tuple[bytes, Pending, object]] = []

    @property
    def inflight(self) -> int:
        return sum(1 for _, p, _ in self.queued if p.data is None)

    def queue(self, command: bytes, pending: Pending, sink: object) -> None:
        if self.down:
            pending.data = BACKEND_DOWN
            return
        self.queued.append((command, pending, sink))

    def answer(self, data: bytes, index: int = -1) -> None:
        _, pending, sink = self.queued[index]
        pending.data = data
        sink.replies_arrived()  # type: ignore[attr-defined]  # a ReplySink


class FakePeers:
    def __init__(self, **down: bool) -> None:
        self.conns: dict[str, FakeConn] = {}
        self.down = down

    def get(self, address: str, resp3: bool) -> FakeConn:
        assert not resp3
        return self.conns.setdefault(address, FakeConn(self.down.get(address, False)))


class FakeClient:
    def __init__(self) -> None:
        self.told = 0

    def replies_arrived(self) -> None:
        self.told += 1


def start(me: str, peers: FakePeers, stalled: set[str] | None = None,
          local: FakeConn | None = None) -> tuple[FakeClient, Pending, FakeConn]:
    client, reply, conn = FakeClient(), Pending(), local or FakeConn()
    publish(client, reply, conn, peers, stalled if stalled is not None else set(),  # type: ignore[arg-type]  # fakes
            table(me), b"ch", b"hello")
    return client, reply, conn


@pytest.mark.anyio
async def test_the_peers_get_the_message_only_once_this_nodes_redis_ran_it():
    peers = FakePeers()
    client, reply, local = start(ME, peers)
    assert [c for c, _, _ in local.queued] == [encode_command([b"PUBLISH", b"ch", b"hello"])]
    assert peers.conns == {}  # after the client's earlier commands, not before
    local.answer(b":2\r\n")
    sent = encode_command([b"UMCTL", b"PUBLISH", b"c/uid", b"ch", b"hello"])
    assert {a: [c for c, _, _ in conn.queued] for a, conn in peers.conns.items()} == \
        {M2: [sent], M3: [sent]}
    peers.conns[M2].answer(b":1\r\n")
    assert reply.data is None
    peers.conns[M3].answer(b":0\r\n")
    assert (reply.data, client.told) == (b":3\r\n", 1)


@pytest.mark.anyio
async def test_a_replica_sends_to_every_master_at_once():
    peers = FakePeers()
    client, reply, local = start(R1, peers)
    assert local.queued == [] and sorted(peers.conns) == [ME, M2, M3]
    for conn in peers.conns.values():
        conn.answer(b":1\r\n")
    assert (reply.data, client.told) == (b":3\r\n", 1)


@pytest.mark.anyio
async def test_peers_that_are_down_answer_at_once():
    peers = FakePeers(**{M2: True, M3: True})
    client, reply, local = start(ME, peers)
    local.answer(b":4\r\n")
    assert (reply.data, client.told) == (b":4\r\n", 1)


@pytest.mark.anyio
async def test_everything_down_is_answered_in_place():
    # the reply is filled before publish() returns: the session writes it after the command
    client, reply, _ = start(R1, FakePeers(**{ME: True, M2: True, M3: True}))
    assert reply.data == BACKEND_DOWN and client.told == 0


@pytest.mark.anyio
async def test_a_peer_that_does_not_answer_costs_one_deadline_then_is_not_waited_for(
        monkeypatch):
    monkeypatch.setattr(broadcast, "PUBLISH_DEADLINE", 0.05)
    peers, stalled = FakePeers(), set()
    client, reply, local = start(ME, peers, stalled)
    local.answer(b":1\r\n")
    peers.conns[M2].answer(b":1\r\n")
    with anyio.fail_after(1):
        while reply.data is None:
            await anyio.sleep(0.01)
    assert (reply.data, client.told, stalled) == (b":2\r\n", 1, {M3})
    # the next PUBLISH does not wait for M3, which is still sent the message
    client, reply, local = start(ME, peers, stalled)
    local.answer(b":1\r\n")
    peers.conns[M2].answer(b":1\r\n")
    assert (reply.data, client.told) == (b":2\r\n", 1)
    assert len(peers.conns[M3].queued) == 2
    # M3 answers (late): it is waited for again
    peers.conns[M3].answer(b":5\r\n", 0)
    assert stalled == set()
    client, reply, local = start(ME, peers, stalled)
    local.answer(b":1\r\n")
    peers.conns[M2].answer(b":1\r\n")
    assert reply.data is None
    peers.conns[M3].answer(b":5\r\n")
    assert reply.data == b":7\r\n"


@pytest.mark.anyio
async def test_a_peer_with_too_much_unanswered_is_not_sent_more(monkeypatch):
    monkeypatch.setattr(broadcast, "MAX_PEER_BACKLOG", 2)
    peers, stalled = FakePeers(), {M3}
    for _ in range(2):
        start(R1, peers, stalled)
        for address in (ME, M2):
            peers.conns[address].answer(b":0\r\n")
    assert len(peers.conns[M3].queued) == 2
    _, reply, _ = start(R1, peers, stalled)
    for address in (ME, M2):
        peers.conns[address].answer(b":1\r\n")
    assert len(peers.conns[M3].queued) == 2 and reply.data == b":2\r\n"
    assert stalled == {M3}  # skipping it is no answer from it
