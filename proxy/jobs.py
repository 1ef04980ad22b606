"""Work a client command starts on the backend that outlives the callback it came in on:
the graceful-failover handover, slot scans, and a dedicated connection's lifetime.

Each job is an async function run in the server's task group (`ProxyContext.spawn`); what it
returns is the reply the command waits for.
"""
from __future__ import annotations

from collections.abc import Callable
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


async def slot_key_counts(pool: BackendPool, slots: frozenset[int]) -> list[int] | Err:
    """CLUSTER SLOT-STATS's key-count: one SCAN of the whole backend, each key hashed, the
    keys of `slots` counted (16384 entries; other slots 0)."""
    counts = [0] * SLOT_COUNT

    def take(batch: list[bytes]) -> bool:
        for key in batch:
            slot = key_slot(key)
            if slot in slots:
                counts[slot] += 1
        return False

    return await _scan(pool, take) or counts


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
