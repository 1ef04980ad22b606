"""Pub/sub across the mesh: PUBLISH on any node reaches every subscriber of the cluster, on
every node, exactly once; shard channels follow their slot. One 3-shard x 1-replica mesh of
real etcd, redis-servers and mesh-proxies for the module (tests use channels of their own;
the ones that stop a proxy or move a slot come last)."""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest
import redis
from redis.cluster import RedisCluster

from core import secret
from core.slots import key_slot
from mesh.store.keys import Keys
from proxy.broadcast import PUBLISH_DEADLINE
from proxy.resp import encode_command
from tests.conftest import MESH_SECRET, Mesh, Spawner
from tests.procs import command, read_replies, wait_for
from tools.launch import etcd_binary

QUIET = 0.5  # how long a subscriber listens for a duplicate that must not come


@dataclass(frozen=True)
class Node:
    node: str
    port: int  # its proxy
    shard: str
    master: bool


class Cluster:
    """The mesh and its cluster `pubs`, with the roles as `cluster show` tells them."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def shards(self) -> list[dict]:
        return self.mesh.umctl("--json", "cluster", "show", "pubs")["shards"]

    def nodes(self) -> list[Node]:
        return [Node(n["node"], self.mesh.proxies[n["node"]].port, s["id"], n["role"] == "master")
                for s in self.shards() for n in s["nodes"]]

    def masters(self) -> list[Node]:
        return [n for n in self.nodes() if n.master]

    def owner(self, slot: int) -> str:
        """The shard that owns `slot`."""
        return next(s["id"] for s in self.shards()
                    if any(a <= slot <= b for a, b in s["slots"]))

    def of_shard(self, shard: str) -> tuple[Node, Node]:
        """The shard's master and its replica."""
        nodes = [n for n in self.nodes() if n.shard == shard]
        return next(n for n in nodes if n.master), next(n for n in nodes if not n.master)


@pytest.fixture(scope="module")
def cluster():
    spawner = Spawner()
    try:
        mesh = Mesh(spawner, 6)
        mesh.wait_pool(6)
        mesh.umctl("--json", "cluster", "create", "pubs", "--shards", "3", "--replicas", "1")
        c = Cluster(mesh)
        # every replica's Redis follows its master: replication carries PUBLISH to it
        for n in c.nodes():
            if not n.master:
                wait_for(lambda n=n: b"master_link_status:up" in command(
                    mesh.redis[n.node].port, "INFO", "replication"), what="replication")
        yield c
    finally:
        spawner.cleanup()


def subscribe(port: int, *, channel: str | None = None, pattern: str | None = None):
    """A plain redis-py client subscribed through the proxy at `port`."""
    ps = redis.Redis(port=port, socket_timeout=10).pubsub()
    if channel is not None:
        ps.subscribe(channel)
    else:
        ps.psubscribe(pattern)
    confirmation = ps.get_message(timeout=5)
    assert confirmation is not None and confirmation["type"] in ("subscribe", "psubscribe")
    return ps


def received(ps, count: int, timeout: float = 5.0) -> list[bytes]:
    """The data of the messages `ps` gets: `count` of them, then whatever comes within QUIET."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        msg = ps.get_message(timeout=0.1)
        if msg is not None and msg["type"] in ("message", "pmessage", "smessage"):
            out.append(msg["data"])
    quiet_until = time.monotonic() + QUIET
    while time.monotonic() < quiet_until:
        msg = ps.get_message(timeout=0.1)
        if msg is not None and msg["type"] in ("message", "pmessage", "smessage"):
            out.append(msg["data"])
    return out


def test_publish_on_any_node_reaches_every_subscriber_of_the_cluster_exactly_once(cluster):
    nodes = cluster.nodes()
    subscribers = {n.node: subscribe(n.port, channel="news") for n in nodes}
    a_master = cluster.masters()[0]
    a_replica = next(n for n in nodes if not n.master and n.shard != a_master.shard)
    # the reply counts the subscribers of the masters' Redis (one per master here); those
    # of the replicas get the message by replication and are not counted
    assert redis.Redis(port=a_master.port).publish("news", "from a master") == 3
    assert redis.Redis(port=a_replica.port).publish("news", "from a replica") == 3
    for node, ps in subscribers.items():
        assert received(ps, 2) == [b"from a master", b"from a replica"], node
        ps.close()


def test_psubscribe_on_every_node_gets_a_message_published_anywhere(cluster):
    nodes = cluster.nodes()
    subscribers = {n.node: subscribe(n.port, pattern="sport.*") for n in nodes}
    for i, n in enumerate(nodes):
        assert redis.Redis(port=n.port).publish(f"sport.{i}", f"goal {i}") == 3
    for node, ps in subscribers.items():
        assert received(ps, len(nodes)) == [f"goal {i}".encode() for i in range(len(nodes))], node
        ps.close()


def read_lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))


def test_redis_cli_cluster_mode_subscriber_gets_what_another_node_publishes(cluster):
    first = cluster.masters()[0]
    replica = next(n for n in cluster.nodes() if not n.master and n.shard != first.shard)
    sub = subprocess.Popen(["redis-cli", "-c", "-p", str(replica.port), "SUBSCRIBE", "cli-ch"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(sub.stdout, lines), daemon=True).start()
    try:
        assert [lines.get(timeout=10) for _ in range(3)] == ["subscribe", "cli-ch", "1"]
        out = subprocess.run(["redis-cli", "-c", "-p", str(first.port), "PUBLISH", "cli-ch",
                              "hello from elsewhere"], capture_output=True, text=True, timeout=10)
        assert out.stdout.strip() == "0"  # the subscriber is a replica's: not counted
        assert [lines.get(timeout=5) for _ in range(3)] == ["message", "cli-ch",
                                                             "hello from elsewhere"]
        with pytest.raises(queue.Empty):
            lines.get(timeout=QUIET)
    finally:
        sub.kill()
        sub.wait()


def test_redis_py_cluster_pubsub_gets_what_cluster_publish_sends(cluster):
    masters = cluster.masters()
    owner = cluster.owner(key_slot(b"rc-news"))
    elsewhere = next(n for n in masters if n.shard != owner)
    rc = RedisCluster(host="127.0.0.1", port=elsewhere.port, socket_timeout=10)
    try:
        # one subscriber where redis-py puts it (the channel's slot), one on another node
        by_slot = rc.pubsub()
        by_slot.subscribe("rc-news")
        pinned = rc.pubsub(node=rc.get_node(host="127.0.0.1", port=elsewhere.port))
        pinned.subscribe("rc-news")
        for ps in (by_slot, pinned):
            assert ps.get_message(timeout=5)["type"] == "subscribe"
        assert rc.publish("rc-news", "one") == 2
        assert rc.publish("rc-news", "two") == 2
        for ps in (by_slot, pinned):
            assert received(ps, 2) == [b"one", b"two"]
            ps.close()
        # shard channels: redis-py subscribes at the slot's owner and SPUBLISH goes there too
        sharded = rc.pubsub()
        sharded.ssubscribe("rc-orders")
        assert sharded.get_sharded_message(timeout=5)["type"] == "ssubscribe"
        assert rc.spublish("rc-orders", "o1") == 1
        msg = None
        deadline = time.monotonic() + 5
        while msg is None and time.monotonic() < deadline:
            msg = sharded.get_sharded_message(timeout=0.5)
        assert msg is not None and (msg["type"], msg["data"]) == ("smessage", b"o1")
        sharded.close()
    finally:
        rc.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def send(s: socket.socket, *commands: list[str]) -> None:
    s.sendall(b"".join(encode_command([a.encode() for a in c]) for c in commands))


def push(kind: str, channel: str, value: str | int, resp3: bool = False) -> bytes:
    """A pub/sub message as Redis sends it."""
    last = b":%d\r\n" % value if isinstance(value, int) else \
        b"$%d\r\n%s\r\n" % (len(value), value.encode())
    return b"%s3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n%s" % (
        b">" if resp3 else b"*", len(kind), kind.encode(), len(channel), channel.encode(), last)


def test_shard_subscribers_on_the_slots_master_and_replica_get_spublish(cluster):
    owner = cluster.owner(key_slot(b"orders"))
    master, replica = cluster.of_shard(owner)
    other = next(n for n in cluster.masters() if n.shard != owner)
    with connect(master.port) as on_master, connect(replica.port) as on_replica:
        for s in (on_master, on_replica):  # a replica of the slot serves SSUBSCRIBE (Redis 7.0)
            send(s, ["SSUBSCRIBE", "orders"])
            assert read_replies(s, 1) == [push("ssubscribe", "orders", 1)]
        assert command(master.port, "SPUBLISH", "orders", "o1") == b":1\r\n"
        # SPUBLISH through the replica or another shard is redirected to the slot's master
        moved = b"-MOVED %d 127.0.0.1:%d\r\n" % (key_slot(b"orders"), master.port)
        assert command(replica.port, "SPUBLISH", "orders", "x") == moved
        assert command(other.port, "SPUBLISH", "orders", "x") == moved
        out = subprocess.run(["redis-cli", "-c", "-p", str(replica.port), "SPUBLISH", "orders",
                              "o2"], capture_output=True, text=True, timeout=10)
        assert out.stdout.strip().splitlines()[-1] == "1"
        for s in (on_master, on_replica):
            assert read_replies(s, 2) == [push("smessage", "orders", "o1"),
                                          push("smessage", "orders", "o2")]
            s.settimeout(QUIET)
            with pytest.raises(TimeoutError):
                s.recv(1)
    # a shard channel of another shard's slot is redirected, on a replica as on a master
    assert command(other.port, "SSUBSCRIBE", "orders").startswith(b"-MOVED")


def tenant_of(cluster: Cluster) -> str:
    """The cluster's tenant as its proxies name it: the name and the view's uid."""
    etcdctl = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
    out = subprocess.run([etcdctl, "--endpoints", cluster.mesh.endpoint, "get",
                          Keys().view("pubs").decode(), "--print-value-only"],
                         capture_output=True, check=True, timeout=10).stdout
    return f"pubs/{json.loads(out)['uid']}"


def test_umctl_publish_is_a_peer_call_of_the_same_cluster_published_there_only(cluster):
    tenant = tenant_of(cluster)
    here, elsewhere = cluster.masters()[:2]
    _, here_replica = cluster.of_shard(here.shard)
    subscribers = {n: subscribe(n.port, channel="peer-ch") for n in (here, here_replica, elsewhere)}
    assert command(here.port, "UMCTL", "PUBLISH", tenant, "peer-ch", "x").startswith(b"-NOPERM")
    with connect(here.port) as peer:
        send(peer, ["UMCTL", "CHALLENGE"])
        nonce = read_replies(peer, 1)[0].split(b"\r\n")[1]
        proof = secret.proof(MESH_SECRET[secret.SECRET_ENV].encode(), nonce).decode()
        send(peer, ["UMCTL", "PROVE", proof],
             ["UMCTL", "PUBLISH", "pubs/another-uid", "peer-ch", "x"],  # the secret is the pool's
             ["UMCTL", "PUBLISH", tenant, "peer-ch", "only here"])
        proved, other_tenant, published = read_replies(peer, 3)
    assert proved == b"+OK\r\n" and other_tenant.startswith(b"-ERR UMCTL PUBLISH for another")
    assert published == b":1\r\n"
    # on this node's Redis (and by replication its replica's), never sent on
    assert received(subscribers[here], 1) == [b"only here"]
    assert received(subscribers[here_replica], 1) == [b"only here"]
    assert received(subscribers[elsewhere], 1, timeout=QUIET) == []
    for ps in subscribers.values():
        ps.close()


def test_a_stalled_subscriber_does_not_hold_back_the_others(cluster):
    masters = cluster.masters()
    publisher, there = masters[0], masters[1]
    count, size = 400, 100 * 1024  # 40 MB: past a subscriber's 32 MB output limit
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", there.port))
    send(stalled, ["SUBSCRIBE", "firehose"])  # and never reads again
    good = subscribe(there.port, channel="firehose")
    got: list[bytes] = []

    def listen() -> None:
        while len(got) < count:
            msg = good.get_message(timeout=10)
            if msg is None:
                return
            if msg["type"] == "message":
                got.append(msg["data"][:8])

    reader = threading.Thread(target=listen)
    reader.start()
    r = redis.Redis(port=publisher.port)
    started = time.monotonic()
    for i in range(count):
        r.publish("firehose", b"%08d" % i + b"x" * (size - 8))
    reader.join(timeout=60)
    assert got == [b"%08d" % i for i in range(count)]
    assert time.monotonic() - started < 60
    # the stalled one was cut off at its output limit; the proxy serves on
    wait_for(lambda: command(cluster.mesh.redis[there.node].port, "PUBSUB", "NUMSUB",
                             "firehose") == b"*2\r\n$8\r\nfirehose\r\n:1\r\n",
             timeout=10, what="the stalled subscriber dropped")
    assert command(there.port, "PING") == b"+PONG\r\n"
    good.close()
    stalled.close()


def test_a_stopped_peer_never_makes_publish_hang(cluster):
    masters = cluster.masters()
    publisher, stopped, running = masters
    on_stopped = subscribe(stopped.port, channel="alive")
    on_running = subscribe(running.port, channel="alive")
    proxy = cluster.mesh.proxies[stopped.node]
    r = redis.Redis(port=publisher.port, socket_timeout=10)
    os.kill(proxy.pid, signal.SIGSTOP)  # shorter than the leader's suspicion (3 s of silence)
    try:
        started = time.monotonic()
        first = r.publish("alive", "m0")
        first_took = time.monotonic() - started
        # the first waits out the deadline; the next do not wait for a peer that is stalled
        replies = [r.publish("alive", f"m{i}") for i in range(1, 5)]
        took = time.monotonic() - started
        assert received(on_running, 5) == [b"m%d" % i for i in range(5)]
    finally:
        os.kill(proxy.pid, signal.SIGCONT)
    assert first == 1 and replies == [1] * 4
    assert PUBLISH_DEADLINE <= first_took < PUBLISH_DEADLINE + 1.0
    assert took < 2 * PUBLISH_DEADLINE + 0.5
    # the stopped node's subscriber gets them late, in order, not lost
    assert received(on_stopped, 5) == [b"m%d" % i for i in range(5)]
    # and once it answered again it is waited for: its subscriber counts
    wait_for(lambda: r.publish("alive", "again") == 2, timeout=5, what="the peer counted again")
    on_stopped.close()
    on_running.close()


def test_shard_subscribers_are_told_to_leave_when_their_slot_moves(cluster):
    channel = "{mig}"
    slot = key_slot(channel.encode())
    source = cluster.owner(slot)
    source_slots = next(s["slots"] for s in cluster.shards() if s["id"] == source)
    stay = next(c for c in (f"stay{i}" for i in range(10_000))
                if key_slot(c.encode()) != slot
                and any(a <= key_slot(c.encode()) <= b for a, b in source_slots))
    target = next(n.shard for n in cluster.masters() if n.shard != source)
    master, replica = cluster.of_shard(source)
    with connect(master.port) as resp2, connect(replica.port) as on_replica, \
            connect(master.port) as resp3, connect(master.port) as plain:
        send(resp2, ["SSUBSCRIBE", channel], ["SSUBSCRIBE", stay])
        send(on_replica, ["SSUBSCRIBE", channel])
        send(resp3, ["HELLO", "3"], ["SSUBSCRIBE", channel])
        send(plain, ["SUBSCRIBE", channel])
        assert read_replies(resp2, 2) == [push("ssubscribe", channel, 1),
                                          push("ssubscribe", stay, 2)]
        assert read_replies(on_replica, 1) == [push("ssubscribe", channel, 1)]
        assert read_replies(resp3, 2)[1] == push("ssubscribe", channel, 1, True)
        assert read_replies(plain, 1) == [push("subscribe", channel, 1)]
        cluster.mesh.umctl("migrate", "pubs", "--slots", f"{slot}-{slot}", "--to", target,
                           "--wait", "--timeout", "60")
        # as Redis Cluster does when a slot leaves a node: sunsubscribe, the count left
        assert read_replies(resp2, 1, timeout=10) == [push("sunsubscribe", channel, 1)]
        assert read_replies(on_replica, 1, timeout=10) == [push("sunsubscribe", channel, 0)]
        assert read_replies(resp3, 1, timeout=10) == [push("sunsubscribe", channel, 0, True)]
        # the replica's subscriber had nothing else: an ordinary client again
        send(on_replica, ["CLUSTER", "KEYSLOT", "x"])
        assert read_replies(on_replica, 1) == [b":%d\r\n" % key_slot(b"x")]
        send(resp3, ["PING"])
        assert read_replies(resp3, 1) == [b"+PONG\r\n"]
        # subscribing again at the new owner works; the old one redirects there
        new_master, _ = cluster.of_shard(target)
        assert command(master.port, "SSUBSCRIBE", channel) == \
            b"-MOVED %d 127.0.0.1:%d\r\n" % (slot, new_master.port)
        with connect(new_master.port) as again:
            send(again, ["SSUBSCRIBE", channel])
            assert read_replies(again, 1) == [push("ssubscribe", channel, 1)]
            assert command(new_master.port, "SPUBLISH", channel, "moved") == b":1\r\n"
            assert read_replies(again, 1) == [push("smessage", channel, "moved")]
        # the ordinary channel of the same name and the shard channel that stayed are kept
        assert command(master.port, "SPUBLISH", stay, "still") == b":1\r\n"
        assert read_replies(resp2, 1) == [push("smessage", stay, "still")]
        assert command(replica.port, "PUBLISH", channel, "plain") == b":1\r\n"
        assert read_replies(plain, 1) == [push("message", channel, "plain")]
