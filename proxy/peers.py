"""Connections to the other proxies of this cluster, for commands this node sends on a
client's behalf (plain clients' forwards, cluster-wide fan-outs, PUBLISH to every shard).

One pipelined connection per peer address and RESP version, made on first use, authenticated
as a peer by the mesh secret (challenge-response: the secret never crosses the wire), kept
connected by a task in the server's task group, and closed when the address leaves the view.
A peer proxy treats such a connection as a cluster client of the cluster: it answers for its
own slots and redirects the rest.
"""
from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from core import secret
from core.address import Address

from .backend import BackendConnection, keep_connected


def peer_connection(address: str, resp3: bool, admin_secret: bytes | None) -> BackendConnection:
    """A connection to the proxy at `address` that proves `admin_secret` before anything else
    (none: a standalone proxy with no admin password, nothing to prove)."""
    peer = Address.parse(address)
    prove = None if admin_secret is None else (
        lambda nonce: [b"UMCTL", b"PROVE", secret.proof(admin_secret, nonce)])
    return BackendConnection(peer.host, peer.port, resp3, prove=prove)


class PeerPool:
    """The connections to peers this proxy uses, by (address, resp3)."""

    def __init__(self, admin_secret: bytes | None,
                 spawn: Callable[[Callable[..., Coroutine[Any, Any, None]], BackendConnection],
                                 None]) -> None:
        self.admin_secret = admin_secret
        self._spawn = spawn  # runs keep_connected(conn) in the server's task group
        self._conns: dict[tuple[str, bool], BackendConnection] = {}

    def get(self, address: str, resp3: bool) -> BackendConnection:
        conn = self._conns.get((address, resp3))
        if conn is None or conn.closed:
            conn = self._conns[(address, resp3)] = peer_connection(address, resp3,
                                                                   self.admin_secret)
            self._spawn(keep_connected, conn)
        return conn

    def retain(self, addresses: set[str]) -> None:
        """Close the connections to addresses that are no longer in the view."""
        for key in [k for k in self._conns if k[0] not in addresses]:
            self._conns.pop(key).close()

    def close(self) -> None:
        self.retain(set())
