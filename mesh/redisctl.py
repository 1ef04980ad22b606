"""A minimal admin client for a node's Redis: one connection, one command at a time.

For the control plane only (ROLE, REPLICAOF, FLUSHALL, INFO); the data path never uses it.
Callers own timeouts.
"""
from __future__ import annotations

from dataclasses import dataclass

import anyio
import hiredis
from anyio.abc import SocketStream

from core.address import Address
from proxy.resp import ReplyScanner, encode_command

READ_SIZE = 65536


def connection_refused(exc: BaseException) -> bool:
    """Whether a failed connect found nothing listening (anyio's connect_tcp reports a refusal
    as an OSError caused by a group of the attempts' errors)."""
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, ConnectionRefusedError):
            return True
        if isinstance(e, BaseExceptionGroup):
            seen.extend(e.exceptions)
        if e.__cause__ is not None:
            seen.append(e.__cause__)
    return False


class RedisCtlError(Exception):
    """The backend could not be reached or answered with an error. `refused`: nothing listens
    at its address (the Redis process is gone)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class RedisCtl:
    def __init__(self, address: str, password: str | None = None) -> None:
        self.address = Address.parse(address)  # AddressError (a ValueError) if malformed
        self.host, self.port = self.address.host, self.address.port
        self.password = password
        self._stream: SocketStream | None = None
        self._lock = anyio.Lock()

    async def call(self, *argv: bytes | str | int) -> object:
        """Send one command and return its parsed reply; an error reply raises RedisCtlError."""
        args = [a if isinstance(a, bytes) else str(a).encode() for a in argv]
        async with self._lock:
            try:
                if self._stream is None:
                    self._stream = await anyio.connect_tcp(self.host, self.port)
                    if self.password:
                        await self._exchange([b"AUTH", self.password.encode()])
                reply = await self._exchange(args)
            except (OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                await self.aclose()
                raise RedisCtlError(f"backend {self.address}: {exc!r}",
                                    refused=connection_refused(exc)) from None
            except BaseException:
                await self.aclose()  # cancelled mid-reply: the next reply would be this one's
                raise
        if isinstance(reply, hiredis.ReplyError):
            raise RedisCtlError(f"backend {self.address} replied: {reply}")
        return reply

    async def _exchange(self, argv: list[bytes]) -> object:
        assert self._stream is not None
        await self._stream.send(encode_command(argv))
        buf = b""
        scanner = ReplyScanner()
        while (end := scanner.next_end(buf)) < 0:
            buf += await self._stream.receive(READ_SIZE)
        reader = hiredis.Reader()
        reader.feed(buf[:end])
        return reader.gets()

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    # -- the few things the agent needs ------------------------------------------------------
    async def role(self) -> tuple[str, Address | None]:
        """('master', None) or ('slave', the address of its master)."""
        reply = await self.call("ROLE")
        if not isinstance(reply, list) or not reply:
            raise RedisCtlError(f"unexpected ROLE reply {reply!r}")
        kind = reply[0].decode()
        if kind == "slave":
            try:
                return kind, Address(reply[1].decode(), int(reply[2]))
            except (IndexError, ValueError, AttributeError):
                raise RedisCtlError(f"unexpected ROLE reply {reply!r}") from None
        return kind, None

    async def replication(self) -> Replication:
        """What INFO replication says: the offset, the master followed, whether its link is up."""
        info = await self.call("INFO", "replication")
        if not isinstance(info, bytes):
            raise RedisCtlError(f"unexpected INFO reply {info!r}")
        fields = dict(line.partition(":")[::2] for line in info.decode().splitlines())
        try:
            offset = int(fields.get("slave_repl_offset") or fields.get("master_repl_offset") or 0)
        except ValueError:
            raise RedisCtlError(f"unexpected INFO reply {info!r}") from None
        if fields.get("role") != "slave":
            return Replication(offset)
        master = f"{fields.get('master_host', '')}:{fields.get('master_port', '')}"
        return Replication(offset, master, fields.get("master_link_status") == "up")


@dataclass(frozen=True, slots=True)
class Replication:
    offset: int
    master: str | None = None  # the master followed (None: this is a master)
    link_up: bool = False
