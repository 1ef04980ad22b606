"""proxy/control.py: commands refused for a running handover are held behind one barrier
that falls when the handover ends or HANDOVER_HOLD has passed."""
from __future__ import annotations

import asyncio
from dataclasses import replace

from core import clock
from proxy.control import HANDOVER_HOLD, ControlPort
from proxy.routing import NodeInfo
from tests.unit.test_admission import NoMigrations, make_table


class Waiter:
    def __init__(self) -> None:
        self.woken = 0

    def replies_arrived(self) -> None:
        self.woken += 1


def test_no_handover_nothing_to_hold():
    port = ControlPort(NoMigrations())
    port.apply(make_table())
    assert port.hold_handover(Waiter()) is None


def test_held_until_the_view_makes_the_node_a_replica():
    async def run() -> None:
        port = ControlPort(NoMigrations())
        port.apply(make_table(epoch=1))
        port.start_handover()
        a, b = Waiter(), Waiter()
        barrier = port.hold_handover(a)
        assert barrier is not None and barrier.data is None
        assert port.hold_handover(b) is barrier  # one barrier for every client
        port.apply(make_table(epoch=2))  # still the master: still held
        assert barrier.data is None and (a.woken, b.woken) == (0, 0)
        replica = replace(make_table(epoch=3),
                          nodes=(NodeInfo("me", "10.0.0.1:7000", True, (), "m"),))
        port.apply(replica)
        assert barrier.data is not None and (a.woken, b.woken) == (1, 1)
        assert port.hold_handover(a) is None  # decided again: redirected, not held

    asyncio.run(run())


def test_held_at_most_handover_hold_then_tryagain():
    async def run() -> None:
        port = ControlPort(NoMigrations())
        port.apply(make_table(epoch=1))
        port.start_handover()
        port.handover_hold_until = clock.now() + 0.05  # as if HANDOVER_HOLD were short
        waiter = Waiter()
        assert port.hold_handover(waiter) is not None
        await asyncio.sleep(0.1)
        assert port.hold_handover(Waiter()) is None  # past the hold: TRYAGAIN as before
        assert port.permission.handing_over

    asyncio.run(run())
    assert HANDOVER_HOLD >= 1.5  # a Redis FAILOVER waits for a once-a-second ACK
