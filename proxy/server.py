"""The proxy server: listener, routing table, backend pool, and what they share."""
from __future__ import annotations

import asyncio
import os
import time

import anyio
import hiredis
import structlog
from anyio.abc import TaskGroup

from mesh.model.slots import key_slot

from . import __version__
from .backend import (BACKEND_DOWN, BackendConnection, BackendPool, Pending, keep_connected,
                      request)
from .migration import (DEFAULT_KEYS_PER_SECOND, MOVE_RETRY_WAIT, MigrationProgress, SlotGate,
                        run_mover)
from .resp import OK, Err, error
from .routing import RoutingTable, empty_table, format_ranges, table_from_meta
from .session import Session
from .umctl import ClusterMeta

log = structlog.get_logger("proxy.server")

SLOT_SCAN_TIMEOUT = 60.0
HANDOVER_ATTEMPTS = 6  # FAILOVER tries before a graceful failover gives up
HANDOVER_RETRY_WAIT = 0.5
SLOT_SCAN_BATCH = 1000
LISTEN_BACKLOG = 1024


class ProxyServer:
    def __init__(self, listen: str, backend: str, announce: str | None = None,
                 backend_password: str | None = None,
                 migration_rate: int = DEFAULT_KEYS_PER_SECOND) -> None:
        self.listen = listen
        self.announce = announce or listen
        self.backend_address = backend
        self.pool = BackendPool(backend, password=backend_password)
        self.table: RoutingTable = empty_table()
        self.sessions: set[Session] = set()
        self.commands_processed = 0
        self.managed = False  # True in mesh mode: views come from etcd, not UMCTL SETCLUSTER
        self.migration_rate = migration_rate  # keys/s the mover may move; 0: no limit
        self.fenced = False  # set by the agent when its lease may have expired: no writes
        # writes are refused once time.monotonic() passes this (the mesh agent keeps moving it
        # ahead of its lease; it is checked on the write path itself, so a process that was
        # frozen refuses writes the moment it wakes, before any background task runs)
        self.write_deadline = float("inf")
        self.lease_ok = False  # the agent holds a live lease (peers ask, see UMCTL LEASEOK)
        self.handing_over = False  # UMCTL HANDOVER in progress: writes get TRYAGAIN
        self.gates: dict[str, SlotGate] = {}  # running migrations this proxy takes part in
        self.migration_scopes: dict[str, anyio.CancelScope] = {}
        self.migration_progress: dict[str, MigrationProgress] = {}
        self.started_at = time.time()
        self._tg: TaskGroup | None = None

    # -- metadata --------------------------------------------------------------------------
    def apply_setcluster(self, meta: ClusterMeta) -> bytes:
        """Apply in-band metadata (standalone mode); returns the reply."""
        if self.managed:
            return error("ERR this proxy follows the mesh's views in etcd; use umctl-mesh")
        if meta.epoch <= self.table.epoch and not meta.force:
            return error(f"OLD_EPOCH current epoch is {self.table.epoch}")
        foreign = [e.address for e in meta.local if e.address != self.backend_address]
        if foreign:
            return error(f"ERR_NOT_MY_META this proxy fronts {self.backend_address}, "
                         f"not {foreign[0]}")
        self.apply_table(table_from_meta(meta, self.announce))
        return OK

    def apply_table(self, table: RoutingTable) -> None:
        self.table = table  # one reference swap: every command reads a whole table
        me = table.myself
        if self.handing_over and (me is None or me.master_id is not None):
            self.handing_over = False  # the view with the new master arrived
        self._reconcile_migrations(table)
        me = table.myself
        log.info("view_applied", cluster=table.cluster, epoch=table.epoch,
                 slots=[list(r) for r in me.ranges] if me else [], nodes=len(table.nodes))

    # -- migrations --------------------------------------------------------------------------
    def _reconcile_migrations(self, table: RoutingTable) -> None:
        running = table.migrations()
        for mid, (marker, mask) in running.items():
            gate = self.gates.get(mid)
            if gate is not None and gate.marker.source == marker.source:
                continue
            if gate is not None:
                self._end_migration(mid)
            conns = {resp3: self.pool.dedicated(resp3) for resp3 in (False, True)}
            forwards = {resp3: self._peer_connection(marker.peer, resp3) for resp3 in (False, True)}
            gate = self.gates[mid] = SlotGate(marker, conns, forwards if marker.source else {})
            assert self._tg is not None
            self._tg.start_soon(self._run_migration, gate, mask)
        for mid in [m for m in self.gates if m not in running]:
            self._end_migration(mid)

    def _peer_connection(self, address: str, resp3: bool) -> BackendConnection:
        """A connection to another proxy of this cluster, authenticated as a peer."""
        host, _, port = address.rpartition(":")
        password_hash = self.table.password_hash
        handshake = ([b"UMCTL", b"AUTHPEER", password_hash.encode()],) if password_hash else ()
        return BackendConnection(host.strip("[]"), int(port), resp3, handshake=handshake)

    def _end_migration(self, mid: str) -> None:
        self.gates.pop(mid).close()
        scope = self.migration_scopes.pop(mid, None)
        if scope is not None:
            scope.cancel()
        self.migration_progress.pop(mid, None)

    async def _run_migration(self, gate: SlotGate, mask: bytearray) -> None:
        mid = gate.marker.migration_id
        links = [*gate.conns.values(), *gate.forwards.values()]
        with anyio.CancelScope() as scope:
            self.migration_scopes[mid] = scope
            try:
                async with anyio.create_task_group() as tg:
                    for link in links:  # closed below, once commands in flight are answered
                        tg.start_soon(keep_connected, link, False)
                    if gate.marker.source:
                        await self._move_keys(gate, mask)
            finally:
                with anyio.move_on_after(5, shield=True):
                    while gate.busy:  # let checks in flight finish on their connection
                        await anyio.sleep(0.01)
                for link in links:
                    link.close()

    async def _move_keys(self, gate: SlotGate, mask: bytearray) -> None:
        mid = gate.marker.migration_id
        progress = self.migration_progress.setdefault(mid, MigrationProgress(mid))
        while True:
            backend = self.pool.dedicated(False)
            target = self._peer_connection(gate.marker.peer, False)
            try:
                await backend.connect()
                await target.connect()
                await run_mover(gate, mask, backend, target, progress, self.migration_rate)
            except OSError as exc:
                progress.error = str(exc)
                log.warning("migration_batch_failed", migration=mid, error=str(exc))
            finally:
                backend.close()
                target.close()
            await anyio.sleep(MOVE_RETRY_WAIT)

    # -- reports ---------------------------------------------------------------------------
    def info_section(self) -> str:
        table = self.table
        fields = {
            "proxy_version": __version__,
            "proxy_pid": os.getpid(),
            "proxy_address": self.announce,
            "proxy_backend": self.backend_address,
            "proxy_backend_up": int(self.pool.healthy),
            "proxy_cluster": table.cluster,
            "proxy_epoch": table.epoch,
            "proxy_connected_clients": len(self.sessions),
            "proxy_commands_processed": self.commands_processed,
            "proxy_uptime_in_seconds": int(time.time() - self.started_at),
        }
        return "# Proxy\r\n" + "".join(f"{k}:{v}\r\n" for k, v in fields.items())

    def umctl_info(self) -> list:
        table = self.table
        me = table.myself
        return [
            "Cluster", [table.cluster, "epoch", table.epoch,
                        "local", [f"{self.backend_address} {' '.join(format_ranges(me.ranges))}"]
                        if me else [],
                        "peer", [f"{n.address} {' '.join(format_ranges(n.ranges))}"
                                 for n in table.nodes if not n.myself],
                        "config", [f"{k} {v}" for k, v in table.config]],
            "Backend", [self.backend_address, "up" if self.pool.healthy else "down"],
        ]

    # -- background work started by sessions ------------------------------------------------
    def open_dedicated(self, session: Session, conn: BackendConnection) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._run_dedicated, session, conn)

    async def _run_dedicated(self, session: Session, conn: BackendConnection) -> None:
        try:
            await conn.connect()
        except OSError as exc:
            log.warning("dedicated_connect_failed", error=str(exc))
        else:
            await conn.lost.wait()
        finally:
            conn.close()
        if session.dedicated is conn and session.transport is not None:
            session.raw_closed()  # its transaction or subscriptions are gone with the link

    def start_handover(self, session: Session, pending: Pending, host: bytes, port: bytes,
                       timeout_ms: bytes) -> None:
        """Graceful failover: Redis's own FAILOVER pauses writes on the backend, waits for the
        replica to catch up and swaps roles; the proxy answers writes with TRYAGAIN from now
        until a view shows this node as a replica (umctl-mesh writes it after the swap)."""
        assert self._tg is not None
        self.handing_over = True
        self._tg.start_soon(self._handover, session, pending, host, port, timeout_ms)

    async def _handover(self, session: Session, pending: Pending, host: bytes, port: bytes,
                        timeout_ms: bytes) -> None:
        conn = self.pool.dedicated(False)
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
                        await anyio.sleep(0.05)
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
        if reply != OK:
            self.handing_over = False
        log.info("handover", to=f"{host.decode()}:{port.decode()}", reply=reply.decode().strip())
        pending.data = reply
        session.replies_arrived()

    def start_slot_scan(self, session: Session, pending: Pending, slot: int,
                        count: int | None) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._slot_scan, session, pending, slot, count)

    async def _slot_scan(self, session: Session, pending: Pending, slot: int,
                         count: int | None) -> None:
        """CLUSTER COUNTKEYSINSLOT/GETKEYSINSLOT: the backend is no cluster node, so scan it."""
        conn = self.pool.dedicated(False)
        keys: list[bytes] = []
        result: list[bytes] | Err = keys
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
                        result = Err(f"ERR backend: {reply}")
                        break
                    cursor, batch = reply[0], reply[1]
                    keys.extend(k for k in batch if key_slot(k) == slot)
                    if cursor == b"0" or (count is not None and len(keys) >= count):
                        break
        except (OSError, TimeoutError) as exc:
            result = Err(f"CLUSTERDOWN cannot scan the backend: {exc}")
        finally:
            conn.close()
        session.slot_scan_done(pending, result, count)

    # -- lifetime --------------------------------------------------------------------------
    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        host, _, port = self.listen.rpartition(":")
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self.pool.run(tg)
            server = await loop.create_server(lambda: Session(self), host.strip("[]"), int(port),
                                              reuse_address=True, backlog=LISTEN_BACKLOG)
            log.info("proxy_listening", listen=self.listen, backend=self.backend_address,
                     announce=self.announce)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                server.close()
                for session in list(self.sessions):
                    if session.transport is not None:
                        session.transport.abort()
                tg.cancel_scope.cancel()

