#!/bin/sh
# The image's entrypoint: one node, redis-server and mesh-proxy, in one container.
#
#   MOONMESH_ETCD              etcd endpoints; unset: a standalone proxy (UMCTL SETCLUSTER)
#   MOONMESH_ANNOUNCE          HOST:PORT clients and peers reach the proxy at
#   MOONMESH_BACKEND           HOST:PORT peers' Redis servers replicate this Redis from
#                              (default 127.0.0.1:$MOONMESH_REDIS_PORT: standalone only)
#   MOONMESH_NODE_ID, MOONMESH_HOST_TAG    the node's id and host tag in the pool
#   MOONMESH_SECRET            the mesh secret (read by mesh-proxy itself)
#   MOONMESH_BACKEND_PASSWORD  Redis's password (given to Redis on stdin, not on its command
#                              line); when set, Redis also listens on every address
#   MOONMESH_PORT (7000), MOONMESH_REDIS_PORT (6379), MOONMESH_DATA (/data),
#   MOONMESH_MAXMEMORY (700mb: keep it below the container's memory limit)
#   MOONMESH_BIN               where mesh-proxy is (/opt/moonmesh/.venv/bin)
# Arguments are passed on to mesh-proxy.
#
# SIGTERM (docker stop) goes to mesh-proxy first: a master hands its shard over, which needs
# its Redis; once the proxy has exited, Redis gets SIGTERM. Give the stop time for the
# handover (docker run --stop-timeout 45). If either process ends by itself, the other is
# stopped the same way and the container exits 1.
set -eu

bin=${MOONMESH_BIN:-/opt/moonmesh/.venv/bin}
port=${MOONMESH_PORT:-7000}
redis_port=${MOONMESH_REDIS_PORT:-6379}
data=${MOONMESH_DATA:-/data}
backend=${MOONMESH_BACKEND:-127.0.0.1:$redis_port}
bind=127.0.0.1
auth=
if [ -n "${MOONMESH_BACKEND_PASSWORD:-}" ]; then
    bind=0.0.0.0
    auth="requirepass $MOONMESH_BACKEND_PASSWORD
masterauth $MOONMESH_BACKEND_PASSWORD"
fi

log() { echo "entrypoint: $*" >&2; }

printf '%s\n' "$auth" | redis-server - --port "$redis_port" --bind "$bind" --dir "$data" \
    --save "" --appendonly yes --maxmemory "${MOONMESH_MAXMEMORY:-700mb}" \
    --maxmemory-policy noeviction &
redis=$!

set -- --listen "0.0.0.0:$port" --backend "$backend" "$@"
if [ -n "${MOONMESH_ANNOUNCE:-}" ]; then set -- --announce "$MOONMESH_ANNOUNCE" "$@"; fi
if [ -n "${MOONMESH_ETCD:-}" ]; then set -- --etcd "$MOONMESH_ETCD" "$@"; fi
if [ -n "${MOONMESH_NODE_ID:-}" ]; then set -- --node-id "$MOONMESH_NODE_ID" "$@"; fi
if [ -n "${MOONMESH_HOST_TAG:-}" ]; then set -- --host-tag "$MOONMESH_HOST_TAG" "$@"; fi
"$bin/mesh-proxy" "$@" &
proxy=$!

# stop the proxy, wait for it (the handover), then stop Redis and wait for it
stop() {
    trap '' TERM INT
    log "stopping mesh-proxy (pid $proxy)"
    kill -TERM "$proxy" 2>/dev/null || true
    status=0
    wait "$proxy" || status=$?
    log "mesh-proxy exited ($status); stopping redis-server (pid $redis)"
    kill -TERM "$redis" 2>/dev/null || true
    wait "$redis" || true
    log "redis-server exited"
    exit "$1"
}
trap 'stop 0' TERM INT

while kill -0 "$proxy" 2>/dev/null && kill -0 "$redis" 2>/dev/null; do
    sleep 1 &
    wait $! || true  # a trapped signal interrupts this wait at once
done
log "a process ended by itself"
stop 1
