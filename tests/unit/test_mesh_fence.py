"""The fence guard carries out the fence rule on the real control port (the lease keeper and
etcd's members faked): writes stop at the lease deadline unless a majority of etcd's members
say they have no leader."""
from __future__ import annotations

import anyio
import pytest

from core import clock
from mesh.fence import FenceGuard
from mesh.model.fencing import FENCE_HARD, FENCE_MARGIN, NO_LEADER_GRACE
from proxy.control import FENCED_BACKEND, FENCED_LEASE, ControlPort
from tests.unit.test_view import make_view

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class NoMigrations:
    def reconcile(self, table):  # noqa: ANN001, ANN201
        pass

    def progress(self):  # noqa: ANN201
        return {}


class Keeper:
    def __init__(self, left: float) -> None:
        self.lost = anyio.Event()
        self.deadline = clock.now() + left
        self.expired = False
        self.lease_id = 1


class Applier:
    def __init__(self, applied=None) -> None:  # noqa: ANN001
        self.applied = applied


class Members:
    """etcd's members as the store reports them: (members, leaderless)."""

    def __init__(self, members: int, leaderless: int, renew_to: float | None = None) -> None:
        self.answer = (members, leaderless)
        self.asked = 0
        self.renew_to = renew_to
        self.keeper: Keeper | None = None

    async def ask_members(self) -> tuple[int, int]:
        self.asked += 1
        if self.renew_to is not None and self.keeper is not None:  # a keepalive landed
            self.keeper.deadline = clock.now() + self.renew_to
        return self.answer


def guard(left: float | None, members: int = 3, leaderless: int = 0, applied: bool = True,
          renew_to: float | None = None):  # noqa: ANN201
    control = ControlPort(NoMigrations())
    store = Members(members, leaderless, renew_to)
    g = FenceGuard(control, Applier(make_view(2, 1) if applied else None), store, "node-0")  # type: ignore[arg-type]  # duck-typed applier and store
    g.keeper = store.keeper = Keeper(left) if left is not None else None  # type: ignore[assignment]  # fake keeper
    return g, control, store


async def test_a_healthy_lease_lets_writes_run_until_just_before_it_may_expire():
    g, control, store = guard(left=5.0)
    await g.check()
    assert not control.fenced and store.asked == 0
    assert control.permission.deadline == pytest.approx(g.keeper.deadline - FENCE_HARD)


async def test_near_the_deadline_it_asks_etcds_members_then_fences_at_the_deadline():
    g, control, store = guard(left=FENCE_MARGIN - 0.1)
    await g.check()
    assert store.asked == 1 and not control.fenced  # before the hard deadline
    g.keeper.deadline = clock.now() + FENCE_HARD - 0.1
    await g.check()
    assert control.fenced and control.fenced_for == {FENCED_LEASE}
    assert control.permission.refusal(clock.now()) is not None


@pytest.mark.parametrize("members,leaderless,excused", [
    (3, 2, True),  # a majority has no leader: nothing can expire the lease
    (3, 3, True),
    (5, 3, True),
    (3, 1, False),  # a minority says so: a leader may exist on the other side
    (3, 0, False),  # nobody answered (or every member has a leader)
    (4, 2, False),  # half is not a majority
])
async def test_past_the_deadline_only_a_leaderless_majority_keeps_writes(members, leaderless,
                                                                          excused):
    g, control, _ = guard(left=FENCE_HARD - 0.1, members=members, leaderless=leaderless)
    await g.check()
    assert control.fenced is not excused
    if excused:
        assert control.permission.deadline == pytest.approx(clock.now() + NO_LEADER_GRACE,
                                                            abs=0.1)


async def test_a_lease_etcd_said_is_gone_fences_whatever_the_members_say():
    g, control, store = guard(left=3.0, leaderless=3)
    g.keeper.expired = True
    await g.check()
    assert control.fenced and store.asked == 0


async def test_a_keepalive_that_lands_while_asking_saves_the_writes():
    g, control, _ = guard(left=FENCE_HARD - 0.1, renew_to=5.0)
    await g.check()
    assert not control.fenced
    await g.check()  # healthy again: the permission follows the new deadline
    assert control.permission.deadline == pytest.approx(g.keeper.deadline - FENCE_HARD)


async def test_a_node_in_no_cluster_asks_nobody_and_is_not_fenced():
    g, control, store = guard(left=0.1, leaderless=3, applied=False)
    await g.check()
    assert store.asked == 0 and not control.fenced


async def test_before_the_first_lease_there_are_no_writes_even_if_etcd_has_no_leader():
    g, control, store = guard(left=None, leaderless=3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(g.run)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert control.fenced and store.asked == 0  # a view applied and no lease: fenced at once
    g2, control2, _ = guard(left=None, applied=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(g2.run)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert not control2.fenced and control2.permission.refusal(clock.now()) is not None


async def test_fence_reasons_are_lifted_one_by_one_and_cut_what_is_in_flight():
    control = ControlPort(NoMigrations())
    cut = []
    control.on_fence.append(lambda: cut.append(1))
    control.allow_writes_until(clock.now() + 10)
    control.fence(FENCED_BACKEND)
    control.fence(FENCED_LEASE)
    assert cut == [1]  # once, when writes became fenced
    control.unfence(FENCED_LEASE, clock.now() + 10)
    assert control.fenced  # the backend's reason still holds
    control.unfence(FENCED_BACKEND, clock.now() + 10)
    assert not control.fenced and control.permission.refusal(clock.now()) is None
