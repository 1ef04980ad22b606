"""MeshRepo over an in-memory store with etcd's revision rules: typed reads, and the one view
transaction (`commit_view`) every writer uses."""
from __future__ import annotations

from dataclasses import replace

import pytest

from core.nodes import Assignment, DataOwner, MigrationProgress, NodeRecord, NodeStatus
from core.view import ViewError, to_json
from mesh.store.etcd import KV, Fence
from mesh.store.keys import Keys
from mesh.store.repo import MeshRepo, ViewCommit
from tests.unit.test_view import make_view

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class MemoryStore:
    """The part of EtcdStore that MeshRepo uses, with etcd's mod/create revisions."""

    def __init__(self) -> None:
        self.keys = Keys("/t")
        self.data: dict[bytes, KV] = {}
        self.revision = 1
        self.transactions = 0

    async def get(self, key: bytes) -> KV | None:
        return self.data.get(key)

    async def get_prefix(self, prefix: bytes) -> tuple[list[KV], int]:
        return [kv for k, kv in sorted(self.data.items()) if k.startswith(prefix)], self.revision

    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        self.revision += 1
        before = self.data.get(key)
        self.data[key] = KV(key, value, self.revision,
                            before.create_revision if before else self.revision, lease or 0)

    async def delete(self, key: bytes) -> None:
        self.revision += 1
        self.data.pop(key, None)

    async def cas(self, key: bytes, value: bytes | None, mod_revision: int, *,
                  lease: int | None = None, fence: Fence | None = None) -> bool:
        if value is None:
            return await self.commit({key: mod_revision}, {}, (key,), fence=fence)
        return await self.commit({key: mod_revision}, {key: value}, fence=fence)

    async def commit(self, checks: dict[bytes, int], puts: dict[bytes, bytes],
                     deletes: tuple[bytes, ...] = (), *, fence: Fence | None = None) -> bool:
        self.transactions += 1
        for key, rev in checks.items():
            kv = self.data.get(key)
            if (kv.mod_revision if kv else 0) != rev:
                return False
        if fence is not None:
            kv = self.data.get(fence.key)
            if kv is None or kv.create_revision != fence.create_revision:
                return False
        self.revision += 1
        for key, value in puts.items():
            before = self.data.get(key)
            self.data[key] = KV(key, value, self.revision,
                                before.create_revision if before else self.revision, 0)
        for key in deletes:
            self.data.pop(key, None)
        return True


@pytest.fixture
def store():
    return MemoryStore()


@pytest.fixture
def repo(store):
    return MeshRepo(store)  # type: ignore[arg-type]  # duck-typed: the part of EtcdStore it uses


async def test_create_claims_every_node_and_a_second_create_loses(repo, store):
    view = make_view(2, 0)
    assert await repo.commit_view("mydb", 0, view, ViewCommit(claim=view.node_ids))
    assert not await repo.commit_view("mydb", 0, view, ViewCommit(claim=view.node_ids))
    assignments = await repo.assignments()
    assert {n: a.assignment for n, a in assignments.items()} == {
        n: Assignment("mydb") for n in view.node_ids}
    stored = await repo.view("mydb")
    assert stored.view == view and stored.cluster == "mydb"


async def test_a_claim_of_an_assigned_node_fails_the_whole_transaction(repo, store):
    await store.put(store.keys.assignment("node-1"), Assignment("other").encode())
    view = make_view(2, 0)
    assert not await repo.commit_view("mydb", 0, view, ViewCommit(claim=view.node_ids))
    assert await repo.view("mydb") is None


async def test_a_stale_revision_loses_the_race(repo):
    view = make_view(2, 0)
    await repo.commit_view("mydb", 0, view)
    read = await repo.view("mydb")
    assert await repo.commit_view("mydb", read.revision, view.next())
    assert not await repo.commit_view("mydb", read.revision, view.next().next())
    assert (await repo.view("mydb")).view.epoch == 2


async def test_a_leader_write_needs_its_election_key(repo, store):
    await repo.commit_view("mydb", 0, make_view(2, 0))
    candidate = store.keys.candidate(0xAB)
    await store.put(candidate, b"", lease=0xAB)
    fence = Fence(candidate, store.data[candidate].create_revision)
    read = await repo.view("mydb")
    await store.delete(candidate)  # the lease expired: deposed
    assert not await repo.commit_view("mydb", read.revision, read.view.next(),
                                      ViewCommit(fence=fence))
    await store.put(candidate, b"", lease=0xAB)  # a new key of the same name is not the fence
    assert not await repo.commit_view("mydb", read.revision, read.view.next(),
                                      ViewCommit(fence=fence))
    fence = Fence(candidate, store.data[candidate].create_revision)
    assert await repo.commit_view("mydb", read.revision, read.view.next(), ViewCommit(fence=fence))


async def test_released_nodes_lose_assignment_and_data_ownership(repo, store):
    view = make_view(2, 0)
    await repo.commit_view("mydb", 0, view, ViewCommit(claim=view.node_ids))
    assigned = await repo.assignment("node-1")
    assert await repo.set_data_owner("node-1", DataOwner("mydb", "u1"), assigned.revision)
    read = await repo.view("mydb")
    assert await repo.commit_view("mydb", read.revision, view.next(),
                                  ViewCommit(unassign=("node-1",)))
    assert await repo.data_owner("node-1") is None
    assert set(await repo.assigned()) == {"node-0"}


async def test_delete_keeping_data_holds_the_nodes(repo, store):
    view = make_view(2, 0)
    await repo.commit_view("mydb", 0, view, ViewCommit(claim=view.node_ids))
    read = await repo.view("mydb")
    assert await repo.commit_view("mydb", read.revision, None, ViewCommit(hold=view.node_ids))
    assert await repo.view("mydb") is None
    assert all(a.assignment == Assignment("mydb", held=True)
               for a in (await repo.assignments()).values())
    held = await repo.assignment("node-0")
    await store.put(store.keys.data_owner("node-0"), DataOwner("mydb", "u1").encode())
    assert await repo.release("node-0", held.revision)
    assert await repo.assignment("node-0") is None
    assert await repo.data_owner("node-0") is None  # emptied if it joins again


async def test_an_invalid_view_is_never_written(repo):
    view = make_view(2, 0)
    broken = replace(view, shards=view.shards[:1])  # half the slots have no owner
    with pytest.raises(ViewError):
        await repo.commit_view("mydb", 0, broken)
    assert await repo.view("mydb") is None


async def test_reads_skip_what_does_not_decode(repo, store):
    await repo.commit_view("good", 0, replace(make_view(2, 0), cluster="good"))
    await store.put(store.keys.view("bad"), b"{not json")
    await store.put(store.keys.node("x"), b"[]")
    await store.put(store.keys.status("x"), b"{}")
    read = await repo.read_views()
    assert list(read.views) == ["good"] and list(read.invalid) == ["bad"]
    assert read.revision == store.revision
    assert await repo.nodes() == {} and await repo.statuses() == {}
    with pytest.raises(ViewError):
        await repo.view("bad")


async def test_records_round_trip_as_frozen_values(repo, store):
    record = NodeRecord("n1", "127.0.0.1:7000", "127.0.0.1:17000", "h", "0.1", 1.0)
    await repo.register(record, lease=7)
    progress = MigrationProgress(total_keys=10, moved_keys=4, left_keys=6, done=False)
    status = NodeStatus("n1", cluster="c", epoch=3, migrations={"s1>s2@3": progress})
    await repo.put_status(status, lease=7)
    nodes = await repo.nodes()
    assert nodes["n1"].record == record and nodes["n1"].lease == 7
    assert await repo.status("n1") == status
    assert (await repo.statuses())["n1"].progress("s1>s2@3") == progress
    await repo.deregister("n1")
    assert await repo.nodes() == {} and await repo.status("n1") is None


async def test_the_leader_is_the_oldest_candidate_with_a_record(repo, store):
    assert await repo.leader() is None
    for node, lease in (("a", 1), ("b", 2)):
        await repo.register(NodeRecord(node, "127.0.0.1:7000", "127.0.0.1:17000"), lease)
    await store.put(store.keys.candidate(2), b"", lease=2)
    await store.put(store.keys.candidate(1), b"", lease=1)
    assert await repo.leader() == "b"


async def test_a_malformed_data_owner_counts_as_unknown(repo, store):
    await store.put(store.keys.data_owner("n"), b"\xff")
    assert await repo.data_owner("n") is None
    await store.put(store.keys.data_owner("n"), DataOwner("c", "u").encode())
    assert await repo.data_owner("n") == DataOwner("c", "u")


async def test_data_ownership_is_recorded_only_under_the_assignment_read_before(repo):
    # the node read its assignment, emptied its Redis, and was unassigned meanwhile: an
    # ownership written now would outlive the unassignment that deleted it
    view = make_view(2, 0)
    await repo.commit_view("mydb", 0, view, ViewCommit(claim=view.node_ids))
    assigned = await repo.assignment("node-1")
    read = await repo.view("mydb")
    assert await repo.commit_view("mydb", read.revision, view.next(),
                                  ViewCommit(unassign=("node-1",)))
    assert not await repo.set_data_owner("node-1", DataOwner("mydb", "u1"), assigned.revision)
    assert await repo.data_owner("node-1") is None


async def test_the_view_is_the_first_put_so_a_retried_commit_checks_it(repo, store):
    seen = {}
    commit = store.commit

    async def spy(checks, puts, deletes=(), *, fence=None):
        seen["first"] = next(iter(puts))
        return await commit(checks, puts, deletes, fence=fence)

    store.commit = spy
    view = make_view(2, 0)
    await repo.commit_view("mydb", 0, view, ViewCommit(claim=view.node_ids))
    assert seen["first"] == store.keys.view("mydb")
    assert store.data[store.keys.view("mydb")].value == to_json(view)
