"""The mesh's records in etcd, typed: every read returns frozen values, every view write is
one `commit_view` (DESIGN.md section 3).

`MeshRepo` sits over `EtcdStore` (the etcd client) and `Keys` (the key layout); the agent, the
leader and umctl-mesh read and write the mesh through it and never build a key or a
transaction themselves. Records that do not decode are skipped: a reader never fails on
another node's bad record (views are validated on every read; the agent logs the invalid
ones it meets, from `ViewsRead.invalid` and `ViewChange.error`).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.nodes import Assignment, DataOwner, NodeRecord, NodeStatus, RecordError
from core.view import ClusterView, ViewError, from_json, to_json, validate

from .etcd import EtcdStore, Event, Fence
from .keys import Keys


@dataclass(frozen=True, slots=True)
class StoredView:
    """A cluster's view and the etcd mod_revision it was read at: what `commit_view` compares."""

    cluster: str  # from the key
    view: ClusterView
    revision: int


@dataclass(frozen=True, slots=True)
class ViewsRead:
    views: dict[str, StoredView]  # cluster -> view, the valid ones
    invalid: dict[str, str]  # cluster -> why its view did not decode
    revision: int  # the etcd revision of the read: a watch continues after it


@dataclass(frozen=True, slots=True)
class ViewChange:
    """One change under clusters/: a new view, a deleted one (`view` None, `error` None), or
    a view that does not decode (`error`)."""

    cluster: str
    view: ClusterView | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Registered:
    """A registered node: its record and the lease it lives on."""

    record: NodeRecord
    lease: int
    revision: int = 0  # the record's mod revision (for `ViewCommit.nodes_as_read`)


@dataclass(frozen=True, slots=True)
class StoredAssignment:
    assignment: Assignment
    revision: int


@dataclass(frozen=True, slots=True)
class ViewCommit:
    """What goes into one view transaction besides the view itself.

    `claim`: free nodes taken into the cluster (their assignment must be absent; it is
    written). `hold`: assignments rewritten as held (`cluster delete --keep-data`).
    `unassign`: assignments deleted (the nodes return to the pool), and with them the
    nodes' data ownership: a node that joins again, even the same cluster, is emptied (what
    its Redis kept from before is stale: a key deleted since would come back).
    """

    claim: tuple[str, ...] = ()
    hold: tuple[str, ...] = ()
    unassign: tuple[str, ...] = ()
    fence: Fence | None = None  # leader duties: the leader's election key must still exist
    # (node, mod revision; 0: absent): these statuses must be as the caller read them (a
    # master replaced on its own word that it fenced must not have spoken again since)
    statuses_as_read: tuple[tuple[str, int], ...] = ()
    nodes_as_read: tuple[tuple[str, int], ...] = ()  # the same for registrations


class MeshRepo:
    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.keys: Keys = store.keys

    # -- views -------------------------------------------------------------------------------
    def _decode_view(self, key: bytes, value: bytes) -> tuple[str | None, ClusterView | None, str]:
        cluster = self.keys.cluster_of_view_key(key)
        if cluster is None:
            return None, None, ""
        try:
            return cluster, from_json(value), ""
        except ViewError as exc:
            return cluster, None, str(exc)

    async def read_views(self) -> ViewsRead:
        kvs, revision = await self.store.get_prefix(self.keys.clusters)
        views: dict[str, StoredView] = {}
        invalid: dict[str, str] = {}
        for kv in kvs:
            cluster, view, error = self._decode_view(kv.key, kv.value)
            if cluster is None:
                continue
            if view is None:
                invalid[cluster] = error
            else:
                views[cluster] = StoredView(cluster, view, kv.mod_revision)
        return ViewsRead(views, invalid, revision)

    async def views(self) -> dict[str, StoredView]:
        return (await self.read_views()).views

    async def view(self, cluster: str) -> StoredView | None:
        """The cluster's view; None if there is none. Raises ViewError if it is invalid."""
        kv = await self.store.get(self.keys.view(cluster))
        if kv is None:
            return None
        return StoredView(cluster, from_json(kv.value), kv.mod_revision)

    async def watch_views(self, start_revision: int,
                          on_change: Callable[[ViewChange], Awaitable[None]],
                          on_resync: Callable[[], Awaitable[int]]) -> None:
        """Deliver every view change from `start_revision` on, forever (see EtcdStore.watch:
        after a compaction `on_resync` re-reads and returns the revision to go on from)."""

        async def on_event(event: Event) -> None:
            if event.value is None:
                cluster = self.keys.cluster_of_view_key(event.key)
                if cluster is not None:
                    await on_change(ViewChange(cluster, None))
                return
            cluster, view, error = self._decode_view(event.key, event.value)
            if cluster is not None:
                await on_change(ViewChange(cluster, view, error or None))

        await self.store.watch(self.keys.clusters, start_revision, on_event, on_resync)

    async def commit_view(self, cluster: str, revision: int, view: ClusterView | None,
                          change: ViewCommit = ViewCommit()) -> bool:
        """The one view transaction: if the view of `cluster` is still at `revision` (0: there
        is none), every claimed node is still unassigned and, with `change.fence`, the
        leader's election key still exists as created, write `view` (None deletes it) with
        `change`'s assignments in the same transaction. False when a comparison failed: the
        caller lost a race and must re-read and re-plan."""
        keys = self.keys
        if view is not None:
            validate(view)  # views are validated on every write (and every read)
        checks = {keys.view(cluster): revision, **{keys.assignment(n): 0 for n in change.claim},
                  **{keys.status(n): rev for n, rev in change.statuses_as_read},
                  **{keys.node(n): rev for n, rev in change.nodes_as_read}}
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        if view is not None:
            puts[keys.view(cluster)] = to_json(view)  # first: a retried commit checks it
        else:
            deletes.append(keys.view(cluster))
        puts.update({keys.assignment(n): Assignment(cluster).encode() for n in change.claim})
        puts.update({keys.assignment(n): Assignment(cluster, held=True).encode()
                     for n in change.hold})
        deletes += [keys.assignment(n) for n in change.unassign]
        deletes += [keys.data_owner(n) for n in change.unassign]
        return await self.store.commit(checks, puts, tuple(deletes), fence=change.fence)

    # -- nodes -------------------------------------------------------------------------------
    async def nodes(self) -> dict[str, Registered]:
        """Every registered node (alive: its record lives on its lease)."""
        found = {}
        for kv in (await self.store.get_prefix(self.keys.nodes))[0]:
            try:
                record = NodeRecord.decode(kv.value)
            except RecordError:
                continue
            found[record.node_id] = Registered(record, kv.lease, kv.mod_revision)
        return found

    async def register(self, record: NodeRecord, lease: int) -> None:
        await self.store.put(self.keys.node(record.node_id), record.encode(), lease=lease)

    async def deregister(self, node_id: str) -> None:
        """Delete the node's record and status (a clean shutdown)."""
        await self.store.delete(self.keys.node(node_id))
        await self.store.delete(self.keys.status(node_id))

    async def leader(self, nodes: dict[str, Registered] | None = None) -> str | None:
        """The node whose election candidate is the oldest (None: no candidate, or its node
        has no record). `nodes`: a read of `nodes()` to reuse."""
        if nodes is None:
            nodes = await self.nodes()
        candidates = (await self.store.get_prefix(self.keys.election))[0]
        if not candidates:
            return None
        oldest = min(candidates, key=lambda kv: kv.create_revision)
        return next((nid for nid, r in nodes.items() if r.lease == oldest.lease), None)

    # -- statuses ----------------------------------------------------------------------------
    async def statuses(self) -> dict[str, NodeStatus]:
        return (await self.read_statuses())[0]

    async def status(self, node_id: str) -> NodeStatus | None:
        kv = await self.store.get(self.keys.status(node_id))
        if kv is None:
            return None
        try:
            return NodeStatus.decode(kv.value)
        except RecordError:
            return None

    async def read_statuses(self) -> tuple[dict[str, NodeStatus], int]:
        """Every readable status, and the etcd revision of the read (to watch from)."""
        statuses, _, revision = await self.statuses_as_read()
        return statuses, revision

    async def statuses_as_read(self) -> tuple[dict[str, NodeStatus], dict[str, int], int]:
        """Every readable status, each status key's mod revision (for `ViewCommit.
        statuses_as_read`), and the etcd revision of the read."""
        kvs, revision = await self.store.get_prefix(self.keys.statuses)
        found, revisions = {}, {}
        for kv in kvs:
            try:
                status = NodeStatus.decode(kv.value)
            except RecordError:
                continue
            found[status.node_id] = status
            revisions[status.node_id] = kv.mod_revision
        return found, revisions, revision

    async def watch_statuses(self, start_revision: int,
                             on_change: Callable[[str, NodeStatus | None], Awaitable[None]],
                             on_resync: Callable[[], Awaitable[int]]) -> None:
        """Deliver every status change from `start_revision` on, forever: (node id, its new
        status or None when it is gone). Statuses that do not decode are skipped."""

        async def on_event(event: Event) -> None:
            node_id = self.keys.last_part(event.key)
            if event.value is None:
                await on_change(node_id, None)
                return
            try:
                status = NodeStatus.decode(event.value)
            except RecordError:
                return
            await on_change(status.node_id, status)

        await self.store.watch(self.keys.statuses, start_revision, on_event, on_resync)

    async def put_status(self, status: NodeStatus, lease: int) -> None:
        await self.store.put(self.keys.status(status.node_id), status.encode(), lease=lease)

    # -- assignments and data ownership ------------------------------------------------------
    async def assignments(self) -> dict[str, StoredAssignment]:
        found = {}
        for kv in (await self.store.get_prefix(self.keys.assignments))[0]:
            try:
                found[self.keys.last_part(kv.key)] = StoredAssignment(
                    Assignment.decode(kv.value), kv.mod_revision)
            except RecordError:
                continue
        return found

    async def assigned(self) -> set[str]:
        """The nodes with an assignment, readable or not (none of them is free)."""
        kvs = (await self.store.get_prefix(self.keys.assignments))[0]
        return {self.keys.last_part(kv.key) for kv in kvs}

    async def assignment(self, node_id: str) -> StoredAssignment | None:
        """Raises RecordError if the record does not decode."""
        kv = await self.store.get(self.keys.assignment(node_id))
        if kv is None:
            return None
        return StoredAssignment(Assignment.decode(kv.value), kv.mod_revision)

    async def release(self, node_id: str, revision: int) -> bool:
        """Delete the node's assignment, if it is still at `revision`, and its data ownership
        (a held node joining its cluster again is emptied first: its copy is stale)."""
        key = self.keys.assignment(node_id)
        return await self.store.commit({key: revision}, {},
                                       (key, self.keys.data_owner(node_id)))

    async def data_owner(self, node_id: str) -> DataOwner | None:
        """Whose data the node's Redis holds; None if unknown (or unreadable)."""
        kv = await self.store.get(self.keys.data_owner(node_id))
        if kv is None:
            return None
        try:
            return DataOwner.decode(kv.value)
        except RecordError:
            return None

    async def set_data_owner(self, node_id: str, owner: DataOwner, assigned: int) -> bool:
        """Record `owner` if the node's assignment is still at revision `assigned` (False:
        the node was unassigned, or assigned anew, since: whatever it joined is no more)."""
        return await self.store.commit({self.keys.assignment(node_id): assigned},
                                       {self.keys.data_owner(node_id): owner.encode()})
