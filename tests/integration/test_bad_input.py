"""Bad input against a live proxy: a Redis-style error or a clean close, and nobody else hurt."""
from __future__ import annotations

import contextlib
import random
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.resp import encode_command, scan_reply
from tests.procs import command, wait_for

pytestmark = pytest.mark.usefixtures("one_node")


@pytest.fixture(scope="module")
def one_node(standalone_node):
    return standalone_node


# how long a connection that should close may stay quiet before the test says it did not
CLOSE_WAIT = 10.0


def exchange(port: int, data: bytes, timeout: float = 3.0,
             quiet: float = 0.5) -> tuple[bytes, bool]:
    """Send raw bytes, read until the proxy closes or stays quiet for `quiet` seconds;
    (replies, closed). Tests that expect a close pass CLOSE_WAIT: they end at the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.settimeout(quiet)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return out, False
            if not chunk:
                return out, True
            out += chunk


def replies(data: bytes) -> list[bytes]:
    out = []
    while data:
        end = scan_reply(data)
        assert end > 0, data
        out.append(data[:end])
        data = data[end:]
    return out


def assert_healthy(port: int) -> None:
    key = f"health:{random.random()}"
    assert command(port, "SET", key, "ok") == b"+OK\r\n"
    assert command(port, "GET", key) == b"$2\r\nok\r\n"


@pytest.mark.parametrize("data", [
    b"*1\r\n$-5\r\n", b"*1\r\n$abc\r\n", b"*x\r\n", b"*-3\r\n", b"*99999999999\r\n",
    b"*1\r\n*1\r\n$1\r\na\r\n", b"*1\r\n:1\r\n", b"*2\r\n$3\r\nGET\r\n$999999999999\r\n",
    # RESP3 and simple-string arguments, sized so that their bytes add up as if they were
    # bulk strings: never forwarded as sent
    b"*3\r\n$3\r\nSET\r\n=5\r\ntxt:k\r\n+0123456789\r\n", b"*2\r\n+GET\r\n$1\r\nk\r\n",
])
def test_malformed_resp_gets_a_protocol_error_and_a_close(one_node, data):
    out, closed = exchange(one_node.port, data, quiet=CLOSE_WAIT)
    assert out.startswith(b"-ERR Protocol error") and closed
    assert_healthy(one_node.port)


def test_replies_before_the_malformed_request_are_still_delivered(one_node):
    out, closed = exchange(one_node.port, encode_command([b"PING"]) + b"*1\r\n$x\r\n",
                           quiet=CLOSE_WAIT)
    assert replies(out) == [b"+PONG\r\n", replies(out)[1]] and closed
    assert replies(out)[1].startswith(b"-ERR Protocol error")


def test_unknown_command_and_wrong_arity_keep_the_connection(one_node):
    out, closed = exchange(one_node.port, encode_command([b"NOSUCH", b"a"])
                           + encode_command([b"GET"]) + encode_command([b"GET", b"a", b"b"])
                           + encode_command([b"PING"]))
    assert not closed
    assert replies(out) == [
        b"-ERR unknown command 'NOSUCH', with args beginning with: 'a'\r\n",
        b"-ERR wrong number of arguments for 'get' command\r\n",
        b"-ERR wrong number of arguments for 'get' command\r\n",
        b"+PONG\r\n",
    ]


def test_inline_commands_work_like_telnet(one_node):
    out, closed = exchange(one_node.port, b"PING\r\nSET inline:k hello\r\nGET inline:k\r\n")
    assert replies(out) == [b"+PONG\r\n", b"+OK\r\n", b"$5\r\nhello\r\n"] and not closed


@pytest.mark.parametrize("argv, prefix", [
    ([b"REPLICAOF", b"127.0.0.1", b"1"], b"-ERR REPLICAOF is not allowed"),
    ([b"SLAVEOF", b"NO", b"ONE"], b"-ERR SLAVEOF is not allowed"),
    ([b"SHUTDOWN"], b"-ERR SHUTDOWN is not allowed"),
    ([b"DEBUG", b"SLEEP", b"0"], b"-ERR DEBUG"),
    ([b"CLUSTER", b"ADDSLOTS", b"1"], b"-ERR CLUSTER ADDSLOTS is not allowed"),
    ([b"MIGRATE", b"h", b"1", b"k", b"0", b"1"], b"-ERR MIGRATE is not allowed"),
    ([b"CONFIG", b"SET", b"port", b"1"], b"-ERR CONFIG SET port is not allowed"),
    ([b"MONITOR"], b"-ERR MONITOR is not allowed"),
    ([b"SELECT", b"1"], b"-ERR SELECT is not allowed in cluster mode"),
])
def test_commands_that_would_break_the_mesh_are_refused(one_node, argv, prefix):
    assert command(one_node.port, *argv).startswith(prefix)
    assert_healthy(one_node.port)


def test_harmless_config_set_passes(one_node):
    assert command(one_node.port, "CONFIG", "SET", "slowlog-max-len", "200") == b"+OK\r\n"


def test_client_that_closes_mid_pipeline_hurts_nobody(one_node):
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", one_node.port))
        s.sendall(b"".join(encode_command([b"SET", b"mid:%d" % i, b"v"]) for i in range(500))
                  + b"*3\r\n$3\r\nSET\r\n$2\r\nab")
        s.close()
    assert_healthy(one_node.port)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def backend_gets(port: int) -> int:
    stats = command(port, "INFO", "commandstats").decode()
    return int(stats.split("cmdstat_get:calls=")[1].split(",")[0]) if "cmdstat_get:" in stats else 0


HOLD_BACK_WAIT = 1.0  # seconds a send may take to reach Redis before the proxy is held back


def test_client_that_reads_slowly_is_held_back_with_bounded_memory(one_node):
    assert command(one_node.port, "SET", "big", b"x" * (1024 * 1024)) == b"+OK\r\n"
    backend = one_node.backend.port
    before = backend_gets(backend)
    alone = connected_clients(one_node.port)
    with socket.create_connection(("127.0.0.1", one_node.port)) as s:
        reading = True  # the proxy still takes each send as it comes
        for sent in range(10, 410, 10):  # 400 requests for 1 MB each, none read back
            s.sendall(encode_command([b"GET", b"big"]) * 10)
            # pacing: each send is a read of its own for the proxy, as from a client that
            # pipelines steadily (one read of all 400 would be run whole: 400 MB queued). A
            # fixed 20 ms gap let sends pile up into one read whenever the proxy was slow to
            # be scheduled; so the next send waits until these reached Redis, until the
            # proxy stops taking them (held back)
            deadline = time.monotonic() + HOLD_BACK_WAIT
            while reading and backend_gets(backend) - before < sent:
                reading = time.monotonic() < deadline
                time.sleep(0.005)
        # the proxy stopped reading: most GETs wait unread in the socket, not as replies in
        # the proxy's memory (all 400 would be 400 MB, past the 256 MB output limit). Time
        # passing is the point: the proxy must still hold back a second later.
        time.sleep(1)
        assert connected_clients(one_node.port) == alone + 1  # held back, not dropped
        assert backend_gets(backend) - before < 200
        assert rss_mb(one_node.pid) < 300
    assert_healthy(one_node.port)


def connected_clients(port: int) -> int:
    info = command(port, "INFO", "proxy").decode()
    return int(info.split("proxy_connected_clients:")[1].split()[0])


def test_client_that_never_reads_is_disconnected_at_the_output_limit(one_node):
    assert command(one_node.port, "SET", "big", b"x" * (1024 * 1024)) == b"+OK\r\n"
    alone = connected_clients(one_node.port)  # counts the connection that asks
    s = socket.create_connection(("127.0.0.1", one_node.port))
    s.sendall(encode_command([b"GET", b"big"]) * 2000)  # one read: 2 GB of replies, never read
    wait_for(lambda: connected_clients(one_node.port) == alone + 1, what="the client to count")
    # the proxy drops it once 256 MB sit unread (MAX_CLIENT_OUTPUT_BYTES)
    wait_for(lambda: connected_clients(one_node.port) == alone, timeout=60,
             what="the proxy to disconnect the client")
    s.settimeout(10)
    received = 0
    with contextlib.suppress(ConnectionResetError):  # a reset ends the stream too
        while chunk := s.recv(1 << 20):  # what the kernel already holds, then the end
            received += len(chunk)
    s.close()
    assert received < 300 * 1024 * 1024  # the output limit plus kernel buffers, not 2 GB
    assert_healthy(one_node.port)


def test_huge_pipeline_is_answered_in_order(one_node):
    n = 20_000
    data = b"".join(encode_command([b"ECHO", b"%d" % i]) if i % 2 else
                    encode_command([b"INCR", b"order:counter"]) for i in range(n))
    with socket.create_connection(("127.0.0.1", one_node.port), timeout=10) as s:
        s.sendall(data)
        buf = b""
        got: list[bytes] = []
        while len(got) < n:
            buf += s.recv(1 << 20)
            while (end := scan_reply(buf)) > 0:
                got.append(buf[:end])
                buf = buf[end:]
    echoes = [r for i, r in enumerate(got) if i % 2]
    assert echoes == [b"$%d\r\n%d\r\n" % (len(str(i)), i) for i in range(1, n, 2)]
    counters = [int(r[1:-2]) for i, r in enumerate(got) if not i % 2]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)


def test_long_pipeline_then_bad_bytes_runs_every_command_before_the_error(one_node):
    # more commands in one read than the proxy runs per event-loop turn (MAX_COMMANDS_PER_TURN)
    n = 1000
    data = b"".join(encode_command([b"INCR", b"long:counter"]) for _ in range(n))
    out, closed = exchange(one_node.port, data + b"*1\r\n$x\r\n", quiet=CLOSE_WAIT)
    got = replies(out)
    assert closed and len(got) == n + 1
    counters = [int(r[1:-2]) for r in got[:n]]
    assert counters == list(range(counters[0], counters[0] + n))
    assert got[-1].startswith(b"-ERR Protocol error")


def test_quit_inside_a_long_pipeline_stops_what_follows(one_node):
    before = int(command(one_node.port, "INCR", "quit:counter")[1:-2])
    data = b"".join(encode_command([b"INCR", b"quit:counter"]) for _ in range(300))
    data += encode_command([b"QUIT"]) + data
    out, closed = exchange(one_node.port, data, quiet=CLOSE_WAIT)
    assert closed and replies(out)[-1] == b"+OK\r\n" and len(replies(out)) == 301
    assert command(one_node.port, "GET", "quit:counter").split(b"\r\n")[1] == b"%d" % (before + 300)


@given(st.binary(min_size=1, max_size=200))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_never_break_the_proxy_for_others(one_node, data):
    with socket.create_connection(("127.0.0.1", one_node.port), timeout=3) as s:
        s.sendall(data)
        s.settimeout(0.05)
        try:
            s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            pass
    assert_healthy(one_node.port)
