"""The client host's load: list-append and register operations through the proxies, every one
recorded.

List-append (chaos/history.py checks it): RPUSH of unique values, LRANGE, DEL of retired keys.
Registers (chaos/linearizable.py checks them): SET of unique values and GET on a fixed set of
keys. With `kind="both"` half the client threads run each, on distinct keys.

A small Redis Cluster client of its own (not redis-py's, which retries writes after timeouts
and would make the history lie): one command per operation on the slot owner's proxy;
`MOVED` and `ASK` are followed (the command did not run), and nothing else is retried. A reply
is an `ok`, a refusal that means the command did not run is a `fail`, and everything else (no
reply in time, a lost connection, `-UNCERTAIN`, an error we cannot prove harmless) is
`unknown`. Client threads enter the client's namespace before they open a socket.
"""
from __future__ import annotations

import random
import socket
import threading
import time

import hiredis

from chaos import netns
from chaos.history import History, Op
from core.slots import key_slot

OP_TIMEOUT = 1.5  # seconds for a reply
CONNECT_TIMEOUT = 0.5
# refusals the proxy or Redis gives before running a command
DEFINITE = ("CLUSTERDOWN", "TRYAGAIN", "NOAUTH", "CROSSSLOT", "READONLY", "LOADING",
            "MASTERDOWN", "ERR max number of clients")


class Definite(Exception):
    """The command certainly did not run."""


class Indefinite(Exception):
    """The command may or may not have run."""


def encode(*args: str | bytes) -> bytes:
    parts = [a if isinstance(a, bytes) else a.encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Conn:
    def __init__(self, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT)
        self.sock.settimeout(OP_TIMEOUT)
        self.reader = hiredis.Reader()

    def call(self, *args: str | bytes):  # noqa: ANN201
        self.sock.sendall(encode(*args))
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.reader.feed(data)

    def pipeline(self, commands: list[tuple[str | bytes, ...]]) -> list:
        """Send every command at once, then read their replies in order."""
        self.sock.sendall(b"".join(encode(*c) for c in commands))
        replies: list = []
        while len(replies) < len(commands):
            reply = self.reader.gets()
            if reply is not False:
                replies.append(reply)
                continue
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.reader.feed(data)
        return replies

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class ClusterClient:
    """Routes by a slot map read with CLUSTER SLOTS; one connection per node."""

    def __init__(self, seeds: list[str]) -> None:
        self.seeds = list(seeds)
        self.slots: list[str | None] = [None] * 16384
        self.conns: dict[str, Conn] = {}
        self.stale = True
        self.last_addr = ""  # the node that gave the last reply

    def conn(self, addr: str) -> Conn:
        c = self.conns.get(addr)
        if c is None:
            c = self.conns[addr] = Conn(addr)
        return c

    def drop(self, addr: str) -> None:
        c = self.conns.pop(addr, None)
        if c:
            c.close()

    def refresh(self) -> None:
        known = {a for a in self.slots if a} | set(self.seeds)
        for addr in random.sample(sorted(known), len(known)):
            try:
                reply = self.conn(addr).call("CLUSTER", "SLOTS")
            except (OSError, ConnectionError):
                self.drop(addr)
                continue
            if isinstance(reply, hiredis.ReplyError) or not reply:
                continue
            for entry in reply:
                start, end, master = entry[0], entry[1], entry[2]
                target = f"{master[0].decode()}:{master[1]}"
                for s in range(start, end + 1):
                    self.slots[s] = target
            self.stale = False
            return
        raise Definite("no node answered CLUSTER SLOTS")

    def call(self, key: str, *args: str):  # noqa: ANN201
        """Run one command for `key`; raises `Definite` or `Indefinite` when it failed."""
        if self.stale:
            self.refresh()
        addr = self.slots[key_slot(key.encode())]
        if addr is None:
            self.stale = True
            raise Definite("slot not covered")
        asking = False
        for _ in range(5):
            try:
                c = self.conn(addr)
            except OSError as exc:
                self.stale = True
                raise Definite(f"connect to {addr}: {exc}") from None
            try:
                if asking:
                    c.call("ASKING")
                reply = c.call(*args)
            except (OSError, ConnectionError) as exc:
                self.drop(addr)
                self.stale = True
                raise Indefinite(f"{addr}: {type(exc).__name__} {exc}") from None
            if not isinstance(reply, hiredis.ReplyError):
                self.last_addr = addr
                return reply
            msg = str(reply)
            if msg.startswith("MOVED "):
                addr = msg.split()[2]
                self.slots[key_slot(key.encode())] = addr
                self.stale = True
                asking = False
                continue
            if msg.startswith("ASK "):
                addr, asking = msg.split()[2], True
                continue
            if msg.startswith(DEFINITE):
                raise Definite(f"{addr}: {msg}")
            raise Indefinite(f"{addr}: {msg}")
        raise Definite("too many redirects")

    def close(self) -> None:
        for addr in list(self.conns):
            self.drop(addr)


KINDS = ("append", "register", "both")


class Workload:
    """`threads` clients. List-append ones append to and read a few live keys; now and then
    one key is retired with DEL (no append is started on it afterwards) and read again later.
    Register ones SET and GET `keys` registers."""

    def __init__(self, history: History, ns: str, seeds: list[str], tag: str, seed: int,
                 threads: int = 4, keys: int = 8, pace: float = 0.01,
                 kind: str = "append") -> None:
        if kind not in KINDS:
            raise ValueError(f"workload {kind!r} is none of {KINDS}")
        self.history, self.ns, self.seeds, self.tag = history, ns, seeds, tag
        self.rng = random.Random(seed)
        self.threads_n, self.pace, self.kind = threads, pace, kind
        self.lock = threading.Lock()
        self.next_key = 0
        lists, registers = kind in ("append", "both"), kind in ("register", "both")
        self.live: list[str] = [self._new_key() for _ in range(keys)] if lists else []
        self.registers: list[str] = [f"{tag}:r{i}" for i in range(keys)] if registers else []
        self.retired: list[str] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def _new_key(self) -> str:
        self.next_key += 1
        return f"{self.tag}:k{self.next_key}"

    def keys(self) -> list[str]:
        with self.lock:
            return self.live + self.retired + self.registers

    def in_use(self) -> list[str]:
        """The keys clients write now (live lists and the registers)."""
        with self.lock:
            return self.live + self.registers

    def start(self) -> Workload:
        for p in range(self.threads_n):
            registers = self.kind == "register" or (self.kind == "both" and p % 2 == 1)
            target = self._register_thread if registers else self._thread
            t = threading.Thread(target=target, args=(p, self.rng.randrange(1 << 30)),
                                 name=f"chaos-client-{p}", daemon=True)
            self.threads.append(t)
            t.start()
        return self

    def _thread(self, process: int, seed: int) -> None:
        try:
            netns.setns(self.ns)  # this thread only, for good
            rng = random.Random(seed)
            client = ClusterClient(self.seeds)
            counter = 0
            while not self.stop.is_set():
                x = rng.random()
                with self.lock:
                    if x < 0.01 and len(self.live) > 2:
                        key = self.live.pop(rng.randrange(len(self.live)))
                        self.live.append(self._new_key())
                        self.retired.append(key)
                        f = "del"
                    elif x < 0.05 and self.retired:
                        key, f = rng.choice(self.retired[-8:]), "read"
                    else:
                        key = rng.choice(self.live)
                        f = "append" if x < 0.65 else "read"
                if f == "append":
                    counter += 1
                    value = f"{process}.{counter}"
                    op = self.history.invoke(process, f, key, value)
                else:
                    op = self.history.invoke(process, f, key)
                if not self.run_op(client, op):
                    time.sleep(0.05)  # pacing after a failure: no hot loop on a dead node
                time.sleep(self.pace)
            client.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the runner
            self.errors.append(exc)

    def _register_thread(self, process: int, seed: int) -> None:
        try:
            netns.setns(self.ns)  # this thread only, for good
            rng = random.Random(seed)
            client = ClusterClient(self.seeds)
            counter = 0
            while not self.stop.is_set():
                key = rng.choice(self.registers)
                if rng.random() < 0.5:
                    counter += 1
                    op = self.history.invoke(process, "set", key, f"{process}.{counter}")
                else:
                    op = self.history.invoke(process, "get", key)
                if not self.run_op(client, op):
                    time.sleep(0.05)  # pacing after a failure: no hot loop on a dead node
                time.sleep(self.pace)
            client.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the runner
            self.errors.append(exc)

    def run_op(self, client: ClusterClient, op: Op) -> bool:
        try:
            if op.f == "append":
                reply = client.call(op.key, "RPUSH", op.key, op.value)  # type: ignore[arg-type]
            elif op.f == "read":
                reply = client.call(op.key, "LRANGE", op.key, "0", "-1")
                reply = [v.decode() for v in reply]
            elif op.f == "set":
                reply = client.call(op.key, "SET", op.key, op.value)  # type: ignore[arg-type]
                reply = reply.decode() if isinstance(reply, bytes) else reply
            elif op.f == "get":
                reply = client.call(op.key, "GET", op.key)
                reply = reply.decode() if isinstance(reply, bytes) else reply
            else:
                reply = client.call(op.key, "DEL", op.key)
        except Definite as exc:
            self.history.fail(op, str(exc))
            return False
        except Indefinite as exc:
            self.history.unknown(op, str(exc))
            return False
        self.history.ok(op, reply, client.last_addr)
        return True

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(OP_TIMEOUT * 4)

    def throughput(self, since: int) -> tuple[int, int]:
        """(ok, not ok) operations completed among those invoked after index `since`."""
        ops = self.history.ops[since:]
        ok = sum(1 for o in ops if o.status == "ok")
        return ok, sum(1 for o in ops if o.status in ("fail", "unknown"))

    def final_reads(self, timeout: float = 30) -> list[str]:
        """Read every key once more (retrying failures), as process 999; the keys that never
        answered are returned."""
        result: list[str] = []

        def reader() -> None:
            netns.setns(self.ns)
            client = ClusterClient(self.seeds)
            deadline = time.monotonic() + timeout
            for key in self.keys():
                f = "get" if key in self.registers else "read"
                while True:
                    op = self.history.invoke(999, f, key)
                    if self.run_op(client, op):
                        break
                    if time.monotonic() > deadline:
                        result.append(key)
                        break
                    time.sleep(0.2)
            client.close()

        t = threading.Thread(target=reader, name="chaos-final-reads")
        t.start()
        t.join()
        return result
