"""etcd access: the only importer of the etcd client (aetcd).

On top of aetcd: retries of transient failures (tenacity, here and nowhere else), a lease keeper
that reports loss at once, a watch that resumes from the last revision after a stream error or
an etcd restart and asks its caller to re-read after compaction, compare-and-swap writes, and
leader election on a kept-alive lease.
"""
from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.exceptions
import anyio
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential, wait_random

from core import clock
from core.address import Address, AddressError
from core.outage import OutageLog, Say

from .keys import Keys

log = structlog.get_logger("mesh.store")

RPC_TIMEOUT = 3  # seconds for one etcd call
# gRPC backs off reconnecting up to 120 s by default: after a long partition a node would
# stay away from etcd (fenced) long after the heal. Pings find a dead connection (etcd
# refuses pings more often than every 5 s).
GRPC_OPTIONS = {"grpc.lb_policy_name": "pick_first",
                "grpc.initial_reconnect_backoff_ms": 100,
                "grpc.min_reconnect_backoff_ms": 100,
                "grpc.max_reconnect_backoff_ms": 1000,
                "grpc.keepalive_time_ms": 5000,
                "grpc.keepalive_timeout_ms": 2000,
                "grpc.keepalive_permit_without_calls": 1}
RETRY_WINDOW = 6.0  # how long a call is retried while etcd is unreachable
WATCH_RESTART_MAX_WAIT = 1.0

_TRANSIENT = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError,
              aetcd.exceptions.InternalError, TimeoutError, OSError)


class StoreError(Exception):
    """etcd could not be reached or refused the request."""


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Fence:
    """A leader's election key as it was created: a write fenced on it fails once the key is
    gone (the leader's lease expired or was revoked), so a deposed leader cannot write."""

    key: bytes
    create_revision: int


@dataclass(frozen=True, slots=True)
class Event:
    key: bytes
    value: bytes | None  # None: the key was deleted
    revision: int


def _kv(kv: Any) -> KV:  # aetcd's KeyValue (aetcd has no type information)
    return KV(kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.lease)


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """'http://127.0.0.1:2379,127.0.0.1:22379' -> [('127.0.0.1', 2379), ('127.0.0.1', 22379)]."""
    endpoints = []
    for part in text.split(","):
        part = part.strip().removeprefix("http://").rstrip("/")
        try:
            address = Address.parse(part)
        except AddressError:
            raise ValueError(f"invalid etcd endpoint '{part}' (expected HOST:PORT)") from None
        endpoints.append((address.host, address.port))
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


def _grpc_target(endpoints: list[tuple[str, int]]) -> tuple[str, int]:
    """aetcd dials f'{host}:{port}'; gRPC's 'ipv4:a:p,b:q' target lets one channel fail over."""
    if len(endpoints) == 1:
        return endpoints[0]
    try:
        for host, _ in endpoints:
            ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError("several etcd endpoints must be IPv4 addresses") from None
    *rest, (last_host, last_port) = endpoints
    return "ipv4:" + ",".join(f"{h}:{p}" for h, p in rest) + "," + last_host, last_port


class EtcdStore:
    def __init__(self, endpoints: str, root: str = "/moonmesh") -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.keys = Keys(root)
        host, port = _grpc_target(self.endpoints)
        self._client = aetcd.Client(host=host, port=port, timeout=RPC_TIMEOUT,
                                    options=GRPC_OPTIONS)
        self.outage = OutageLog()

    def _failed(self, what: str, exc: BaseException) -> None:
        """A call or watch found etcd away: logged when that is news (core/outage.py)."""
        said = self.outage.failed(time.monotonic())
        if said is Say.LOST:
            log.warning("etcd_unreachable", endpoints=self.describe(), what=what,
                        error=str(exc))
        elif said is Say.STILL:
            log.warning("etcd_still_unreachable", endpoints=self.describe(),
                        for_sec=round(time.monotonic() - (self.outage.down_since or 0), 1),
                        failures=self.outage.failures)

    def _answered(self) -> None:
        if self.outage.down_since is not None:
            away = self.outage.succeeded(time.monotonic())
            log.warning("etcd_reachable_again", endpoints=self.describe(),
                        after_sec=round(away or 0.0, 1))

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self._client.close()

    async def _call(self, what: str, fn: Callable[[], Awaitable]):  # noqa: ANN202
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(RETRY_WINDOW), reraise=True, sleep=anyio.sleep,
                wait=wait_exponential(multiplier=0.05, max=0.5) + wait_random(0, 0.05),
                retry=retry_if_exception_type(_TRANSIENT),
            ):
                with attempt:
                    result = await fn()
                    self._answered()
                    return result
        except _TRANSIENT as exc:
            self._failed(what, exc)
            raise StoreError(f"etcd unreachable at {self.describe()}: {what}: {exc}") from None
        except aetcd.exceptions.ClientError as exc:
            raise StoreError(f"etcd refused {what}: {exc}") from None

    def describe(self) -> str:
        return ",".join(str(Address(h, p)) for h, p in self.endpoints)

    # -- keys --------------------------------------------------------------------------------
    async def get(self, key: bytes) -> KV | None:
        got = await self._call("get", lambda: self._client.get(key))
        return _kv(got) if got is not None else None

    async def get_prefix(self, prefix: bytes) -> tuple[list[KV], int]:
        """Every key under `prefix`, and the store revision they were read at."""
        got = await self._call("get prefix", lambda: self._client.get_prefix(prefix))
        return [_kv(kv) for kv in got], got.header.revision

    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        await self._call("put", lambda: self._client.put(key, value, lease=lease))

    async def delete(self, key: bytes) -> None:
        await self._call("delete", lambda: self._client.delete(key))

    async def cas(self, key: bytes, value: bytes | None, mod_revision: int, *,
                  lease: int | None = None, fence: Fence | None = None) -> bool:
        """Write `value` (None deletes) only if `key` is still at `mod_revision` (0: absent)
        and, with a `fence`, the fence's key still exists as it was created.
        False when the comparison failed: the caller lost a race and must re-read."""
        tx = self._client.transactions
        op = tx.delete(key) if value is None else tx.put(key, value, lease=lease)
        return await self._txn({key: mod_revision}, [op], (key, value), fence)

    async def commit(self, checks: dict[bytes, int], puts: dict[bytes, bytes],
                     deletes: tuple[bytes, ...] = (), *,
                     fence: Fence | None = None) -> bool:
        """One transaction: if every key in `checks` is at its mod revision (0: absent) and
        the fence holds, apply `puts` and `deletes`. False when a comparison failed."""
        tx = self._client.transactions
        ops = [tx.put(k, v) for k, v in puts.items()] + [tx.delete(k) for k in deletes]
        probe = next(iter(puts.items()), None) or (deletes[0], None)
        return await self._txn(checks, ops, probe, fence)

    async def _txn(self, checks: dict[bytes, int], ops: list, probe: tuple[bytes, bytes | None],
                   fence: Fence | None) -> bool:
        tx = self._client.transactions
        compare = [tx.mod(key) == rev for key, rev in checks.items()]
        if fence is not None:
            compare.append(tx.create(fence.key) == fence.create_revision)
        attempts = 0

        async def txn() -> bool:
            nonlocal attempts
            attempts += 1
            ok, _ = await self._client.transaction(compare=compare, success=ops, failure=[])
            if not ok and attempts > 1:
                # a retried write may have landed the first time: look for its effect
                current = await self._client.get(probe[0])
                return (current.value if current is not None else None) == probe[1]
            return ok

        return await self._call("transaction", txn)

    # -- leases ------------------------------------------------------------------------------
    async def grant(self, ttl: int) -> int:
        lease = await self._call("lease grant", lambda: self._client.lease(ttl))
        return lease.id

    async def refresh(self, lease_id: int) -> int:
        """Remaining TTL after a keepalive; <= 0 means the lease is gone."""
        reply = await self._call("lease keepalive", lambda: self._client.refresh_lease(lease_id))
        return reply.TTL if reply is not None else 0

    async def revoke(self, lease_id: int) -> None:
        await self._call("lease revoke", lambda: self._client.revoke_lease(lease_id))

    # -- watch -------------------------------------------------------------------------------
    async def watch(self, prefix: bytes, start_revision: int,
                    on_event: Callable[[Event], Awaitable[None]],
                    on_resync: Callable[[], Awaitable[int]]) -> None:
        """Deliver every change under `prefix` from `start_revision` on, forever.

        After a stream error or an etcd restart the watch resumes after the last revision it
        delivered; if that revision was compacted, `on_resync` re-reads and returns the
        revision to continue from.
        """
        revision = start_revision
        failures = 0
        while True:
            watch = None
            try:
                watch = await self._client.watch_prefix(prefix, start_revision=revision)
                async for event in watch:
                    failures = 0
                    self._answered()
                    kv = event.kv
                    deleted = event.kind == aetcd.rtypes.EventKind.DELETE
                    await on_event(Event(kv.key, None if deleted else kv.value,
                                         kv.mod_revision))
                    revision = kv.mod_revision + 1
                raise aetcd.exceptions.ConnectionFailedError("watch stream ended")
            except aetcd.exceptions.RevisionCompactedError:
                log.warning("watch_compacted", prefix=prefix.decode(), revision=revision)
                revision = await on_resync() + 1
            except (aetcd.exceptions.ClientError, *_TRANSIENT) as exc:
                failures += 1
                wait = min(WATCH_RESTART_MAX_WAIT, 0.05 * 2**failures)
                self._failed("watch", exc)
                log.debug("watch_restarting", prefix=prefix.decode(), revision=revision,
                         error=str(exc), wait=wait)
                await anyio.sleep(wait)
            finally:
                if watch is not None:  # aetcd keeps feeding a watch nobody cancels
                    with anyio.move_on_after(1, shield=True), \
                            contextlib.suppress(Exception):
                        await watch.cancel()


class LeaseKeeper:
    """Keeps one lease alive and confirms it; `lost` is set the moment it cannot be trusted.

    Every `interval` the keeper reads `witness` (the node's registration, put on this lease)
    with a linearizable read: etcd answers it only after confirming, with a quorum in the
    current term, that its leader still leads, and from state that includes every entry
    committed before the read was sent. So when the key is still there on this lease, no
    revocation or expiry of the lease had been committed when the read was sent, and
    `renewed_at` (core.clock) moves to that send time: the fence rule counts from it
    (mesh/model/fencing.py). A keepalive alone proves less on etcd 3.5.1: a deposed or
    lagging etcd leader may still answer one after the lease was revoked.

    Keepalives go every `keepalive_every` reads; `deadline` is when etcd may expire the lease
    at the earliest. Loss is declared when a keepalive says the lease is gone (`expired`: it
    expired, or the leader revoked it), or when the deadline passes without one.
    """

    def __init__(self, store: EtcdStore, ttl: int, interval: float, keepalive_every: int,
                 witness: bytes, on_renew: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.ttl = ttl
        self.interval = interval
        self.keepalive_every = keepalive_every
        self.witness = witness
        self.on_renew = on_renew  # called after each read that moved `renewed_at`
        self.lease_id = 0
        self.renewed_at = float("-inf")
        self.deadline = float("-inf")
        self.expired = False  # etcd said the lease is gone
        self.lost = anyio.Event()

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        sent = clock.now()
        self.lease_id = await self.store.grant(self.ttl)
        # the lease cannot have been revoked before it was granted
        self.renewed_at, self.deadline = sent, sent + self.ttl
        task_status.started()
        tick = 0
        while True:
            await anyio.sleep(self.interval)
            tick += 1
            try:
                if tick % self.keepalive_every == 0:
                    await self._keepalive()
                sent = clock.now()
                with anyio.fail_after(max(0.1, self.deadline - sent)):
                    kv = await self.store.get(self.witness)
            except (StoreError, TimeoutError) as exc:
                if self.expired or clock.now() >= self.deadline:
                    log.warning("lease_lost", lease=self.lease_id,
                                reason="gone at etcd" if self.expired else str(exc))
                    self.lost.set()
                    return
                continue
            if kv is not None and kv.lease == self.lease_id:
                self.renewed_at = sent
                self.on_renew()

    async def _keepalive(self) -> None:
        sent = clock.now()
        with anyio.fail_after(max(0.1, self.deadline - sent)):
            remaining = await self.store.refresh(self.lease_id)
        if remaining <= 0:
            self.expired = True
            raise StoreError("the lease is gone at etcd")
        self.deadline = sent + remaining


async def campaign(store: EtcdStore, lease_id: int) -> Fence:
    """Block until this lease's candidate key is the oldest under election/; return the fence
    (candidate key, its create_revision) that leader writes must compare."""
    keys = store.keys
    mine = keys.candidate(lease_id)
    await store.cas(mine, b"", 0, lease=lease_id)
    while True:
        candidates, revision = await store.get_prefix(keys.election)
        candidates.sort(key=lambda kv: kv.create_revision)
        me = next((c for c in candidates if c.key == mine), None)
        if me is None:
            raise StoreError("our election key is gone: the lease expired")
        ahead = [c for c in candidates if c.create_revision < me.create_revision]
        if not ahead:
            return Fence(mine, me.create_revision)
        await _wait_deleted(store, ahead[-1].key, revision + 1)


async def _wait_deleted(store: EtcdStore, key: bytes, revision: int) -> None:
    gone = anyio.Event()

    async def on_event(event: Event) -> None:
        if event.key == key and event.value is None:
            gone.set()

    async def on_resync() -> int:
        kv, rev = await store.get_prefix(key)
        if not kv:
            gone.set()
        return rev

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.watch, key, revision, on_event, on_resync)
        if await store.get(key) is None:
            gone.set()
        await gone.wait()
        tg.cancel_scope.cancel()
