"""Work a client command starts on the backend that outlives the callback it came in on:
the graceful-failover handover, slot scans, and a dedicated connection's lifetime.

Each job is an async function run in the server's task group (`ProxyContext.spawn`); what it
returns is the reply the command waits for.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import hiredis
import structlog

from core.slots import SLOT_COUNT, key_slot

from .backend import BACKEND_DOWN, BackendConnection, BackendPool, request
from .resp import OK, Err, error

log = structlog.get_logger("proxy.jobs")

SLOT_SCAN_TIMEOUT = 60.0
SLOT_SCAN_BATCH = 1000
# CLUSTER SLOT-STATS reuses the key counts of a SCAN this long (seconds) for the same table
# (tenant and epoch): each is a SCAN of the whole backend, so they may be this old
SLOT_COUNTS_FRESH = 10.0
HANDOVER_ATTEMPTS = 6  # FAILOVER tries before a graceful failover gives up
HANDOVER_RETRY_WAIT = 0.5
HANDOVER_ROLE_POLL = 0.05


async def handover(pool: BackendPool, host: bytes, port: bytes, timeout_ms: bytes) -> bytes:
    """Graceful failover: Redis's own FAILOVER pauses writes on the backend, waits for the
    replica to catch up and swaps roles. Returns +OK once the backend is a replica."""
    conn = pool.dedicated(False)
    reply = BACKEND_DOWN
    try:
        with anyio.fail_after(HANDOVER_ATTEMPTS * (int(timeout_ms) / 1000 + 2)):
            await conn.connect()
            for _ in range(HANDOVER_ATTEMPTS):
                reply = await request(conn, [b"FAILOVER", b"TO", host, port, b"TIMEOUT",
                                             timeout_ms])
                if reply != OK:  # e.g. the replica is still (re)connecting: try again
                    await anyio.sleep(HANDOVER_RETRY_WAIT)
                    continue
                # FAILOVER answers at once and works in the background: wait for the role
                # to change, or for Redis to give up (the replica did not catch up in time)
                while True:
                    await anyio.sleep(HANDOVER_ROLE_POLL)
                    if (await request(conn, [b"ROLE"])).startswith(b"*5\r\n$5\r\nslave"):
                        break
                    info = await request(conn, [b"INFO", b"replication"])
                    if b"role:slave" in info:
                        break
                    if b"master_failover_state:no-failover" in info:
                        reply = error("ERR the replica did not catch up in time")
                        break
                if reply == OK:
                    break
                await anyio.sleep(HANDOVER_RETRY_WAIT)
    except (OSError, TimeoutError) as exc:
        reply = error(f"ERR handover failed: {exc!r}")
    finally:
        conn.close()
    log.info("handover", to=f"{host.decode()}:{port.decode()}", reply=reply.decode().strip())
    return reply


async def _scan(pool: BackendPool, take: Callable[[list[bytes]], bool]) -> Err | None:
    """SCAN the whole backend on a connection of its own, each batch of keys to `take`
    until it says it has enough (True); an error, or None once done."""
    conn = pool.dedicated(False)
    try:
        with anyio.fail_after(SLOT_SCAN_TIMEOUT):
            await conn.connect()
            cursor = b"0"
            while True:
                raw = await request(conn, [b"SCAN", cursor, b"COUNT", b"%d" % SLOT_SCAN_BATCH])
                reader = hiredis.Reader()
                reader.feed(raw)
                reply = reader.gets()
                if not isinstance(reply, list):
                    return Err(f"ERR backend: {reply}")
                cursor = reply[0]
                if take(reply[1]) or cursor == b"0":
                    return None
    except (OSError, TimeoutError) as exc:
        return Err(f"CLUSTERDOWN cannot scan the backend: {exc}")
    finally:
        conn.close()


async def keys_in_slot(pool: BackendPool, slot: int, count: int | None) -> list[bytes] | Err:
    """CLUSTER COUNTKEYSINSLOT/GETKEYSINSLOT: the backend is no cluster node, so scan it
    (until `count` keys are found, or all of it)."""
    keys: list[bytes] = []

    def take(batch: list[bytes]) -> bool:
        keys.extend(k for k in batch if key_slot(k) == slot)
        return count is not None and len(keys) >= count

    return await _scan(pool, take) or keys


@dataclass(frozen=True, slots=True)
class KeyCounts:
    """CLUSTER SLOT-STATS's key counts of every slot, from one SCAN of the backend made
    for the table of `tenant` at `epoch`, started at `taken` (time.monotonic())."""

    tenant: str
    epoch: int
    taken: float
    counts: tuple[int, ...]

    def fresh_for(self, tenant: str, epoch: int, now: float) -> bool:
        """Reusable for the table of `tenant` at `epoch` at time `now`."""
        return self.tenant == tenant and self.epoch == epoch \
            and 0 <= now - self.taken < SLOT_COUNTS_FRESH


async def slot_key_counts(pool: BackendPool, wanted: Callable[[], bool]) -> list[int] | Err \
        | None:
    """CLUSTER SLOT-STATS's key-count: one SCAN of the whole backend, each key hashed and
    counted under its slot (16384 entries). None: given up, as `wanted()` said no more (its
    client is gone) between two batches."""
    counts = [0] * SLOT_COUNT
    abandoned = False

    def take(batch: list[bytes]) -> bool:
        nonlocal abandoned
        for key in batch:
            counts[key_slot(key)] += 1
        abandoned = not wanted()
        return abandoned

    failed = await _scan(pool, take)
    return failed or (None if abandoned else counts)


class DedicatedOwner(Protocol):
    dedicated: BackendConnection | None

    def raw_closed(self) -> None: ...


async def run_dedicated(owner: DedicatedOwner, conn: BackendConnection) -> None:
    """Keep a client's own connection open until it drops or is closed; when it drops
    under the client, the client goes too (its transaction or subscriptions are gone)."""
    try:
        await conn.connect()
    except OSError as exc:
        log.warning("dedicated_connect_failed", error=str(exc))
    else:
        await conn.lost.wait()
    finally:
        conn.close()
    if owner.dedicated is conn:
        owner.raw_closed()
