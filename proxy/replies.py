"""Reply ordering: the slots a client's replies wait in, and taking the ready ones in order.

Every command a session runs appends one slot (a `Pending`, or a `Batch` for the fast path's
forwarded batch) to the client's queue; a backend or the proxy fills it later or at once.
Only the filled head of the queue is written, so replies leave in request order whichever
path made them.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .backend import BackendConnection, Batch, Pending, ReplySink
from .resp import encode_command

# Bytes a client has not read yet before it is disconnected (Redis: client-output-buffer-limit)
MAX_CLIENT_OUTPUT_BYTES = 256 * 1024 * 1024
# ... for a subscriber, whose messages nobody paces (Redis's own pubsub hard limit)
MAX_SUBSCRIBER_OUTPUT_BYTES = 32 * 1024 * 1024


class Rewrite(Pending):
    """A reply slot whose bytes are transformed before they are written."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[bytes], bytes]) -> None:
        super().__init__()
        self.fn = fn


class SyncedWrite(Pending):
    """Synchronous mode: the reply slot of a write sent with a WAIT behind it. It gets the
    write's reply once WAIT says enough replicas have it, else -UNCERTAIN: the write ran
    here, but a failover could lose it (-NOREPLICAS would tell clients it did not run)."""

    __slots__ = ("sink", "command", "write", "ack", "replicas", "wait")

    def __init__(self, sink: ReplySink, command: bytes, replicas: int, timeout_ms: int) -> None:
        super().__init__()
        self.sink, self.command, self.replicas = sink, command, replicas
        self.write, self.ack = Pending(), Pending()
        self.wait = encode_command([b"WAIT", b"%d" % replicas, b"%d" % timeout_ms])

    def queue_on(self, conn: BackendConnection) -> None:
        conn.queue(self.command, self.write, None)  # WAIT's reply tells
        conn.queue(self.wait, self.ack, self)
        if self.ack.data is not None:  # the connection is down
            self.replies_arrived()

    def replies_arrived(self) -> None:
        written, ack = self.write.data or b"", self.ack.data or b""
        if written[:1] == b"-" or ack[:1] != b":":
            self.data = written if written[:1] == b"-" else ack
        else:
            confirmed = int(ack[1:-2])
            self.data = written if confirmed >= self.replicas else (
                b"-UNCERTAIN the write ran here but %d of %d replicas confirmed it in time; a "
                b"failover could lose it\r\n" % (confirmed, self.replicas))
        self.sink.replies_arrived()


def take_ready(replies: deque[Pending]) -> list[bytes]:
    """Remove the filled slots at the head of `replies` and return their bytes in order,
    with the replies a deep `Batch` at the head has handed over so far."""
    out: list[bytes] = []
    while replies:
        p = replies[0]
        data = p.data
        if data is None:
            break
        replies.popleft()
        # exact class checks: cheaper than isinstance on the per-reply path
        if p.__class__ is Rewrite:
            out.append(p.fn(data))
        else:
            if p.__class__ is Batch and p.parts:
                out += p.parts
            out.append(data)
    if replies:
        head = replies[0]
        if head.__class__ is Batch and head.parts:
            out += head.parts
            head.parts = []
    return out


def newest_unanswered(replies: deque[Pending]) -> Pending | None:
    """The newest slot still waiting for its reply: once it is filled, every reply the
    client is owed so far has arrived."""
    for p in reversed(replies):
        if p.data is None:
            return p
    return None
