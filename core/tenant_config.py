"""The Redis parameters a cluster's users may change with CONFIG SET: the proxy lets these
through and no others (proxy/policy.py, proxy/local.py), and a node sets them back to what
its Redis had when the node's agent started before it serves another cluster (mesh/views.py),
so one tenant's tuning never reaches the next."""
from __future__ import annotations

# What a tenant may CONFIG SET: tuning of its own data and diagnostics. Everything else
# (memory limits, eviction, persistence, replication, networking, client limits, security)
# is the operator's: it would change how the node behaves in the mesh or for other tenants
# that later get the node, or break replication, migration or the proxy's link.
TENANT_SETTABLE = frozenset({
    "slowlog-log-slower-than", "slowlog-max-len", "latency-monitor-threshold",
    "latency-tracking", "latency-tracking-info-percentiles", "notify-keyspace-events",
    "hash-max-listpack-entries", "hash-max-listpack-value", "hash-max-ziplist-entries",
    "hash-max-ziplist-value", "list-max-listpack-size", "list-max-ziplist-size",
    "list-compress-depth", "set-max-intset-entries", "set-max-listpack-entries",
    "set-max-listpack-value", "zset-max-listpack-entries", "zset-max-listpack-value",
    "zset-max-ziplist-entries", "zset-max-ziplist-value", "stream-node-max-bytes",
    "stream-node-max-entries", "hll-sparse-max-bytes",
})
