"""Session edge cases found in review: connection switches, pub/sub framing, MULTI, leaks."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import redis

from proxy.resp import encode_command
from tests.procs import blocked_clients, command, read_replies, wait_for


@pytest.fixture(scope="module")
def node(standalone_node):
    return standalone_node


def enc(*args: str | bytes) -> bytes:
    return encode_command([a if isinstance(a, bytes) else a.encode() for a in args])


def session(port: int, *commands: bytes, replies: int) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(commands))
        return read_replies(s, replies)


def backend_clients(node) -> int:
    info = command(node.backend.port, "INFO", "clients")
    return int(info.split(b"connected_clients:")[1].split(b"\r\n")[0])


def test_unsubscribe_without_subscriptions_is_answered_locally(node):
    replies = session(node.port, enc("UNSUBSCRIBE", "a", "b"), enc("PING"), replies=3)
    assert replies == [b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n",
                       b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n", b"+PONG\r\n"]


def test_unsubscribe_never_steals_other_clients_replies(node):
    for i in range(8):
        command(node.port, "SET", f"steal:{i}", f"value{i}")
    victims = [socket.create_connection(("127.0.0.1", node.port), timeout=5) for _ in range(8)]
    attacker = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    attacker.sendall(enc("PUNSUBSCRIBE", "x", "y", "z") + enc("UNSUBSCRIBE", "a", "b"))
    for i, v in enumerate(victims):
        v.sendall(enc("GET", f"steal:{i}"))
    for i, v in enumerate(victims):
        assert read_replies(v, 1) == [b"$6\r\nvalue%d\r\n" % i]
        v.close()
    assert len(read_replies(attacker, 5)) == 5
    attacker.close()


def test_second_switch_while_commands_are_held_does_not_deadlock(node):
    replies = session(node.port, enc("GET", "sw:a"), enc("HELLO", "3"), enc("GET", "sw:b"),
                      enc("MULTI"), enc("SET", "sw:x", "1"), enc("EXEC"), enc("RESET"),
                      enc("GET", "sw:x"), replies=8)
    assert replies[0] == b"$-1\r\n" and replies[1].startswith(b"%7")
    assert replies[2:] == [b"_\r\n", b"+OK\r\n", b"+QUEUED\r\n", b"*1\r\n+OK\r\n", b"+RESET\r\n",
                           b"$1\r\n1\r\n"]


def test_barrier_on_a_slot_scan_is_released(node):
    replies = session(node.port, enc("CLUSTER", "COUNTKEYSINSLOT", "0"), enc("MULTI"),
                      enc("PING"), enc("EXEC"), replies=4)
    assert replies[1:] == [b"+OK\r\n", b"+QUEUED\r\n", b"*1\r\n+PONG\r\n"]


def test_commands_inside_multi_are_queued_like_redis(node):
    replies = session(node.port, enc("MULTI"), enc("PING"), enc("ECHO", "hi"), enc("EXEC"),
                      replies=4)
    assert replies == [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"*2\r\n+PONG\r\n$2\r\nhi\r\n"]
    replies = session(node.port, enc("MULTI"), enc("SET", "m:a", "1"), enc("CLUSTER", "NODES"),
                      enc("EXEC"), replies=4)
    assert replies[2].startswith(b"-ERR CLUSTER inside MULTI")
    assert replies[3].startswith(b"-EXECABORT")
    assert command(node.port, "EXISTS", "m:a") == b":0\r\n"


def test_reset_lets_queued_transaction_commands_finish(node):
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        s.sendall(enc("MULTI"))
        assert read_replies(s, 1) == [b"+OK\r\n"]  # the dedicated connection is open now
        s.sendall(enc("SET", "rs:a", "1") + enc("RESET") + enc("GET", "rs:a"))
        assert read_replies(s, 3) == [b"+QUEUED\r\n", b"+RESET\r\n", b"$-1\r\n"]


def test_subscribe_mode_replies_keep_redis_order(node):
    replies = session(node.port, enc("SUBSCRIBE", "ord"), enc("PING"), enc("PING", "hc"),
                      enc("QUIT"), replies=4)
    assert replies == [b"*3\r\n$9\r\nsubscribe\r\n$3\r\nord\r\n:1\r\n",
                       b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", b"*2\r\n$4\r\npong\r\n$2\r\nhc\r\n",
                       b"+OK\r\n"]


def test_dedicated_connections_close_with_their_clients(node):
    before = backend_clients(node)
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", node.port))
        s.sendall(enc("MULTI"))
        s.close()
        s = socket.create_connection(("127.0.0.1", node.port))
        s.sendall(enc("MULTI") + enc("SET", "leak", "1") + enc("RESET"))
        s.close()
    wait_for(lambda: backend_clients(node) <= before + 1, timeout=10,
             what="the dedicated connections to close")


def test_abandoned_blpop_does_not_eat_a_later_push(node):
    s = socket.create_connection(("127.0.0.1", node.port))
    s.sendall(enc("BLPOP", "jobs", "0"))
    wait_for(lambda: blocked_clients(node.backend.port) == 1, timeout=10, what="BLPOP to block in Redis")
    s.close()
    wait_for(lambda: blocked_clients(node.backend.port) == 0, timeout=10,
             what="the proxy to close the abandoned BLPOP's connection")
    assert command(node.port, "RPUSH", "jobs", "job1") == b":1\r\n"
    assert command(node.port, "LLEN", "jobs") == b":1\r\n"


def test_resp3_subscriber_gets_whole_messages_and_command_replies(node):
    payload = b"x" * 200_000 + b"\r\n+INJECTED\r\n" + b"y" * 200_000
    publisher = redis.Redis(port=node.backend.port)
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(enc("HELLO", "3") + enc("SUBSCRIBE", "big"))
        hello, confirm = read_replies(s, 2)
        assert confirm == b">3\r\n$9\r\nsubscribe\r\n$3\r\nbig\r\n:1\r\n"
        stop = threading.Event()

        def publish():
            while not stop.is_set():
                publisher.publish("big", payload)
                # pacing: a publisher at full speed outruns this reader, and Redis drops a
                # subscriber at its pubsub output limit (32 MB)
                time.sleep(0.002)

        t = threading.Thread(target=publish)
        t.start()
        try:
            gets = pushes = 0
            deadline = time.monotonic() + 5
            while gets < 30 and time.monotonic() < deadline:
                s.sendall(enc("GET", "nosuchkey"))
                gets += 1
                while True:
                    reply = read_replies(s, 1)[0]
                    if reply.startswith(b">3"):
                        assert reply.endswith(b"$%d\r\n%s\r\n" % (len(payload), payload))
                        pushes += 1
                    else:
                        assert reply == b"_\r\n"
                        break
        finally:
            stop.set()
            t.join()
        assert gets == 30 and pushes > 0


def test_unknown_client_subcommands_are_refused(node):
    assert command(node.port, "CLIENT", "SETINFO", "LIB-NAME", "x") == b"+OK\r\n"
    assert command(node.port, "CLIENT", "NO-TOUCH", "ON").startswith(b"-ERR unknown or unsupported")


def test_password_change_requires_authenticating_again(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)

    def setcluster(epoch, *extra):
        return command(proxy.port, "UMCTL", "SETCLUSTER", "v2", str(epoch), "NOFLAGS", "mydb",
                       backend.addr, "1", "0-16383", *extra)

    setcluster(1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(enc("SET", "k", "v"))
        assert read_replies(s, 1) == [b"+OK\r\n"]
        # the cluster gets a password: a client that never authenticated must now
        assert setcluster(2, "CONFIG", "password", "p1") == b"+OK\r\n"
        s.sendall(enc("GET", "k") + enc("UMCTL", "INFO") + enc("INFO") + enc("UMCTL", "READY"))
        assert read_replies(s, 4) == [b"-NOAUTH Authentication required.\r\n"] * 3 + [b":1\r\n"]
        s.sendall(enc("AUTH", "p1") + enc("GET", "k"))
        assert read_replies(s, 2) == [b"+OK\r\n", b"$1\r\nv\r\n"]
