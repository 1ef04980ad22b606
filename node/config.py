"""Checks of mesh-proxy's addresses before it joins a mesh. Pure.

A node advertises two addresses to its peers: its proxy's (`--announce`, where clients and
peer proxies reach it) and its Redis's (`--backend`): a replica's agent sends `REPLICAOF
<its master's backend address>` to its own Redis. A loopback backend on a node that peers reach
from elsewhere would make every replica replicate from whatever listens on that port on its own
host (in a pod: itself), so such a node refuses to start.
"""
from __future__ import annotations

import ipaddress

from core.address import Address

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (a name: resolved by nobody here, so only that one)."""
    if host.lower() in LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """0.0.0.0 or :: (a place to listen on, not an address anyone can reach)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def mesh_address_problem(announce: Address, backend: Address) -> str | None:
    """Why peers could not use the addresses this node would advertise; None if they can.
    Only the mismatch that breaks replication is refused: a loopback backend behind a proxy
    announced elsewhere (a loopback proxy with a reachable backend is fine: its peers are on
    the same host and reach both)."""
    if is_wildcard(announce.host):
        return (f"the announced address {announce} is a wildcard: peers and clients cannot "
                "reach it; give --announce HOST:PORT")
    if is_wildcard(backend.host):
        return (f"--backend {backend} is a wildcard: peers' replicas replicate from the backend "
                "address this node advertises; give one they can reach")
    if is_loopback(backend.host) and not is_loopback(announce.host):
        return (f"--backend {backend} is a loopback address but the node is announced at "
                f"{announce}: replicas elsewhere would replicate from their own host; give "
                "the Redis's address on the network the peers share (and bind redis-server "
                "to it)")
    return None
