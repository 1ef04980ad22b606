#!/bin/bash
# Instructions per request of a standalone mesh-proxy, counted by valgrind's callgrind: the
# same for the same code and inputs whatever else the machine does, so a change to the
# per-command path can be compared with its parent on a shared machine (make bench's ops/s
# move 5-10% between runs of the same code there). Run it twice with two request counts and
# take the difference, which cancels the interpreter's start:
#   tools/callgrind_proxy.sh REPO OUT PIPELINE REQUESTS
#   e.g. for n in 5000 25000; do tools/callgrind_proxy.sh . /tmp/cg-$n.out 1 $n; done
# -> (total(25000) - total(5000)) / (2 * 20000) instructions per request (SET and GET).
# Uses ports 41000 (redis-server) and 41001 (the proxy) on 127.0.0.1.
set -uo pipefail
REPO=$(cd "$1" && pwd); OUT=$2; P=$3; N=${4:-20000}
PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
RPORT=41000; PPORT=41001
redis-server --port $RPORT --save "" --appendonly no --daemonize yes --logfile /tmp/cg-redis.log >/dev/null
for _ in $(seq 1 100); do redis-cli -p $RPORT PING 2>/dev/null | grep -q PONG && break; sleep 0.1; done
cd "$REPO"
PYTHONPATH=$REPO valgrind --tool=callgrind --callgrind-out-file="$OUT" "$PY" -m node.main \
  --listen 127.0.0.1:$PPORT --backend 127.0.0.1:$RPORT --log-level warning 2>/tmp/cg-proxy.err &
VPID=$!
for _ in $(seq 1 300); do redis-cli -p $PPORT PING 2>/dev/null | grep -q PONG && break; sleep 0.2; done
redis-cli -p $PPORT UMCTL SETCLUSTER v2 1 NOFLAGS mydb 127.0.0.1:$RPORT 1 0-16383 >/dev/null
redis-benchmark -p $PPORT -t set,get -n "$N" -c 4 -P "$P" -r 1000 -q >/dev/null
kill -TERM $VPID
wait $VPID
redis-cli -p $RPORT shutdown nosave >/dev/null 2>&1
grep -E "^(summary|totals):" "$OUT" | head -1
