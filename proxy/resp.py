"""RESP codec, sans-IO: bytes in, values out (requests); bytes in, reply boundaries out (replies).

Requests are parsed with hiredis; the session forwards a read of plain commands as it came
(`RequestParser.whole`) and re-encodes the others (argument bytes are exact).
Replies from Redis are never re-encoded: hiredis would collapse `+OK` and `$2 OK`, drop the
RESP3 verbatim header and turn errors into values, so the proxy only finds where each reply
ends (`ReplyScanner`) and forwards the original bytes.
"""
from __future__ import annotations

import hiredis

# Limits, as Redis's defaults (proto-max-bulk-len, PROTO_INLINE_MAX_SIZE), except:
MAX_BULK_LEN = 512 * 1024 * 1024
# arguments in one command: Redis takes 1M, but the proxy handles a command's arguments in one
# turn of its loop (re-encoded, keys hashed, split over shards), about 2 us each here, and a
# turn of over FENCE_AFTER (1 s) fences the node, over its lease TTL costs it the lease: a
# tenant's 1M-key DEL did both. At this size a turn stays near a quarter of a second.
MAX_MULTIBULK_LEN = 128 * 1024
TOO_MANY_ARGUMENTS = ("ERR Protocol error: invalid multibulk length (this proxy takes at most "
                      f"{MAX_MULTIBULK_LEN} arguments a command: split it)")
MAX_INLINE_LEN = 64 * 1024
# hiredis is fed a big read this much at a time (see RequestParser._parse_multibulk)
FEED_SLICE = 16 * 1024
# An incomplete request may hold this much (Redis: client-query-buffer-limit).
MAX_QUERY_BUFFER = 1024 * 1024 * 1024

_NEED_DATA = Ellipsis


class RequestError(Exception):
    """The client's bytes are not a valid request; the connection must be closed after the reply.

    `commands` holds the complete requests that came before the bad bytes: they still run.
    """

    commands: list[list[bytes]] = []


class BackendProtocolError(Exception):
    """The backend sent bytes that are not RESP."""


class RequestParser:
    """Turns the client's byte stream into argv lists (list[bytes]).

    hiredis does the parsing; the parser also counts the bytes each request took (Redis only
    accepts canonical headers, so the size follows from the argv) to know where requests end.
    That lets inline (telnet style) lines come at any request boundary, and lets the headers
    of an incomplete request be checked as they arrive, before a client can make the proxy
    buffer a bulk it would refuse.
    """

    __slots__ = ("_reader", "_unconsumed", "_inline", "_check", "whole")

    def __init__(self) -> None:
        self._reader = hiredis.Reader(notEnoughData=_NEED_DATA)
        self._unconsumed = 0  # bytes fed to hiredis that no returned request accounts for
        self._inline = b""
        self._check = _HeaderCheck()
        # After feed(): the data fed was exactly the requests returned, byte for byte
        # (multibulk only, nothing carried over or left over), so it can be forwarded as is.
        self.whole = False

    def feed(self, data: bytes) -> list[list[bytes]]:
        """Return the complete requests in `data` (plus what was buffered). Raises RequestError."""
        commands: list[list[bytes]] = []
        self.whole = False
        try:
            if self._unconsumed == 0 and (self._inline or data[:1] != b"*"):
                data = self._parse_inline(data, commands)
                if not data:
                    return commands
                whole = False
            else:
                whole = self._unconsumed == 0
            self._parse_multibulk(data, commands, whole)
        except RequestError as exc:
            exc.commands = commands
            raise
        return commands

    def _parse_multibulk(self, data: bytes, commands: list[list[bytes]], whole: bool) -> None:
        first_new = len(commands)
        feed, gets = self._reader.feed, self._reader.gets
        # offset in `data` of the next request (negative: it began in an earlier read)
        pos = -self._unconsumed
        size = len(data)
        fed = 0
        try:
            # hiredis moves its unread bytes to the front after each request past its first
            # KB, so a big read is fed in slices: the move stays small
            while fed < size:
                feed(data, fed, min(FEED_SLICE, size - fed))
                fed += FEED_SLICE
                cmd = gets()
                while cmd is not _NEED_DATA:
                    if cmd.__class__ is not list:
                        raise RequestError("ERR Protocol error: expected '*'")
                    argc = len(cmd)
                    if argc < 256:
                        pos += 3 + _DIGITS[argc]
                    else:
                        if argc > MAX_MULTIBULK_LEN:  # came whole: no header check saw it
                            raise RequestError(TOO_MANY_ARGUMENTS)
                        pos += 3 + len(str(argc))
                    for arg in cmd:
                        # Redis takes bulk strings only, hiredis also +simple, =verbatim...
                        # (headers in earlier reads were checked by _HeaderCheck)
                        if pos >= 0 and data[pos] != 36:  # b"$"
                            raise RequestError("ERR Protocol error: expected '$', got "
                                               f"'{chr(data[pos])}'")
                        if arg.__class__ is not bytes:
                            raise RequestError("ERR Protocol error: invalid bulk length")
                        n = len(arg)
                        pos += n + 5 + (_DIGITS[n] if n < 256 else len(str(n)))
                    if cmd:
                        commands.append(cmd)
                    else:
                        whole = False
                    cmd = gets()
        except hiredis.ProtocolError as exc:
            raise RequestError(f"ERR Protocol error: {exc}") from None
        except (TypeError, ValueError):  # hiredis building a value Redis would never accept
            raise RequestError("ERR Protocol error: expected '$'") from None
        before = self._unconsumed
        self._unconsumed = unconsumed = len(data) - pos
        if not unconsumed:
            self.whole = whole
        else:
            if unconsumed > MAX_QUERY_BUFFER:
                raise RequestError("ERR Protocol error: query buffer limit reached")
            if before == 0 or len(commands) > first_new:
                self._check.reset()
                self._check.walk(data[len(data) - unconsumed :] if unconsumed < len(data) else data)
            else:
                self._check.walk(data)

    def _parse_inline(self, data: bytes, commands: list[list[bytes]]) -> bytes:
        """Parse whole inline lines from the front of `data` into `commands`; return the rest."""
        buf = self._inline + data
        pos = 0
        while pos < len(buf) and buf[pos] != 42:  # b"*"
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > MAX_INLINE_LEN:
                    raise RequestError("ERR Protocol error: too big inline request")
                self._inline = buf[pos:]
                return b""
            argv = buf[pos:nl].split()
            if argv:
                commands.append(argv)
            pos = nl + 1
        self._inline = b""
        return buf[pos:]


_DIGITS = bytes(len(str(i)) for i in range(256))
_MAX_HEADER = 24


class _HeaderCheck:
    """Checks the headers of the one incomplete request, incrementally, as Redis would."""

    __slots__ = ("args_left", "skip", "fragment")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.args_left = -1  # -1: the multibulk header comes next
        self.skip = 0  # payload bytes (plus CRLF) still to pass over
        self.fragment = b""

    def walk(self, data: bytes) -> None:
        if self.fragment:  # an unfinished header line: only ever left when not skipping
            data = self.fragment + data
            self.fragment = b""
        pos, n = 0, len(data)
        while pos < n and self.args_left != 0:
            if self.skip:
                step = min(self.skip, n - pos)
                self.skip -= step
                pos += step
                continue
            nl = data.find(b"\r\n", pos)
            if nl < 0:
                self.fragment = data[pos:]
                if len(self.fragment) > _MAX_HEADER:
                    raise RequestError("ERR Protocol error: invalid header")
                return
            line = data[pos:nl]
            pos = nl + 2
            digits = line[1:]
            multibulk = self.args_left < 0
            if not digits.isdigit() or line[:1] != (b"*" if multibulk else b"$"):
                raise RequestError("ERR Protocol error: invalid header")
            value = int(digits)
            if multibulk:
                if value > MAX_MULTIBULK_LEN:
                    raise RequestError(TOO_MANY_ARGUMENTS)
                self.args_left = value
            else:
                if value > MAX_BULK_LEN:
                    raise RequestError("ERR Protocol error: invalid bulk length")
                self.args_left -= 1
                self.skip = value + 2


_BULK_HEADERS = [b"$%d\r\n" % n for n in range(1024)]


def encode_command(argv: list[bytes]) -> bytes:
    """RESP multibulk for argv. Per-command hot path: short forms are spelled out."""
    n = len(argv)
    if n == 2:
        a, b = argv
        return b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(a), a, len(b), b)
    if n == 3:
        a, b, c = argv
        return b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(a), a, len(b), b, len(c), c)
    out = [b"*%d\r\n" % n]
    for a in argv:
        size = len(a)
        out.append(_BULK_HEADERS[size] if size < 1024 else b"$%d\r\n" % size)
        out.append(a)
        out.append(b"\r\n")
    return b"".join(out)


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
_KIND_BY_BYTE = tuple(_KIND)  # a tuple indexes faster than a list


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
        found, end = self.next_ends(buf, 1)
        return end if found else -1

    def next_ends(self, buf: bytes | bytearray, count: int) -> tuple[int, int]:
        """Scan on until `count` more replies are complete, or the bytes run out: how many
        completed, and the end offset of the last of them (-1 if none)."""
        found = 0
        last = -1
        pos = self.pos
        stack = self.open
        n = len(buf)
        kind_of = _KIND_BY_BYTE
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
                    elements = int(buf[pos + 1 : nl])
                except ValueError:
                    raise BackendProtocolError(bytes(buf[pos : nl + 2])) from None
                pos = nl + 2
                if kind != _AGG:
                    elements *= 2
                    if kind == _ATTR:
                        elements += 1  # an attribute map is followed by the reply it annotates
                if elements > 0:
                    stack.append(elements)
                    continue
            # one element is complete; close every aggregate it completes
            while stack:
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            if not stack:
                found += 1
                last = pos
                if found == count:
                    break
        self.pos = pos
        return found, last

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
