"""Views in, the proxy and the backend out (DESIGN.md section 5).

`ViewApplier` watches every cluster's view, picks the newest one that names this node, and
applies it: empties the backend if it holds another tenant's data, sets the backend's role,
swaps the proxy's routing table through the control port, and reports the applied epoch in
the node's status. It also starts gating an outgoing migration once its start barrier passed
(mesh/barriers.py), since that changes the routing table too.
"""
from __future__ import annotations

from dataclasses import replace

import anyio
import structlog

from core import clock
from core.address import Address
from core.nodes import DataOwner
from core.tenant_config import TENANT_SETTABLE
from core.view import ClusterView, Migration
from proxy.control import FENCED_LEASE, ControlPort
from proxy.routing import empty_table, table_from_view

from .barriers import wait_commit
from .model.fencing import lease_of
from .notify import Changed
from .redisctl import RedisCtl, RedisCtlError
from .status import PeerStatuses, StatusReporter
from .store.etcd import LeaseKeeper, StoreError
from .store.repo import MeshRepo, ViewChange

log = structlog.get_logger("mesh.views")

BACKEND_TIMEOUT = 2.0
# run after the FLUSHALL that empties a node for its next cluster (see _take_backend_for)
BACKEND_RESETS = (("FUNCTION", "FLUSH"), ("SCRIPT", "FLUSH"), ("SLOWLOG", "RESET"),
                  ("LATENCY", "RESET"), ("CONFIG", "RESETSTAT"))
VIEW_RESYNC_INTERVAL = 10.0  # seconds between two reads of every view, the watch aside


class ViewApplier:
    def __init__(self, repo: MeshRepo, control: ControlPort, ctl: RedisCtl,
                 status: StatusReporter, peers: PeerStatuses, node_id: str) -> None:
        self.repo = repo
        self.peers = peers  # for the commit barrier
        self.control = control  # the one way into the data path
        self.ctl = ctl
        self.status = status
        self.node_id = node_id
        self.views: dict[str, ClusterView] = {}
        self.applied: ClusterView | None = None
        self.active: frozenset[str] = frozenset()  # migrations gated here (barrier passed)
        self.changed = Changed()  # the applied view (or the active set) changed
        self.removed = anyio.Event()  # set when no view names this node any more
        self.lock = anyio.Lock()  # one change of the proxy or the backend at a time
        self.keeper: LeaseKeeper | None = None  # the current lease's
        self.log = log.bind(node=node_id)
        # the tenant-settable parameters as the backend had them when this agent first read
        # them, set back whenever the node is emptied for a cluster (None: not read yet)
        self.backend_config: dict[str, str] | None = None

    # -- watching ----------------------------------------------------------------------------
    async def run(self, keeper: LeaseKeeper) -> None:
        """Read every view, apply, let writes resume under this lease, then follow changes.
        The lease counts for the fence only once the views were read under it: until then
        `self.views` holds what an earlier lease saw, which may miss a failover that made
        this node a replica (the backend check's reconcile must not unfence on it)."""
        if self.backend_config is None:
            await self._read_backend_config()
        revision = await self.read_all()
        self.keeper = keeper
        async with self.lock:
            if self.current():
                self._resume_writes()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.repo.watch_views, revision + 1, self._on_change, self.read_all)
            # a safety net under the watch: after a partition a watch stream was seen to stay
            # silent (a node one epoch behind for good) while everything else worked
            while True:
                await anyio.sleep(VIEW_RESYNC_INTERVAL)
                await self.read_all()

    async def read_all(self) -> int:
        read = await self.repo.read_views()
        for cluster, error in read.invalid.items():
            self.log.error("view_invalid", cluster=cluster, error=error)
        self.views = {cluster: stored.view for cluster, stored in read.views.items()}
        await self.reconcile()
        return read.revision

    async def _on_change(self, change: ViewChange) -> None:
        if change.error is not None:  # keep what we had: an invalid view is never applied
            self.log.error("view_invalid", cluster=change.cluster, error=change.error)
            return
        if change.view is None:
            self.views.pop(change.cluster, None)
        else:
            self.views[change.cluster] = change.view
        await self.reconcile()

    # -- applying ----------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """Make the proxy and the backend match the newest view that names this node."""
        me = self.node_id
        target = self._target()
        async with self.lock:
            current = self.applied
            if target is None:
                if current is not None:
                    await self._leave_cluster(current)
                self.removed.set()
                return
            if self.removed.is_set():
                self.removed = anyio.Event()
            same = current is not None and current.uid == target.uid \
                and current.cluster == target.cluster
            if current is None or not same or target.epoch > current.epoch:
                try:
                    if current is not None and same:
                        await wait_commit(self.peers, me, current, target)
                    await self._apply(target, joining=not same)
                except (RedisCtlError, TimeoutError, StoreError) as exc:
                    # retried by the backend check every second until it applies; the old
                    # table stays live, so writes stay fenced if they were
                    self.log.warning("view_apply_failed", cluster=target.cluster,
                                     epoch=target.epoch, error=repr(exc))
                    return
            self._resume_writes()

    def _target(self) -> ClusterView | None:
        """The newest view that names this node (None: no view does)."""
        mine = [v for v in self.views.values() if self.node_id in v.node_ids]
        if len(mine) > 1:
            self.log.error("node_in_several_clusters", clusters=sorted(v.cluster for v in mine))
        return max(mine, key=lambda v: v.epoch, default=None)

    def current(self) -> bool:
        """The proxy serves the newest view read (or none, when no view names this node)."""
        target, applied = self._target(), self.applied
        if target is None or applied is None:
            return target is None and applied is None
        return (target.cluster, target.uid, target.epoch) == \
            (applied.cluster, applied.uid, applied.epoch)

    def resume_if_current(self) -> None:
        """`_resume_writes` from outside an apply: only when none runs and the newest view
        read is the one applied."""
        if not self.lock.locked() and self.current():
            self._resume_writes()

    def _resume_writes(self) -> None:
        """The newest view is applied: if the fence guard fenced writes for the lease and the
        lease holds again (a new one, or a keepalive that landed after all), lift it."""
        keeper = self.keeper
        if FENCED_LEASE not in self.control.fenced_for or keeper is None or keeper.lost.is_set():
            return
        until = lease_of(keeper).writes_until
        if clock.now() >= until:
            return
        self.control.unfence(FENCED_LEASE, until)
        self.log.warning("unfenced", epoch=self.applied.epoch if self.applied else 0,
                         still_fenced_for=sorted(self.control.fenced_for))

    async def _apply(self, view: ClusterView, joining: bool) -> None:
        me = self.node_id
        shard = view.shard_of(me)
        assert shard is not None
        if joining and self.control.table.configured:
            # stop serving the tenant the node had before its Redis is emptied for the new
            # one: the old tenant's clients are cut off first (their own connections close)
            self.control.apply(empty_table())
        with anyio.fail_after(BACKEND_TIMEOUT * 3):
            if joining:
                await self._take_backend_for(view)
            await self._set_role(view)
        self.active &= {m.id for m in view.migrations}
        self.control.apply(table_from_view(view, me, self.active), joining=joining)
        self.applied = view
        self.changed.notify()
        role = "master" if shard.master == me else "replica"
        self.status.set(cluster=view.cluster, cluster_uid=view.uid, epoch=view.epoch, role=role)
        self.log.info("view_applied", cluster=view.cluster, epoch=view.epoch, role=role,
                      shard=shard.id)

    async def _leave_cluster(self, view: ClusterView) -> None:
        # a free node answers as a node with no slots (cluster_state:fail) and forgets the
        # cluster's password; the clients still connected under the cluster are redirected
        # to the new owners of their keys' slots
        still = self.views.get(view.cluster)
        departed = table_from_view(still, self.node_id) if still else None
        self.control.apply(replace(empty_table(), departed=departed))
        self.applied = None
        self.changed.notify()
        self.status.set(cluster="", cluster_uid="", epoch=0, role="master")
        self.log.info("left_cluster", cluster=view.cluster, epoch=view.epoch)
        try:
            with anyio.fail_after(BACKEND_TIMEOUT):
                await self.ctl.call("REPLICAOF", "NO", "ONE")
        except (RedisCtlError, TimeoutError) as exc:
            self.log.warning("backend_role_failed", error=str(exc))

    async def _take_backend_for(self, view: ClusterView) -> None:
        """Empty the backend unless it already holds this very cluster's data (same creation,
        not just the same name): one tenant's keys never reach another. The ownership is
        recorded only while the node's assignment is the one read before emptying: an
        unassignment deletes the record, and one written after it would let the node rejoin
        later with a stale copy (deleted keys back)."""
        owner = await self.repo.data_owner(self.node_id)
        wanted = DataOwner(view.cluster, view.uid)
        if owner == wanted:
            return
        assigned = await self.repo.assignment(self.node_id)
        if assigned is None or assigned.assignment.cluster != view.cluster:
            raise StoreError(f"not assigned to {view.cluster} (any more)")
        if self.backend_config is None:  # its Redis was away when the agent started
            await self._read_backend_config()
        await self.ctl.call("REPLICAOF", "NO", "ONE")  # a replica refuses FLUSHALL
        await self.ctl.call("FLUSHALL")
        # what the last tenant left besides keys: its functions and cached scripts (runnable
        # by the next, FLUSHALL keeps them), its commands' arguments in the slow log, its
        # command counts. Best effort: a Redis that renamed one of these still joins
        for reset in BACKEND_RESETS:
            try:
                await self.ctl.call(*reset)
            except RedisCtlError as exc:
                self.log.warning("backend_reset_failed", command=" ".join(reset),
                                 error=str(exc))
        await self._restore_backend_config()
        self.log.info("backend_emptied", previous=owner.cluster if owner else None,
                      cluster=view.cluster)
        if not await self.repo.set_data_owner(self.node_id, wanted, assigned.revision):
            raise StoreError(f"the assignment to {view.cluster} changed while joining it")

    async def _read_backend_config(self) -> None:
        try:
            with anyio.fail_after(BACKEND_TIMEOUT):
                reply = await self.ctl.call("CONFIG", "GET", *sorted(TENANT_SETTABLE))
        except (RedisCtlError, TimeoutError, OSError) as exc:
            self.log.warning("backend_config_unread", error=str(exc))
            return
        pairs = reply if isinstance(reply, list) else []
        self.backend_config = {bytes(k).decode(): bytes(v).decode()
                               for k, v in zip(pairs[::2], pairs[1::2])}

    async def _restore_backend_config(self) -> None:
        """Set the tenant-settable parameters back, one by one (aliases, such as the
        ziplist and listpack names, may not share one CONFIG SET); best effort."""
        if self.backend_config is None:
            self.log.warning("backend_config_not_restored", why="never read")
            return
        for name, value in sorted(self.backend_config.items()):
            try:
                await self.ctl.call("CONFIG", "SET", name, value)
            except RedisCtlError as exc:
                self.log.warning("backend_config_not_restored", parameter=name,
                                 error=str(exc))

    async def _set_role(self, view: ClusterView) -> None:
        """Make the backend the master or the replica `view` says it is."""
        shard = view.shard_of(self.node_id)
        assert shard is not None
        master = None if shard.master == self.node_id \
            else Address.parse(view.address_of(shard.master).backend)
        if await self.ctl.role() == ("master" if master is None else "slave", master):
            return
        if master is None:
            await self.ctl.call("REPLICAOF", "NO", "ONE")
        else:
            await self.ctl.call("REPLICAOF", master.host, master.port)
        self.log.info("backend_role_set", role="master" if master is None else "slave",
                      master=str(master) if master else None)

    async def keep_role(self) -> None:
        """Set the backend's role again if something changed it (the backend check)."""
        async with self.lock:
            view = self.applied
            # a graceful failover swaps the roles before the view records it: leave them be
            if view is not None and view.shard_of(self.node_id) is not None \
                    and not self.control.permission.handing_over:
                await self._set_role(view)

    async def activate(self, view: ClusterView, migration: Migration) -> None:
        """The start barrier of an outgoing migration passed: gate its slots here (unless
        another view was applied meanwhile)."""
        async with self.lock:
            if self.applied is not view:
                return
            self.active = self.active | {migration.id}
            self.control.apply(table_from_view(view, self.node_id, self.active))
            self.changed.notify()
            self.log.info("migration_started", migration=migration.id, epoch=view.epoch,
                          slots=[list(r) for r in migration.slots])
