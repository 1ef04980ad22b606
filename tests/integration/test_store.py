"""The etcd store against a real etcd."""
from __future__ import annotations

import anyio
import pytest

from core import clock
from mesh.store.etcd import EtcdStore, Event, LeaseKeeper, campaign
from tests import procs

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_event_loop")]


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def one_event_loop():
    """Holds anyio's runner for the whole module, so every test runs on one event loop:
    grpc's asyncio poller stays bound to the loop it first saw, and a loop closed between
    tests gets its late callbacks ('Event loop is closed' from a test's teardown)."""
    yield


@pytest.fixture
def etcd():
    p = procs.start_etcd()
    yield p
    procs.cleanup([p])


async def test_compare_and_swap_lets_one_writer_win(etcd):
    async with EtcdStore(etcd.addr, root="/t") as store:
        key = store.keys.view("c")
        assert await store.cas(key, b"v1", 0)
        assert not await store.cas(key, b"v1-again", 0)  # it exists now
        kv = await store.get(key)
        assert await store.cas(key, b"v2", kv.mod_revision)
        assert not await store.cas(key, b"v3", kv.mod_revision)  # stale revision
        assert (await store.get(key)).value == b"v2"


async def test_watch_resumes_after_an_etcd_restart(etcd):
    seen: list[Event] = []
    async with EtcdStore(etcd.addr, root="/t") as store:
        _, rev = await store.get_prefix(b"/t/")

        async def on_event(e: Event) -> None:
            seen.append(e)

        async def on_resync() -> int:
            raise AssertionError("no compaction here")

        async with anyio.create_task_group() as tg:
            tg.start_soon(store.watch, b"/t/w/", rev + 1, on_event, on_resync)
            await store.put(b"/t/w/a", b"1")
            with anyio.fail_after(5):
                while len(seen) < 1:
                    await anyio.sleep(0.05)
            etcd.kill()
            restarted = procs.start_etcd(etcd.port, etcd.workdir)
            etcd.popen = restarted.popen
            await store.put(b"/t/w/b", b"2")
            await store.delete(b"/t/w/a")
            with anyio.fail_after(15):
                while len(seen) < 3:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert [(e.key, e.value) for e in seen] == [(b"/t/w/a", b"1"), (b"/t/w/b", b"2"),
                                                 (b"/t/w/a", None)]


async def test_lease_keeper_keeps_a_key_alive_confirms_it_and_reports_loss(etcd):
    async with EtcdStore(etcd.addr, root="/t") as store:
        async with anyio.create_task_group() as tg:
            keeper = LeaseKeeper(store, ttl=2, interval=0.2, keepalive_every=3,
                                 witness=b"/t/alive")
            await tg.start(keeper.run)
            await store.put(b"/t/alive", b"x", lease=keeper.lease_id)
            await anyio.sleep(3)  # past the TTL: only keepalives keep it
            assert await store.get(b"/t/alive") is not None and not keeper.lost.is_set()
            # reads that find the key on the lease move the fence's clock
            assert clock.now() - keeper.renewed_at < 1.0
            await store.revoke(keeper.lease_id)
            revoked_at = clock.now()
            with anyio.fail_after(3):
                await keeper.lost.wait()
            assert await store.get(b"/t/alive") is None and keeper.expired
            # no read sent after the revocation confirmed the lease
            assert keeper.renewed_at < revoked_at


async def test_election_passes_to_the_next_candidate(etcd):
    async with EtcdStore(etcd.addr, root="/t") as store:
        first, second = await store.grant(5), await store.grant(5)
        fence = await campaign(store, first)
        order: list[str] = []

        async def second_campaign():
            await campaign(store, second)
            order.append("second leads")

        async with anyio.create_task_group() as tg:
            tg.start_soon(second_campaign)
            await anyio.sleep(0.5)
            assert order == []
            # a leader write is fenced on its candidate key
            assert await store.cas(b"/t/x", b"1", 0, fence=fence)
            await store.revoke(first)
            with anyio.fail_after(5):
                while not order:
                    await anyio.sleep(0.05)
        assert not await store.cas(b"/t/y", b"1", 0, fence=fence)  # the old fence is void


async def test_losing_one_of_three_etcd_members_is_invisible():
    members = procs.start_etcd_cluster(3)
    try:
        endpoints = ",".join(m.addr for m in members)
        async with EtcdStore(endpoints, root="/t") as store:
            with anyio.fail_after(20):
                while True:  # the members elect a raft leader first
                    try:
                        await store.put(b"/t/k", b"0")
                        break
                    except Exception:  # noqa: BLE001
                        await anyio.sleep(0.2)
            members[0].kill()  # the member the client talks to first
            with anyio.fail_after(15):
                for i in range(20):
                    await store.put(b"/t/k", b"%d" % i)
                assert (await store.get(b"/t/k")).value == b"19"
    finally:
        procs.cleanup(members)


async def test_watch_after_compaction_asks_for_a_reread(etcd):
    async with EtcdStore(etcd.addr, root="/t") as store:
        for i in range(5):
            await store.put(b"/t/c/k", b"%d" % i)
        kv = await store.get(b"/t/c/k")
        await store._client.compact(kv.mod_revision)
        resyncs: list[int] = []

        async def on_event(e: Event) -> None:
            pass

        async def on_resync() -> int:
            resyncs.append(1)
            _, rev = await store.get_prefix(b"/t/c/")
            return rev

        async with anyio.create_task_group() as tg:
            tg.start_soon(store.watch, b"/t/c/", 2, on_event, on_resync)
            with anyio.fail_after(5):
                while not resyncs:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        assert resyncs == [1]


async def test_commit_view_is_one_fenced_transaction(etcd):
    from core.nodes import Assignment
    from mesh.store.repo import MeshRepo, ViewCommit
    from tests.unit.test_view import make_view

    async with EtcdStore(etcd.addr, root="/t") as store:
        repo = MeshRepo(store)
        view = make_view(2, 0)
        assert await repo.commit_view("mydb", 0, view, ViewCommit(claim=view.node_ids))
        assert not await repo.commit_view("mydb", 0, view)  # it exists now
        lease = await store.grant(5)
        fence = await campaign(store, lease)
        stored = await repo.view("mydb")
        assert stored.view == view
        assert await repo.commit_view("mydb", stored.revision, view.next(),
                                      ViewCommit(unassign=("node-1",), fence=fence))
        assert set(await repo.assigned()) == {"node-0"}
        assert (await repo.assignment("node-0")).assignment == Assignment("mydb")
        stored = await repo.view("mydb")
        await store.revoke(lease)  # deposed: its fenced writes fail
        assert not await repo.commit_view("mydb", stored.revision, stored.view.next(),
                                          ViewCommit(fence=fence))
        assert (await repo.view("mydb")).view.epoch == 2


async def test_status_watch_delivers_puts_and_deletes(etcd):
    from core.nodes import NodeStatus
    from mesh.store.repo import MeshRepo

    seen: list[tuple[str, int | None]] = []
    async with EtcdStore(etcd.addr, root="/t") as store:
        repo = MeshRepo(store)
        _, revision = await repo.read_statuses()

        async def on_change(node_id, status):
            seen.append((node_id, status.epoch if status else None))

        async def on_resync() -> int:
            raise AssertionError("no compaction here")

        async with anyio.create_task_group() as tg:
            tg.start_soon(repo.watch_statuses, revision + 1, on_change, on_resync)
            lease = await store.grant(5)
            await repo.put_status(NodeStatus("n1", cluster="c", epoch=3), lease)
            await store.put(store.keys.status("junk"), b"not json")
            await store.revoke(lease)
            with anyio.fail_after(5):
                while len(seen) < 2:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert seen == [("n1", 3), ("n1", None)]
