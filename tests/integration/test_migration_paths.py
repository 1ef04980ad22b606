"""How keys travel during a migration, chosen by a probe: straight from the source Redis to the
target Redis (MIGRATE) where it reaches it, through the proxies (DUMP/RESTORE) where it does
not. Nodes are hosts in network namespaces (chaos/hosts.py), so "cannot reach" is a real
dropped connection."""
from __future__ import annotations

import pytest
from redis.cluster import RedisCluster

from chaos import netns
from chaos.hosts import PROXY_PORT, REDIS_PORT, Deployment
from tests.integration.test_fence_rule import deployment

pytestmark = pytest.mark.integration
KEYS = 5000


def calls(dep: Deployment, command: str) -> int:
    """How often every node's Redis has run `command` (INFO commandstats)."""
    total = 0
    for name in dep.nodes:
        stat = dep.redis_info(name, "commandstats").get(f"cmdstat_{command}", "calls=0,")
        total += int(stat.split(",")[0].removeprefix("calls="))
    return total


def scale(dep: Deployment, cluster: str, shards: int) -> tuple[int, int]:
    """Scale `cluster` to `shards` and wait: the MIGRATE and DUMP calls it cost the Redises."""
    before = calls(dep, "migrate"), calls(dep, "dump")
    dep.umctl("cluster", "scale", cluster, "--shards", str(shards))
    dep.wait("the scale to finish", lambda: dep.umctl("--json", "migrations", cluster) == [],
             timeout=120)
    return calls(dep, "migrate") - before[0], calls(dep, "dump") - before[1]


def test_keys_go_redis_to_redis_and_through_the_proxies_where_the_redis_port_is_cut(request):
    dep = deployment(4)
    request.addfinalizer(dep.close)
    dep.umctl("cluster", "create", "paths", "--shards", "2")
    entry = f"{dep.nodes['n1'].host.ip}:{PROXY_PORT}"
    with netns.inside(dep.client.ns):
        rc = RedisCluster.from_url(f"redis://{entry}")
        pipe = rc.pipeline()
        for i in range(KEYS):
            pipe.set(f"p:{i}", i)
        pipe.execute()
    # 2 -> 3 with every Redis reachable: MIGRATE (a probe and a batch or more per source)
    migrates, dumps = scale(dep, "paths", 3)
    assert migrates >= 2 * 2 and dumps == 0
    # every node's Redis port closed to the other nodes (proxies still reach each other and
    # their own Redis): the probe finds MIGRATE cannot reach and the proxies carry the keys
    names = list(dep.nodes)
    for name in names:
        dep.net.block_port(name, [n for n in names if n != name], REDIS_PORT)
    migrates, dumps = scale(dep, "paths", 4)
    assert migrates == 0 and dumps > 0
    with netns.inside(dep.client.ns):
        pipe = rc.pipeline()
        for i in range(KEYS):
            pipe.get(f"p:{i}")
        values = pipe.execute()
        rc.close()
    assert [i for i, v in enumerate(values) if v != str(i).encode()] == []
    shown = dep.show("paths")
    assert sorted(len(s["nodes"]) for s in shown["shards"]) == [1, 1, 1, 1]
