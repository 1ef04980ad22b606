"""Online resharding speed and impact: Moonmesh against native Redis Cluster, on the same data,
in the same run.

    .venv/bin/python tools/bench_migration.py [--keys 2000000] [--value-size 512]
                                              [--cases 2to3,3to4,4to3] [--json]

Cases (--cases, comma-separated; default 2to3,3to4,4to3):
  2to3     Moonmesh `scale` 2 -> 3 shards; native: 2 masters, `redis-cli --cluster reshard`
           of 5461 slots (a third) from all to a new empty master
  3to4     Moonmesh `scale` 3 -> 4; native: 3 masters and an empty one,
           `redis-cli --cluster rebalance --cluster-use-empty-masters`
  4to3     Moonmesh `scale` 4 -> 3 (scale-in: the last shard gives its slots away); native:
           4 masters, `redis-cli --cluster rebalance --cluster-weight <4th>=0`
  bigkeys  not in the default list (heavy): the 2to3 data plus, in slots that move, a hash of
           --bigkeys-elements fields, a zset, a list and a set of as many elements and a
           --bigkeys-string-mb MB string; Moonmesh 2 -> 3 only; their counts and a sample of
           their contents are compared at the target

Every case loads `--keys` distinct keys (`key:<12 digits>`) of `--value-size` bytes straight
into the backends' Redis (the same bytes for both systems; loading is not timed), then runs one
redis-py RedisCluster client doing GET/SET (3:1) of those keys for --phase-seconds before, during
the move, and --phase-seconds after, recording each operation's latency. Native clusters are
built by hand (CLUSTER ADDSLOTSRANGE / MEET) with the same even slot split as Moonmesh.

Per case and system it prints one table row: keys, keys moved (the sum of the backends' DBSIZE
gains), time (Moonmesh: from the scale's commit until the view has no migrations and every
node applied it; native: the redis-cli run), keys/s, MB/s (moved keys x value size),
speedup (native time / Moonmesh time), client ops/s, p50 and p99 ms before / during / after,
client errors (by type below the table; a GET that returns neither the loaded nor the last
written value counts as one), the checker's verdict and the longest source Redis stall.

The checker reads every backend directly after the move: SCAN of every key (each must be in a
slot its shard owns; a copy anywhere else is "misplaced"), every `--keys` key present exactly
once ("lost" otherwise), every value equal to the loaded one or the one the client last wrote
("wrong"), DBSIZE summed. The stall probe: during each move a separate process PINGs every
source Redis (not through a proxy) every --probe-interval seconds and keeps the longest round
trip; LATENCY LATEST (latency-monitor-threshold 10 ms, reset before the move) is read after.

Everything runs on loopback and is stopped at the end; every wait is bounded by --timeout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from binascii import crc_hqx
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import hiredis
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.slots import SLOT_COUNT, key_slot  # noqa: E402
from core.view import ClusterView, even_split  # noqa: E402
from mesh.store.etcd import EtcdStore  # noqa: E402
from mesh.store.repo import MeshRepo  # noqa: E402
from tools.launch import HOST, Launcher, Process, free_port, port_free, proxy_argv  # noqa: E402
from tools.umctl_mesh import ops  # noqa: E402

CASES = {"2to3": (2, 3), "3to4": (3, 4), "4to3": (4, 3), "bigkeys": (2, 3)}
DEFAULT_CASES = "2to3,3to4,4to3"
MESH_NODES = 4  # the most shards any case has
LOAD_CHUNK = 10_000  # keys per chunk written to `redis-cli --pipe`
SCAN_COUNT = 2000
SETTLE_POLL = 0.05  # s between reads of the view while a Moonmesh migration runs
BIG_CHUNK = 1000  # elements per command loading a big key
BIG_STRING_BLOCK = 1 << 20
BIG_SAMPLE = 1000
LATENCY_THRESHOLD_MS = 10


def key_name(i: int) -> bytes:
    return b"key:%012d" % i


def loaded_value(key: bytes, size: int) -> bytes:
    """The value loaded into `key`: its name in it, so a value under another key shows."""
    return (b"L" + key + b"." * size)[:size]


def written_value(key: bytes, size: int) -> bytes:
    """The value the client load SETs (same size: MB/s stays exact)."""
    return (b"W" + key + b"." * size)[:size]


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def cli(port: int, *args: str, timeout: float = 30) -> str:
    return subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), *args], capture_output=True,
                          text=True, check=True, timeout=timeout).stdout.strip()


def direct(port: int, timeout: float = 60) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=timeout)


def pipe_in(port: int, commands: Iterable[bytes], timeout: float) -> int:
    """Send RESP `commands` to a Redis with `redis-cli --pipe` (killed after `timeout` s);
    returns the replies counted. Its output goes to a file: error replies, one line each, could
    fill a pipe and stop it reading its input."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(["redis-cli", "-h", HOST, "-p", str(port), "--pipe",
                                 "--pipe-timeout", str(max(1, int(timeout)))],
                                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        assert proc.stdin is not None
        try:
            with contextlib.suppress(BrokenPipeError):
                for chunk in commands:
                    proc.stdin.write(chunk)
                proc.stdin.close()
            proc.wait(timeout)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0 or "errors: 0," not in text:
        raise SystemExit(f"loading into {port} failed (exit {proc.returncode}): "
                         f"{text[:300]} ... {text[-300:]}")
    return int(text.rpartition("replies: ")[2].split()[0])


def slots_of_keys(keys: int) -> array:
    return array("H", (crc_hqx(key_name(i), 0) & (SLOT_COUNT - 1) for i in range(keys)))


def load(owner: list[int], slots: array, keys: int, size: int, timeout: float) -> None:
    """Every key SET straight into the Redis that owns its slot (`owner[slot]` = its port)."""
    by_port: dict[int, list[int]] = {}
    for i in range(keys):
        by_port.setdefault(owner[slots[i]], []).append(i)

    # one SET as a bytes template of the key's number (twice: the value has the name in it)
    template = (b"*3\r\n$3\r\nSET\r\n$16\r\nkey:%012d\r\n$" + str(size).encode()
                + b"\r\nLkey:%012d" + b"." * (size - 17) + b"\r\n")
    if size < 17 or keys > 10**12 or template % (7, 7) != resp(
            b"SET", key_name(7), loaded_value(key_name(7), size)):
        template = b""  # a value too short to hold the name: the slow way

    def chunks(indexes: list[int]) -> Iterator[bytes]:
        for start in range(0, len(indexes), LOAD_CHUNK):
            part = indexes[start:start + LOAD_CHUNK]
            yield b"".join(template % (i, i) for i in part) if template else b"".join(
                resp(b"SET", k, loaded_value(k, size)) for k in map(key_name, part))

    for port, indexes in by_port.items():
        if pipe_in(port, chunks(indexes), timeout) != len(indexes):
            raise SystemExit(f"loading into {port}: not every key was acknowledged")


def dbsizes(ports: Iterable[int]) -> dict[int, int]:
    out = {}
    for p in ports:
        with direct(p) as r:
            out[p] = int(r.dbsize())
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- client load


class LoadMeter:
    """One RedisCluster client: GET/SET (3:1) of the loaded keys, each operation's latency
    recorded in the list of the phase it started in. Remembers which keys it wrote (and those
    whose SET failed: either value is right for them)."""

    PHASES = ("warmup", "before", "during", "after")

    def __init__(self, port: int, keys: int, size: int, rate: float, limit: float) -> None:
        self.port, self.keys, self.size, self.rate, self.limit = port, keys, size, rate, limit
        self.latencies: dict[str, list[float]] = {p: [] for p in self.PHASES}
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.errors: Counter[str] = Counter()
        self.written: set[int] = set()
        self.uncertain: set[int] = set()
        self.phase = "warmup"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="load", daemon=True)

    def start(self) -> None:
        self.started["warmup"] = time.perf_counter()
        self.thread.start()

    def switch(self, phase: str) -> None:
        now = time.perf_counter()
        self.ended[self.phase] = now
        self.started[phase] = now
        self.phase = phase

    def finish(self) -> None:
        self.ended[self.phase] = time.perf_counter()
        self.stop.set()
        self.thread.join(timeout=30)

    def run(self) -> None:
        from redis.cluster import RedisCluster

        rc = None
        deadline = time.monotonic() + self.limit
        try:
            rc = RedisCluster(host=HOST, port=self.port, socket_timeout=10)
            i = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                idx = i * 7919 % self.keys
                key = key_name(idx)
                phase = self.phase
                write = i % 4 == 0
                t0 = time.perf_counter()
                try:
                    if write:
                        rc.set(key, written_value(key, self.size))
                    else:
                        got = rc.get(key)
                    took = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001 - counted by type, never fatal
                    self.errors[type(exc).__name__] += 1
                    if write:
                        self.uncertain.add(idx)
                else:
                    self.latencies[phase].append(took)
                    if write:
                        self.written.add(idx)
                        self.uncertain.discard(idx)
                    elif not self.read_ok(idx, key, got):
                        self.errors["GET: wrong value" if got is not None else "GET: nil"] += 1
                i += 1
                if self.rate:
                    time.sleep(max(0.0, 1 / self.rate - (time.perf_counter() - t0)))
        except Exception as exc:  # noqa: BLE001 - the client could not even start
            self.errors[f"load stopped: {type(exc).__name__}: {exc}"] += 1
        finally:
            if rc is not None:
                rc.close()

    def read_ok(self, idx: int, key: bytes, got: object) -> bool:
        if idx in self.uncertain:
            return got in (loaded_value(key, self.size), written_value(key, self.size))
        expected = written_value if idx in self.written else loaded_value
        return got == expected(key, self.size)

    def stats(self, phase: str) -> dict[str, float]:
        lat = self.latencies[phase]
        seconds = max(self.ended.get(phase, 0) - self.started.get(phase, 0), 1e-6)
        return {"ops_per_sec": len(lat) / seconds, "p50_ms": percentile(lat, 0.5) * 1e3,
                "p99_ms": percentile(lat, 0.99) * 1e3}


# --------------------------------------------------------------------------- stall probe


# The stall probe runs in a process of its own (`python -c`, standard library only, so it
# starts at once), so that it shares no GIL with the client load: one thread per Redis port in
# argv[4:] of host argv[1] sends PING, waits for the reply, sleeps argv[2] s, and keeps the
# longest round trip, until its stdin closes (or argv[3] s pass); then prints
# {port: {max_ms, pings, error}} as JSON.
PROBE_SOURCE = r"""
import json, socket, sys, threading, time
host, interval, limit = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
ports = [int(p) for p in sys.argv[4:]]
socks = {}
for port in ports:
    s = socket.create_connection((host, port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    socks[port] = s
stop, results, deadline = threading.Event(), {}, time.monotonic() + limit
def one(port, s):
    longest, pings, error = 0.0, 0, ""
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            t0 = time.perf_counter()
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                data = s.recv(64)
                if not data:
                    raise OSError("connection closed")
                reply += data
            longest = max(longest, time.perf_counter() - t0)
            pings += 1
            if interval:
                time.sleep(interval)
    except OSError as exc:
        error = str(exc)
    results[port] = {"max_ms": longest * 1e3, "pings": pings, "error": error}
threads = [threading.Thread(target=one, args=item, daemon=True) for item in socks.items()]
for t in threads:
    t.start()
print("ready", flush=True)
sys.stdin.read()
stop.set()
for t in threads:
    t.join(70)
print(json.dumps(results), flush=True)
"""


def higher_priority() -> None:
    """In the probe, before exec: scheduled ahead of the rest where allowed (root), so that
    what it measures is the Redis more than its own wait for a core."""
    with contextlib.suppress(OSError):
        os.nice(-10)


class StallProbe:
    """The longest PING round trip to each of `ports` while it runs (PROBE_SOURCE)."""

    def __init__(self, ports: list[int], interval: float, limit: float) -> None:
        self.ports = ports
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE_SOURCE, HOST, str(interval),
                                      str(limit), *map(str, ports)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=higher_priority)
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], 30)[0]
        if not ready or self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise SystemExit("the stall probe did not start")

    def result(self) -> dict[int, dict]:
        try:
            out, _ = self.proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            self.close()
            return {}
        return {int(p): r for p, r in json.loads(out.strip() or "{}").items()}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def latency_reset(ports: Iterable[int]) -> None:
    for p in ports:
        with direct(p) as r:
            r.config_set("latency-monitor-threshold", LATENCY_THRESHOLD_MS)
            r.execute_command("LATENCY", "RESET")


def latency_latest(ports: Iterable[int]) -> tuple[int, str]:
    """The largest `max` of LATENCY LATEST over `ports`, and its event (and port)."""
    best, what = 0, ""
    for p in ports:
        with direct(p) as r:
            for event, _, _, worst in r.execute_command("LATENCY", "LATEST"):
                if int(worst) > best:
                    best, what = int(worst), f"{event.decode()}@{p}"
    return best, what


# --------------------------------------------------------------------------- the checker


@dataclass
class Verdict:
    checked: int = 0
    lost: int = 0
    wrong: int = 0
    misplaced: int = 0
    unexpected: int = 0
    dbsize: int = 0
    big: list[str] = field(default_factory=list)  # big keys that differ, and how
    big_keys: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.wrong or self.misplaced or self.unexpected or self.big) \
            and self.dbsize == self.checked + self.big_keys

    def line(self) -> str:
        head = "OK" if self.ok else "FAILED"
        extra = f", {self.unexpected} unexpected" if self.unexpected else ""
        extra += f", DBSIZE sum {self.dbsize}" if self.dbsize != self.checked + self.big_keys \
            else ""
        extra += "".join(f"; {b}" for b in self.big)
        return (f"verdict: {head} ({self.checked} keys checked, {self.lost} lost, "
                f"{self.wrong} wrong, {self.misplaced} misplaced{extra})")


def get_many(sock: socket.socket, reader: hiredis.Reader, names: list[bytes]) -> list:
    """GET every one of `names`, pipelined on a plain socket (a 2M-key check in seconds, not
    a minute: no command objects)."""
    sock.sendall(b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(n), n) for n in names))
    replies: list = []
    while len(replies) < len(names):
        reply = reader.gets()
        if reply is False:  # not a whole reply yet (a nil is None)
            data = sock.recv(1 << 20)
            if not data:
                raise OSError("connection closed")
            reader.feed(data)
        else:
            replies.append(reply)
    return replies


def check(owner: list[int], ports: Iterable[int], keys: int, size: int, meter: LoadMeter,
          big: dict[bytes, BigKey] | None = None) -> Verdict:
    """Every key of every backend in `ports` read directly: in a slot its backend owns
    (`owner[slot]` = the owning port, 0: nobody), every loaded key found once at its owner
    with the right value."""
    v = Verdict(checked=keys, big_keys=len(big or {}))
    where = array("H", bytes(2 * keys))  # the port a key was found at, at its owner
    for port in ports:
        with direct(port) as r, socket.create_connection((HOST, port), timeout=60) as raw:
            v.dbsize += int(r.dbsize())
            reader = hiredis.Reader()
            cursor = 0
            while True:
                cursor, names = r.scan(cursor, count=SCAN_COUNT)
                batch = []
                for name in names:
                    if owner[key_slot(name)] != port:
                        v.misplaced += 1
                    elif name.startswith(b"key:") and name[4:].isdigit() \
                            and int(name[4:]) < keys:
                        idx = int(name[4:])
                        if where[idx] != port:  # SCAN may return a key twice
                            where[idx] = port
                            batch.append(idx)
                    elif big is None or name not in big:
                        v.unexpected += 1
                for idx, got in zip(batch, get_many(raw, reader, [key_name(i) for i in batch])):
                    if not meter.read_ok(idx, key_name(idx), got):
                        v.wrong += 1
                if cursor == 0:
                    break
    v.lost = where.count(0)
    for name, bk in (big or {}).items():
        problem = bk.verify(owner[key_slot(name)])
        if problem:
            v.big.append(f"{name.decode()}: {problem}")
    return v


# --------------------------------------------------------------------------- big keys


@dataclass
class BigKey:
    name: bytes
    kind: str  # hash, zset, list, set, string
    elements: int  # elements, or bytes of a string

    def commands(self) -> Iterator[bytes]:
        n, k = self.elements, self.name
        if self.kind == "string":
            for j in range(n // BIG_STRING_BLOCK):
                yield resp(b"APPEND", k, self.block(j))
            return
        verb = {"hash": b"HSET", "zset": b"ZADD", "list": b"RPUSH", "set": b"SADD"}[self.kind]
        for start in range(0, n, BIG_CHUNK):
            args: list[bytes] = []
            for i in range(start, min(n, start + BIG_CHUNK)):
                args.extend(self.element(i))
            yield resp(verb, k, *args)

    def element(self, i: int) -> tuple[bytes, ...]:
        return {"hash": (b"f%d" % i, b"v%d" % i), "zset": (b"%d" % i, b"m%d" % i),
                "list": (b"e%d" % i,), "set": (b"s%d" % i,)}[self.kind]

    @staticmethod
    def block(j: int) -> bytes:
        return (b"%07d|" % j) * (BIG_STRING_BLOCK // 8)

    @property
    def payload(self) -> int:
        if self.kind == "string":
            return self.elements
        return sum(len(x) for i in range(self.elements) for x in self.element(i))

    def verify(self, port: int) -> str:
        """'' when the key at `port` has the count and a sample of the contents it was loaded
        with, else what differs."""
        if not port:
            return "its slot has no owner"
        rng = random.Random(self.name)
        n = self.elements
        sample = sorted(rng.randrange(n) for _ in range(min(BIG_SAMPLE, n)))
        with direct(port) as r:
            kind = r.type(self.name).decode()
            if kind == "none":
                return f"missing at its owner {port}"
            if kind != self.kind:
                return f"type {kind}, not {self.kind}"
            if self.kind == "string":
                blocks = n // BIG_STRING_BLOCK
                if r.strlen(self.name) != blocks * BIG_STRING_BLOCK:
                    return f"STRLEN {r.strlen(self.name)}"
                for j in sorted(rng.randrange(blocks) for _ in range(min(BIG_SAMPLE, blocks))):
                    off = j * BIG_STRING_BLOCK + rng.randrange(BIG_STRING_BLOCK // 8) * 8
                    if r.getrange(self.name, off, off + 7) != b"%07d|" % j:
                        return f"bytes at {off} differ"
                return ""
            count = {"hash": r.hlen, "zset": r.zcard, "list": r.llen, "set": r.scard}[self.kind]
            if count(self.name) != n:
                return f"{count(self.name)} elements, not {n}"
            if self.kind == "hash":
                got = r.hmget(self.name, [b"f%d" % i for i in sample])
                bad = [i for i, g in zip(sample, got) if g != b"v%d" % i]
            elif self.kind == "zset":
                got = r.zmscore(self.name, [b"m%d" % i for i in sample])
                bad = [i for i, g in zip(sample, got) if g != float(i)]
            elif self.kind == "set":
                got = r.smismember(self.name, [b"s%d" % i for i in sample])
                bad = [i for i, g in zip(sample, got) if not g]
            else:
                pipe = r.pipeline(transaction=False)
                for i in sample:
                    pipe.lindex(self.name, i)
                bad = [i for i, g in zip(sample, pipe.execute()) if g != b"e%d" % i]
        return f"{len(bad)} of {len(sample)} sampled elements differ" if bad else ""


def big_keys(moving: set[int], elements: int, string_mb: int) -> dict[bytes, BigKey]:
    """One big key of each kind, named so that its slot is among `moving`."""
    out = {}
    for kind in ("hash", "zset", "list", "set", "string"):
        n = 0
        while key_slot(b"big:%s:%d" % (kind.encode(), n)) not in moving:
            n += 1
        name = b"big:%s:%d" % (kind.encode(), n)
        size = string_mb * BIG_STRING_BLOCK if kind == "string" else elements
        out[name] = BigKey(name, kind, size)
    return out


# --------------------------------------------------------------------------- one run


@dataclass
class Row:
    case: str
    system: str
    keys: int
    moved: int
    seconds: float
    moved_bytes: int
    phases: dict[str, dict[str, float]]
    errors: dict[str, int]
    verdict: str
    ok: bool
    stall_ms: float  # the probe's longest PING to a source Redis
    latency_ms: int  # LATENCY LATEST's largest max on a source Redis
    latency_event: str
    target_latency_ms: int
    speedup: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def keys_per_sec(self) -> float:
        return self.moved / max(self.seconds, 1e-9)

    @property
    def mb_per_sec(self) -> float:
        return self.moved_bytes / max(self.seconds, 1e-9) / 1e6


def measure(args: argparse.Namespace, case: str, system: str, entry: int, ports: list[int],
            sources: list[int], move: Callable[[], float],
            owner_after: Callable[[], list[int]],
            big: dict[bytes, BigKey] | None = None) -> Row:
    """The load before / during `move()` (which returns its own duration) / after, the stall
    probe on `sources` during it, then the checker on `ports`."""
    latency_reset(ports)
    before = dbsizes(ports)
    meter = LoadMeter(entry, args.keys, args.value_size, args.load_rate, args.timeout)
    probe: StallProbe | None = None
    stalls: dict[int, dict] = {}
    meter.start()
    try:
        time.sleep(0.5)
        meter.switch("before")
        time.sleep(args.phase_seconds)
        probe = StallProbe(sources, args.probe_interval, args.timeout)
        latency_reset(ports)
        meter.switch("during")
        seconds = move()
        meter.switch("after")
        stalls = probe.result()
        probe = None
        time.sleep(args.phase_seconds)
    finally:
        meter.finish()
        if probe is not None:
            probe.close()
    after = dbsizes(ports)
    moved = sum(max(0, after[p] - before.get(p, 0)) for p in ports)
    targets = [p for p in ports if p not in sources]
    latency, event = latency_latest(sources)
    target_latency, _ = latency_latest(targets)
    verdict = check(owner_after(), ports, args.keys, args.value_size, meter, big)
    big_moved = sum(b.payload for b in (big or {}).values())
    stall = max((s["max_ms"] for s in stalls.values()), default=0.0)
    pings = sum(s["pings"] for s in stalls.values())
    notes = [verdict.line(),
             f"longest source Redis stall: {stall:.1f} ms (probe, {pings} PINGs), "
             f"LATENCY LATEST max {latency} ms" + (f" ({event})" if event else "")
             + f"; targets' LATENCY LATEST max {target_latency} ms"]
    notes += [f"probe error at {p}: {s['error']}" for p, s in stalls.items() if s["error"]]
    if big:
        notes.append("big keys: " + ", ".join(
            f"{b.name.decode()} ({b.elements} {'bytes' if b.kind == 'string' else 'elements'})"
            for b in big.values()) + (f", counts and {BIG_SAMPLE} sampled elements equal at "
                                      "their new owner" if not verdict.big else ""))
    if meter.errors:
        notes.append("client errors: " + ", ".join(f"{n} {kind}" for kind, n
                                                   in meter.errors.most_common()))
    return Row(case, system, args.keys, moved, seconds,
               moved * args.value_size + (big_moved if big else 0),
               {p: meter.stats(p) for p in ("before", "during", "after")},
               dict(meter.errors), "OK" if verdict.ok else "FAILED", verdict.ok,
               stall, latency, event,
               target_latency, notes=notes)


# --------------------------------------------------------------------------- Moonmesh


class Mesh:
    """etcd and MESH_NODES mesh nodes (a redis-server behind a mesh-proxy each), reused by every
    case: a case creates its own cluster on them (a new cluster empties the backends), and
    deletes it when done."""

    def __init__(self, args: argparse.Namespace, launcher: Launcher) -> None:
        self.args, self.launcher = args, launcher
        self.etcd = launcher.etcd(name="mesh-etcd").addr
        self.backend_of: dict[str, int] = {}  # proxy address -> its Redis's port
        rate = [] if args.migration_rate is None else ["--migration-rate",
                                                       str(args.migration_rate)]
        proxies: list[Process] = []
        for i in range(MESH_NODES):
            backend = launcher.redis(name=f"mesh-redis-{i}")
            port = free_port()
            p = launcher.process(f"mesh-proxy-{i}", proxy_argv(
                port, backend.addr, "--etcd", self.etcd, "--log-level", "warning", *rate), port)
            p.backend = backend
            p.spawn()
            proxies.append(p)
            self.backend_of[p.addr] = backend.port
        for p in proxies:
            p.wait_listening()
        self.ports = list(self.backend_of.values())

    def run(self, fn: Callable[[EtcdStore], Any]) -> Any:
        async def go() -> Any:
            async with EtcdStore(self.etcd) as store:
                with anyio.fail_after(self.args.timeout):
                    return await fn(store)
        return anyio.run(go)

    def backend(self, view: ClusterView, node: str) -> int:
        return int(view.address_of(node).backend.rpartition(":")[2])

    def owner(self, view: ClusterView) -> list[int]:
        owner = [0] * SLOT_COUNT
        for shard in view.shards:
            port = self.backend(view, shard.master)
            for a, b in shard.slots:
                owner[a:b + 1] = [port] * (b - a + 1)
        return owner

    def create(self, name: str, shards: int) -> ClusterView:
        async def go(store: EtcdStore) -> ClusterView:
            while len((await ops.read_pool(store)).free()) < MESH_NODES:
                await anyio.sleep(0.1)
            view = await ops.create_cluster(store, name, shards, 0, None)
            if await ops.wait_applied(store, view, self.args.timeout):
                raise SystemExit(f"cluster {name} was not applied in {self.args.timeout} s")
            return view
        return self.run(go)

    def delete(self, name: str) -> None:
        self.run(lambda store: ops.delete_cluster(store, name, False))
        for p in self.ports:  # empty now, not when a node joins the next cluster (timed)
            with direct(p) as r:
                r.flushall()

    def settle(self, name: str, shards: int) -> tuple[float, ClusterView, list[str]]:
        """Scale `name` to `shards`; returns the seconds from the scale's commit until the view
        has no migrations and every node applied it (ops.wait_migrations' condition, read every
        SETTLE_POLL s), the final view, and the errors the sources reported meanwhile."""
        async def go(store: EtcdStore) -> tuple[float, ClusterView, list[str]]:
            repo = MeshRepo(store)
            started = time.perf_counter()
            await ops.scale_cluster(store, name, shards, False)
            errors: set[str] = set()
            while True:
                stored = await repo.view(name)
                assert stored is not None
                view = stored.view
                statuses = await repo.statuses()
                errors |= {f"{mid}: {p.error}" for st in statuses.values()
                           for mid, p in st.migrations.items() if p.error}
                if not view.migrations and all(
                        (st := statuses.get(n)) is not None
                        and st.applied(view.cluster, view.uid) >= view.epoch
                        for n in view.node_ids):
                    return time.perf_counter() - started, view, sorted(errors)
                await anyio.sleep(SETTLE_POLL)
        try:
            return self.run(go)
        except TimeoutError:
            raise SystemExit(f"{name}: the migrations did not finish in "
                             f"{self.args.timeout} s") from None

    def case(self, case: str, slots: array) -> Row:
        args = self.args
        frm, to = CASES[case]
        name = f"bench-{case}"
        view = self.create(name, frm)
        entry = int(view.address_of(view.shards[0].master).proxy.rpartition(":")[2])
        _, planned = self.run(lambda store: ops.scale_cluster(store, name, to, True))
        shard_ids = {s.id: s for s in view.shards}
        sources = sorted({self.backend(view, shard_ids[m.source].master)
                          for m in planned.migrations})
        moving = {s for m in planned.migrations for a, b in m.slots for s in range(a, b + 1)}
        owner = self.owner(view)
        load(owner, slots, args.keys, args.value_size, args.timeout)
        big = None
        if case == "bigkeys":
            big = big_keys(moving, args.bigkeys_elements, args.bigkeys_string_mb)
            for bk in big.values():
                pipe_in(owner[key_slot(bk.name)], bk.commands(), args.timeout)
        final: list[ClusterView] = []
        errors: list[str] = []

        def move() -> float:
            seconds, view, errs = self.settle(name, to)
            final.append(view)
            errors.extend(errs)
            return seconds

        row = measure(args, case, "moonmesh", entry, self.ports, sources, move,
                      lambda: self.owner(final[0]), big)
        row.notes += [f"mover error: {e}" for e in errors]
        self.delete(name)
        return row


# --------------------------------------------------------------------------- native


def native_cluster(launcher: Launcher, case: str, with_slots: int, empty: int,
                   timeout: float) -> list[int]:
    """`with_slots` masters holding an even split of the slots (as Moonmesh creates them) and
    `empty` masters without slots, joined by hand; waits until redis-cli sees them agree."""
    ports = []
    for i in range(with_slots + empty):
        port = free_port(below=55000)
        while not port_free(port + 10000):  # the cluster bus listens on port + 10000
            port = free_port(below=55000)
        name = f"native-{case}-{i}"
        d = launcher.data_dir(name)
        launcher.redis(port, "--cluster-enabled", "yes", "--cluster-config-file",
                       str(d / "nodes.conf"), name=name)
        ports.append(port)
    for i, port in enumerate(ports):
        cli(port, "CLUSTER", "SET-CONFIG-EPOCH", str(i + 1))
    for port, ranges in zip(ports, even_split(with_slots)):
        for a, b in ranges:
            cli(port, "CLUSTER", "ADDSLOTSRANGE", str(a), str(b))
    for port in ports[1:]:
        cli(port, "CLUSTER", "MEET", HOST, str(ports[0]))
    deadline = time.monotonic() + timeout
    while True:
        nodes = [cli(p, "CLUSTER", "NODES") for p in ports]
        if all(n.count("master") == len(ports) and "handshake" not in n and "fail" not in n
               for n in nodes) \
                and all("cluster_state:ok" in cli(p, "CLUSTER", "INFO") for p in ports):
            check = subprocess.run(["redis-cli", "--cluster", "check", f"{HOST}:{ports[0]}"],
                                   capture_output=True, text=True, timeout=timeout)
            if check.returncode == 0 and "All nodes agree" in check.stdout:
                return ports
        if time.monotonic() > deadline:
            raise SystemExit(f"native cluster {case} did not form in {timeout} s")
        time.sleep(0.2)


def native_owner(port: int) -> list[int]:
    """Slot -> owning port from one node's CLUSTER NODES."""
    owner = [0] * SLOT_COUNT
    for line in cli(port, "CLUSTER", "NODES").splitlines():
        parts = line.split()
        node_port = int(parts[1].split("@")[0].rpartition(":")[2])
        for r in parts[8:]:
            if r.startswith("["):  # a migrating / importing marker
                continue
            a, _, b = r.partition("-")
            owner[int(a):int(b or a) + 1] = [node_port] * (int(b or a) - int(a) + 1)
    return owner


def native_case(args: argparse.Namespace, launcher: Launcher, case: str, slots: array,
                moonmesh: Row | None) -> Row:
    frm, to = CASES[case]
    ports = native_cluster(launcher, case, frm, max(0, to - frm), args.timeout)
    entry = ports[0]
    load(native_owner(entry), slots, args.keys, args.value_size, args.timeout)
    common = ["--cluster-yes", "--cluster-pipeline", str(args.native_pipeline)]
    if to > frm and frm == 2:
        system = "native reshard"
        command = ["reshard", f"{HOST}:{entry}", "--cluster-from", "all", "--cluster-to",
                   cli(ports[-1], "CLUSTER", "MYID"),
                   "--cluster-slots", str(SLOT_COUNT // to), *common]
        sources = ports[:frm]
    elif to > frm:
        system = "native rebalance"
        command = ["rebalance", f"{HOST}:{entry}", "--cluster-use-empty-masters", *common]
        sources = ports[:frm]
    else:
        system = "native rebalance"
        command = ["rebalance", f"{HOST}:{entry}", "--cluster-weight",
                   f"{cli(ports[-1], 'CLUSTER', 'MYID')}=0", *common]
        sources = ports[to:]

    def move() -> float:
        started = time.perf_counter()
        done = subprocess.run(["redis-cli", "--cluster", *command], capture_output=True,
                              text=True, timeout=args.timeout)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"redis-cli --cluster {command[0]} failed: "
                             f"{(done.stdout + done.stderr)[-1000:]}")
        return seconds

    row = measure(args, case, system, entry, ports, sources, move, lambda: native_owner(entry))
    launcher.stop(f"native-{case}-")
    if moonmesh is not None:
        moonmesh.speedup = row.seconds / max(moonmesh.seconds, 1e-9)
    return row


# --------------------------------------------------------------------------- output

STARTED = time.monotonic()


def progress(what: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {what}", file=sys.stderr, flush=True)



def slashed(phases: dict[str, dict[str, float]], what: str, fmt: str) -> str:
    return "/".join(format(phases[p][what], fmt) for p in ("before", "during", "after"))


def table(rows: list[Row]) -> str:
    head = (f"{'case':7} {'system':16} {'keys':>8} {'moved':>8} {'time s':>7} {'keys/s':>9} "
            f"{'MB/s':>6} {'ratio':>6} {'ops/s before/during/after':>26} "
            f"{'p50 ms b/d/a':>16} {'p99 ms b/d/a':>17} {'errors':>6} {'verdict':>7} "
            f"{'stall ms':>8}")
    lines = [head]
    for r in rows:
        ratio = f"{r.speedup:.2f}" if r.speedup is not None else "-"
        lines.append(
            f"{r.case:7} {r.system:16} {r.keys:>8} {r.moved:>8} {r.seconds:>7.2f} "
            f"{r.keys_per_sec:>9.0f} {r.mb_per_sec:>6.1f} {ratio:>6} "
            f"{slashed(r.phases, 'ops_per_sec', '.0f'):>26} "
            f"{slashed(r.phases, 'p50_ms', '.2f'):>16} {slashed(r.phases, 'p99_ms', '.2f'):>17} "
            f"{sum(r.errors.values()):>6} {r.verdict:>7} {r.stall_ms:>8.1f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=2_000_000, help="keys loaded per case "
                        "(default 2000000)")
    parser.add_argument("--value-size", type=int, default=512,
                        help="bytes per value (default 512)")
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help=f"comma-separated, of {', '.join(CASES)} (default {DEFAULT_CASES}; "
                             "bigkeys is heavy and only on request)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="bound, in seconds, of every wait (default 3600)")
    parser.add_argument("--migration-rate", type=int, default=None, metavar="KEYS/S",
                        help="passed to every mesh-proxy as --migration-rate (keys/s, 0: no "
                             "limit; default: not passed, the proxy's own default)")
    parser.add_argument("--native-pipeline", type=int, default=64,
                        help="redis-cli --cluster-pipeline: keys per MIGRATE (default 64)")
    parser.add_argument("--phase-seconds", type=float, default=3,
                        help="seconds of client load measured before and after each move "
                             "(default 3)")
    parser.add_argument("--load-rate", type=float, default=0,
                        help="client operations per second (default 0: as fast as the one "
                             "client goes)")
    parser.add_argument("--probe-interval", type=float, default=0.002,
                        help="seconds between a stall-probe PING's reply and the next PING: a "
                             "stall is measured at most this much short (default 0.002; 0: a "
                             "tight loop, which takes a core of its own)")
    parser.add_argument("--bigkeys-elements", type=int, default=1_000_000,
                        help="elements of each big hash, zset, list and set (default 1000000)")
    parser.add_argument("--bigkeys-string-mb", type=int, default=100,
                        help="MiB of the big string (default 100)")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.keys < 1 or args.value_size < 1:
        parser.error("--keys and --value-size must be positive")

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    rows: list[Row] = []
    launcher = Launcher(prefix="moonmesh-bench-migration-", new_session=True,
                        die_with_parent=True)
    try:
        progress("starting the mesh")
        slots = slots_of_keys(args.keys)
        mesh = Mesh(args, launcher)
        for case in cases:
            progress(f"{case}: moonmesh")
            ours = mesh.case(case, slots)
            rows.append(ours)
            if case != "bigkeys":
                progress(f"{case}: native")
                rows.append(native_case(args, launcher, case, slots, ours))
        progress("done")
    except (Exception, SystemExit) as exc:  # the rows so far are still printed
        failure = f"{type(exc).__name__}: {exc}"
    else:
        failure = ""
    finally:
        with contextlib.suppress(Exception):
            launcher.cleanup()

    rate = "proxy default" if args.migration_rate is None else str(args.migration_rate)
    print(f"{args.keys} keys of {args.value_size} B per case; load: one redis-py RedisCluster "
          f"client, GET/SET 3:1{f' at {args.load_rate:g} ops/s' if args.load_rate else ''}; "
          f"moonmesh --migration-rate {rate}; native --cluster-pipeline {args.native_pipeline}; "
          "ratio = native time / moonmesh time")
    print(table(rows))
    for r in rows:
        for note in r.notes:
            print(f"{r.case} {r.system}: {note}")
    if args.json:
        print(json.dumps([{**asdict(r), "keys_per_sec": r.keys_per_sec,
                           "mb_per_sec": r.mb_per_sec} for r in rows]))
    if failure:
        print(f"the run stopped early: {failure}")
    # client errors fail the run for Moonmesh's rows only: redis-py itself sometimes raises
    # (an AttributeError) while native resharding moves slots, which is no fault of ours
    # and is shown in the native row's errors column
    return 0 if not failure and all(r.ok and not (r.errors and r.system == "moonmesh")
                                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
