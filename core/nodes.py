"""What etcd holds about nodes besides views: registration, status, assignment. Pure values."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


class RecordError(ValueError):
    pass


def _decode(cls, data: bytes):  # noqa: ANN001, ANN202
    try:
        doc = json.loads(data)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})
    except (ValueError, TypeError) as exc:
        raise RecordError(f"malformed {cls.__name__}: {exc}") from None


def _encode(record: object) -> bytes:
    return json.dumps(asdict(record), sort_keys=True, separators=(",", ":")).encode()  # type: ignore[arg-type]


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
class NodeStatus:
    """`status/<id>`: what the node has applied and observes (leased)."""

    node_id: str
    cluster: str = ""
    epoch: int = 0
    role: str = "master"  # the backend's role as ROLE reports it: master | replica
    backend_ok: bool = True
    repl_offset: int = 0
    leaving: bool = False  # set by a node shutting down cleanly
    migrations: dict = field(default_factory=dict)  # migration id -> progress (as source)
    updated: float = 0.0

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
