"""Resource attacks on one proxy: each is bounded by a named limit with a clear error, and the
proxy and its other clients carry on."""
from __future__ import annotations

import socket

import redis

from proxy.dedicated import MAX_DEDICATED_CONNECTIONS
from proxy.local import MAX_SLOT_SCANS
from proxy.replies import MAX_SUBSCRIBER_OUTPUT_BYTES
from proxy.resp import encode_command
from tests.procs import command, read_replies, wait_for

MESSAGE = b"m" * 64 * 1024


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def serve_all(proxy, backend) -> None:
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"


def test_a_subscriber_that_does_not_read_is_dropped_at_the_pubsub_limit(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    serve_all(proxy, backend)
    sub = socket.socket()
    sub.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sub.connect(("127.0.0.1", proxy.port))
    sub.sendall(encode_command([b"SUBSCRIBE", b"news"]))
    assert read_replies(sub, 1)[0] == b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    publisher = redis.Redis(port=backend.port)  # straight to Redis: only the subscriber's path
    rounds = 2 * MAX_SUBSCRIBER_OUTPUT_BYTES // (len(MESSAGE) * 100)  # twice the limit
    for _ in range(rounds):
        pipe = publisher.pipeline(transaction=False)
        for _ in range(100):
            pipe.publish("news", MESSAGE)
        pipe.execute()
    # the proxy dropped it (its subscription is gone) instead of buffering all of it
    wait_for(lambda: publisher.publish("news", b"x") == 0, what="the subscriber dropped")
    assert rss_mb(proxy.pid) < 3 * MAX_SUBSCRIBER_OUTPUT_BYTES / 2**20
    assert command(proxy.port, "SET", "k", "v") == b"+OK\r\n"
    sub.close()


def test_scans_of_the_whole_keyspace_run_a_few_at_a_time(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    serve_all(proxy, backend)
    loader = redis.Redis(port=backend.port).pipeline(transaction=False)
    for i in range(200):
        loader.mset({f"key:{i}:{j}": b"v" for j in range(1000)})
    loader.execute()
    clients = [socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
               for _ in range(4 * MAX_SLOT_SCANS)]
    for c in clients:
        c.sendall(encode_command([b"CLUSTER", b"COUNTKEYSINSLOT", b"0"]))
    answers = [read_replies(c, 1, timeout=30)[0] for c in clients]
    busy = [a for a in answers if a.startswith(b"-BUSY")]
    counted = [a for a in answers if a.startswith(b":")]
    assert busy and counted and len(busy) + len(counted) == len(answers), answers
    assert len(set(counted)) == 1  # every scan that ran found the same keys
    for c in clients:
        c.close()


def test_clients_needing_connections_of_their_own_are_bounded(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    serve_all(proxy, backend)
    blocked = []
    for i in range(MAX_DEDICATED_CONNECTIONS):
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        s.sendall(encode_command([b"BLPOP", b"q%d" % i, b"0"]))
        blocked.append(s)
    wait_for(lambda: b"blocked_clients:%d" % MAX_DEDICATED_CONNECTIONS
             in command(backend.port, "INFO", "clients"), timeout=60, what="all blocked")
    # a loaded machine with 2000 clients blocked may take a while: the reply must come
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as one_more:
        one_more.sendall(encode_command([b"BLPOP", b"q", b"0"]) + encode_command([b"GET", b"k"]))
        refused, served = read_replies(one_more, 2, timeout=30)
        assert refused.startswith(b"-ERR max number of clients reached")
        assert served == b"$-1\r\n"  # and the GET is served otherwise
    assert command(proxy.port, "SET", "k", "v") == b"+OK\r\n"
    blocked.pop().close()  # one leaves: its connection is freed
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as again:
        wait_for(lambda: b"blocked_clients:%d" % (MAX_DEDICATED_CONNECTIONS - 1)
                 in command(backend.port, "INFO", "clients"), what="one unblocked")
        again.sendall(encode_command([b"BLPOP", b"q", b"1"]))
        assert read_replies(again, 1, timeout=10)[0] in (b"*-1\r\n", b"$-1\r\n")  # ran: timed out after 1 s
    for s in blocked:
        s.close()
