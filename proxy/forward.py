"""Plain clients: commands for slots another node serves are forwarded, not redirected.

A client connected to the proxy's plain listener (`--plain-listen`) never sees MOVED or ASK.
Where a cluster client would be redirected, its command goes to the owner's proxy over a
pipelined peer connection (proxy/peers.py) and the reply comes back into the client's reply
slot, in request order. The owner decides the command as it decides any cluster client's (the
fence, the migration gate, synchronous mode), so forwarding adds no rule of its own.

A reply that says the command did not run because the view moved on (MOVED, ASK, TRYAGAIN,
CLUSTERDOWN, the peer unreachable) is followed: MOVED/ASK to the address it names (at most
MAX_HOPS times), the others again every RETRY_WAIT to the owner the table names then, for up
to RETRY_FOR seconds (a failover ends within that); then the client gets the last reply.
A node that serves the slot itself by then gets the command through its own cluster port (a
loopback peer connection), so every path a command can take here stays the one
`admission.decide()` governs.

A `Fanout` is one client command answered from several such sub-commands (MGET across slots,
DBSIZE of every shard): its reply is made from theirs once all have arrived.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Protocol

from core import clock
from core.address import Address
from core.slots import SLOT_COUNT

from .admission import TENANT_CHANGED
from .backend import BACKEND_DOWN, BackendConnection, Pending
from .resp import encode_command
from .routing import SLOT_NOT_SERVED

REDIRECTS_REMEMBERED = 2 * SLOT_COUNT  # parsed redirect replies (a table has one per slot)
MAX_HOPS = 5  # redirects followed for one command
RETRY_FOR = 4.0  # seconds a command that did not run is tried again (a failover takes ~2)
RETRY_WAIT = 0.05  # between such tries
_ASKING = encode_command([b"ASKING"])
# replies that mean the command did not run and may be sent again
_NOT_RUN = (b"-TRYAGAIN", b"-CLUSTERDOWN")
PENDING_RETRY = "retry"  # the link of a hop waiting to be sent again
SCRIPTS = frozenset({b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO"})


@functools.lru_cache(maxsize=REDIRECTS_REMEMBERED)
def redirect_target(reply: bytes) -> tuple[int, str, bool] | None:
    """The slot and address of a `-MOVED slot host:port` or `-ASK ...` reply, and whether it
    is an ASK; None for any other reply. IPv6 hosts come without brackets, as Redis prints
    them (the port follows the last colon)."""
    if not (reply.startswith(b"-MOVED ") or reply.startswith(b"-ASK ")):
        return None
    parts = reply.split()
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    host, _, port = parts[2].decode(errors="replace").rpartition(":")
    try:
        address = Address.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except ValueError:
        return None
    return int(parts[1]), str(address), reply[1:4] == b"ASK"


class Client(Protocol):
    """What a hop needs of the plain client's session (proxy/session.py)."""

    @property
    def transport(self) -> object | None: ...  # None once the client has gone

    hops: dict[int, dict[object, int]]  # slot -> {link (or PENDING_RETRY): hops on it}
    hop_seq: dict[int, int]  # slot -> hops sent for it so far (while any is in flight)

    def peer_conn(self, address: str, argv: list[bytes]) -> BackendConnection: ...
    def owner_of(self, slot: int) -> str | None: ...
    def same_tenant(self) -> bool: ...  # the node still serves the client's cluster
    def replies_arrived_soon(self) -> None: ...  # its replies are in: write them this turn


def hop_moved(c: Client, slot: int, old: object, new: object) -> None:
    """Count a forwarded command of `slot` off link `old` and on `new` (None: neither)."""
    hops = c.hops
    if old is not None:
        links = hops[slot]
        links[old] -= 1
        if not links[old]:
            del links[old]
            if not links:
                del hops[slot]
                c.hop_seq.pop(slot, None)
    if new is not None:
        links = hops.setdefault(slot, {})
        links[new] = links.get(new, 0) + 1
        if new is not PENDING_RETRY:
            c.hop_seq[slot] = c.hop_seq.get(slot, 0) + 1


class Hop:
    """One command of a plain client on its way to the node that serves its slot. `done`
    is told when `pending` holds the final reply."""

    __slots__ = ("session", "argv", "slot", "pending", "inner", "address", "link", "hops",
                 "deadline", "done", "seq", "final")

    def __init__(self, session: Client, argv: list[bytes], slot: int, pending: Pending,
                 done: Callable[[Hop], None]) -> None:
        self.session, self.argv, self.slot, self.pending = session, argv, slot, pending
        self.done = done
        self.inner = Pending()
        self.address: str | None = None  # where it was sent last
        self.link: object = None  # the link it is counted on (session.hops)
        self.hops = 0
        self.deadline = clock.now() + RETRY_FOR
        self.seq = 0
        # a script's own error reply may read like a redirect or TRYAGAIN, and it may have
        # written before: its reply is the client's, whatever it says
        self.final = argv[0].upper() in SCRIPTS

    def send(self, address: str, asking: bool = False) -> None:
        session = self.session
        if not session.same_tenant():  # the node left the client's cluster meanwhile
            self._finish(TENANT_CHANGED)
            return
        conn = session.peer_conn(address, self.argv)
        hop_moved(session, self.slot, self.link, conn)
        self.address, self.link = address, conn
        self.seq = session.hop_seq[self.slot]
        self.inner = Pending()
        if asking:
            conn.queue(_ASKING, Pending(), None)
        conn.queue(encode_command(self.argv), self.inner, self)
        if self.inner.data is not None:  # the peer is down: answered at once
            self.replies_arrived()

    def replies_arrived(self) -> None:
        data = self.inner.data
        if data is None or self.pending.data is not None:
            return
        session = self.session
        if data[:1] == b"-" and not self.final and self.hops < MAX_HOPS \
                and session.transport is not None:
            target = redirect_target(data)
            if target is not None:
                self.hops += 1
                self.send(target[1], target[2])
                return
            # not run: again, unless a later command for the slot went meanwhile (it may
            # have run, and this one must not run after it)
            if data.startswith(_NOT_RUN) and clock.now() < self.deadline \
                    and session.hop_seq.get(self.slot) == self.seq:
                hop_moved(session, self.slot, self.link, PENDING_RETRY)
                self.link = PENDING_RETRY
                asyncio.get_running_loop().call_later(RETRY_WAIT, self._again)
                return
        if data == BACKEND_DOWN:  # the peer's link, not this node's Redis
            data = b"-CLUSTERDOWN the node serving slot %d (%s) is unreachable\r\n" % (
                self.slot, (self.address or "?").encode())
        self._finish(data)

    def _again(self) -> None:
        session = self.session
        address = session.owner_of(self.slot) if session.transport is not None else None
        if address is None:  # the client left, or nobody serves the slot now
            self._finish(SLOT_NOT_SERVED)
            return
        self.send(address)

    def _finish(self, data: bytes) -> None:
        hop_moved(self.session, self.slot, self.link, None)
        self.link = None
        self.pending.data = data
        self.done(self)


class Fanout(Pending):
    """The reply slot of a client command answered from several sub-commands: `merge` makes
    the client's reply from their replies (in the order of `parts`) once all have arrived,
    then `done` is called (the session's `replies_arrived_soon`, or an outer fan-out's part)."""

    __slots__ = ("done", "parts", "merge", "left")

    def __init__(self, done: Callable[[], None], merge: Callable[[list[bytes]], bytes]) -> None:
        super().__init__()
        self.done, self.merge = done, merge
        self.parts: list[Pending] = []
        self.left = 0

    def part(self) -> Pending:
        pending = Pending()
        self.parts.append(pending)
        self.left += 1
        return pending

    def part_done(self, hop: Hop | None = None) -> None:
        self.left -= 1
        if self.left == 0:
            self.data = self.merge([p.data or b"" for p in self.parts])
            self.done()
