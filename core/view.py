"""The cluster view: the whole metadata of one cluster at one epoch. Pure values, strict JSON.

A view is what etcd stores under `clusters/<name>/view`, what umctl-mesh edits and what every
node applies. `validate()` is total: a view that passes it can be routed from alone.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from .slots import SLOT_COUNT, SlotRange, normalize, slot_count

CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
ADDRESS = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


class ViewError(ValueError):
    """The view breaks an invariant; the message says which."""


class MigrationState(Enum):
    PENDING = "pending"  # planned; the leader starts it when the source has no other
    MIGRATING = "migrating"  # the source moves keys; ownership changes at commit


@dataclass(frozen=True, slots=True)
class NodeAddress:
    proxy: str  # where clients reach the node's proxy
    backend: str  # the node's Redis


@dataclass(frozen=True, slots=True)
class Shard:
    id: str
    master: str
    replicas: tuple[str, ...] = ()
    slots: tuple[SlotRange, ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        return (self.master, *self.replicas)


@dataclass(frozen=True, slots=True)
class Migration:
    slots: tuple[SlotRange, ...]
    source: str  # shard ids
    target: str
    epoch: int  # the epoch it was planned (pending) or started (migrating) in
    state: MigrationState = MigrationState.MIGRATING

    @property
    def id(self) -> str:
        """Stable while the migration runs: names its progress in the source's status."""
        return f"{self.source}>{self.target}@{self.epoch}"


REASSIGN_AFTER = 60  # seconds (ClusterConfig.reassign_after)
MAX_REPLICAS = 16  # replicas per shard a cluster may declare (ClusterConfig.replicas)
# keys/s a cluster may declare (ClusterConfig.migration_rate): far above what one mover does,
# low enough that a typo (an extra few digits) is refused rather than read as "no limit"
MAX_MIGRATION_RATE = 10_000_000


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    password_hash: str | None = None
    replica_reads: bool = False
    failover: str = "auto"  # "manual": the leader never reassigns a dead shard's slots
    # synchronous mode: a write is acknowledged only once this many replicas have it
    min_replicas_ack: int = 0
    ack_timeout_ms: int = 1000
    # seconds every node of a shard must have been dead before the leader gives its slots away
    # EMPTY (its data is lost); synchronous mode never does (mesh/model/failover.py)
    reassign_after: int = REASSIGN_AFTER
    # replicas per shard the leader keeps (mesh/model/replicas.py): it fills missing ones from
    # free nodes and replaces one dead for `reassign_after`. A view written before this field
    # existed declares what its shards have (`from_json`)
    replicas: int = 0
    # the migration mover's rate in keys/s for this cluster (0: no limit); None: each node's
    # `mesh-proxy --migration-rate`. `umctl-mesh migrate throttle` changes it live: a running
    # migration's markers carry it (proxy/routing.py)
    migration_rate: int | None = None


@dataclass(frozen=True, slots=True)
class ClusterView:
    cluster: str
    epoch: int
    shards: tuple[Shard, ...]
    nodes: tuple[tuple[str, NodeAddress], ...]  # (node id, addresses), sorted by id
    config: ClusterConfig = field(default_factory=ClusterConfig)
    migrations: tuple[Migration, ...] = ()
    # one creation of the cluster: a cluster deleted and created again under the same name is
    # another tenant's (its nodes empty their Redis, its epochs start over)
    uid: str = ""
    failed: tuple[str, ...] = ()  # members the leader found dead; they rejoin as replicas
    lost: tuple[str, ...] = ()  # what failures cost, in words, for operators (newest last)

    def address_of(self, node_id: str) -> NodeAddress:
        for nid, address in self.nodes:
            if nid == node_id:
                return address
        raise KeyError(node_id)

    def shard_of(self, node_id: str) -> Shard | None:
        return next((s for s in self.shards if node_id in s.members), None)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(nid for nid, _ in self.nodes)

    def next(self, **changes: Any) -> ClusterView:
        """The same view one epoch later, with `changes` applied."""
        return replace(self, epoch=self.epoch + 1, **changes)


def validate(view: ClusterView) -> None:
    """Raise ViewError unless every invariant of DESIGN.md section 4 holds."""
    if not CLUSTER_NAME.fullmatch(view.cluster):
        raise ViewError(f"invalid cluster name {view.cluster!r}")
    if view.epoch < 1:
        raise ViewError("epoch must be at least 1")
    if view.config.failover not in ("auto", "manual"):
        raise ViewError("config failover must be auto or manual")
    if view.config.min_replicas_ack < 0 or view.config.ack_timeout_ms < 1 \
            or view.config.reassign_after < 0:
        raise ViewError("config min_replicas_ack and reassign_after must be >= 0 and "
                        "ack_timeout_ms >= 1")
    if not 0 <= view.config.replicas <= MAX_REPLICAS:
        raise ViewError(f"config replicas must be 0 to {MAX_REPLICAS}")
    rate = view.config.migration_rate
    if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool)
                             or not 0 <= rate <= MAX_MIGRATION_RATE):
        raise ViewError(f"config migration_rate must be 0 (no limit) to {MAX_MIGRATION_RATE} "
                        f"keys/s or null (the nodes' --migration-rate), not {rate!r}")
    addresses = dict(view.nodes)
    if len(addresses) != len(view.nodes):
        raise ViewError("a node is listed twice")
    for nid, address in view.nodes:
        if not NODE_ID.fullmatch(nid):
            raise ViewError(f"invalid node id {nid!r}")
        for a in (address.proxy, address.backend):
            match = ADDRESS.fullmatch(a)
            if not match or not 0 < int(match.group(2)) < 65536:
                raise ViewError(f"invalid address {a!r} of node {nid}")
    if not view.shards:
        raise ViewError("a cluster needs at least one shard")
    seen_shards: set[str] = set()
    seen_nodes: set[str] = set()
    owner = [""] * SLOT_COUNT
    for shard in view.shards:
        if not shard.id or shard.id in seen_shards:
            raise ViewError(f"shard id {shard.id!r} is empty or repeated")
        seen_shards.add(shard.id)
        for nid in shard.members:
            if nid in seen_nodes:
                raise ViewError(f"node {nid} is in more than one shard or role")
            if nid not in addresses:
                raise ViewError(f"node {nid} of shard {shard.id} has no addresses")
            seen_nodes.add(nid)
        if normalize(shard.slots) != shard.slots:
            raise ViewError(f"slots of shard {shard.id} are not sorted and merged")
        for start, end in shard.slots:
            if not 0 <= start <= end < SLOT_COUNT:
                raise ViewError(f"shard {shard.id} has an invalid range {start}-{end}")
            for slot in range(start, end + 1):
                if owner[slot]:
                    raise ViewError(f"slot {slot} is owned by {owner[slot]} and {shard.id}")
                owner[slot] = shard.id
    unowned = owner.count("")
    if unowned:
        raise ViewError(f"{unowned} slots have no owner (first: {owner.index('')})")
    if not set(view.failed) <= seen_nodes:
        raise ViewError("a failed node is in no shard")
    if any(s.master in view.failed for s in view.shards):
        raise ViewError("a failed node cannot be a master")
    extra = set(addresses) - seen_nodes
    if extra:
        raise ViewError(f"nodes {sorted(extra)} are listed but in no shard")
    moving = [False] * SLOT_COUNT
    for m in view.migrations:
        if m.source not in seen_shards or m.target not in seen_shards or m.source == m.target:
            raise ViewError(f"migration {m.source}->{m.target} names unknown shards")
        if not m.slots or normalize(m.slots) != m.slots:
            raise ViewError(f"migration {m.source}->{m.target} has no or unsorted slots")
        for start, end in m.slots:
            if not 0 <= start <= end < SLOT_COUNT:
                raise ViewError(f"migration has an invalid range {start}-{end}")
            for s in range(start, end + 1):
                if owner[s] != m.source:
                    raise ViewError(f"migration moves slot {s}, which its source does not own")
                if moving[s]:
                    raise ViewError(f"slot {s} is in two migrations")
                moving[s] = True


# -- JSON ------------------------------------------------------------------------------------

def to_json(view: ClusterView) -> bytes:
    doc = {
        "cluster": view.cluster,
        "uid": view.uid,
        "failed": list(view.failed),
        "lost": list(view.lost),
        "epoch": view.epoch,
        "config": {"password_hash": view.config.password_hash,
                   "replica_reads": view.config.replica_reads,
                   "failover": view.config.failover,
                   "min_replicas_ack": view.config.min_replicas_ack,
                   "ack_timeout_ms": view.config.ack_timeout_ms,
                   "reassign_after": view.config.reassign_after,
                   "replicas": view.config.replicas,
                   "migration_rate": view.config.migration_rate},
        "shards": [{"id": s.id, "master": s.master, "replicas": list(s.replicas),
                    "slots": [list(r) for r in s.slots]} for s in view.shards],
        "migrations": [{"slots": [list(r) for r in m.slots], "from": m.source, "to": m.target,
                        "epoch": m.epoch, "state": m.state.value} for m in view.migrations],
        "nodes": {nid: {"proxy": a.proxy, "backend": a.backend} for nid, a in view.nodes},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def from_json(data: bytes | str) -> ClusterView:
    """Decode and validate; raises ViewError for anything malformed."""
    try:
        doc = json.loads(data)
        config = doc.get("config") or {}
        shards = doc["shards"]
        # a view from before declared replica counts: the most any shard has
        declared = max((len(s.get("replicas", [])) for s in shards), default=0)
        view = ClusterView(
            cluster=str(doc["cluster"]),
            uid=str(doc.get("uid", "")),
            failed=tuple(map(str, doc.get("failed", []))),
            lost=tuple(map(str, doc.get("lost", []))),
            epoch=_int(doc["epoch"]),
            config=ClusterConfig(password_hash=config.get("password_hash"),
                                 replica_reads=bool(config.get("replica_reads", False)),
                                 failover=str(config.get("failover", "auto")),
                                 min_replicas_ack=_int(config.get("min_replicas_ack", 0)),
                                 ack_timeout_ms=_int(config.get("ack_timeout_ms", 1000)),
                                 reassign_after=_int(config.get("reassign_after", REASSIGN_AFTER)),
                                 replicas=_int(config.get("replicas", declared)),
                                 migration_rate=_optional_int(config.get("migration_rate"))),
            shards=tuple(Shard(id=str(s["id"]), master=str(s["master"]),
                               replicas=tuple(map(str, s.get("replicas", []))),
                               slots=tuple((_int(a), _int(b)) for a, b in s["slots"]))
                         for s in shards),
            migrations=tuple(Migration(slots=tuple((_int(a), _int(b)) for a, b in m["slots"]),
                                       source=str(m["from"]), target=str(m["to"]),
                                       epoch=_int(m["epoch"]),
                                       state=MigrationState(m.get("state", "migrating")))
                             for m in doc.get("migrations", [])),
            nodes=tuple(sorted((str(nid), NodeAddress(str(a["proxy"]), str(a["backend"])))
                               for nid, a in doc["nodes"].items())),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ViewError(f"malformed view: {exc}") from None
    validate(view)
    return view


def hash_password(password: str) -> str:
    """How a cluster password is kept in views and compared by proxies."""
    return hashlib.sha256(password.encode()).hexdigest()


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ViewError(f"expected an integer, got {value!r}")
    return value


def _optional_int(value: object) -> int | None:
    return None if value is None else _int(value)


def even_split(shards: int) -> list[tuple[SlotRange, ...]]:
    """Contiguous, even slot ranges: the first SLOT_COUNT % shards get one slot more."""
    base, extra = divmod(SLOT_COUNT, shards)
    ranges: list[tuple[SlotRange, ...]] = []
    start = 0
    for i in range(shards):
        end = start + base + (1 if i < extra else 0) - 1
        ranges.append(((start, end),))
        start = end + 1
    return ranges


def slots_of(shard: Shard) -> int:
    return slot_count(shard.slots)
