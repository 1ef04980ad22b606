#!/bin/sh
# Label every node pod with the cluster it serves (moonmesh.io/cluster=NAME), and unlabel
# free and held nodes, so each cluster's client Service (cluster-orders.yaml) selects exactly
# the nodes of that cluster. Run it after `cluster create`, `scale`, `node drain`, or from a
# timer: the leader also moves nodes by itself (a lost replica refilled from free nodes).
# Needs kubectl and python3.    usage: label-clusters.sh [NAMESPACE]
set -eu
ns=${1:-default}
kubectl -n "$ns" exec moonmesh-0 -c mesh-proxy -- \
    /opt/moonmesh/.venv/bin/umctl-mesh nodes --json |
python3 -c '
import json, sys
for row in json.load(sys.stdin):
    serving = row["alive"] and row["role"] in ("master", "replica")
    print(row["node"], row["cluster"] if serving else "-")
' |
while read -r node cluster; do
    if [ "$cluster" = - ]; then
        kubectl -n "$ns" label pod "$node" moonmesh.io/cluster- >/dev/null 2>&1 || true
    else
        kubectl -n "$ns" label pod "$node" --overwrite "moonmesh.io/cluster=$cluster"
    fi
done
