"""The fence guard carries out the fence rule on the real control port (the lease keeper
faked): keys are served until FENCE_AFTER past the last successful keepalive's sending, and
not at all once etcd said the lease is gone."""
from __future__ import annotations

import anyio
import pytest

from core import clock
from mesh.fence import FenceGuard
from mesh.model.fencing import FENCE_AFTER
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

    def finished(self):  # noqa: ANN201
        return {}


class Keeper:
    def __init__(self, ago: float) -> None:
        self.lost = anyio.Event()
        self.renewed_at = clock.now() - ago  # the last successful keepalive was sent then
        self.expired = False
        self.lease_id = 1


class Applier:
    def __init__(self, applied=None) -> None:  # noqa: ANN001
        self.applied = applied


def guard(ago: float | None, applied: bool = True):  # noqa: ANN201
    control = ControlPort(NoMigrations())
    g = FenceGuard(control, Applier(make_view(2, 1) if applied else None), "node-0")  # type: ignore[arg-type]  # duck-typed applier
    g.keeper = Keeper(ago) if ago is not None else None  # type: ignore[assignment]  # fake keeper
    return g, control


async def test_writes_run_until_fence_after_past_the_last_successful_keepalive():
    g, control = guard(ago=0.2)
    g.check()
    assert not control.fenced
    assert control.permission.deadline == pytest.approx(g.keeper.renewed_at + FENCE_AFTER)
    assert control.permission.refusal(clock.now()) is None


async def test_no_keepalive_for_fence_after_fences():
    g, control = guard(ago=FENCE_AFTER + 0.01)
    g.check()
    assert control.fenced and control.fenced_for == {FENCED_LEASE}
    assert control.permission.refusal(clock.now()) is not None


async def test_a_lease_etcd_said_is_gone_fences_at_once():
    g, control = guard(ago=0.0)
    g.keeper.expired = True
    g.check()
    assert control.fenced


async def test_a_later_keepalive_moves_the_deadline_on():
    g, control = guard(ago=0.5)
    g.check()
    first = control.permission.deadline
    g.keeper.renewed_at = clock.now()
    g.check()  # the keeper calls this after every successful keepalive
    assert control.permission.deadline == pytest.approx(first + 0.5, abs=0.05)


async def test_a_node_in_no_cluster_is_not_fenced_but_serves_no_keys():
    g, control = guard(ago=FENCE_AFTER + 1, applied=False)
    g.check()
    assert not control.fenced and control.permission.refusal(clock.now()) is not None


async def test_before_the_first_lease_there_are_no_writes():
    g, control = guard(ago=None)
    async with anyio.create_task_group() as tg:
        tg.start_soon(g.run)
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert control.fenced  # a view applied and no lease: fenced at once
    g2, control2 = guard(ago=None, applied=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(g2.run)
        await anyio.sleep(0.1)
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
