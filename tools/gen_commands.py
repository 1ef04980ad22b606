"""Generate proxy/command_table.py from a real redis-server's COMMAND reply.

Usage:
    python tools/gen_commands.py                 # start a throwaway redis-server, write the table
    python tools/gen_commands.py --port 6379     # read an already running server instead
    python tools/gen_commands.py --check         # exit 1 if the committed table is stale

The output is deterministic: commands are sorted by name, command flags and tips are
sorted, key specs keep Redis's order (the order is meaningful: it is the order in which
COMMAND GETKEYS reports the keys). Only the standard library is used (and tools/launch.py,
which uses nothing else).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.launch import HOST, Launcher, LaunchError  # noqa: E402  (standard library only)

DEFAULT_OUTPUT = os.path.join(ROOT, "proxy", "command_table.py")


# --------------------------------------------------------------------------- RESP2 client


class RespError(Exception):
    pass


class _Conn:
    def __init__(self, port: int, host: str = HOST, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.pos = 0

    def close(self) -> None:
        self.sock.close()

    def call(self, *args: bytes | str | int):
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        self.sock.sendall(b"*%d\r\n" % len(parts)
                          + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        return self._read()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = self.buf[self.pos:end]
                self.pos = end + 2
                return line
            self._fill()

    def _read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) - self.pos < n + 2:
                self._fill()
            data = self.buf[self.pos:self.pos + n]
            self.pos += n + 2
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RespError(f"unexpected reply type {line[:20]!r}")


# --------------------------------------------------------------------------- server handling


# --------------------------------------------------------------------------- conversion


def _pairs(flat: list) -> dict:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _key_spec(raw: list) -> tuple:
    """One Redis 7 key spec -> (key_flags, begin_search, find_keys).

    begin_search: ("index", pos) | ("keyword", KEYWORD, startfrom) | ("unknown",)
    find_keys:    ("range", lastkey, keystep, limit) | ("keynum", keynumidx, firstkey, keystep)
                  | ("unknown",)
    """
    d = _pairs(raw)
    flags = tuple(f.decode() for f in d[b"flags"])
    bs = _pairs(d[b"begin_search"])
    fk = _pairs(d[b"find_keys"])
    bs_type, bs_spec = bs[b"type"].decode(), _pairs(bs[b"spec"])
    fk_type, fk_spec = fk[b"type"].decode(), _pairs(fk[b"spec"])
    if bs_type == "index":
        begin: tuple = ("index", bs_spec[b"index"])
    elif bs_type == "keyword":
        begin = ("keyword", bs_spec[b"keyword"], bs_spec[b"startfrom"])
    elif bs_type == "unknown":
        begin = ("unknown",)
    else:
        raise ValueError(f"unsupported begin_search type {bs_type!r}")
    if fk_type == "range":
        find: tuple = ("range", fk_spec[b"lastkey"], fk_spec[b"keystep"], fk_spec[b"limit"])
    elif fk_type == "keynum":
        find = ("keynum", fk_spec[b"keynumidx"], fk_spec[b"firstkey"], fk_spec[b"keystep"])
    elif fk_type == "unknown":
        find = ("unknown",)
    else:
        raise ValueError(f"unsupported find_keys type {fk_type!r}")
    return (flags, begin, find)


def _walk(entries: list):
    for e in entries:
        yield e
        if len(e) > 9 and e[9]:
            yield from _walk(e[9])


def collect(conn: _Conn) -> tuple[str, list[tuple]]:
    info = conn.call("INFO", "server").decode()
    version = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                   if line.startswith("redis_version:"))
    rows = []
    for e in _walk(conn.call("COMMAND")):
        name, arity, flags, first, last, step = e[0], e[1], e[2], e[3], e[4], e[5]
        tips = e[7] if len(e) > 7 else []
        specs = e[8] if len(e) > 8 else []
        rows.append((
            name.upper(),
            arity,
            tuple(sorted(f.decode() for f in flags)),
            first, last, step,
            tuple(sorted(t.decode() for t in tips)),
            tuple(_key_spec(s) for s in specs),
        ))
    rows.sort(key=lambda r: r[0])
    names = [r[0] for r in rows]
    if len(set(names)) != len(names):
        raise ValueError("duplicate command names in COMMAND reply")
    return version, rows


HEADER = '''\
# GENERATED FILE - DO NOT EDIT BY HAND.
# Generated by tools/gen_commands.py from redis-server {version}
# ({count} commands including subcommands). Regenerate with:
#     python tools/gen_commands.py
"""Static Redis command table: plain data only; proxy/commands.py gives it meaning.

Each row of COMMAND_ROWS is
    (name, arity, flags, first_key, last_key, key_step, tips, key_specs)
name       upper-case bytes; a subcommand is b"CONTAINER|SUB" (e.g. b"OBJECT|ENCODING")
arity      Redis convention: > 0 exact argc (name included), < 0 minimum argc
flags      Redis command flag names, sorted
first_key, last_key, key_step
           the legacy key triple from COMMAND (0, 0, 0 when keyless)
tips       COMMAND tips (request_policy:..., response_policy:..., nondeterministic_output...)
key_specs  Redis 7 key specs in Redis's order, each (key_flags, begin_search, find_keys):
    begin_search  ("index", pos) | ("keyword", KEYWORD, startfrom) | ("unknown",)
    find_keys     ("range", lastkey, keystep, limit)
                  | ("keynum", keynumidx, firstkey, keystep) | ("unknown",)
"""

REDIS_VERSION = {version!r}

COMMAND_ROWS = (
'''


def render(version: str, rows: list[tuple]) -> str:
    out = [HEADER.format(version=version, count=len(rows))]
    for row in rows:
        out.append(f"    {row!r},\n")
    out.append(")\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, help="read a running redis-server on 127.0.0.1:PORT")
    ap.add_argument("--host", default=HOST)
    ap.add_argument("--output", default=DEFAULT_OUTPUT)
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if --output differs from what would be generated")
    args = ap.parse_args(argv)

    launcher = None
    port = args.port
    if port is None:  # a throwaway redis-server
        if not shutil.which("redis-server"):
            sys.exit("redis-server not found on PATH (or pass --port of a running server)")
        launcher = Launcher(prefix="gen-commands-")
        try:
            port = launcher.redis().port
        except LaunchError as exc:
            launcher.cleanup()
            sys.exit(str(exc))
    try:
        conn = _Conn(port, host=args.host)
        try:
            version, rows = collect(conn)
        finally:
            conn.close()
    finally:
        if launcher is not None:
            launcher.cleanup()

    text = render(version, rows)
    if args.check:
        try:
            with open(args.output) as f:
                current = f.read()
        except OSError:
            current = None
        if current != text:
            print(f"{args.output} is stale (redis-server {version})", file=sys.stderr)
            return 1
        print(f"{args.output} is current (redis-server {version}, {len(rows)} commands)")
        return 0
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: {len(rows)} commands from redis-server {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
