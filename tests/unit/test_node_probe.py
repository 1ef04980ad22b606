"""mesh-probe's answers against canned servers: what counts as alive, as ready, as down."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from node import probe


class Canned:
    """A listener that answers every connection's first read with `reply`."""

    def __init__(self, reply: bytes) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.reply = reply
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(64)
                if self.reply:
                    conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve() -> Iterator:
    servers: list[Canned] = []

    def start(reply: bytes) -> str:
        servers.append(Canned(reply))
        return servers[-1].addr

    yield start
    for s in servers:
        s.close()


def closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


@pytest.mark.parametrize(("reply", "live", "ready"), [
    (b"+PONG\r\n", 0, 0),
    (b"-NOAUTH Authentication required.\r\n", 0, 0),  # a proxy of a cluster with a password
    (b"-LOADING Redis is loading the dataset in memory\r\n", 0, 1),  # alive, not ready
    (b"-ERR something else\r\n", 0, 1),  # any RESP reply: its event loop turns
    (b"HTTP/1.1 400 Bad Request\r\n", 1, 1),  # not a RESP server
    (b"", 1, 1),  # accepts, then closes without a word
])
def test_live_and_ready_by_reply(serve, reply: bytes, live: int, ready: int):
    addr = serve(reply)
    assert probe.main(["live", "--addr", addr, "--timeout", "2"]) == live
    assert probe.main(["ready", "--addr", addr, "--timeout", "2", "--etcd", ""]) == ready


def test_nothing_listening_is_neither_live_nor_ready():
    addr = closed_port()
    assert probe.main(["live", "--addr", addr, "--timeout", "1"]) == 1
    assert probe.main(["ready", "--addr", addr, "--timeout", "1", "--etcd", ""]) == 1


def test_wait_down(serve):
    assert probe.main(["wait-down", "--addr", closed_port(), "--timeout", "1"]) == 0
    up = serve(b"+PONG\r\n")
    assert probe.main(["wait-down", "--addr", up, "--timeout", "0.3", "--interval", "0.1"]) == 1


def test_ready_reads_etcd_and_node_id_from_the_environment(monkeypatch):
    monkeypatch.setenv(probe.ETCD_ENV, "etcd-client:2379")
    monkeypatch.setenv(probe.NODE_ID_ENV, "moonmesh-3")
    args = probe.build_parser().parse_args(["ready"])
    assert (args.etcd, args.node_id, args.addr) == ("etcd-client:2379", "moonmesh-3",
                                                    ("127.0.0.1", 7000))


def test_ready_with_etcd_needs_a_node_id(monkeypatch):
    monkeypatch.delenv(probe.NODE_ID_ENV, raising=False)
    with pytest.raises(SystemExit) as exc:
        probe.main(["ready", "--etcd", "127.0.0.1:2379"])
    assert exc.value.code == probe.EXIT_USAGE


@pytest.mark.parametrize("addr", ["7000", "host:", ":7000", "host:99999", "host:x"])
def test_bad_addresses_are_usage_errors(addr: str):
    with pytest.raises(SystemExit) as exc:
        probe.main(["live", "--addr", addr])
    assert exc.value.code == probe.EXIT_USAGE


def test_ipv6_address():
    assert probe.split_addr("[::1]:7000") == ("::1", 7000)
