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
    "CONFIG|SET",  # only TENANT_SETTABLE parameters, then forwarded
    "CONFIG|GET",  # forwarded; the values of HIDDEN_CONFIG are masked in the reply
    "PUBLISH",  # to every master of the cluster (proxy/broadcast.py)
}

DEDICATED = {
    "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH",
    "EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO",
    "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
    "WAIT", "XREAD", "XREADGROUP",  # only their BLOCK form blocks; a connection is cheap
}

SUBSCRIBE = {"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"}

_MESH = "the mesh manages it"
_SECRETS = "it shows the node's users and their password hashes"
REFUSED = {
    "REPLICAOF": _MESH, "SLAVEOF": _MESH, "SHUTDOWN": _MESH, "FAILOVER": _MESH,
    "DEBUG": "it can crash or stall the node", "MIGRATE": _MESH,
    "SYNC": _MESH, "PSYNC": _MESH, "REPLCONF": _MESH, "MONITOR": "not supported through a proxy",
    "SWAPDB": "cluster mode has one database", "MOVE": "cluster mode has one database",
    "MODULE": _MESH, "ACL|SETUSER": _MESH, "ACL|DELUSER": _MESH, "ACL|LOAD": _MESH,
    "ACL|SAVE": _MESH, "ACL|LIST": _SECRETS, "ACL|GETUSER": _SECRETS, "ACL|USERS": _SECRETS,
    "ACL|LOG": _SECRETS, "ACL|DRYRUN": _SECRETS,
    "CLIENT|LIST": "it would show the proxy's connections to its Redis, not clients",
    "CLIENT|GETREDIR": "not supported through a proxy",
    "CLIENT|TRACKINGINFO": "not supported through a proxy",
    "CONFIG|REWRITE": _MESH, "CONFIG|RESETSTAT": _MESH,
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

# What CONFIG GET shows with an empty value: secrets, and paths and addresses of the host.
HIDDEN_CONFIG = frozenset({
    "requirepass", "masterauth", "masteruser", "tls-key-file-pass", "tls-client-key-file-pass",
    "aclfile", "dir", "dbfilename", "appendfilename", "appenddirname", "logfile", "pidfile",
    "unixsocket", "bind", "replicaof", "slaveof", "tls-cert-file", "tls-key-file",
    "tls-client-cert-file", "tls-client-key-file", "tls-dh-params-file", "tls-ca-cert-file",
    "tls-ca-cert-dir", "bind-source-addr", "replica-announce-ip", "slave-announce-ip",
    "cluster-config-file", "cluster-announce-ip", "cluster-announce-hostname",
})

CLUSTER_LOCAL = {"NODES", "SLOTS", "SHARDS", "INFO", "MYID", "KEYSLOT", "COUNTKEYSINSLOT",
                 "GETKEYSINSLOT", "REPLICAS", "SLAVES", "LINKS", "HELP", "SLOT-STATS"}


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
