"""The leader's prober against real sockets on loopback: a proxy that answers is trusted, a
port with nothing listening is suspected within SUSPECT_REFUSED, one that accepts but never
answers (a frozen process) only after SUSPECT_SILENT."""
from __future__ import annotations

import contextlib

import anyio
import pytest

from mesh.model.health import SUSPECT_REFUSED, SUSPECT_SILENT
from mesh.notify import Changed
from mesh.prober import Prober
from mesh.redisctl import connection_refused

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def serve(answer: bool):  # noqa: ANN201
    async def handle(stream) -> None:  # noqa: ANN001
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while True:
                    await stream.receive()
                    if answer:
                        await stream.send(b"+PONG\r\n")
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    return listener, handle, listener.extra(anyio.abc.SocketAttribute.local_port)


async def wait_until(predicate, timeout: float) -> float:  # noqa: ANN001
    start = anyio.current_time()
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)
    return anyio.current_time() - start


async def test_a_closed_port_is_suspected_quickly_and_a_live_one_never():
    listener, handle, port = await serve(answer=True)
    wake = Changed()
    prober = Prober(wake)
    woken = wake.waiter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        tg.start_soon(prober.run)
        prober.watch({"a": f"127.0.0.1:{port}"})
        await wait_until(lambda: "a" in prober.checks, 2)
        await anyio.sleep(0.3)
        assert prober.suspects(anyio.current_time()) == set()
        tg.cancel_scope.cancel()
    await listener.aclose()  # the process is gone: nothing listens, its connections are closed
    async with anyio.create_task_group() as tg:
        tg.start_soon(prober.run)
        prober.watch({})
        prober.watch({"a": f"127.0.0.1:{port}"})
        took = await wait_until(lambda: prober.suspects(anyio.current_time()) == {"a"}, 2)
        await wait_until(woken.is_set, 1)  # the leader is woken for it
        assert prober.checks["a"].refused, prober.checks
        assert took >= SUSPECT_REFUSED
        tg.cancel_scope.cancel()


async def test_a_port_that_never_answers_is_suspected_only_after_the_silent_limit():
    listener, handle, port = await serve(answer=False)
    prober = Prober(Changed())
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        tg.start_soon(prober.run)
        prober.watch({"a": f"127.0.0.1:{port}"})
        await wait_until(lambda: prober.checks.get("a") and prober.checks["a"].failing_since,
                         2)
        await anyio.sleep(1.0)  # a 1 s pause is no reason for suspicion
        assert prober.suspects(anyio.current_time()) == set()
        took = await wait_until(lambda: prober.suspects(anyio.current_time()) == {"a"},
                                SUSPECT_SILENT + 2)
        assert not prober.checks["a"].refused and took > SUSPECT_SILENT - 1.6
        tg.cancel_scope.cancel()


async def test_connection_refused_sees_through_anyios_connect_error():
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    with pytest.raises(OSError) as caught:
        await anyio.connect_tcp("127.0.0.1", port)
    assert connection_refused(caught.value)
    assert not connection_refused(TimeoutError())
