"""A client cannot step around the proxy's guards through pub/sub, nor outlive its tenant."""
from __future__ import annotations

import socket

from core.slots import key_slot
from proxy.resp import encode_command
from tests.procs import command, read_replies

PEER = "127.0.0.1:1"  # only named in redirects


def send(s: socket.socket, *commands: list[bytes | str]) -> None:
    s.sendall(b"".join(encode_command([a if isinstance(a, bytes) else a.encode() for a in c])
                       for c in commands))


def two_shards(proxy, backend, cluster: str = "mydb", epoch: int = 1) -> None:
    """This node serves 8001-16383; a peer serves 0-8000."""
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", str(epoch), "NOFLAGS", cluster,
                   backend.addr, "1", "8001-16383", "PEER", PEER, "1", "0-8000") == b"+OK\r\n"


def test_a_client_that_unsubscribed_from_everything_is_an_ordinary_client_again(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    two_shards(proxy, backend)
    theirs = b"k"  # slot 7629: the peer's
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        send(s, ["SUBSCRIBE", "x"], ["UNSUBSCRIBE", "x"], [b"SET", theirs, b"v"],
             ["SELECT", "1"], ["REPLICAOF", "NO", "ONE"], ["CONFIG", "SET", "dir", "/tmp"])
        subscribed, unsubscribed, written, select, replicaof, config = read_replies(s, 6)
    assert subscribed == b"*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n"
    assert unsubscribed == b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n:0\r\n"
    assert written == b"-MOVED %d %s\r\n" % (key_slot(theirs), PEER.encode())
    assert select == b"-ERR SELECT is not allowed in cluster mode\r\n"
    assert replicaof.startswith(b"-ERR REPLICAOF is not allowed through moonmesh")
    assert config.startswith(b"-ERR CONFIG SET dir is not allowed through moonmesh")
    assert command(backend.port, "EXISTS", theirs) == b":0\r\n"
    assert command(backend.port, "ROLE").startswith(b"*3\r\n$6\r\nmaster")


def test_a_client_still_subscribed_after_an_unsubscribe_stays_a_subscriber(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    two_shards(proxy, backend)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        send(s, ["SUBSCRIBE", "x", "y"], ["UNSUBSCRIBE", "x"], ["GET", "k"])
        *confirmations, refused = read_replies(s, 4)
        assert confirmations[-1] == b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n:1\r\n"
        assert refused.startswith(b"-ERR Can't execute 'get'")  # Redis's own answer
        assert command(proxy.port, "PUBLISH", "y", "hello") == b":1\r\n"
        assert read_replies(s, 1) == [b"*3\r\n$7\r\nmessage\r\n$1\r\ny\r\n$5\r\nhello\r\n"]


def test_a_client_is_not_served_once_its_node_belongs_to_another_cluster(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    two_shards(proxy, backend, cluster="one")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as plain, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as subscriber:
        send(plain, ["SET", "q", "1"])
        send(subscriber, ["SUBSCRIBE", "x"])
        assert read_replies(plain, 1) == [b"+OK\r\n"]
        read_replies(subscriber, 1)
        two_shards(proxy, backend, cluster="two", epoch=2)
        # the subscriptions end with their tenant, and the subscriber is disconnected
        assert subscriber.recv(1) == b""
        send(plain, ["GET", "q"])
        assert read_replies(plain, 1)[0].startswith(b"-CLUSTERDOWN this node was given to "
                                                    b"another cluster")
        assert plain.recv(1) == b""  # and closed
    assert command(proxy.port, "GET", "q") == b"$1\r\n1\r\n"  # a new client of "two" is served


def test_config_shows_no_secret_and_sets_only_what_a_tenant_may(spawn):
    backend = spawn.redis("--requirepass", "backend-secret")
    proxy = spawn.proxy(backend, "--backend-password", "backend-secret")
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"
    assert command(proxy.port, "CONFIG", "GET", "requirepass") == \
        b"*2\r\n$11\r\nrequirepass\r\n$0\r\n\r\n"
    everything = command(proxy.port, "CONFIG", "GET", "*")
    assert b"maxmemory-policy" in everything and b"backend-secret" not in everything
    assert str(backend.workdir).encode() not in everything  # `dir` is the host's
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        send(s, ["HELLO", "3"], ["CONFIG", "GET", "*pass*"])
        _, resp3 = read_replies(s, 2)
    assert resp3.startswith(b"%") and b"backend-secret" not in resp3
    for param, value in [("appendonly", "yes"), ("maxmemory-policy", "allkeys-lru"),
                         ("client-output-buffer-limit", "pubsub 0 0 0"), ("save", "1 1")]:
        reply = command(proxy.port, "CONFIG", "SET", param, value)
        assert reply.startswith(b"-ERR CONFIG SET %s is not allowed" % param.encode()), reply
    assert command(proxy.port, "CONFIG", "SET", "slowlog-max-len", "64") == b"+OK\r\n"
    assert command(proxy.port, "CONFIG", "SET", "notify-keyspace-events", "KEA") == b"+OK\r\n"


def prove(s: socket.socket, secret: bytes) -> bytes:
    from core.secret import proof

    send(s, ["UMCTL", "CHALLENGE"])
    nonce = read_replies(s, 1)[0].split(b"\r\n")[1]
    send(s, [b"UMCTL", b"PROVE", proof(secret, nonce)])
    return read_replies(s, 1)[0]


def test_admin_commands_need_the_admin_secret_proven(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend, "--admin-password", "s3cret-admin")
    setcluster = ["UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb", backend.addr, "1",
                  "0-16383"]
    assert command(proxy.port, *setcluster).startswith(b"-NOPERM")
    assert command(proxy.port, "UMCTL", "HANDOVER", "127.0.0.1", "1", "100").startswith(b"-NOPERM")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        assert prove(s, b"wrong") == b"-WRONGPASS the answer does not prove the admin secret\r\n"
        send(s, [b"UMCTL", b"PROVE", b"00"])  # a challenge is good for one answer only
        assert read_replies(s, 1)[0].startswith(b"-ERR usage")
        send(s, setcluster)
        assert read_replies(s, 1)[0].startswith(b"-NOPERM")
        assert prove(s, b"s3cret-admin") == b"+OK\r\n"
        send(s, setcluster)
        assert read_replies(s, 1) == [b"+OK\r\n"]
    assert command(proxy.port, "SET", "k", "v") == b"+OK\r\n"  # the probes and clients: open
    assert command(proxy.port, "UMCTL", "GETEPOCH") == b":1\r\n"
