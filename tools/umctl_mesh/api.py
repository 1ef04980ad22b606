"""The REST API's documents and request checks, pure: values in, values out.

`umctl-mesh serve` (serve.py) is the I/O shell around these: it reads etcd and the proxies,
and hands what it read here to be shaped into JSON, or a request body to be checked into the
arguments of the same `ops` functions the CLI calls.
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

from core.slots import SlotRange, SlotRangeError, normalize, parse_range, slot_count
from core.view import MAX_MIGRATION_RATE, ClusterView, to_json
from proxy.routing import node_id as cluster_node_id

from .ops import Pool, UsageError, migration_rows, replicas_in_sync

# a request body larger than this is refused (413) before it is parsed
MAX_BODY_BYTES = 16 * 1024
# a shorter API token is refused when the server starts: it could be guessed
MIN_TOKEN_LENGTH = 16
# slot ranges one `migrate` request may name
MAX_RANGES = 64
# failovers the server remembers (newest kept) for the page
MAX_FAILOVER_EVENTS = 100


# -- the token -------------------------------------------------------------------------------

def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header; None if absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def token_matches(header: str | None, token: str | None) -> bool:
    """Whether the header carries `token` (compared in constant time); never with no token."""
    given = bearer(header)
    if token is None or given is None:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


def check_token(token: str, source: str) -> str:
    """The token as configured (`source` names where it came from, for the error)."""
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise UsageError(f"the API token {source} is shorter than {MIN_TOKEN_LENGTH} "
                         "characters")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise UsageError(f"the API token {source} has spaces or control characters")
    return token


# -- request bodies --------------------------------------------------------------------------

def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object (an empty body is `{}`); UsageError for anything else."""
    if len(raw) > MAX_BODY_BYTES:
        raise UsageError(f"the request body is over {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"the request body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError("the request body must be a JSON object")
    return doc


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise UsageError(f"unknown field{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; expected {', '.join(sorted(allowed))}")


def _int(body: dict[str, Any], name: str, default: int | None = None,
         low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low} to {high}" if high is not None else f"at least {low}"
        raise UsageError(f"{name} must be {bounds}, got {value}")
    return value


def _str(body: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise UsageError(f"{name} is required")
        return None
    if not isinstance(value, str) or not value:
        raise UsageError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class CreateRequest:
    name: str
    shards: int
    replicas: int
    password: str | None
    min_replicas_ack: int
    migration_rate: int | None


def create_request(body: dict[str, Any]) -> CreateRequest:
    _only(body, {"name", "shards", "replicas", "password", "min_replicas_ack",
                 "migration_rate"})
    shards = _int(body, "shards", low=1)
    if shards is None:
        raise UsageError("shards is required")
    return CreateRequest(
        name=_str(body, "name", required=True) or "", shards=shards,
        replicas=_int(body, "replicas", 0, low=0) or 0, password=_str(body, "password"),
        min_replicas_ack=_int(body, "min_replicas_ack", 0, low=0) or 0,
        migration_rate=_int(body, "migration_rate", None, 0, MAX_MIGRATION_RATE))


@dataclass(frozen=True, slots=True)
class ScaleRequest:
    shards: int | None
    replicas: int | None
    dry_run: bool


def scale_request(body: dict[str, Any]) -> ScaleRequest:
    _only(body, {"shards", "replicas", "dry_run"})
    request = ScaleRequest(_int(body, "shards", low=1), _int(body, "replicas", low=0),
                           _bool(body, "dry_run"))
    if request.shards is None and request.replicas is None:
        raise UsageError("scale needs shards and/or replicas")
    return request


@dataclass(frozen=True, slots=True)
class MigrateRequest:
    slots: tuple[SlotRange, ...]
    to: str
    dry_run: bool


def migrate_request(body: dict[str, Any]) -> MigrateRequest:
    """`{"slots": ["0-99", "200"], "to": "s2"}` (a string of ranges split by spaces or
    commas is taken too)."""
    _only(body, {"slots", "to", "dry_run"})
    raw = body.get("slots")
    if isinstance(raw, str):
        raw = raw.replace(",", " ").split()
    if not isinstance(raw, list) or not raw or not all(isinstance(r, str) for r in raw):
        raise UsageError("slots must be a list of ranges such as [\"0-99\", \"200\"]")
    if len(raw) > MAX_RANGES:
        raise UsageError(f"at most {MAX_RANGES} slot ranges in one request")
    try:
        ranges = normalize(parse_range(r.strip()) for r in raw)
    except SlotRangeError as exc:
        raise UsageError(str(exc)) from None
    return MigrateRequest(ranges, _str(body, "to", required=True) or "", _bool(body, "dry_run"))


@dataclass(frozen=True, slots=True)
class FailoverRequest:
    shard: str
    to: str | None


def failover_request(body: dict[str, Any]) -> FailoverRequest:
    _only(body, {"shard", "to"})
    return FailoverRequest(_str(body, "shard", required=True) or "", _str(body, "to"))


def empty_request(body: dict[str, Any], what: str) -> None:
    if body:
        raise UsageError(f"{what} takes no fields, got {', '.join(sorted(body))}")


# -- documents -------------------------------------------------------------------------------

def node_health(pool: Pool, node_id: str) -> str:
    """As `umctl-mesh nodes` says it: ok, gone, backend down, behind, syncing, fenced."""
    st = pool.statuses.get(node_id)
    cluster, role = pool.role_of(node_id)
    view = pool.views[cluster].view if cluster else None
    applied = st.applied(view.cluster, view.uid) if st and view else None
    if st is None:
        return "gone"
    if not st.backend_ok:
        return "backend down"
    if view is not None and (not applied or applied < view.epoch):
        return "behind"
    if role == "replica" and not st.synced:
        return "syncing"
    if st.fenced:
        return "fenced"
    return "ok"


def node_rows(pool: Pool, ops_per_sec: dict[str, float | None]) -> list[dict[str, Any]]:
    """Every node registered or assigned, with its cluster, role, health and ops/s (None:
    not measured yet, or its proxy did not answer)."""
    rows = []
    for nid in sorted(set(pool.nodes) | set(pool.assignments)):
        rec = pool.nodes.get(nid)
        st = pool.statuses.get(nid)
        cluster, role = pool.role_of(nid)
        held = pool.assignments.get(nid)
        if held and held.assignment.held:
            cluster, role = held.assignment.cluster, "held"
        view = pool.views[cluster].view if role in ("master", "replica") else None
        rows.append({
            "node": nid, "leader": nid == pool.leader, "alive": rec is not None,
            "proxy": rec.proxy if rec else "", "backend": rec.backend if rec else "",
            "host": rec.host if rec else "", "version": rec.version if rec else "",
            "cluster": cluster, "role": role or "free",
            # the id clients see in CLUSTER NODES/SLOTS/SHARDS (None: in no cluster)
            "cluster_node_id": cluster_node_id(cluster, nid) if view else None,
            "applied_epoch": (st.applied(view.cluster, view.uid) or None)
            if st and view else None,
            "health": node_health(pool, nid) if role != "held" else "held",
            "failed": bool(view and nid in view.failed),
            "leaving": bool(st and st.leaving),
            "ops_per_sec": ops_per_sec.get(nid),
        })
    return rows


def hosts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pool by host: [{"host", "nodes": [rows]}], hosts sorted, '' (untagged) last."""
    by_host: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_host.setdefault(row["host"], []).append(row)
    return [{"host": h, "nodes": by_host[h]}
            for h in sorted(by_host, key=lambda h: (h == "", h))]


def view_doc(view: ClusterView, revision: int) -> dict[str, Any]:
    """The view as etcd stores it, but for the password hash (only whether there is one)."""
    doc = json.loads(to_json(view))
    doc["config"]["password"] = doc["config"].pop("password_hash") is not None
    doc["revision"] = revision
    return doc


def cluster_doc(view: ClusterView, pool: Pool) -> dict[str, Any]:
    """A cluster for the page: shards with their members' health, the slot map, migrations
    with progress, failed members and `lost` (DATA LOST) notes."""
    synced = replicas_in_sync(view, pool)
    shards = []
    for shard in view.shards:
        members = []
        for nid in shard.members:
            st = pool.statuses.get(nid)
            address = view.address_of(nid)
            members.append({
                "node": nid, "role": "master" if nid == shard.master else "replica",
                "proxy": address.proxy, "backend": address.backend,
                "host": pool.nodes[nid].host if nid in pool.nodes else "",
                "alive": nid in pool.nodes, "failed": nid in view.failed,
                "applied_epoch": (st.applied(view.cluster, view.uid) or None) if st else None,
                "health": node_health(pool, nid)})
        shards.append({"id": shard.id, "master": shard.master,
                       "replicas": list(shard.replicas),
                       "slots": [list(r) for r in shard.slots],
                       "slot_count": slot_count(shard.slots), "nodes": members,
                       "replicas_live": len(synced[shard.id])})
    return {"cluster": view.cluster, "uid": view.uid, "epoch": view.epoch,
            "replicas_declared": view.config.replicas,
            "min_replicas_ack": view.config.min_replicas_ack,
            "migration_rate": view.config.migration_rate,
            "password": view.config.password_hash is not None,
            "shards": shards, "failed": list(view.failed), "lost": list(view.lost),
            "migrations": migration_rows(view, pool)}


def cluster_summary(view: ClusterView) -> dict[str, Any]:
    return {"cluster": view.cluster, "epoch": view.epoch, "shards": len(view.shards),
            "nodes": len(view.nodes), "migrations": len(view.migrations),
            "password": view.config.password_hash is not None,
            "lost": len(view.lost), "failed": len(view.failed)}


def change_doc(old: ClusterView, new: ClusterView, dry_run: bool = False) -> dict[str, Any]:
    """What a scale, migrate or cancel did (or, dry, would do): `changed` is false when it was
    already so (nothing written)."""
    before = {s.id for s in old.shards}
    return {"cluster": new.cluster, "epoch": new.epoch, "was_epoch": old.epoch,
            "changed": new is not old, "dry_run": dry_run,
            "shards": [s.id for s in new.shards],
            "new_shards": [s.id for s in new.shards if s.id not in before],
            "migrations": [{"slots": [list(r) for r in m.slots],
                            "slot_count": slot_count(m.slots), "from": m.source,
                            "to": m.target, "state": m.state.value}
                           for m in new.migrations]}


# -- what the poller derives ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sample:
    """One read of a proxy's `INFO proxy`: its counter, its pid (a restart resets the
    counter), when it was read (monotonic seconds), and how many of the commands counted
    since the previous read were the reader's own (its previous INFO, and UMCTL CHALLENGE
    and PROVE on a new connection)."""

    commands: int
    pid: int
    at: float
    own: int = 1


def ops_rates(before: dict[str, Sample], now: dict[str, Sample]) -> dict[str, float | None]:
    """Commands per second of each node read now, from its previous read, less the reader's
    own; None where there is none to compare with (first read, restarted proxy, no time
    passed)."""
    rates: dict[str, float | None] = {}
    for nid, cur in now.items():
        prev = before.get(nid)
        if prev is None or prev.pid != cur.pid or cur.commands < prev.commands \
                or cur.at <= prev.at:
            rates[nid] = None
        else:
            rates[nid] = max(0, cur.commands - prev.commands - cur.own) / (cur.at - prev.at)
    return rates


def parse_proxy_info(text: bytes) -> Sample | None:
    """`proxy_commands_processed` and `proxy_pid` from INFO's Proxy section (`at` and `own`
    are the caller's to set); None if either is missing."""
    fields = dict(line.partition(":")[::2]
                  for line in text.decode(errors="replace").splitlines()
                  if line and not line.startswith("#"))
    try:
        return Sample(int(fields["proxy_commands_processed"]), int(fields["proxy_pid"]), 0.0)
    except (KeyError, ValueError):
        return None


def failovers(before: dict[str, ClusterView], now: dict[str, ClusterView],
              at: float) -> list[dict[str, Any]]:
    """Shards whose master changed between two reads of the views (the same creation of a
    cluster, a later epoch): graceful or not, each is one event."""
    events = []
    for name, view in sorted(now.items()):
        old = before.get(name)
        if old is None or old.uid != view.uid or old.epoch >= view.epoch:
            continue
        masters = {s.id: s.master for s in old.shards}
        for shard in view.shards:
            was = masters.get(shard.id)
            if was is not None and was != shard.master:
                events.append({"at": at, "cluster": name, "shard": shard.id, "from": was,
                               "to": shard.master, "epoch": view.epoch,
                               "from_failed": was in view.failed})
    return events
