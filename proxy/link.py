"""A Redis connection for bulk work off the per-command path (the key mover): commands packed
and replies parsed by hiredis, in C, so SCAN pages, MIGRATE of a batch and the like cost
Python little. The per-command path relays raw bytes instead (proxy/backend.py).

Replies come back parsed: bytes, int, list, None, or a `hiredis.ReplyError` for an error
reply (returned, not raised). A lost link fails every call waiting on it with OSError.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

import hiredis

from .backend import CONNECT_TIMEOUT


class Link(asyncio.Protocol):
    def __init__(self, host: str, port: int, password: str | None = None) -> None:
        self.host, self.port, self.password = host, port, password
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[object]] = deque()
        self._closed = False

    async def connect(self) -> None:
        """Open the link (and authenticate as the default user); OSError on failure."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self, self.host, self.port),
                                   CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise OSError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        if self.password:
            reply = await self.call(b"AUTH", self.password.encode())
            if isinstance(reply, hiredis.ReplyError):
                self.close()
                raise OSError(f"{self.host}:{self.port} refused the password: {reply}")

    async def call(self, *argv: bytes) -> object:
        return (await self.call_many([argv]))[0]

    async def call_many(self, commands: Sequence[Sequence[bytes]]) -> list[object]:
        """Pipeline `commands`; their replies, in order."""
        if self._transport is None or self._closed:
            raise OSError(f"not connected to {self.host}:{self.port}")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)
        self._transport.write(b"".join(hiredis.pack_command(tuple(c))  # type: ignore[arg-type]  # the stub wants a 1-tuple
                                       for c in commands))
        return [await f for f in futures]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._closed:
            transport.close()
            return
        self._transport = transport  # type: ignore[assignment]  # a stream's is a Transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future = self._waiting.popleft()
            if not future.done():  # its caller may have been cancelled
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(OSError(f"lost the link to {self.host}:{self.port}"))

    def abort(self) -> None:
        """Drop the link now if calls are in flight (they fail with OSError)."""
        if self._transport is not None and self._waiting:
            self._transport.abort()

    def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()
