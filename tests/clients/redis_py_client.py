"""One redis-py RedisCluster session against a cluster, run by tests/integration/test_client_compat.py
with the interpreter of each pinned redis-py (.venv-clients/redis<N>) and of .venv.

    python redis_py_client.py PORT PREFIX N [RESP]

Connects to one startup node (127.0.0.1:PORT) and prints one JSON line per phase:
  1. N keys PREFIX:i set and read one by one, MSET/MGET on hash-tagged keys, a pipeline over
     all shards, and a MULTI/EXEC on one slot (where this redis-py has cluster transactions);
then waits for a line on stdin (the test moves slots meanwhile) and
  2. reads the N keys again (the moved ones answer MOVED), writes N keys PREFIX:new:i and
     reads them back in a pipeline.
Nothing is asserted here: the test compares what is printed with what it expects.
"""
from __future__ import annotations

import json
import sys

import redis
from redis.cluster import RedisCluster


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def main() -> None:
    port, prefix, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    kwargs = {"socket_timeout": 20}
    if len(sys.argv) > 4:
        kwargs["protocol"] = int(sys.argv[4])  # RESP3 needs redis-py 5
    rc = RedisCluster(host="127.0.0.1", port=port, **kwargs)
    out: dict = {"version": redis.__version__,
                 "startup_nodes_known": sorted(n.port for n in rc.get_nodes())}

    out["set"] = [rc.set(f"{prefix}:{i}", i) for i in range(n)]
    out["get"] = [text(rc.get(f"{prefix}:{i}")) for i in range(n)]

    tagged = {f"{{{prefix}:tag}}:{c}": c.upper() for c in "abc"}
    out["mset"] = rc.mset(tagged)
    out["mget"] = [text(v) for v in rc.mget(list(tagged))]
    out["tagged_del"] = rc.delete(*tagged)

    pipe = rc.pipeline()
    for i in range(n):
        pipe.incr(f"{prefix}:ctr:{i}")
        pipe.get(f"{prefix}:{i}")
    out["pipeline"] = [text(v) for v in pipe.execute()]

    try:
        tx = rc.pipeline(transaction=True)
    except Exception as exc:  # redis-py before 6 has no cluster transactions
        out["tx"] = f"unsupported: {type(exc).__name__}: {exc}"
    else:
        try:
            tx.set(f"{{{prefix}:tx}}:a", 1)
            tx.incr(f"{{{prefix}:tx}}:a")
            tx.get(f"{{{prefix}:tx}}:a")
            out["tx"] = [text(v) if not isinstance(v, bool) else v for v in tx.execute()]
        except Exception as exc:
            out["tx"] = f"unsupported: {type(exc).__name__}: {exc}"
    print(json.dumps(out), flush=True)

    sys.stdin.readline()  # the test moves slots and their keys meanwhile
    out = {"get_old": [text(rc.get(f"{prefix}:{i}")) for i in range(n)],
           "set_new": [rc.set(f"{prefix}:new:{i}", i) for i in range(n)]}
    pipe = rc.pipeline()
    for i in range(n):
        pipe.get(f"{prefix}:new:{i}")
    out["get_new"] = [text(v) for v in pipe.execute()]
    out["nodes_known"] = sorted(n.port for n in rc.get_nodes())
    print(json.dumps(out), flush=True)
    rc.close()


if __name__ == "__main__":
    main()
