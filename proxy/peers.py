"""Connections to the other proxies of this cluster, for commands this node sends on a
client's behalf (plain clients' forwards, cluster-wide fan-outs, PUBLISH to every shard).

One pipelined connection per peer address and RESP version, made on first use, authenticated
as a peer by the mesh secret (challenge-response: the secret never crosses the wire), kept
connected by a task in the server's task group, and closed when the address leaves the view.
A peer proxy treats such a connection as a cluster client of the cluster: it answers for its
own slots and redirects the rest.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from core import secret
from core.address import Address

from .backend import BackendConnection, keep_connected

# a busy link is looked at this often; when its oldest command in flight is the same as at
# the last look (no reply for 2.5-5 s), it is cut (its commands answer -UNCERTAIN, or are
# retried when never sent) and made again: a peer that accepts and never answers must not
# hang the clients forwarding through it
STALL_CHECK_EVERY = 2.5


def peer_connection(address: str, resp3: bool, admin_secret: bytes | None,
                    tenant: str = "") -> BackendConnection:
    """A connection to the proxy at `address` that proves `admin_secret` before anything else
    (none: a standalone proxy with no admin password, nothing to prove). With `tenant`, the
    peer ends the connection at once unless it serves that tenant (`UMCTL TENANT`)."""
    peer = Address.parse(address)
    prove = None if admin_secret is None else (
        lambda nonce: [b"UMCTL", b"PROVE", secret.proof(admin_secret, nonce)])
    handshake = ([b"UMCTL", b"TENANT", tenant.encode()],) if tenant else ()
    return BackendConnection(peer.host, peer.port, resp3, handshake=handshake, prove=prove)


class PeerPool:
    """The connections to peers this proxy uses, by (address, resp3, tenant): each is for
    the tenant this node served when it was made (a peer of another tenant refuses it)."""

    def __init__(self, admin_secret: bytes | None,
                 spawn: Callable[[Callable[..., Coroutine[Any, Any, None]], BackendConnection],
                                 None],
                 tenant: Callable[[], str]) -> None:
        self.admin_secret = admin_secret
        self._spawn = spawn  # runs keep_connected(conn) in the server's task group
        self._tenant = tenant  # the tenant this node serves now
        self._conns: dict[tuple[str, bool, str], BackendConnection] = {}
        self._watched: set[BackendConnection] = set()

    def get(self, address: str, resp3: bool) -> BackendConnection:
        """The link, watched for a stall while it has commands in flight."""
        key = (address, resp3, self._tenant())
        conn = self._conns.get(key)
        if conn is None or conn.closed:
            conn = self._conns[key] = peer_connection(address, resp3, self.admin_secret, key[2])
            self._spawn(keep_connected, conn)
        if conn not in self._watched:
            self._watched.add(conn)
            asyncio.get_running_loop().call_later(STALL_CHECK_EVERY, self._check, conn, None)
        return conn

    def _check(self, conn: BackendConnection, head: object) -> None:
        """One timer per busy link, not per command: the same oldest command still waiting
        a whole interval later means the peer stopped answering."""
        now = conn.oldest()
        if now is None or conn.closed:
            self._watched.discard(conn)
        elif now is head:
            self._watched.discard(conn)
            conn.abort()
        else:
            asyncio.get_running_loop().call_later(STALL_CHECK_EVERY, self._check, conn, now)

    def retain(self, addresses: set[str], tenant: str) -> None:
        """Close the connections to addresses that are no longer in the view, or made for
        another tenant."""
        for key in [k for k in self._conns if k[0] not in addresses or k[2] != tenant]:
            self._conns.pop(key).close()

    def close(self) -> None:
        self.retain(set(), "")
