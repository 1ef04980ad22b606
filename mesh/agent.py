"""The node agent: joins the pool, applies views to the proxy, reports status, may lead.

One agent per mesh-proxy. Each incarnation holds one lease: the node record, the status key
and the election key live on it. When the lease is lost everything under it is cancelled and
a new incarnation starts; the proxy keeps serving the last view it applied meanwhile.

The work is done by small tasks, each in its own module; the agent owns their task groups:

| task | module | lifetime |
| --- | --- | --- |
| fence guard | mesh/fence.py | the agent's |
| views watcher and applier | mesh/views.py | one lease |
| status reporter | mesh/status.py | one lease |
| status watch (peers' applied epochs) | mesh/status.py | one lease |
| backend check | mesh/backend_check.py | one lease |
| migration start barriers | mesh/barriers.py | one lease |
| leader (campaign, then duties) | mesh/leader.py | one lease |
| the leader's watch (revokes a dead leader's lease) | mesh/leader.py | one lease |
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import anyio
import structlog
from anyio.abc import TaskStatus

from core import __version__
from core.nodes import NodeRecord
from proxy.control import FENCED_LEAVING, ControlPort

from .backend_check import BackendChecker
from .barriers import MigrationStarts
from .fence import FenceGuard
from .handover import HandoverError, graceful_failover
from .leader import lead, watch_the_leader
from .model.fencing import CONFIRM_INTERVAL, KEEPALIVE_EVERY, LEASE_TTL
from .redisctl import RedisCtl, RedisCtlError
from .status import PeerStatuses, StatusReporter
from .store.etcd import EtcdStore, LeaseKeeper, StoreError
from .store.repo import MeshRepo
from .views import ViewApplier

log = structlog.get_logger("mesh.agent")

# how long a stopping master may take to hand its shard over (Redis FAILOVER tries and the
# view commit; usually well under a second); deploy/ gives a stop this plus DEREGISTER_TIMEOUT
LEAVE_HANDOVER_TIMEOUT = 20.0
RESTART_WAIT = 1.0
REVOKE_TIMEOUT = 2.0  # a lost incarnation revokes its lease at once: the election moves on
DEREGISTER_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    proxy: str  # announced proxy address
    backend: str
    host: str = ""
    backend_password: str | None = None
    # the mesh secret: a leaving master proves it to its own proxy for UMCTL HANDOVER
    mesh_secret: bytes | None = field(default=None, repr=False)


class NodeAgent:
    def __init__(self, store: EtcdStore, control: ControlPort, config: NodeConfig) -> None:
        self.repo = MeshRepo(store)
        self.control = control  # the one way into the data path
        self.config = config
        self.ctl = RedisCtl(config.backend, config.backend_password)
        self.status = StatusReporter(self.repo, config.node_id)
        self.peers = PeerStatuses(self.repo)
        # what outlives a lease: the views seen, the one applied, the fence
        self.views = ViewApplier(self.repo, control, self.ctl, self.status, self.peers,
                                 config.node_id)
        self.fence = FenceGuard(control, self.views, config.node_id)
        self.backend = BackendChecker(self.ctl, self.views, self.status, control)
        self.keeper: LeaseKeeper | None = None
        self.log = log.bind(node=config.node_id)

    # -- lifetime ----------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run incarnations forever. Nothing the agent meets (etcd down, a backend that
        misbehaves, a bug) may stop the proxy: the data path keeps serving meanwhile."""
        task_status.started()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.fence.run)
            await self._incarnations()

    async def _incarnations(self) -> None:
        while True:
            try:
                await self._incarnation()
            except* (StoreError, OSError, RedisCtlError) as group:
                # etcd away: the store said so once (etcd_unreachable); not again per restart
                quiet = self.repo.store.outage.down and all(
                    isinstance(e, StoreError) for e in group.exceptions)
                (self.log.debug if quiet else self.log.warning)(
                    "agent_restarting", error=repr(group.exceptions[0]))
            except* Exception as group:  # noqa: BLE001
                self.log.error("agent_failed", error=repr(group.exceptions[0]),
                               exc_info=group.exceptions[0])
            await anyio.sleep(RESTART_WAIT)

    async def _incarnation(self) -> None:
        """One lease: register on it and run every per-lease task until it is lost."""
        async with anyio.create_task_group() as tg:
            keeper = LeaseKeeper(self.repo.store, LEASE_TTL, CONFIRM_INTERVAL,
                                 KEEPALIVE_EVERY, self.repo.keys.node(self.config.node_id),
                                 on_renew=self._lease_confirmed)
            await tg.start(keeper.run)
            self.keeper = self.fence.keeper = keeper
            lease = keeper.lease_id
            record = NodeRecord(self.config.node_id, self.config.proxy, self.config.backend,
                                self.config.host, __version__, time.time())
            await self.repo.register(record, lease)
            self.log.info("node_registered", lease=f"{lease:x}")
            self.status.lease = lease
            await self.status.publish()  # before the views are read: see ViewApplier.run
            tg.start_soon(self.peers.run)
            tg.start_soon(self.views.run, keeper)
            tg.start_soon(self.status.run, lease)
            tg.start_soon(self.backend.run)
            tg.start_soon(MigrationStarts(self.peers, self.views, self.config.node_id).run)
            tg.start_soon(lead, self.repo, lease, self.config.node_id, self.peers.changed)
            tg.start_soon(watch_the_leader, self.repo, self.config.node_id)
            try:
                await keeper.lost.wait()
                self.log.warning("lease_lost_reregistering")
                tg.cancel_scope.cancel()
            finally:
                # a lost lease is revoked at once, so the election moves on. One that still
                # holds (the incarnation failed otherwise: etcd refused a write) is left to
                # expire: the fence guard keeps its deadline, and the node stays registered
                # until then, so nobody is promoted while it may still serve (a revoke would
                # end the lease before the deadline the guard trusts)
                if keeper.lost.is_set():
                    with anyio.move_on_after(REVOKE_TIMEOUT, shield=True):
                        with contextlib.suppress(StoreError):
                            await self.repo.store.revoke(lease)

    def _lease_confirmed(self) -> None:
        """etcd confirmed the lease (the keeper's read found it): move the deadline on, and
        lift a lease fence now rather than at the next reconcile (a node frozen past its
        deadline serves again as soon as etcd answers it)."""
        self.fence.check()
        self.views.resume_if_current()

    async def stop(self) -> None:
        """Clean shutdown (SIGTERM): a master hands its shard over first, then the node
        deregisters and revokes its lease, so the leader sees it gone at once and marks it a
        failed replica. It stays a member: restarted with the same node id it registers
        again, leaves `failed` and resyncs as a replica of its shard. Leaving a cluster for
        good is `umctl-mesh node drain`."""
        await self._hand_over_shard()
        with anyio.move_on_after(DEREGISTER_TIMEOUT, shield=True), \
                contextlib.suppress(StoreError):
            await self.repo.deregister(self.config.node_id)
            if self.keeper is not None:
                await self.repo.store.revoke(self.keeper.lease_id)

    async def _hand_over_shard(self) -> None:
        """A master whose shard has a replica hands the shard over as `umctl-mesh failover`
        does (mesh/handover.py: writes pause, the replica catches up, the roles swap, the view
        records it), so it stops as a replica and no write is lost or taken twice. If that
        fails it stops taking writes before it deregisters: the replica the leader then
        promotes is never a second master. A master with no live replica stops as it is (its
        slots are unserved until it is back, or reassigned after the cluster's
        reassign_after)."""
        view, me = self.views.applied, self.config.node_id
        shard = view.shard_of(me) if view is not None else None
        if view is None or shard is None or shard.master != me \
                or all(r in view.failed for r in shard.replicas):
            return
        try:
            with anyio.fail_after(LEAVE_HANDOVER_TIMEOUT):
                new = await graceful_failover(self.repo, view.cluster, shard.id, None,
                                              self.config.mesh_secret, master=me)
        except (HandoverError, StoreError, TimeoutError) as exc:
            self.control.fence(FENCED_LEAVING)
            self.log.warning("leave_handover_failed", cluster=view.cluster, shard=shard.id,
                             error=str(exc) or type(exc).__name__)
            return
        to = next(s.master for s in new.shards if s.id == shard.id)
        self.log.info("leave_handed_over", cluster=new.cluster, epoch=new.epoch,
                      shard=shard.id, to=to)
