"""The immutable routing snapshot a proxy serves from, and how it is built. Pure.

A command reads `server.table` once; applying new metadata builds a whole new table off to the
side and swaps one reference, so no command sees half of one epoch and half of another.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from core.address import Address
from core.slots import SLOT_COUNT, SlotRange, format_range
from core.view import ClusterView, MigrationState, hash_password

from .umctl import ClusterMeta

SLOT_NOT_SERVED = b"-CLUSTERDOWN Hash slot not served\r\n"


def moved(slot: int, address: str) -> bytes:
    """The redirect to `address`, printed as Redis Cluster prints it (IPv6 without brackets:
    clients split host and port at the last colon)."""
    where = Address.parse(address)
    return b"-MOVED %d %s:%d\r\n" % (slot, where.host.encode(), where.port)


def node_id(cluster: str, address: str) -> str:
    """A stable 40-character node id: the cluster name padded to 20, then a hash of the address."""
    digest = hashlib.blake2b(address.encode(), digest_size=8).hexdigest()
    return cluster[:20].ljust(20, "_") + digest.ljust(20, "_")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    address: str  # the proxy address clients connect to
    myself: bool
    ranges: tuple[SlotRange, ...]
    master_id: str | None = None  # set for a replica
    failed: bool = False  # the leader found it dead; it rejoins as a replica

    @property
    def host(self) -> str:
        return Address.parse(self.address).host

    @property
    def port(self) -> int:
        return Address.parse(self.address).port


@dataclass(frozen=True, slots=True, eq=False)
class MigratingSlots:
    """The route of every slot of a running migration, on its source and on its target.

    On the source, a key still present is served here and a missing one is forwarded to
    `peer` (proxy/migration.py); on the target, a command is served after ASKING and
    redirected to `peer` (the source, still the owner) without it.

    The source gates the slots from the first moment it serves them (after a restart, a
    promotion or a cancel too: keys may be at the peer already). Until `ready` (the start
    barrier: the peer applied the view) it forwards nothing and moves nothing: a command
    whose keys are missing here waits for the barrier.
    """

    migration_id: str
    source: bool
    peer: str  # the other side's proxy address
    peer_backend: str = ""  # the other side's Redis: the source MIGRATEs keys straight there
    ready: bool = True  # source: the barrier passed (missing keys go to `peer`; keys move)
    replicas: int = 0  # live replicas of this node's shard: the mover WAITs for them
    peer_replicas: int = 0  # live replicas of the peer's shard: WAITed for after RESTORE
    min_replicas_ack: int = 0  # synchronous mode: a gated write WAITs for this many
    ack_timeout_ms: int = 1000
    # the cluster's migration rate in keys/s (0: no limit); None: the node's --migration-rate
    keys_per_second: int | None = None

    def moved(self, slot: int) -> bytes:
        """The target's answer without ASKING: the slot is still the source's."""
        return moved(slot, self.peer)


@dataclass(frozen=True, slots=True)
class RoutingTable:
    cluster: str
    epoch: int
    nodes: tuple[NodeInfo, ...]
    # per slot: None when this proxy serves it, the complete redirect/error reply, or the
    # slot's running migration
    routes: tuple[bytes | MigratingSlots | None, ...] = field(repr=False)
    config: tuple[tuple[str, str], ...] = ()
    password_hash: str | None = None
    # whose data the backend holds: the cluster and, in the mesh, its creation. A client
    # connected under one tenant is never served under another (proxy/admission.py)
    tenant: str = ""
    # a node that left a cluster which goes on: that cluster's layout as it left it, so the
    # clients still connected under it are redirected to the new owners (nobody else sees it)
    departed: RoutingTable | None = field(default=None, repr=False)
    # per slot: 1 where this node is a replica of the slot's master (READONLY clients read here)
    readable: bytes = b""
    # synchronous mode: acknowledge a write once WAIT says this many replicas have it
    min_replicas_ack: int = 0
    ack_timeout_ms: int = 1000
    # the proxies of masters that receive slots in a planned or running migration (any
    # node's table)
    receiving: frozenset[str] = frozenset()
    # every slot is served here (a one-shard cluster): the fast path skips hashing keys
    serves_all: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "serves_all", self.routes.count(None) == SLOT_COUNT)

    @property
    def myself(self) -> NodeInfo | None:
        return next((n for n in self.nodes if n.myself), None)

    @property
    def configured(self) -> bool:
        return bool(self.cluster)

    @property
    def login_hash(self) -> str | None:
        """The password hash AUTH and HELLO check: the served cluster's or, on a node that
        just left a cluster, that cluster's (its clients' keyed commands are redirected
        after they log in; proxy/admission.py)."""
        if not self.tenant and self.departed is not None:
            return self.departed.password_hash
        return self.password_hash

    def migrations(self) -> dict[str, tuple[MigratingSlots, bytearray]]:
        """Each running migration this proxy takes part in, with a mask of its slots."""
        found: dict[str, tuple[MigratingSlots, bytearray]] = {}
        for slot, route in enumerate(self.routes):
            if isinstance(route, MigratingSlots):
                entry = found.get(route.migration_id)
                if entry is None:
                    entry = found[route.migration_id] = (route, bytearray(SLOT_COUNT))
                entry[1][slot] = 1
        return found


def empty_table() -> RoutingTable:
    return RoutingTable(cluster="", epoch=0, nodes=(), routes=(SLOT_NOT_SERVED,) * SLOT_COUNT)


def table_from_meta(meta: ClusterMeta, my_address: str) -> RoutingTable:
    """Build the table for this proxy (`my_address` is its announced address)."""
    routes: list[bytes | None] = [SLOT_NOT_SERVED] * SLOT_COUNT
    ranges_by_owner: dict[str, list[SlotRange]] = {}
    for owner, ranges in meta.owned():
        ranges_by_owner.setdefault(owner, []).extend(ranges)
        for start, end in ranges:
            if owner:
                for slot in range(start, end + 1):
                    routes[slot] = moved(slot, owner)
            else:
                routes[start : end + 1] = [None] * (end - start + 1)
    nodes = [NodeInfo(node_id(meta.cluster, my_address), my_address, True,
                      tuple(sorted(ranges_by_owner.pop("", []))))]
    for entry in meta.peers:
        if entry.address not in {n.address for n in nodes}:
            nodes.append(NodeInfo(node_id(meta.cluster, entry.address), entry.address, False,
                                  tuple(sorted(ranges_by_owner.get(entry.address, [])))))
    config = dict(meta.config)
    password_hash = config.pop("password_hash", None)
    if "password" in config:
        password_hash = hash_password(config.pop("password"))
    return RoutingTable(cluster=meta.cluster, epoch=meta.epoch, nodes=tuple(nodes), tenant=meta.cluster,
                        routes=tuple(routes), config=tuple(sorted(config.items())),
                        password_hash=password_hash)


def format_ranges(ranges: tuple[SlotRange, ...]) -> list[str]:
    return [format_range(r) for r in ranges]


def live_replicas(view: ClusterView, shard_id: str) -> int:
    """How many replicas of `shard_id` are not marked failed: what a WAIT there waits for."""
    shard = next(s for s in view.shards if s.id == shard_id)
    return sum(1 for r in shard.replicas if r not in view.failed)


def table_from_view(view: ClusterView, me: str,
                    active: frozenset[str] | None = None) -> RoutingTable:
    """Build the table node `me` serves from a validated cluster view.

    A shard's slots are served by its master's proxy; a replica's proxy redirects to it.
    Running migrations mark their slots on the source's and the target's master. The source
    gates them at once; it forwards and moves only once the migration's id is in `active`
    (the target has applied the view: the barrier). None: all are active.
    """
    routes: list[bytes | MigratingSlots | None] = [SLOT_NOT_SERVED] * SLOT_COUNT
    nodes: list[NodeInfo] = []
    readable = bytearray(SLOT_COUNT)
    masters = {s.id: s.master for s in view.shards}
    replicas = {s.id: live_replicas(view, s.id) for s in view.shards}
    for shard in view.shards:
        master_proxy = view.address_of(shard.master).proxy
        master_id = node_id(view.cluster, shard.master)
        nodes.append(NodeInfo(master_id, master_proxy, shard.master == me, shard.slots))
        for replica in shard.replicas:
            nodes.append(NodeInfo(node_id(view.cluster, replica), view.address_of(replica).proxy,
                                  replica == me, (), master_id, replica in view.failed))
        if me in shard.replicas and me not in view.failed:
            for start, end in shard.slots:
                readable[start : end + 1] = b"\x01" * (end - start + 1)
        for start, end in shard.slots:
            if shard.master == me:
                routes[start : end + 1] = [None] * (end - start + 1)
            else:
                for slot in range(start, end + 1):
                    routes[slot] = moved(slot, master_proxy)
    # planned ones too: a scale runs them one after another, and a target stays "receiving"
    # from plan to commit (a cluster-wide SCAN orders by it: proxy/plain.py)
    receiving = {view.address_of(masters[m.target]).proxy for m in view.migrations}
    for m in view.migrations:
        if m.state is not MigrationState.MIGRATING:
            continue
        source, target = masters[m.source], masters[m.target]
        config = view.config
        if me == source:
            marker = MigratingSlots(m.id, True, view.address_of(target).proxy,
                                    view.address_of(target).backend,
                                    ready=active is None or m.id in active,
                                    replicas=replicas[m.source],
                                    peer_replicas=replicas[m.target],
                                    min_replicas_ack=config.min_replicas_ack,
                                    ack_timeout_ms=config.ack_timeout_ms,
                                    keys_per_second=config.migration_rate)
        elif me == target:
            marker = MigratingSlots(m.id, False, view.address_of(source).proxy,
                                    view.address_of(source).backend,
                                    replicas=replicas[m.target],
                                    peer_replicas=replicas[m.source],
                                    min_replicas_ack=config.min_replicas_ack,
                                    ack_timeout_ms=config.ack_timeout_ms,
                                    keys_per_second=config.migration_rate)
        else:
            continue
        for start, end in m.slots:
            routes[start : end + 1] = [marker] * (end - start + 1)
    return RoutingTable(cluster=view.cluster, epoch=view.epoch, nodes=tuple(nodes),
                        tenant=f"{view.cluster}/{view.uid}",
                        routes=tuple(routes), password_hash=view.config.password_hash,
                        readable=bytes(readable) if any(readable) else b"",
                        min_replicas_ack=view.config.min_replicas_ack,
                        ack_timeout_ms=view.config.ack_timeout_ms,
                        receiving=frozenset(receiving))
