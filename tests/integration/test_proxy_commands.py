"""Commands the proxy answers itself, the backend's health, and per-connection protocol state."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import redis
from redis.cluster import RedisCluster

from core.slots import key_slot
from proxy.resp import encode_command, scan_reply
from tests.procs import command, read_replies, wait_for
from tools.launch import free_port


def setcluster(proxy, backend, *extra: str, epoch: int = 1) -> bytes:
    return command(proxy.port, "UMCTL", "SETCLUSTER", "v2", str(epoch), "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383", *extra)


@pytest.fixture
def node(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    assert setcluster(proxy, backend) == b"+OK\r\n"
    return proxy


def talk(port: int, *commands: list[bytes | str]) -> list[bytes]:
    """Send commands on one connection, return each raw reply."""
    data = b"".join(encode_command([a if isinstance(a, bytes) else a.encode() for a in c])
                    for c in commands)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        buf, out = b"", []
        while len(out) < len(commands):
            chunk = s.recv(65536)
            assert chunk, f"closed after {out}"
            buf += chunk
            while (end := scan_reply(buf)) > 0:
                out.append(buf[:end])
                buf = buf[end:]
        return out


def test_ping_echo_select_quit(node):
    assert talk(node.port, ["PING"], ["PING", "hi"], ["ECHO", "x y"], ["SELECT", "0"],
                ["QUIT"]) == [b"+PONG\r\n", b"$2\r\nhi\r\n", b"$3\r\nx y\r\n", b"+OK\r\n", b"+OK\r\n"]


def test_hello_3_switches_the_connection_to_resp3(node):
    hello, hget, missing = talk(node.port, ["HELLO", "3"], ["HSET", "h", "f", "v"],
                                ["GET", "nokey"])
    assert hello.startswith(b"%7\r\n") and b"proto\r\n:3" in hello and b"cluster" in hello
    assert missing == b"_\r\n"  # RESP3 null, straight from a RESP3 backend connection
    back = talk(node.port, ["HELLO", "3"], ["HGETALL", "h"], ["HELLO", "2"], ["HGETALL", "h"])
    assert back[1] == b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
    assert back[3] == b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n"


def test_hello_with_unsupported_version(node):
    assert talk(node.port, ["HELLO", "4"]) == [b"-NOPROTO unsupported protocol version\r\n"]


def test_password_from_setcluster_is_required(node):
    backend = node.backend
    assert setcluster(node, backend, "CONFIG", "password", "s3cret", epoch=2) == b"+OK\r\n"
    assert command(node.port, "GET", "k") == b"-NOAUTH Authentication required.\r\n"
    assert command(node.port, "CLUSTER", "SLOTS") == b"-NOAUTH Authentication required.\r\n"
    assert command(node.port, "CONFIG", "SET", "maxmemory", "1").startswith(b"-NOAUTH")
    assert talk(node.port, ["AUTH", "wrong"])[0].startswith(b"-WRONGPASS")
    assert talk(node.port, ["AUTH", "s3cret"], ["SET", "k", "v"]) == [b"+OK\r\n", b"+OK\r\n"]
    assert talk(node.port, ["AUTH", "default", "s3cret"], ["GET", "k"]) == [b"+OK\r\n",
                                                                           b"$1\r\nv\r\n"]
    hello, get = talk(node.port, ["HELLO", "3", "AUTH", "default", "s3cret"], ["GET", "k"])
    assert hello.startswith(b"%7") and get == b"$1\r\nv\r\n"
    r = RedisCluster(host="127.0.0.1", port=node.port, password="s3cret", protocol=3)
    assert r.get("k") == b"v"
    r.close()
    with pytest.raises(redis.exceptions.RedisClusterException, match="invalid username-password"):
        RedisCluster(host="127.0.0.1", port=node.port, password="nope").get("k")


def test_auth_without_a_password_configured(node):
    assert command(node.port, "AUTH", "x").startswith(b"-ERR AUTH <password> called without")


def test_info_has_backend_sections_and_a_proxy_section(node):
    r = redis.Redis(port=node.port)
    info = r.info()
    assert info["redis_version"].startswith("7.") and info["proxy_cluster"] == "mydb"
    assert r.info("proxy")["proxy_epoch"] == 1
    assert "redis_version" in r.info("server") and "proxy_epoch" not in r.info("server")
    r3 = redis.Redis(port=node.port, protocol=3)
    assert r3.info()["proxy_backend_up"] == 1


def test_command_is_passed_through(node):
    r = redis.Redis(port=node.port)
    assert r.command_count() > 200
    assert r.command_getkeys("SET", "a", "b") == ["a"]


def test_cluster_commands(node):
    r = redis.Redis(port=node.port)
    myid = r.execute_command("CLUSTER MYID")
    assert len(myid) == 40 and myid in command(node.port, "CLUSTER", "NODES")
    assert r.execute_command("CLUSTER KEYSLOT", "a") == 15495
    info = command(node.port, "CLUSTER", "INFO").decode()
    assert "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info
    for key in ("{tag}1", "{tag}2", "{tag}3", "other"):
        r.set(key, 1)
    slot = key_slot(b"{tag}")
    assert r.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 3
    keys = r.execute_command("CLUSTER GETKEYSINSLOT", slot, 2)  # redis-py decodes these
    assert len(keys) == 2 and set(keys) <= {"{tag}1", "{tag}2", "{tag}3"}
    assert command(node.port, "CLUSTER", "COUNTKEYSINSLOT", "99999").startswith(b"-ERR Invalid")
    assert command(node.port, "CLUSTER", "RESET").startswith(b"-ERR CLUSTER RESET is not allowed")


def test_keyless_commands_answer_for_this_node(node):
    r = redis.Redis(port=node.port)
    r.flushall()
    r.set("a", 1)
    r.set("b", 2)
    assert r.dbsize() == 2
    assert sorted(r.keys()) == [b"a", b"b"]
    assert sorted(r.scan_iter()) == [b"a", b"b"]
    assert r.randomkey() in (b"a", b"b")
    assert r.flushall() and r.dbsize() == 0


def test_client_name_is_per_client(node):
    a, b = redis.Redis(port=node.port), redis.Redis(port=node.port)
    a.client_setname("alpha")
    assert a.client_getname() == "alpha" and b.client_getname() is None


# how long the Redis stays down in the outage-logging test: every pooled connection logged
# each reconnect attempt before (backoff 50 ms doubling to 2 s: ~100 lines in 3 s)
BACKEND_OUTAGE = 3.0


def test_a_backend_outage_is_logged_once_going_and_once_back(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    setcluster(proxy, backend)
    assert command(proxy.port, "SET", "k", "v") == b"+OK\r\n"
    before = len(proxy.log().splitlines())
    backend.kill()
    time.sleep(BACKEND_OUTAGE)  # the outage's length is the point
    backend.restart()
    wait_for(lambda: command(proxy.port, "SET", "k", "v") == b"+OK\r\n", 10,
             "the proxy to reconnect")
    lines = proxy.log().splitlines()[before:]
    assert sum("backend_connection_lost" in x for x in lines) == 1, lines
    assert sum("backend_reachable_again" in x for x in lines) == 1, lines
    assert len(lines) <= 3, lines  # and at most one backend_still_unreachable


def test_dead_backend_gives_clusterdown_quickly_then_recovers(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    setcluster(proxy, backend)
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.sendall(encode_command([b"SET", b"k", b"v"]))
    assert s.recv(100) == b"+OK\r\n"
    backend.kill()
    started = time.monotonic()
    s.sendall(encode_command([b"GET", b"k"]))
    reply = s.recv(200)
    assert reply.startswith(b"-CLUSTERDOWN") and time.monotonic() - started < 3
    assert command(proxy.port, "PING") == b"+PONG\r\n"
    backend.restart()  # a new redis on the same port: the pool reconnects with backoff

    def set_again() -> bool:
        s.sendall(encode_command([b"SET", b"k", b"again"]))
        return s.recv(200) == b"+OK\r\n"

    wait_for(set_again, timeout=10, what="the proxy to reconnect to the restarted backend")
    s.close()


def test_transaction_state_is_per_client(node):
    a = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    a.sendall(encode_command([b"MULTI"]) + encode_command([b"SET", b"tx", b"1"]))
    assert read_replies(a, 2) == [b"+OK\r\n", b"+QUEUED\r\n"]
    # another client is not inside a's transaction
    assert command(node.port, "SET", "tx", "other") == b"+OK\r\n"
    a.sendall(encode_command([b"EXEC"]))
    assert read_replies(a, 1) == [b"*1\r\n+OK\r\n"]
    assert command(node.port, "GET", "tx") == b"$1\r\n1\r\n"
    a.close()


def test_watch_sees_a_write_from_another_client(node):
    r = redis.Redis(port=node.port)
    r.set("w", 1)
    with r.pipeline() as p:
        p.watch("w")
        redis.Redis(port=node.port).set("w", 2)
        p.multi()
        p.set("w", 3)
        with pytest.raises(redis.exceptions.WatchError):
            p.execute()
    assert r.get("w") == b"2"


def test_pipelined_commands_before_a_transaction_run_first(node):
    """The switch to a dedicated connection waits for what the shared one still runs."""
    replies = talk(node.port, *[["INCR", "seq"] for _ in range(200)], ["MULTI"],
                   ["GET", "seq"], ["EXEC"])
    assert replies[-1] == b"*1\r\n$3\r\n200\r\n"


def test_pattern_and_sharded_subscriptions(node):
    r = redis.Redis(port=node.port)
    ps = r.pubsub()
    ps.psubscribe("news.*")
    assert ps.get_message(timeout=2)["type"] == "psubscribe"
    assert r.publish("news.sport", "goal") == 1
    msg = ps.get_message(timeout=2)
    assert (msg["type"], msg["channel"], msg["data"]) == ("pmessage", b"news.sport", b"goal")
    ps.close()
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        s.sendall(encode_command([b"SSUBSCRIBE", b"orders"]))
        assert s.recv(1000) == b"*3\r\n$10\r\nssubscribe\r\n$6\r\norders\r\n:1\r\n"
        assert command(node.port, "SPUBLISH", "orders", "o1") == b":1\r\n"
        assert s.recv(1000) == b"*3\r\n$8\r\nsmessage\r\n$6\r\norders\r\n$2\r\no1\r\n"


def test_json_logs(spawn):
    import json

    backend = spawn.redis()
    proxy = spawn.proxy(backend, "--log-json", "--log-level", "info")
    setcluster(proxy, backend)
    wait_for(lambda: "view_applied" in proxy.log(), timeout=10, what="the view_applied event")
    events = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "proxy_listening" in names and "view_applied" in names
    applied = next(e for e in events if e["event"] == "view_applied")
    assert applied["cluster"] == "mydb" and applied["epoch"] == 1 and applied["level"] == "info"


@pytest.mark.parametrize("taken", ["proxy", "metrics"])
def test_a_proxy_whose_port_is_taken_exits_1_saying_so_in_one_line(taken):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        listen = port if taken == "proxy" else free_port()
        argv = [sys.executable, "-m", "node.main", "--listen", f"127.0.0.1:{listen}",
                "--backend", "127.0.0.1:1"]
        if taken == "metrics":
            argv += ["--metrics", f"127.0.0.1:{port}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    failed = [line for line in done.stderr.splitlines() if "proxy_failed" in line]
    assert len(failed) == 1 and f"127.0.0.1', {port}" in failed[0], done.stderr
    assert "Traceback" not in done.stderr
