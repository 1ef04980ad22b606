"""RESP codec, sans-IO: bytes in, values out (requests); bytes in, reply boundaries out (replies).

Requests are parsed with hiredis and re-encoded when forwarded (argument bytes are exact).
Replies from Redis are never re-encoded: hiredis would collapse `+OK` and `$2 OK`, drop the
RESP3 verbatim header and turn errors into values, so the proxy only finds where each reply
ends (`ReplyScanner`) and forwards the original bytes.
"""
from __future__ import annotations

import hiredis

# Limits, as Redis's defaults (proto-max-bulk-len, the 1M multibulk cap, PROTO_INLINE_MAX_SIZE).
MAX_BULK_LEN = 512 * 1024 * 1024
MAX_MULTIBULK_LEN = 1024 * 1024
MAX_INLINE_LEN = 64 * 1024
# A request still incomplete after this many bytes is refused (one maximal bulk plus headers).
MAX_PENDING_REQUEST_BYTES = MAX_BULK_LEN + 64 * 1024

_NEED_DATA = Ellipsis


class RequestError(Exception):
    """The client's bytes are not a valid request; the connection must be closed after the reply."""


class BackendProtocolError(Exception):
    """The backend sent bytes that are not RESP."""


class RequestParser:
    """Turns the client's byte stream into argv lists (list[bytes]).

    A connection may start with inline (telnet style) lines and switch to RESP at a line
    boundary. Once it has sent RESP it stays RESP: hiredis does not say where a request ended
    inside a read, so an inline line after RESP cannot be told from a request's middle.
    """

    __slots__ = ("_reader", "_pending_bytes", "_inline", "_resp")

    def __init__(self) -> None:
        self._reader = hiredis.Reader(notEnoughData=_NEED_DATA)
        self._pending_bytes = 0  # upper bound of bytes fed that no finished request accounts for
        self._inline = b""
        self._resp = False

    def feed(self, data: bytes) -> list[list[bytes]]:
        """Return the complete requests in `data` (plus what was buffered). Raises RequestError."""
        if not self._resp:
            commands, data = self._parse_inline(data)
            if not data:
                return commands
            self._resp = True
            _check_multibulk_header(data)
        else:
            commands = []
        reader = self._reader
        reader.feed(data)
        gets = reader.gets
        try:
            cmd = gets()
            while cmd is not _NEED_DATA:
                if cmd.__class__ is not list:
                    raise RequestError("Protocol error: expected '*'")
                if cmd:
                    if len(cmd) > MAX_MULTIBULK_LEN:
                        raise RequestError("Protocol error: invalid multibulk length")
                    for arg in cmd:
                        if arg.__class__ is not bytes:
                            raise RequestError("Protocol error: expected '$'")
                    commands.append(cmd)
                cmd = gets()
        except hiredis.ProtocolError as exc:
            raise RequestError(f"Protocol error: {exc}") from None
        if commands:
            self._pending_bytes = len(data)
        else:
            self._pending_bytes += len(data)
            if self._pending_bytes > MAX_PENDING_REQUEST_BYTES:
                raise RequestError("Protocol error: invalid bulk length")
        return commands

    def _parse_inline(self, data: bytes) -> tuple[list[list[bytes]], bytes]:
        """Parse whole inline lines from the front of `data`; return them and the RESP rest."""
        buf = self._inline + data
        commands: list[list[bytes]] = []
        pos = 0
        while pos < len(buf) and buf[pos] != 42:  # b"*"
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > MAX_INLINE_LEN:
                    raise RequestError("Protocol error: too big inline request")
                self._inline = buf[pos:]
                return commands, b""
            argv = buf[pos:nl].split()
            if argv:
                commands.append(argv)
            pos = nl + 1
        self._inline = b""
        return commands, buf[pos:]


def _check_multibulk_header(data: bytes) -> None:
    # Only the first request can be checked before hiredis parses it; later ones are bounded
    # by MAX_PENDING_REQUEST_BYTES and checked once parsed.
    nl = data.find(b"\r\n", 0, 24)
    if nl > 1:
        try:
            n = int(data[1:nl])
        except ValueError:
            return
        if n > MAX_MULTIBULK_LEN:
            raise RequestError("Protocol error: invalid multibulk length")


def encode_command(argv: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(argv) + b"".join([b"$%d\r\n%s\r\n" % (len(a), a) for a in argv])


# ---------------------------------------------------------------------------------------------
# Reply boundaries

_LINE, _BLOB, _AGG, _PAIRS, _ATTR, _BAD = range(6)
_KIND = [_BAD] * 256
for _c in b"+-:_,#(":
    _KIND[_c] = _LINE
for _c in b"$!=":
    _KIND[_c] = _BLOB
for _c in b"*~>":
    _KIND[_c] = _AGG
_KIND[ord("%")] = _PAIRS
_KIND[ord("|")] = _ATTR
_KIND = tuple(_KIND)


class ReplyScanner:
    """Finds where each reply ends in a growing buffer, resuming where it stopped.

    `pos` is the scan position (absolute in the caller's buffer); `open` holds how many
    elements each open aggregate still needs. A partial 1M-element array is not rescanned from
    its start when more bytes arrive.
    """

    __slots__ = ("pos", "open")

    def __init__(self) -> None:
        self.pos = 0
        self.open: list[int] = []

    def next_end(self, buf: bytes | bytearray) -> int:
        """End offset of the reply in progress, or -1 when more bytes are needed."""
        pos = self.pos
        stack = self.open
        n = len(buf)
        kind_of = _KIND
        while pos < n:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            kind = kind_of[buf[pos]]
            if kind == _LINE:
                pos = nl + 2
            elif kind == _BLOB:
                try:
                    length = int(buf[pos + 1 : nl])
                except ValueError:
                    raise BackendProtocolError(bytes(buf[pos : nl + 2])) from None
                end = nl + 4 + length if length >= 0 else nl + 2
                if end > n:
                    break
                pos = end
            elif kind == _BAD:
                raise BackendProtocolError(bytes(buf[pos : nl + 2]))
            else:
                try:
                    count = int(buf[pos + 1 : nl])
                except ValueError:
                    raise BackendProtocolError(bytes(buf[pos : nl + 2])) from None
                pos = nl + 2
                if kind != _AGG:
                    count *= 2
                    if kind == _ATTR:
                        count += 1  # an attribute map is followed by the reply it annotates
                if count > 0:
                    stack.append(count)
                    continue
            # one element is complete; close every aggregate it completes
            while stack:
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            if not stack:
                self.pos = pos
                return pos
        self.pos = pos
        return -1

    def shift(self, consumed: int) -> None:
        """The caller dropped `consumed` bytes from the front of its buffer."""
        self.pos -= consumed


def scan_reply(buf: bytes, pos: int = 0) -> int:
    """End offset of the one reply starting at `pos`, or -1 if incomplete (tests and tools)."""
    scanner = ReplyScanner()
    scanner.pos = pos
    return scanner.next_end(buf)


# ---------------------------------------------------------------------------------------------
# Replies the proxy makes itself


class Err(str):
    """An error reply; the text starts with its code, e.g. Err('ERR unknown command')."""


OK = b"+OK\r\n"
PONG = b"+PONG\r\n"


def error(text: str) -> bytes:
    return b"-%s\r\n" % text.replace("\r", " ").replace("\n", " ").encode()


def simple(text: str) -> bytes:
    return b"+%s\r\n" % text.encode()


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode(value: object, resp3: bool = False) -> bytes:
    """Encode a Python value: bytes/str -> bulk, int -> integer, None -> null, Err -> error,
    list/tuple -> array, dict -> map (RESP3) or flat array (RESP2), bool -> boolean or integer."""
    out: list[bytes] = []
    _encode_into(value, resp3, out)
    return b"".join(out)


def _encode_into(value: object, resp3: bool, out: list[bytes]) -> None:
    if isinstance(value, Err):
        out.append(error(value))
    elif isinstance(value, (bytes, str)):
        out.append(bulk(value))
    elif isinstance(value, bool):
        out.append((b"#t\r\n" if value else b"#f\r\n") if resp3 else integer(int(value)))
    elif isinstance(value, int):
        out.append(integer(value))
    elif value is None:
        out.append(b"_\r\n" if resp3 else b"$-1\r\n")
    elif isinstance(value, dict):
        out.append(b"%%%d\r\n" % len(value) if resp3 else b"*%d\r\n" % (2 * len(value)))
        for k, v in value.items():
            _encode_into(k, resp3, out)
            _encode_into(v, resp3, out)
    elif isinstance(value, (list, tuple)):
        out.append(b"*%d\r\n" % len(value))
        for item in value:
            _encode_into(item, resp3, out)
    else:
        raise TypeError(f"cannot encode {type(value).__name__}")
