"""A command is decided when it is sent to Redis, not when it was read: commands held behind
a blocking command are routed by the view in force when the block ends."""
from __future__ import annotations

import socket

from core.slots import key_slot
from proxy.resp import encode_command
from tests.procs import blocked_clients, command, read_replies, wait_for

PEER = "127.0.0.1:1"  # never dialled: the proxy only names it in redirects


def test_write_held_behind_a_blocking_command_follows_the_view_applied_meanwhile(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    assert key_slot(b"k") <= 8000 < key_slot(b"q")  # k's slot moves away below, q's stays
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(encode_command([b"BLPOP", b"q", b"10"]) + encode_command([b"SET", b"k", b"v"]))
        wait_for(lambda: blocked_clients(backend.port) == 1, what="BLPOP blocked in Redis")
        # slots 0-8000 (k's) now belong to a peer
        assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "2", "NOFLAGS", "mydb",
                       backend.addr, "1", "8001-16383", "PEER", PEER, "1", "0-8000") == b"+OK\r\n"
        assert command(proxy.port, "LPUSH", "q", "x") == b":1\r\n"
        popped, written = read_replies(s, 2)
    assert popped == b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n"
    assert written == b"-MOVED %d %s\r\n" % (key_slot(b"k"), PEER.encode())
    assert command(backend.port, "EXISTS", "k") == b":0\r\n"  # nothing was written here


def test_write_held_behind_a_blocking_command_is_fenced_by_a_later_view(spawn):
    """A client's held command meets the routing table as it is when it is sent: a node that
    no longer serves any slot refuses it, though it was served when it arrived."""
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(encode_command([b"BLPOP", b"q", b"10"])
                  + encode_command([b"INCR", b"counter"]) + encode_command([b"GET", b"q2"]))
        wait_for(lambda: blocked_clients(backend.port) == 1, what="BLPOP blocked in Redis")
        # every slot but q's moves away
        q = key_slot(b"q")
        assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "2", "NOFLAGS", "mydb",
                       backend.addr, "1", f"{q}-{q}", "PEER", PEER, "2", f"0-{q - 1}",
                       f"{q + 1}-16383") == b"+OK\r\n"
        assert command(proxy.port, "LPUSH", "q", "x") == b":1\r\n"
        _, incr, get = read_replies(s, 3)
    assert incr.startswith(b"-MOVED %d " % key_slot(b"counter"))
    assert get.startswith(b"-MOVED %d " % key_slot(b"q2"))
    assert command(backend.port, "EXISTS", "counter") == b":0\r\n"


def setcluster_all(proxy, backend, epoch: int = 1) -> None:
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", str(epoch), "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"


def test_exec_after_the_slot_moved_away_runs_nothing(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    setcluster_all(proxy, backend)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(encode_command([b"MULTI"]) + encode_command([b"SET", b"k", b"v"]))
        assert read_replies(s, 2) == [b"+OK\r\n", b"+QUEUED\r\n"]
        assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "2", "NOFLAGS", "mydb",
                       backend.addr, "1", "8001-16383", "PEER", PEER, "1", "0-8000") == b"+OK\r\n"
        s.sendall(encode_command([b"EXEC"]) + encode_command([b"GET", b"q"]))
        executed, after = read_replies(s, 2)
    assert executed == b"-MOVED %d %s\r\n" % (key_slot(b"k"), PEER.encode())
    assert after == b"$-1\r\n"  # the connection is out of the transaction
    assert command(backend.port, "EXISTS", "k") == b":0\r\n"


def start_handover(proxy) -> socket.socket:
    """UMCTL HANDOVER to a node that is no replica: Redis refuses FAILOVER, and the proxy
    keeps retrying (writes answer TRYAGAIN) for a few seconds before giving up."""
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    s.sendall(encode_command([b"UMCTL", b"HANDOVER", b"127.0.0.1", b"1", b"100"]))
    wait_for(lambda: command(proxy.port, "SET", "probe", "1").startswith(b"-TRYAGAIN"),
             what="writes paused by the handover")
    return s


SCRIPT_WRITE = "return redis.call('SET', KEYS[1], 'x')"


def test_writing_scripts_and_transactions_meet_the_write_pause(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    setcluster_all(proxy, backend)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as tx:
        tx.sendall(encode_command([b"MULTI"]) + encode_command([b"SET", b"t", b"v"]))
        assert read_replies(tx, 2) == [b"+OK\r\n", b"+QUEUED\r\n"]
        handover = start_handover(proxy)
        with handover:
            assert command(proxy.port, "EVAL", SCRIPT_WRITE, "1", "s").startswith(b"-TRYAGAIN")
            assert command(proxy.port, "FCALL", "f", "1", "s").startswith(b"-TRYAGAIN")
            tx.sendall(encode_command([b"EXEC"]))
            assert read_replies(tx, 1)[0].startswith(b"-TRYAGAIN")
            # read-only scripts wait too: reads stop with writes while the masters switch
            assert command(proxy.port, "EVAL_RO", "return 7", "1", "s").startswith(b"-TRYAGAIN")
            assert command(proxy.port, "EVAL", "#!lua flags=no-writes\nreturn 8", "1",
                           "s").startswith(b"-TRYAGAIN")
            assert command(proxy.port, "SET", "probe", "2").startswith(b"-TRYAGAIN")  # still on
        # once the handover gave up (reads wait while it runs): no transaction left open
        wait_for(lambda: command(proxy.port, "SET", "probe", "3") == b"+OK\r\n",
                 what="the handover to give up")
        tx.sendall(encode_command([b"GET", b"t"]))
        assert read_replies(tx, 1) == [b"$-1\r\n"]
    assert command(backend.port, "EXISTS", "s", "t") == b":0\r\n"


def test_a_client_blocked_on_a_slot_that_moves_away_is_redirected(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    setcluster_all(proxy, backend)
    q = key_slot(b"q")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(encode_command([b"BLPOP", b"q", b"0"]) + encode_command([b"GET", b"k"]))
        wait_for(lambda: blocked_clients(backend.port) == 1, what="BLPOP blocked in Redis")
        assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "2", "NOFLAGS", "mydb",
                       backend.addr, "2", f"0-{q - 1}", f"{q + 1}-16383", "PEER", PEER, "1",
                       f"{q}-{q}") == b"+OK\r\n"
        unblocked, after = read_replies(s, 2)
    assert unblocked == b"-MOVED %d %s\r\n" % (q, PEER.encode())
    assert after == b"$-1\r\n"  # the client goes on, on a slot still served here
    assert blocked_clients(backend.port) == 0
