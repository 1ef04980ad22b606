"""BackendConnection's reply matching, driven by hand (no sockets)."""
from __future__ import annotations

import pytest

from proxy.backend import BACKEND_DOWN, MAYBE_RAN, BackendConnection, Batch, Pending


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.calls = 0

    def replies_arrived(self) -> None:
        self.calls += 1


pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def conn(anyio_backend) -> BackendConnection:
    conn = BackendConnection("127.0.0.1", 1, resp3=False)
    conn.connection_made(Transport())  # type: ignore[arg-type]
    return conn


async def test_batch_hands_over_replies_that_arrived_before_its_last(conn):
    batch, after, sink = Batch(), Pending(), Sink()
    conn.queue(b"<3 requests>", batch, sink, replies=3)
    conn.queue(b"<1 request>", after, sink)
    conn.data_received(b"$1\r\na\r\n$1\r")
    assert batch.parts == [b"$1\r\na\r\n"] and batch.data is None
    conn.data_received(b"\nb\r\n")
    assert batch.parts == [b"$1\r\na\r\n", b"$1\r\nb\r\n"] and batch.data is None
    conn.data_received(b"+OK\r\n:7\r\n")
    assert batch.data == b"+OK\r\n" and after.data == b":7\r\n"
    assert sink.calls == 3


async def test_lost_link_fails_only_the_replies_a_batch_did_not_get(conn):
    batch, after, unsent, sink = Batch(), Pending(), Pending(), Sink()
    conn.queue(b"<4 requests>", batch, sink, replies=4)
    conn.queue(b"<1 request>", after, sink)
    conn.flush()  # the event-loop turn's write
    conn.queue(b"<1 request>", unsent, sink)
    conn.data_received(b"+OK\r\n")
    conn.connection_lost(None)
    assert batch.parts == [b"+OK\r\n"]
    # written before the link went: they may have run, and say so; the unwritten one did not
    assert batch.data == MAYBE_RAN * 3 and after.data == MAYBE_RAN
    assert unsent.data == BACKEND_DOWN
    later = Batch()
    conn.queue(b"<2 requests>", later, sink, replies=2)
    assert later.data == BACKEND_DOWN * 2


async def test_single_requests_get_their_own_reply_bytes(conn):
    first, second, sink = Pending(), Pending(), Sink()
    conn.queue(b"<GET>", first, sink)
    conn.queue(b"<GET>", second, sink)
    conn.data_received(b"$-1\r\n*2\r\n:1\r\n$2\r\nhi\r\n")
    assert first.data == b"$-1\r\n" and second.data == b"*2\r\n:1\r\n$2\r\nhi\r\n"
