"""How the proxy treats each Redis command: one table, looked up once per command. Pure.

Whatever Redis's command table (proxy/commands.py) knows and this table does not name is routed
by its keys (or sent to this node's backend when it has none).
"""
from __future__ import annotations

from enum import Enum


class Kind(Enum):
    KEYED = "keyed"  # route by key slot (keyless ones answer for this node)
    LOCAL = "local"  # answered by the proxy itself
    DEDICATED = "dedicated"  # needs a backend connection of the client's own
    SUBSCRIBE = "subscribe"  # a dedicated connection whose bytes all go to the client
    REFUSED = "refused"


LOCAL = {
    "PING", "ECHO", "SELECT", "QUIT", "RESET", "AUTH", "HELLO", "INFO", "CLUSTER", "UMCTL",
    "ASKING", "READONLY", "READWRITE",
    "CLIENT|SETNAME", "CLIENT|GETNAME", "CLIENT|ID", "CLIENT|SETINFO", "CLIENT|INFO",
    "CONFIG|SET",  # checked against DANGEROUS_CONFIG, then forwarded
}

DEDICATED = {
    "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH",
    "EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO",
    "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
    "WAIT", "XREAD", "XREADGROUP",  # only their BLOCK form blocks; a connection is cheap
}

SUBSCRIBE = {"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"}

_MESH = "the mesh manages it"
REFUSED = {
    "REPLICAOF": _MESH, "SLAVEOF": _MESH, "SHUTDOWN": _MESH, "FAILOVER": _MESH,
    "DEBUG": "it can crash or stall the node", "MIGRATE": _MESH,
    "SYNC": _MESH, "PSYNC": _MESH, "REPLCONF": _MESH, "MONITOR": "not supported through a proxy",
    "SWAPDB": "cluster mode has one database", "MOVE": "cluster mode has one database",
    "MODULE": _MESH, "ACL|SETUSER": _MESH, "ACL|DELUSER": _MESH, "ACL|LOAD": _MESH,
    "ACL|SAVE": _MESH, "CONFIG|REWRITE": _MESH, "CONFIG|RESETSTAT": _MESH,
    "CLIENT|KILL": "it would hit the proxy's shared connections",
    "CLIENT|PAUSE": "it would hit the proxy's shared connections",
    "CLIENT|UNPAUSE": "it would hit the proxy's shared connections",
    "CLIENT|REPLY": "not supported through a proxy",
    "CLIENT|TRACKING": "not supported through a proxy",
    "CLIENT|CACHING": "not supported through a proxy",
    "CLIENT|NO-EVICT": "it would hit the proxy's shared connections",
    "CLIENT|UNBLOCK": "it would hit the proxy's shared connections",
    "BGREWRITEAOF": _MESH, "BGSAVE": _MESH, "SAVE": _MESH,
}

# CONFIG SET of these would break replication, persistence layout or the proxy's link.
DANGEROUS_CONFIG = {
    "bind", "port", "requirepass", "masterauth", "masteruser", "replicaof", "slaveof", "dir",
    "dbfilename", "appendfilename", "unixsocket", "cluster-enabled", "protected-mode",
    "rename-command", "enable-debug-command", "enable-module-command", "tls-port",
    "replica-read-only", "slave-read-only", "databases", "daemonize", "logfile", "pidfile",
    "maxclients", "timeout",
}

CLUSTER_LOCAL = {"NODES", "SLOTS", "SHARDS", "INFO", "MYID", "KEYSLOT", "COUNTKEYSINSLOT",
                 "GETKEYSINSLOT", "REPLICAS", "SLAVES", "LINKS", "HELP"}


def kind_of(name: str) -> Kind:
    """`name` is upper-case, a subcommand as 'CONTAINER|SUB'."""
    if name in LOCAL:
        return Kind.LOCAL
    if name in REFUSED or name.partition("|")[0] in REFUSED:
        return Kind.REFUSED
    if name in DEDICATED:
        return Kind.DEDICATED
    if name in SUBSCRIBE:
        return Kind.SUBSCRIBE
    return Kind.KEYED


def refusal(name: str) -> str:
    reason = REFUSED.get(name) or REFUSED.get(name.partition("|")[0], "")
    return f"ERR {name.replace('|', ' ')} is not allowed through moonmesh: {reason}"
