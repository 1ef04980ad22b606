"""The fence guard carries out the fence rule on the real control port (peers and the lease
keeper faked): writes stop before the lease may expire unless nobody reaches etcd."""
from __future__ import annotations

import time

import anyio
import pytest

from mesh.fence import FenceGuard
from mesh.model.fencing import FENCE_HARD, FENCE_MARGIN, NO_ETCD_GRACE
from proxy.control import ControlPort
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
        self.deadline = time.monotonic() + left
        self.refreshing_since: float | None = None
        self.lease_id = 1


class Applier:
    def __init__(self, applied=None) -> None:  # noqa: ANN001
        self.applied = applied


def guard(left: float | None, peers: bool | None, applied=True, renew_to: float | None = None):  # noqa: ANN001, ANN201
    control = ControlPort(NoMigrations())
    g = FenceGuard(control, Applier(make_view(2, 1) if applied else None), "node-0")  # type: ignore[arg-type]  # duck-typed applier
    g.keeper = Keeper(left) if left is not None else None  # type: ignore[assignment]  # fake keeper
    asked = []

    async def peers_reach_etcd() -> bool | None:
        asked.append(1)
        if renew_to is not None:  # a keepalive succeeded while the peers were asked
            g.keeper.deadline = time.monotonic() + renew_to  # type: ignore[union-attr]
        return peers

    g.peers_reach_etcd = peers_reach_etcd  # type: ignore[method-assign]  # no sockets here
    return g, control, asked


async def test_a_healthy_lease_lets_writes_run_until_just_before_it_may_expire():
    g, control, asked = guard(left=5.0, peers=None)
    await g.check()
    assert control.lease_ok and not control.fenced and asked == []
    assert control.permission.deadline == pytest.approx(g.keeper.deadline - FENCE_HARD)


async def test_near_the_deadline_with_a_peer_on_etcd_it_asks_again_then_fences():
    g, control, asked = guard(left=FENCE_MARGIN - 0.1, peers=True)
    await g.check()
    assert asked and not control.fenced and not control.lease_ok  # before the hard deadline
    g.keeper.deadline = time.monotonic() + FENCE_HARD - 0.1
    await g.check()
    assert control.fenced
    assert control.permission.refusal(time.monotonic()) is not None


async def test_when_no_peer_answers_it_fences_at_the_hard_deadline():
    g, control, _ = guard(left=FENCE_HARD - 0.1, peers=None)
    await g.check()
    assert control.fenced


async def test_when_every_peer_lost_etcd_too_writes_go_on():
    g, control, _ = guard(left=0.1, peers=False)
    await g.check()
    assert not control.fenced
    assert control.permission.deadline == pytest.approx(time.monotonic() + NO_ETCD_GRACE, abs=0.1)


async def test_a_lost_lease_fences_unless_nobody_reaches_etcd():
    g, control, _ = guard(left=3.0, peers=True)
    g.keeper.lost.set()
    await g.check()
    assert control.fenced and not control.lease_ok


async def test_a_keepalive_that_lands_while_asking_saves_the_writes():
    g, control, _ = guard(left=FENCE_HARD - 0.1, peers=True, renew_to=5.0)
    await g.check()
    assert not control.fenced
    await g.check()  # healthy again: the permission follows the new deadline
    assert control.permission.deadline == pytest.approx(g.keeper.deadline - FENCE_HARD)


async def test_a_node_in_no_cluster_asks_nobody_and_is_not_fenced():
    g, control, asked = guard(left=0.1, peers=True, applied=False)
    await g.check()
    assert asked == [] and not control.fenced


async def test_before_the_first_lease_there_are_no_writes():
    g, control, _ = guard(left=None, peers=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(g.run)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert control.fenced  # the applied view exists and no lease does: fenced at once
    g2, control2, _ = guard(left=None, peers=True, applied=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(g2.run)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert not control2.fenced and control2.permission.deadline == 0.0
