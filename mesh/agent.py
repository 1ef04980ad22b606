"""The node agent: joins the pool, applies views to the proxy, reports status, may lead.

One agent per mesh-proxy. Each incarnation holds one lease: the node record, the status key
and the election key live on it. When the lease is lost everything under it is cancelled and
a new incarnation starts; the proxy keeps serving the last view it applied meanwhile.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace

import anyio
import structlog

from core import __version__
from core.nodes import NodeRecord, NodeStatus
from core.view import ClusterView, MigrationState, ViewError, from_json
from proxy.control import ControlPort
from proxy.routing import empty_table, table_from_view

from .leader import lead
from .redisctl import RedisCtl, RedisCtlError
from .store.etcd import EtcdStore, Event, LeaseKeeper, StoreError

log = structlog.get_logger("mesh.agent")

LEASE_TTL = 5  # seconds; a dead node leaves the pool this long after its last keepalive
STATUS_HEARTBEAT = 3.0  # the status key is rewritten at least this often
BACKEND_CHECK_INTERVAL = 1.0
BACKEND_TIMEOUT = 2.0
LEAVE_TIMEOUT = 10.0  # how long a clean shutdown waits to be taken out of its cluster
BACKEND_FAIL_LIMIT = 3  # consecutive failed checks before the node reports its Redis dead
FENCE_MARGIN = 1.5  # seconds before the lease may expire that the node asks its peers
FENCE_HARD = 0.5  # seconds before the lease may expire that writes stop unless excused
FENCE_POLL = 0.1
REFRESH_STUCK = 0.5  # a keepalive in flight this long means etcd is not answering
PEER_TIMEOUT = 0.5
BARRIER_POLL = 0.05  # how often a migration barrier re-reads its peer's applied epoch
COMMIT_BARRIER_TIMEOUT = 5.0  # a source gives up its slots at most this long after the commit
RESTART_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    proxy: str  # announced proxy address
    backend: str
    host: str = ""
    backend_password: str | None = None


class NodeAgent:
    def __init__(self, store: EtcdStore, control: ControlPort, config: NodeConfig) -> None:
        self.store = store
        self.control = control  # the one way into the data path
        self.config = config
        self.keys = store.keys
        self.ctl = RedisCtl(config.backend, config.backend_password)
        self.views: dict[str, ClusterView] = {}
        self.applied: ClusterView | None = None
        self.status = NodeStatus(config.node_id)
        self.status_changed = anyio.Event()
        self.removed = anyio.Event()  # set when no view names this node any more
        self.active: set[str] = set()  # migrations whose source side runs here (barrier passed)
        self.keeper: LeaseKeeper | None = None
        self._apply_lock = anyio.Lock()
        self.log = log.bind(node=config.node_id)

    # -- lifetime ----------------------------------------------------------------------------
    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Run incarnations forever. Nothing the agent meets (etcd down, a backend that
        misbehaves, a bug) may stop the proxy: the data path keeps serving meanwhile."""
        task_status.started()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._fence_guard)
            await self._incarnations()

    async def _incarnations(self) -> None:
        while True:
            try:
                await self._incarnation()
            except* (StoreError, OSError, RedisCtlError) as group:
                self.log.warning("agent_restarting", error=repr(group.exceptions[0]))
            except* Exception as group:  # noqa: BLE001
                self.log.error("agent_failed", error=repr(group.exceptions[0]),
                               exc_info=group.exceptions[0])
            await anyio.sleep(RESTART_WAIT)

    async def _incarnation(self) -> None:
        async with anyio.create_task_group() as tg:
            keeper = LeaseKeeper(self.store, LEASE_TTL)
            await tg.start(keeper.run)
            self.keeper = keeper
            self.lease = keeper.lease_id
            record = NodeRecord(self.config.node_id, self.config.proxy, self.config.backend,
                                self.config.host, __version__, time.time())
            await self.store.put(self.keys.node(self.config.node_id), record.encode(),
                                 lease=self.lease)
            self.log.info("node_registered", lease=f"{self.lease:x}")
            tg.start_soon(self._watch_views)
            tg.start_soon(self._report_status)
            tg.start_soon(self._check_backend)
            tg.start_soon(self._migration_barriers)
            tg.start_soon(lead, self.store, self.lease, self.config.node_id)
            try:
                await keeper.lost.wait()
                self.log.warning("lease_lost_reregistering")
                tg.cancel_scope.cancel()
            finally:
                with anyio.move_on_after(2, shield=True):  # hand the election on at once
                    with contextlib.suppress(StoreError):
                        await self.store.revoke(self.lease)

    async def leave(self) -> None:
        """Clean shutdown: ask to be taken out of the cluster, wait for it, then deregister."""
        self._set_status(leaving=True)
        with anyio.move_on_after(LEAVE_TIMEOUT) as scope:
            if self.applied is not None:
                await self.removed.wait()
        if scope.cancelled_caught:
            self.log.warning("leave_timed_out", cluster=self.applied.cluster if self.applied else "")
        with anyio.move_on_after(3, shield=True), contextlib.suppress(StoreError):
            await self.store.delete(self.keys.node(self.config.node_id))
            await self.store.delete(self.keys.status(self.config.node_id))
            await self.store.revoke(self.lease)

    # -- views -------------------------------------------------------------------------------
    async def _watch_views(self) -> None:
        revision = await self._read_views()
        deadline = self.keeper.deadline - FENCE_HARD if self.keeper is not None else 0.0
        if self.control.fenced:  # the current view is applied again: writes may resume
            self.control.unfence(deadline)
            self.log.warning("unfenced", epoch=self.applied.epoch if self.applied else 0)
        else:
            self.control.allow_writes_until(deadline)
        await self.store.watch(self.keys.clusters, revision + 1, self._on_view_event,
                               self._read_views)

    async def _read_views(self) -> int:
        kvs, revision = await self.store.get_prefix(self.keys.clusters)
        self.views = {}
        for kv in kvs:
            cluster = self.keys.cluster_of_view_key(kv.key)
            if cluster is not None:
                self._remember(cluster, kv.value)
        await self.reconcile()
        return revision

    async def _on_view_event(self, event: Event) -> None:
        cluster = self.keys.cluster_of_view_key(event.key)
        if cluster is None:
            return
        if event.value is None:
            self.views.pop(cluster, None)
        else:
            self._remember(cluster, event.value)
        await self.reconcile()

    def _remember(self, cluster: str, data: bytes) -> None:
        try:
            view = from_json(data)
        except ViewError as exc:
            self.log.error("view_invalid", cluster=cluster, error=str(exc))
            return
        self.views[cluster] = view

    async def reconcile(self) -> None:
        """Make the proxy and the backend match the newest view that names this node."""
        me = self.config.node_id
        mine = [v for v in self.views.values() if me in v.node_ids]
        if len(mine) > 1:
            self.log.error("node_in_several_clusters", clusters=sorted(v.cluster for v in mine))
        target = max(mine, key=lambda v: v.epoch, default=None)
        async with self._apply_lock:
            current = self.applied
            same = current is not None and target is not None and current.uid == target.uid \
                and current.cluster == target.cluster
            if target is None:
                if current is not None:
                    await self._leave_cluster(current)
                self.removed.set()
                return
            self.removed = anyio.Event() if self.removed.is_set() else self.removed
            if same and target.epoch <= current.epoch:  # type: ignore[union-attr]
                return
            try:
                if same:
                    await self._commit_barrier(current, target)  # type: ignore[arg-type]
                await self._apply(target, joining=not same)
            except (RedisCtlError, TimeoutError, StoreError) as exc:
                # retried by the backend check every second until it applies
                self.log.warning("view_apply_failed", cluster=target.cluster,
                                 epoch=target.epoch, error=repr(exc))

    async def _apply(self, view: ClusterView, joining: bool) -> None:
        me = self.config.node_id
        shard = view.shard_of(me)
        assert shard is not None
        with anyio.fail_after(BACKEND_TIMEOUT * 3):
            if joining:
                await self._take_backend_for(view)
            await self._set_role(view, shard.master == me)
        self.active &= {m.id for m in view.migrations}
        self.control.apply(table_from_view(view, me, frozenset(self.active)), joining=joining)
        self.applied = view
        self._set_status(cluster=view.cluster, epoch=view.epoch,
                         role="master" if shard.master == me else "replica")
        self.log.info("view_applied", cluster=view.cluster, epoch=view.epoch,
                      role=self.status.role, shard=shard.id)

    async def _leave_cluster(self, view: ClusterView) -> None:
        # taken out of a cluster that goes on: keep redirecting its clients to the new owners
        still = self.views.get(view.cluster)
        self.control.apply(table_from_view(still, self.config.node_id) if still
                           else empty_table())
        self.applied = None
        self._set_status(cluster="", epoch=0, role="master")
        self.log.info("left_cluster", cluster=view.cluster, epoch=view.epoch)
        try:
            with anyio.fail_after(BACKEND_TIMEOUT):
                await self.ctl.call("REPLICAOF", "NO", "ONE")
        except (RedisCtlError, TimeoutError) as exc:
            self.log.warning("backend_role_failed", error=str(exc))

    async def _take_backend_for(self, view: ClusterView) -> None:
        """Empty the backend unless it already holds this very cluster's data (same creation,
        not just the same name): one tenant's keys never reach another."""
        key = self.keys.data_owner(self.config.node_id)
        kv = await self.store.get(key)
        owner = json.loads(kv.value) if kv is not None else {}
        if (owner.get("cluster"), owner.get("uid")) != (view.cluster, view.uid):
            await self.ctl.call("REPLICAOF", "NO", "ONE")  # a replica refuses FLUSHALL
            await self.ctl.call("FLUSHALL")
            self.log.info("backend_emptied", previous=owner.get("cluster"), cluster=view.cluster)
            await self.store.put(key, json.dumps({"cluster": view.cluster,
                                                  "uid": view.uid}).encode())

    async def _set_role(self, view: ClusterView, master: bool) -> None:
        if master:
            wanted = ("master", None)
        else:
            shard = view.shard_of(self.config.node_id)
            wanted = ("slave", view.address_of(shard.master).backend)  # type: ignore[union-attr]
        if await self.ctl.role() == wanted:
            return
        if wanted[1] is None:
            await self.ctl.call("REPLICAOF", "NO", "ONE")
        else:
            host, _, port = wanted[1].rpartition(":")
            await self.ctl.call("REPLICAOF", host, port)
        self.log.info("backend_role_set", role=wanted[0], master=wanted[1])

    # -- fencing -----------------------------------------------------------------------------
    async def _fence_guard(self) -> None:
        """Stop writes before the lease can expire at etcd (then the leader may promote a
        replica), unless every peer that answers has lost etcd too: then nobody can be
        promoted, and refusing writes would only turn an etcd outage into a write outage.

        Writes stop at the local deadline (last keepalive sent + TTL) minus FENCE_HARD; the
        node starts asking its peers FENCE_MARGIN before it. Assumption: this machine's
        monotonic clock runs no more than FENCE_HARD / LEASE_TTL (10%) slower than etcd's."""
        self.control.allow_writes_until(0.0)  # no writes before the first lease
        while True:
            keeper = self.keeper
            now = time.monotonic()
            alive = keeper is not None and not keeper.lost.is_set()
            healthy = alive and now < keeper.deadline - FENCE_MARGIN  # type: ignore[union-attr]
            stuck = alive and keeper.refreshing_since is not None \
                and now - keeper.refreshing_since > REFRESH_STUCK  # type: ignore[union-attr]
            self.control.lease_ok = healthy and not stuck
            if healthy and not self.control.fenced:
                self.control.allow_writes_until(keeper.deadline - FENCE_HARD)  # type: ignore[union-attr]
            elif not healthy and not self.control.fenced and self.applied is not None:
                peers = await self._peers_reach_etcd()
                if peers is False:
                    # nobody can be promoted while nobody reaches etcd: keep taking writes
                    self.control.allow_writes_until(time.monotonic() + 1.0)
                    self.log.warning("lease_at_risk_not_fencing", reason="no peer reaches etcd")
                elif alive and time.monotonic() < keeper.deadline - FENCE_HARD:  # type: ignore[union-attr]
                    pass  # peers may still be noticing the outage: ask again
                else:
                    self.control.fence()
                    self.log.warning("fenced", reason="lease may expire", peers_reach_etcd=peers)
            await anyio.sleep(FENCE_POLL)

    async def _peers_reach_etcd(self) -> bool | None:
        """True if a peer of this cluster holds a live lease, False if every peer that
        answered has none, None if no peer answered."""
        view = self.applied
        peers = [a.proxy for n, a in view.nodes if n != self.config.node_id] if view else []
        answers: list[bool] = []

        async def ask(address: str) -> None:
            ctl = RedisCtl(address)
            try:
                with anyio.fail_after(PEER_TIMEOUT):
                    answers.append(await ctl.call("UMCTL", "LEASEOK") == 1)
            except (RedisCtlError, TimeoutError, OSError):
                pass
            finally:
                await ctl.aclose()

        async with anyio.create_task_group() as tg:
            for address in peers:
                tg.start_soon(ask, address)
        if not answers:
            return None
        return any(answers)

    # -- migration barriers ------------------------------------------------------------------
    def _my_outgoing(self, view: ClusterView) -> list:
        masters = {s.id: s.master for s in view.shards}
        return [m for m in view.migrations if m.state is MigrationState.MIGRATING
                and masters[m.source] == self.config.node_id]

    async def _peer_epoch(self, view: ClusterView, shard_id: str) -> int:
        master = next(s.master for s in view.shards if s.id == shard_id)
        kv = await self.store.get(self.keys.status(master))
        if kv is None:
            return 0
        status = NodeStatus.decode(kv.value)
        return status.epoch if status.cluster == view.cluster else 0

    async def _migration_barriers(self) -> None:
        """Start redirecting a migration's missing keys only once its target has applied the
        view that started it: before that the target would not serve them."""
        while True:
            view = self.applied
            waiting = [m for m in (self._my_outgoing(view) if view else []) if m.id not in self.active]
            for m in waiting:
                if await self._peer_epoch(view, m.target) >= m.epoch:  # type: ignore[arg-type]
                    async with self._apply_lock:
                        if self.applied is view:
                            self.active.add(m.id)
                            self.control.apply(table_from_view(view, self.config.node_id,
                                                               frozenset(self.active)))
                            self.log.info("migration_started", migration=m.id,
                                          epoch=view.epoch, slots=[list(r) for r in m.slots])  # type: ignore[union-attr]
            await anyio.sleep(BARRIER_POLL if waiting else BARRIER_POLL * 4)

    async def _commit_barrier(self, current: ClusterView, target: ClusterView) -> None:
        """A source gives up a migration's slots only after the target has applied the commit:
        until then it keeps sending every (now missing) key there with -ASK, which the target
        serves whatever its epoch, so clients never bounce between the two."""
        ended = [m for m in self._my_outgoing(current)
                 if m.id not in {x.id for x in target.migrations}]
        if not ended:
            return
        with anyio.move_on_after(COMMIT_BARRIER_TIMEOUT):
            for m in ended:
                if m.target not in {s.id for s in target.shards}:
                    continue
                while await self._peer_epoch(target, m.target) < target.epoch:
                    await anyio.sleep(BARRIER_POLL)
        for m in ended:
            self.log.info("migration_committed", migration=m.id, epoch=target.epoch)

    # -- health and status -------------------------------------------------------------------
    async def _check_backend(self) -> None:
        """PING the backend every second, keep its role as the view says, track its offset.
        The backend is reported dead after BACKEND_FAIL_LIMIT failures in a row."""
        failures = 0
        while True:
            ok, offset = True, self.status.repl_offset
            try:
                with anyio.fail_after(BACKEND_TIMEOUT):
                    await self.ctl.call("PING")
                    offset = await self.ctl.replication_offset()
                    async with self._apply_lock:
                        view = self.applied
                        if view is not None:
                            shard = view.shard_of(self.config.node_id)
                            if shard is not None:
                                await self._set_role(view, shard.master == self.config.node_id)
            except (RedisCtlError, TimeoutError):
                ok = False
            failures = 0 if ok else failures + 1
            ok = failures < BACKEND_FAIL_LIMIT
            await self.reconcile()  # retries an apply that failed; a no-op otherwise
            progress = self.control.migration_progress()
            self._set_status(backend_ok=ok, repl_offset=offset, migrations=progress)
            await anyio.sleep(BACKEND_CHECK_INTERVAL)

    def _set_status(self, **changes: object) -> None:
        new = replace(self.status, **changes)  # type: ignore[arg-type]
        if new != self.status:
            self.status = new
            self.status_changed.set()

    async def _report_status(self) -> None:
        key = self.keys.status(self.config.node_id)
        while True:
            self.status_changed = anyio.Event()
            status = replace(self.status, updated=time.time())
            await self.store.put(key, status.encode(), lease=self.lease)
            with anyio.move_on_after(STATUS_HEARTBEAT):
                await self.status_changed.wait()
