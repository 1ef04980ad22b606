"""How long the chunked copy of a big key (proxy/chunked.py) blocks either Redis.

    .venv/bin/python tools/bench_chunked.py [--hash-fields 1000000] [--string-mb 100]
        [--replica] [--aof] [--compare-migrate] [--chunk-elements 1000]

Starts two redis-servers on loopback (a third as the target's replica with --replica; AOF on
with --aof, as deploy/ runs Redis), loads a hash of --hash-fields fields and a string of
--string-mb MB at the source, and copies each with `copy_in_chunks` while another process
PINGs every server every millisecond. Prints, per key: the copy's time, its round trips and
the slowest of them; per server the longest PING round trip (what any other client could have
waited: it also sees what no command timing shows, such as an AOF write), `LATENCY LATEST`
(latency-monitor-threshold 1 ms), and from the slowlog (every command is logged) each
command's p50 / p99 / max. --compare-migrate does the same for one `MIGRATE ... COPY REPLACE`
of each key. Every copy is checked with DEBUG DIGEST-VALUE. Takes about a minute with the
defaults; every process is stopped at the end. Wall-clock figures include whatever else the
host runs (its load average is printed).
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import time
from pathlib import Path

import anyio
import hiredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import proxy.chunked as chunked_module  # noqa: E402
from proxy.backend import BackendConnection  # noqa: E402
from proxy.chunked import CopyStats, copy_in_chunks  # noqa: E402
from tools.bench_migration import StallProbe  # noqa: E402
from tools.launch import HOST, Launcher  # noqa: E402

# every command goes to the slowlog (threshold 0): the report takes percentiles from it
REDIS_ARGS = ("--latency-monitor-threshold", "1", "--slowlog-log-slower-than", "0",
              "--slowlog-max-len", "1000000", "--enable-debug-command", "local")
SKIP = {b"PING", b"LATENCY", b"SLOWLOG", b"CONFIG", b"INFO", b"DEBUG"}
PROBE_INTERVAL = 0.001
PROBE_LIMIT = 600.0  # seconds a probe runs at most


class Client:
    """A small blocking RESP client (replies parsed by hiredis, errors raised)."""

    def __init__(self, port: int, timeout: float = 120) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.reader = hiredis.Reader()

    def many(self, commands: list[tuple]) -> list[object]:
        out = []
        for args in commands:
            parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
            out.append(b"*%d\r\n" % len(parts)
                       + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        self.sock.sendall(b"".join(out))
        replies: list[object] = []
        while len(replies) < len(commands):
            reply = self.reader.gets()
            if reply is False:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("closed")
                self.reader.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"{commands[len(replies)][:2]}: {reply}")
            replies.append(reply)
        return replies

    def __call__(self, *args: bytes | str | int) -> object:
        return self.many([args])[0]

    def close(self) -> None:
        self.sock.close()


class Prober:
    """The migration benchmark's stall probe (a process of its own, not this one's GIL) over
    named ports: the longest PING round trip, what any other client of that Redis waited."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.longest = dict.fromkeys(ports, 0.0)
        self.pings = dict.fromkeys(ports, 0)

    def __enter__(self) -> Prober:
        self.probe = StallProbe(list(self.ports.values()), PROBE_INTERVAL, PROBE_LIMIT)
        return self

    def __exit__(self, *exc: object) -> None:
        results = self.probe.result()
        for name, port in self.ports.items():
            got = results.get(port, {})
            self.longest[name], self.pings[name] = got.get("max_ms", 0.0) / 1e3, got.get("pings", 0)


def reset(clients: dict[str, Client]) -> None:
    for c in clients.values():
        c.many([(b"LATENCY", b"RESET"), (b"SLOWLOG", b"RESET")])


def server_report(name: str, c: Client, prober: Prober) -> str:
    """What the server saw: LATENCY LATEST, and from the slowlog (every command) how long
    each command took, p50 / p99 / max (the max may include the host's scheduling)."""
    latest = c(b"LATENCY", b"LATEST")
    assert isinstance(latest, list)
    events = ", ".join(f"{e[0].decode()} max {e[3]} ms" for e in latest) or "none >= 1 ms"
    log = c(b"SLOWLOG", b"GET", b"-1")
    assert isinstance(log, list)
    durations: dict[bytes, list[int]] = {}
    for entry in log:
        cmd = entry[3][0].upper()
        if cmd not in SKIP:
            durations.setdefault(cmd, []).append(entry[2])
    per = []
    for cmd, us in sorted(durations.items(), key=lambda item: -max(item[1])):
        us.sort()
        p50, p99 = us[len(us) // 2], us[min(len(us) - 1, len(us) * 99 // 100)]
        per.append(f"{cmd.decode()} {len(us)}x p50 {p50 / 1000:.2f} p99 {p99 / 1000:.2f} "
                   f"max {us[-1] / 1000:.2f}")
    return (f"    {name:7s} longest PING {prober.longest[name] * 1000:6.1f} ms "
            f"({prober.pings[name]} pings) | LATENCY LATEST: {events}\n"
            f"            commands (ms): {'; '.join(per[:6]) or '-'}")


async def chunked(source_port: int, target_port: int, key: bytes) -> tuple[int, CopyStats]:
    source = BackendConnection(HOST, source_port, False)
    target = BackendConnection(HOST, target_port, False)
    await source.connect()
    await target.connect()
    stats = CopyStats()
    try:
        copied = await copy_in_chunks(source, target, key, b"moonmesh:chunk:bench", stats=stats)
    finally:
        source.close()
        target.close()
    return copied, stats


def measure(what: str, key: bytes, ports: dict[str, int], clients: dict[str, Client],
            migrate: bool) -> None:
    src, dst = clients["source"], clients["target"]
    dst(b"UNLINK", key)
    time.sleep(0.2)  # let a lazy free of an earlier copy finish
    reset(clients)
    with Prober(ports) as prober:
        began = time.monotonic()
        if migrate:
            src(b"MIGRATE", HOST, ports["target"], key, 0, 120_000, b"COPY", b"REPLACE")
            note = "one MIGRATE COPY REPLACE"
        else:
            copied, stats = anyio.run(chunked, ports["source"], ports["target"], key)
            note = (f"{copied / 1e6:.1f} MB in {stats.steps} round trips; slowest round trip "
                    f"{stats.slowest * 1000:.1f} ms ({stats.slowest_step})")
        elapsed = time.monotonic() - began
        if "replica" in clients:  # until the replica has applied it all
            caught_up(clients["target"], clients["replica"])
        time.sleep(0.05)
    lines = [server_report(name, c, prober) for name, c in clients.items()]
    same = src(b"DEBUG", b"DIGEST-VALUE", key) == dst(b"DEBUG", b"DIGEST-VALUE", key)
    print(f"  {what}: {'chunked' if not migrate else 'MIGRATE'} {elapsed:.2f} s, {note}; "
          f"copy {'identical' if same else 'DIFFERENT'}")
    print("\n".join(lines))
    if not same:
        raise SystemExit(f"the copy of {key!r} differs")


def offset(c: Client, field: bytes) -> int:
    info = c(b"INFO", b"replication")
    assert isinstance(info, bytes)
    return int(info.split(field + b":")[1].split()[0])


def caught_up(master: Client, replica: Client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while offset(replica, b"slave_repl_offset") < offset(master, b"master_repl_offset"):
        if time.monotonic() > deadline:
            raise SystemExit("the replica did not catch up")
        time.sleep(0.01)


def load_hash(c: Client, key: bytes, fields: int) -> None:
    rng = random.Random(1)
    for start in range(0, fields, 100_000):
        c.many([(b"HSET", key, *[x for i in range(s, min(fields, s + 1000))
                                 for x in (b"field:%d" % i, rng.randbytes(rng.randint(8, 40)))])
                for s in range(start, min(fields, start + 100_000), 1000)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hash-fields", type=int, default=1_000_000)
    ap.add_argument("--string-mb", type=int, default=100)
    ap.add_argument("--replica", action="store_true", help="the target has a replica")
    ap.add_argument("--aof", action="store_true", help="appendonly yes (as deploy/ runs Redis)")
    ap.add_argument("--compare-migrate", action="store_true",
                    help="also time one MIGRATE COPY REPLACE of each key")
    ap.add_argument("--chunk-elements", type=int, default=chunked_module.CHUNK_ELEMENTS,
                    help="elements per step (proxy.chunked.CHUNK_ELEMENTS)")
    args = ap.parse_args()
    chunked_module.CHUNK_ELEMENTS = args.chunk_elements
    redis_args = REDIS_ARGS + (("--appendonly", "yes") if args.aof else ())
    launcher = Launcher(prefix="mm-bench-chunked-", die_with_parent=True)
    try:
        servers = {"source": launcher.redis(None, *redis_args, name="source"),
                   "target": launcher.redis(None, *redis_args, name="target")}
        if args.replica:
            servers["replica"] = launcher.redis(None, *redis_args, name="replica")
        ports = {name: p.port for name, p in servers.items()}
        clients = {name: Client(port) for name, port in ports.items()}
        if args.replica:
            clients["replica"](b"REPLICAOF", HOST, ports["target"])
            deadline = time.monotonic() + 30
            while b"master_link_status:up" not in clients["replica"](b"INFO", b"replication"):  # type: ignore[operator]
                if time.monotonic() > deadline:
                    raise SystemExit("the replica did not sync")
                time.sleep(0.1)
        info = clients["source"](b"INFO", b"server")
        assert isinstance(info, bytes)
        version = info.split(b"redis_version:")[1].split()[0].decode()
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; redis-server "
              f"{version}; {args.chunk_elements} elements a step"
              f"{'; the target has a replica' if args.replica else ''}{'; AOF on' if args.aof else ''}")
        keys = []
        if args.hash_fields:
            load_hash(clients["source"], b"big:hash", args.hash_fields)
            keys.append((f"hash of {args.hash_fields} fields", b"big:hash"))
        if args.string_mb:
            clients["source"](b"SET", b"big:string",
                              b"\r\n\x00" + random.Random(2).randbytes(args.string_mb * 1_000_000 - 3))
            keys.append((f"string of {args.string_mb} MB", b"big:string"))
        for what, key in keys:
            measure(what, key, ports, clients, migrate=False)
            if args.compare_migrate:
                measure(what, key, ports, clients, migrate=True)
        print(f"load average {os.getloadavg()[0]:.2f}")
    finally:
        launcher.cleanup()


if __name__ == "__main__":
    main()
