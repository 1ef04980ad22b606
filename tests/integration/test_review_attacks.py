"""Attacks an adversarial review of the data path found; each broke a guard before its fix."""
from __future__ import annotations

import socket

import pytest

from core.slots import key_slot
from proxy.resp import encode_command
from tests.procs import command, read_replies, wait_for

PEER = "127.0.0.1:1"  # only named in redirects


def send(s: socket.socket, *commands: list) -> None:
    s.sendall(b"".join(encode_command([a if isinstance(a, bytes) else str(a).encode()
                                       for a in c]) for c in commands))


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


@pytest.fixture
def node(spawn):
    """A proxy serving 8001-16383 (a peer has the rest), and its Redis in `backend`."""
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                   backend.addr, "1", "8001-16383", "PEER", PEER, "1", "0-8000") == b"+OK\r\n"
    proxy.backend = backend
    return proxy


def test_subscribe_inside_multi_does_not_turn_the_connection_into_a_pass_through(node):
    theirs = b"k"  # slot 7629: the peer's
    with connect(node.port) as s:
        send(s, ["MULTI"], ["SUBSCRIBE", "x"], ["SET", theirs, "v"], ["SELECT", "3"],
             ["REPLICAOF", "127.0.0.1", "1"], ["EXEC"])
        multi, subscribe, written, select, replicaof, executed = read_replies(s, 6)
    assert multi == b"+OK\r\n" and subscribe.startswith(b"-ERR SUBSCRIBE inside MULTI")
    assert written.startswith(b"-MOVED") and select.startswith(b"-ERR SELECT")
    assert replicaof.startswith(b"-ERR REPLICAOF is not allowed")
    assert executed.startswith(b"-EXECABORT")
    assert command(node.backend.port, "EXISTS", theirs) == b":0\r\n"
    assert command(node.backend.port, "ROLE").startswith(b"*3\r\n$6\r\nmaster")


def test_a_resp3_subscriber_cannot_switch_to_resp2_and_slip_into_pass_through(node):
    with connect(node.port) as s:
        send(s, ["HELLO", "3"], ["SUBSCRIBE", "x"], ["HELLO", "2"], ["UNSUBSCRIBE", "x"],
             ["SET", "k", "v"])
        hello, subscribed, refused, unsubscribed, written = read_replies(s, 5)
    assert subscribed.startswith(b">3\r\n$9\r\nsubscribe")  # in order, before what followed
    assert refused.startswith(b"-ERR HELLO cannot change the protocol of a subscribed")
    assert unsubscribed.startswith(b">3\r\n$11\r\nunsubscribe")
    assert written.startswith(b"-MOVED %d " % key_slot(b"k"))


def test_resp3_subscribe_confirmations_keep_their_place_among_replies(node):
    assert command(node.port, "SET", "{a}k", "v") == b"+OK\r\n"
    with connect(node.port) as s:
        send(s, ["HELLO", "3"], ["SUBSCRIBE", "x"], ["GET", "{a}k"], ["SSUBSCRIBE", "{a}k"],
             ["GET", "{a}k"])
        _, sub, first, ssub, second = read_replies(s, 5)
    assert sub.startswith(b">3\r\n$9\r\nsubscribe") and ssub.startswith(b">3\r\n$10\r\nssubscribe")
    assert first == second == b"$1\r\nv\r\n"


def test_a_resp3_subscriber_waiting_in_blpop_still_gets_its_messages(node):
    with connect(node.port) as s:
        send(s, ["HELLO", "3"], ["SUBSCRIBE", "x"], ["BLPOP", "{a}q", "0"])
        read_replies(s, 2)
        wait_for(lambda: b"blocked_clients:1" in command(node.backend.port, "INFO", "clients"),
                 what="BLPOP blocked")
        assert command(node.backend.port, "PUBLISH", "x", "hi") == b":1\r\n"
        assert read_replies(s, 1) == [b">3\r\n$7\r\nmessage\r\n$1\r\nx\r\n$2\r\nhi\r\n"]


def test_a_script_queued_in_multi_is_checked_again_at_exec(node):
    with connect(node.port) as s:
        send(s, ["MULTI"], ["EVAL", "return redis.call('set', KEYS[1], 'x')", "1", "{a}k"])
        assert read_replies(s, 2) == [b"+OK\r\n", b"+QUEUED\r\n"]
        a = key_slot(b"a")
        assert command(node.port, "UMCTL", "SETCLUSTER", "v2", "2", "NOFLAGS", "mydb",
                       node.backend.addr, "2", f"8001-{a - 1}", f"{a + 1}-16383", "PEER", PEER,
                       "2", "0-8000", f"{a}-{a}") == b"+OK\r\n"
        send(s, ["EXEC"])
        assert read_replies(s, 1)[0].startswith(b"-MOVED %d " % a)
    assert command(node.backend.port, "EXISTS", "{a}k") == b":0\r\n"


def test_a_script_that_may_write_declares_its_keys(node):
    reply = command(node.port, "EVAL", "return redis.call('set', 'k', 'v')", "0")
    assert reply.startswith(b"-ERR a script that may write must declare its keys")
    assert command(node.backend.port, "EXISTS", "k") == b":0\r\n"
    assert command(node.port, "EVAL_RO", "return 1", "0") == b":1\r\n"


def test_nothing_shows_the_backends_users_paths_or_connections(node):
    assert command(node.port, "ACL", "LIST").startswith(b"-ERR ACL LIST is not allowed")
    assert command(node.port, "ACL", "GETUSER", "default").startswith(b"-ERR ACL GETUSER")
    assert command(node.port, "CLIENT", "LIST").startswith(b"-ERR CLIENT LIST is not allowed")
    server = command(node.port, "INFO", "server")
    assert b"\r\nexecutable:\r\n" in server and b"redis_mode:cluster" in server
    assert b"tcp_port:%d\r\n" % node.port in server


def test_commands_held_behind_a_blocked_command_are_bounded_in_bytes(node):
    from proxy.session import MAX_HELD_BYTES

    value = b"x" * (1024 * 1024)
    with connect(node.port) as s:
        send(s, ["BLPOP", "{a}q", "0"])
        wait_for(lambda: b"blocked_clients:1" in command(node.backend.port, "INFO", "clients"),
                 what="BLPOP blocked")
        s.settimeout(5)
        sent = 0
        with pytest.raises(TimeoutError):  # the proxy stops reading: the client cannot send
            while sent < 4 * MAX_HELD_BYTES:
                s.sendall(encode_command([b"SET", b"{a}big", value]))
                sent += len(value)
        assert sent < 2 * MAX_HELD_BYTES + 16 * 2**20  # the held bytes, plus socket buffers
        assert command(node.port, "PING") == b"+PONG\r\n"


def test_a_request_hiredis_cannot_build_gets_a_protocol_error_after_the_replies_before_it(node):
    with connect(node.port) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n*1\r\n%1\r\n*0\r\n$1\r\nx\r\n")
        pong, refused = read_replies(s, 2)
        assert pong == b"+PONG\r\n" and refused.startswith(b"-ERR Protocol error")
    assert command(node.port, "PING") == b"+PONG\r\n"


def test_subscribe_waits_for_a_batch_still_owed_on_the_clients_own_connection(node):
    assert command(node.backend.port, "SET", "{a}big", b"x" * 200_000) == b"+OK\r\n"
    with connect(node.port) as s:
        send(s, ["MULTI"], ["EXEC"])  # the client now has a connection of its own
        read_replies(s, 2)
        send(s, *[["GET", "{a}big"]] * 100)
        send(s, ["SUBSCRIBE", "x"])
        replies = read_replies(s, 101, timeout=10)
    assert all(len(r) > 200_000 for r in replies[:100])
    assert replies[100].startswith(b"*3\r\n$9\r\nsubscribe")


@pytest.mark.parametrize("script", [
    "return redis.call('select', 7)",
    "return redis.call('migrate', '127.0.0.1', ARGV[1], KEYS[1], 0, 1000, 'COPY')",
    "return redis.call('move', KEYS[1], 3)",
    "return redis.call('swapdb', 0, 1)",
])
def test_a_script_cannot_reach_another_database_or_another_redis(node, spawn, script):
    other = spawn.redis()
    assert command(node.port, "SET", "{a}k", "v") == b"+OK\r\n"
    reply = command(node.port, "EVAL", script, "1", "{a}k", str(other.port))
    assert b"can't run this command" in reply, reply  # Redis's ACL refusal
    assert command(other.port, "DBSIZE") == b":0\r\n"
    assert command(node.port, "GET", "{a}k") == b"$1\r\nv\r\n"
