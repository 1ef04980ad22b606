"""A command that may have run never gets an error that tells clients to retry it."""
from __future__ import annotations

import socket

from proxy.resp import encode_command, scan_reply
from tests.procs import blocked_clients, command, wait_for


def test_a_command_in_flight_when_the_backend_dies_may_have_run_and_says_so(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                   backend.addr, "1", "0-16383") == b"+OK\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(encode_command([b"BLMOVE", b"{q}from", b"{q}to", b"LEFT", b"LEFT", b"0"]))
        wait_for(lambda: blocked_clients(backend.port) == 1, what="BLMOVE blocked in Redis")
        backend.kill()
        buf = b""
        while scan_reply(buf, 0) <= 0:
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
    assert buf.startswith(b"-UNCERTAIN ")  # not -CLUSTERDOWN, which clients retry
    # and one that was never sent did not run: that one may be retried
    assert command(proxy.port, "SET", "k", "v").startswith(b"-CLUSTERDOWN")
