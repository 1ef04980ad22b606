"""A broadcast "something changed" signal for tasks of one agent (anyio only)."""
from __future__ import annotations

import anyio


class Changed:
    """Tasks wait for the next change instead of polling for it.

    Take `waiter()` before reading the state it guards and wait on it after: a change made
    in between (while the task was awaiting something else) is not missed.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()

    def waiter(self) -> anyio.Event:
        return self._event

    def notify(self) -> None:
        event, self._event = self._event, anyio.Event()
        event.set()

    async def wait(self) -> None:
        await self._event.wait()


async def first_of(*events: anyio.Event, timeout: float = float("inf")) -> None:
    """Wait until one of `events` is set, or `timeout` has passed."""
    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as tg:
            async def wait(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            for event in events:
                tg.start_soon(wait, event)
