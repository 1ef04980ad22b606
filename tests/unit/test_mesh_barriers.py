"""Migration barriers wait on events (a new applied view, a peer's status), in memory."""
from __future__ import annotations

import anyio
import pytest

from core.nodes import MigrationProgress, NodeStatus
from core.view import ClusterView, Migration
from mesh import barriers
from mesh.barriers import COMMIT_BARRIER_TIMEOUT, MigrationStarts, outgoing, wait_commit
from mesh.model import migrations as plans
from mesh.notify import Changed
from mesh.status import PeerStatuses, StatusReporter
from tests.unit.test_view import make_view

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class FakeApplier:
    def __init__(self) -> None:
        self.applied: ClusterView | None = None
        self.active: frozenset[str] = frozenset()
        self.changed = Changed()
        self.activated: list[tuple[int, str]] = []

    def apply(self, view: ClusterView) -> None:
        self.applied = view
        self.changed.notify()

    async def activate(self, view: ClusterView, migration: Migration) -> None:
        self.active = self.active | {migration.id}
        self.activated.append((view.epoch, migration.id))
        self.changed.notify()


def peers_with(**epochs: int) -> PeerStatuses:
    peers = PeerStatuses(repo=None)  # type: ignore[arg-type]  # fed by hand: no watch runs
    for node, epoch in epochs.items():
        peers.statuses[node] = NodeStatus(node, cluster="mydb", epoch=epoch)
    return peers


def report(peers: PeerStatuses, node: str, epoch: int, cluster: str = "mydb") -> None:
    peers.statuses[node] = NodeStatus(node, cluster=cluster, epoch=epoch)
    peers.changed.notify()


def scale_out_view() -> ClusterView:
    """s1 (node-0) -> s2 (node-1) started at epoch 3."""
    view = make_view(2, 0)
    planned = plans.with_plan(view, [Migration(((0, 100),), "s1", "s2", 2)])
    return plans.start_next(planned) or planned


def test_outgoing_is_what_this_node_is_the_source_master_of():
    view = scale_out_view()
    assert [m.source for m in outgoing(view, "node-0")] == ["s1"]
    assert outgoing(view, "node-1") == []


async def test_a_migration_starts_when_the_target_reports_the_epoch_that_started_it():
    view = scale_out_view()
    migration = view.migrations[0]
    applier, peers = FakeApplier(), peers_with(**{"node-1": 1})
    async with anyio.create_task_group() as tg:
        tg.start_soon(MigrationStarts(peers, applier, "node-0").run)
        await anyio.sleep(0.01)
        applier.apply(view)
        await anyio.sleep(0.01)
        assert applier.activated == []  # the target is still on epoch 1
        report(peers, "node-1", migration.epoch, cluster="other")  # another cluster's epoch
        await anyio.sleep(0.01)
        assert applier.activated == []
        report(peers, "node-1", migration.epoch)
        with anyio.fail_after(1):
            while not applier.activated:
                await anyio.sleep(0)
        tg.cancel_scope.cancel()
    assert applier.activated == [(view.epoch, migration.id)]


async def test_the_commit_barrier_waits_for_the_target_to_apply_the_commit():
    current = scale_out_view()
    committed, _ = plans.commit(current, current.migrations[0].id)
    peers = peers_with(**{"node-1": current.epoch})
    done = anyio.Event()

    async def barrier() -> None:
        await wait_commit(peers, "node-0", current, committed)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(barrier)
        await anyio.sleep(0.01)
        assert not done.is_set()
        report(peers, "node-1", committed.epoch)
        with anyio.fail_after(1):
            await done.wait()


async def test_the_commit_barrier_gives_up_after_its_timeout(monkeypatch):
    assert COMMIT_BARRIER_TIMEOUT == 5.0
    monkeypatch.setattr(barriers, "COMMIT_BARRIER_TIMEOUT", 0.2)
    current = scale_out_view()
    committed, _ = plans.commit(current, current.migrations[0].id)
    with anyio.fail_after(2):
        before = anyio.current_time()
        await wait_commit(peers_with(), "node-0", current, committed)
    assert anyio.current_time() - before >= 0.2


async def test_no_barrier_when_no_migration_of_this_node_ends():
    current = scale_out_view()
    with anyio.fail_after(0.5):
        await wait_commit(peers_with(), "node-1", current, current.next())  # not the source
        await wait_commit(peers_with(), "node-0", current, current.next())  # still running


@pytest.mark.parametrize("before, after, urgent", [
    ({}, {"m": MigrationProgress(moved_keys=5)}, False),  # progress: written within a second
    ({"m": MigrationProgress(moved_keys=5)}, {"m": MigrationProgress(moved_keys=9)}, False),
    ({"m": MigrationProgress(moved_keys=5)}, {"m": MigrationProgress(moved_keys=9, done=True)},
     True),  # the leader commits on it: at once
    ({"m": MigrationProgress(done=True)}, {"m": MigrationProgress(done=True, moved_keys=1)}, False),
])
def test_a_migration_that_is_done_is_published_at_once_and_progress_is_not(before, after, urgent):
    reporter = StatusReporter(None, "n")  # type: ignore[arg-type]  # set() never writes
    reporter.set(migrations=before)
    reporter.dirty = False
    waiter = reporter.changed.waiter()
    reporter.set(migrations=after)
    assert waiter.is_set() is urgent and reporter.dirty is not urgent
