"""What etcd holds about nodes besides views: registration, status, assignment. Pure values."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    R = TypeVar("R", bound=DataclassInstance)
else:
    R = TypeVar("R")


class RecordError(ValueError):
    pass


def _from_doc(cls: type[R], doc: object) -> R:
    """`cls` from a JSON object; keys it does not know are ignored (newer writers)."""
    if not isinstance(doc, dict):
        raise RecordError(f"malformed {cls.__name__}: expected an object, got {doc!r}")
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in doc.items() if k in names})
    except TypeError as exc:
        raise RecordError(f"malformed {cls.__name__}: {exc}") from None


def _decode(cls: type[R], data: bytes) -> R:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise RecordError(f"malformed {cls.__name__}: {exc}") from None
    return _from_doc(cls, doc)


def _encode(record: DataclassInstance) -> bytes:
    return json.dumps(asdict(record), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """`nodes/<id>`: the node is alive (the key lives on its lease)."""

    node_id: str
    proxy: str
    backend: str
    host: str = ""  # host tag: replicas are placed on other hosts than their master
    version: str = ""
    started_at: float = 0.0

    def encode(self) -> bytes:
        return _encode(self)

    @classmethod
    def decode(cls, data: bytes) -> NodeRecord:
        return _decode(cls, data)


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """What a migration's source reports about it (one entry of its status's `migrations`).
    The defaults are what a reader assumes for a migration the source has not reported."""

    total_keys: int = -1  # estimated, then counted by the first pass; -1: not yet
    moved_keys: int = 0
    left_keys: int | None = None  # None: not counted yet
    moved_bytes: int = 0
    passes: int = 0
    method: str = ""  # "migrate": Redis to Redis; "proxy": DUMP/RESTORE through the proxies
    chunked_keys: int = 0  # big keys copied in chunks
    done: bool = False  # every key moved: the leader may commit
    error: str = ""
    keys_per_sec: float = 0.0
    eta_sec: float | None = None
    started_at: float = 0.0

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> MigrationProgress:
        return _from_doc(cls, dict(doc) if isinstance(doc, Mapping) else doc)


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """`status/<id>`: what the node has applied and observes (leased)."""

    node_id: str
    cluster: str = ""
    cluster_uid: str = ""  # the applied cluster's creation (a cluster deleted and made again
    # under the same name is another one)
    epoch: int = 0
    role: str = "master"  # the backend's role as ROLE reports it: master | replica
    backend_ok: bool = True
    fenced: bool = False  # the proxy serves no keys (it may be replaced once it says so)
    repl_offset: int = 0
    synced: bool = True  # its Redis finished a sync with the master it follows now
    leaving: bool = False  # set by a node shutting down cleanly
    # migration id -> progress, for the migrations this node is the source of
    migrations: dict[str, MigrationProgress] = field(default_factory=dict)
    updated: float = 0.0
    # migration id -> its last progress, for migrations this node finished moving in the last
    # minute (proxy/migration.py, FINISHED_KEPT): read by umctl-mesh's --wait, not the leader
    finished_migrations: dict[str, MigrationProgress] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # decoded JSON brings plain objects: make every entry a MigrationProgress
        for name in ("migrations", "finished_migrations"):
            reports = getattr(self, name)
            if not isinstance(reports, dict):
                raise RecordError(f"malformed NodeStatus: {name} {reports!r}")
            if any(not isinstance(p, MigrationProgress) for p in reports.values()):
                object.__setattr__(self, name, {
                    str(mid): p if isinstance(p, MigrationProgress)
                    else MigrationProgress.from_dict(p) for mid, p in reports.items()})

    def serves(self, cluster: str, uid: str) -> bool:
        """The node applied a view of that very cluster (name and creation)."""
        return (self.cluster, self.cluster_uid) == (cluster, uid)

    def applied(self, cluster: str, uid: str) -> int:
        """The epoch of that very cluster this node applied; 0: none."""
        return self.epoch if self.serves(cluster, uid) else 0

    def progress(self, migration_id: str) -> MigrationProgress:
        """This node's report on a migration it is the source of (defaults if none)."""
        return self.migrations.get(migration_id) or MigrationProgress()

    def encode(self) -> bytes:
        return _encode(self)

    @classmethod
    def decode(cls, data: bytes) -> NodeStatus:
        return _decode(cls, data)


@dataclass(frozen=True, slots=True)
class Assignment:
    """`assign/<id>`: the node belongs to `cluster`; `held` keeps it out of the pool after
    `cluster delete --keep-data` until an operator releases it. Written in the same
    transaction as the view, so two clusters can never claim one node."""

    cluster: str
    held: bool = False

    def encode(self) -> bytes:
        return _encode(self)

    @classmethod
    def decode(cls, data: bytes) -> Assignment:
        return _decode(cls, data)


@dataclass(frozen=True, slots=True)
class DataOwner:
    """`data/<id>`: whose data the node's Redis holds: one creation of one cluster (a cluster
    created again under the same name has another uid, and is another tenant)."""

    cluster: str | None = None
    uid: str | None = None

    def encode(self) -> bytes:
        return _encode(self)

    @classmethod
    def decode(cls, data: bytes) -> DataOwner:
        return _decode(cls, data)
