"""Big keys move in chunks (proxy/chunked.py) during a real migration, under a client load,
and arrive equal: every type, a stream with a consumer group (moved whole, by MIGRATE), TTLs."""
from __future__ import annotations

import redis

from core.slots import key_slot
from tests.integration.test_migration import run_with_load
from tests.procs import wait_for

ELEMENTS = 30_000  # well over the mover's BIG_KEY_BYTES for each collection
STRING_BYTES = 3 * 1024 * 1024
MOVING = "0-8191"


def tagged(name: str) -> str:
    """A key named after `name` whose slot moves (a hash tag chosen for it)."""
    for i in range(10_000):
        key = f"{{{name}{i}}}"
        if key_slot(key.encode()) <= 8191:
            return key
    raise AssertionError("no tag found")


def fill(r: redis.Redis) -> dict[str, str]:
    keys = {kind: tagged(kind) for kind in ("hash", "set", "zset", "list", "string", "stream",
                                             "grouped", "expiring")}
    pipe = r.pipeline(transaction=False)
    for start in range(0, ELEMENTS, 1000):
        rng = range(start, start + 1000)
        pipe.hset(keys["hash"], mapping={f"f{i}": f"value-{i}" * 3 for i in rng})
        pipe.sadd(keys["set"], *[f"member-{i}" * 3 for i in rng])
        pipe.zadd(keys["zset"], {f"member-{i}" * 3: i / 7 for i in rng})
        pipe.rpush(keys["list"], *[f"item-{i}" * 6 for i in rng])
        pipe.hset(keys["expiring"], mapping={f"f{i}": "x" * 40 for i in rng})
        for i in rng:
            pipe.xadd(keys["stream"], {"n": str(i), "pad": "p" * 30})
        pipe.execute()
    pipe.set(keys["string"], bytes(range(256)) * (STRING_BYTES // 256))
    pipe.xadd(keys["grouped"], {"a": "1"})
    pipe.xgroup_create(keys["grouped"], "g", id="0")
    pipe.expire(keys["expiring"], 3600)
    pipe.execute()
    return keys


def contents(r: redis.Redis, keys: dict[str, str]) -> dict[str, object]:
    return {"hash": r.hgetall(keys["hash"]), "set": r.smembers(keys["set"]),
            "zset": r.zrange(keys["zset"], 0, -1, withscores=True),
            "list": r.lrange(keys["list"], 0, -1), "string": r.get(keys["string"]),
            "stream": r.xrange(keys["stream"]), "expiring": r.hgetall(keys["expiring"]),
            "grouped": [g["name"] for g in r.xinfo_groups(keys["grouped"])]}


def test_big_keys_move_in_chunks_under_load_and_arrive_equal(mesh_factory):
    mesh = mesh_factory(2)
    mesh.wait_pool(2)
    created = mesh.umctl("--json", "cluster", "create", "big", "--shards", "2")
    source, target = (s["nodes"][0]["node"] for s in created["shards"])
    direct = redis.Redis(port=mesh.redis[source].port)
    keys = fill(direct)
    before = contents(direct, keys)
    stream_info = direct.xinfo_stream(keys["stream"])
    entry = mesh.proxies[target].port

    def migrate() -> None:
        mesh.umctl("migrate", "big", "--slots", MOVING, "--to", "s2")
        wait_for(lambda: mesh.umctl("--json", "migrations", "big") == [], timeout=120,
                 what="the migration to finish")

    checker = run_with_load(entry, migrate, workers=2)
    checker.verify()
    moved = redis.Redis(port=mesh.redis[target].port)
    assert direct.exists(*keys.values()) == 0
    assert contents(moved, keys) == before
    after = moved.xinfo_stream(keys["stream"])
    assert (after["last-generated-id"], after["entries-added"], after["length"]) == (
        stream_info["last-generated-id"], stream_info["entries-added"], stream_info["length"])
    assert 3000 < moved.ttl(keys["expiring"]) <= 3600
    # copied in pieces: many HSET/SADD/ZADD/RPUSH/XADD at the target, not one RESTORE each
    stats = moved.info("commandstats")
    for command in ("hset", "sadd", "zadd", "rpush", "xadd"):
        assert stats[f"cmdstat_{command}"]["calls"] > 10, command
    direct.close()
    moved.close()
