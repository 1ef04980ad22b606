from __future__ import annotations

import pytest

from core.nodes import Assignment, NodeRecord, NodeStatus, RecordError
from mesh.model.placement import PlacementError, host_of, place


def nodes(*hosts: str) -> list[NodeRecord]:
    return [NodeRecord(f"n{i}", f"127.0.0.1:{7000 + i}", f"127.0.0.1:{17000 + i}", host=h)
            for i, h in enumerate(hosts)]


def hosts_of(layout, pool):
    by_id = {n.node_id: host_of(n) for n in pool}
    return [(by_id[m], [by_id[r] for r in rs]) for m, rs in layout]


@pytest.mark.parametrize("hosts, shards, replicas, master_hosts, spread", [
    # three hosts, two nodes each: masters on three hosts, each replica elsewhere
    (["a", "a", "b", "b", "c", "c"], 3, 1, 3, True),
    # two hosts for 2 shards x 2 nodes: master and replica never share a host
    (["a", "a", "b", "b"], 2, 1, 2, True),
    (["a", "a", "a", "b", "b", "b", "c", "c", "c"], 3, 2, 3, True),
    # masters spread over hosts before any host gets a second master
    (["a", "a", "a", "b", "c"], 3, 0, 3, True),
    # one host only: placement still works, it just cannot spread
    (["a", "a", "a"], 1, 2, 1, False),
])
def test_placement_spreads_masters_and_replicas_over_hosts(hosts, shards, replicas,
                                                            master_hosts, spread):
    pool = nodes(*hosts)
    layout = hosts_of(place(pool, shards, replicas), pool)
    assert len({m for m, _ in layout}) == master_hosts
    assert all(len({m, *rs}) == 1 + replicas for m, rs in layout) == spread
    ids = [m for m, _ in place(pool, shards, replicas)]
    assert len(ids) == shards


def test_not_enough_free_nodes_says_how_many():
    with pytest.raises(PlacementError, match="need 6, the pool has 4 free"):
        place(nodes("a", "b", "c", "d"), 3, 1)


def test_placement_is_deterministic():
    pool = nodes("x", "y", "x", "z", "y", "z")
    assert place(pool, 3, 1) == place(list(reversed(pool)), 3, 1)


def test_records_round_trip_and_reject_garbage():
    rec = NodeRecord("n1", "127.0.0.1:7000", "127.0.0.1:17000", host="h1", started_at=1.5)
    assert NodeRecord.decode(rec.encode()) == rec
    st = NodeStatus("n1", cluster="c", epoch=3, role="replica", repl_offset=42)
    assert NodeStatus.decode(st.encode()) == st
    assert Assignment.decode(Assignment("c", held=True).encode()) == Assignment("c", True)
    with pytest.raises(RecordError):
        NodeRecord.decode(b"not json")
