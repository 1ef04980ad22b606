"""`umctl-mesh check CLUSTER`: is the cluster whole, as `redis-cli --cluster check` asks of a
Redis Cluster?

What it reads: the view, the pool's records and every member's status from etcd; then, from
each member's proxy (unless --no-proxies), `UMCTL GETEPOCH`, `INFO replication` (its Redis's,
forwarded) and, on masters, a sample of keys: the first N keys of a `SCAN` of its Redis
(through the proxy, which forwards a cluster client's SCAN to its own Redis), which is hash
table order, not a uniform sample; `--sample 0` scans every key. Data commands need the mesh
secret (proven by UMCTL CHALLENGE/PROVE) or, on a cluster with a password, that password.

`evaluate()` is pure: readings in, a report out (the unit tests feed it readings); the rest
gathers the readings.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import anyio

from core import secret
from core.nodes import NodeStatus
from core.slots import SLOT_COUNT, format_range, key_slot, ranges_of
from core.view import ClusterView, MigrationState
from mesh.redisctl import RedisCtl, RedisCtlError
from mesh.store.etcd import EtcdStore
from mesh.store.repo import MeshRepo

from .ops import OpError, Pool, read_pool
from .text import plural

DEFAULT_SAMPLE = 1000  # keys per master
DEFAULT_MAX_LAG = 1 << 20  # bytes a replica may be behind its master and count as caught up
DEFAULT_TIMEOUT = 5.0  # seconds for everything read from one proxy
# a node behind the view's epoch gets this long to apply it (a view written just before the
# check) before it counts as a problem
APPLY_GRACE = 2.0
STUCK_AFTER = 60.0  # seconds a running migration may go without moving a key
SCAN_COUNT = 1000  # keys asked of each SCAN call
MAX_EXAMPLES = 3  # misplaced keys named per node
CREDENTIALS_HINT = (" (data commands need the mesh secret, $MOONMESH_SECRET or "
                    "--mesh-secret-file, or the cluster's password)")


class Kind(Enum):
    """The checks, in the order they are printed."""

    VIEW = "view"
    NODES = "nodes"
    EPOCHS = "epochs"
    SLOTS = "slots"
    REPLICAS = "replicas"
    KEYS = "keys"
    MIGRATIONS = "migrations"


@dataclass(frozen=True, slots=True)
class Problem:
    kind: Kind
    subject: str  # a node, shard or migration id
    text: str


@dataclass(frozen=True, slots=True)
class Reading:
    """What one member's proxy answered."""

    node: str
    error: str = ""  # the proxy could not be read at all
    epoch: int | None = None  # UMCTL GETEPOCH
    refused: str = ""  # why data commands (INFO, SCAN) were refused or failed
    replication: dict[str, str] | None = None  # INFO replication's fields
    keys: tuple[bytes, ...] | None = None  # the sample (masters only)
    scanned_all: bool = False  # the SCAN went round: the sample is every key


@dataclass(frozen=True, slots=True)
class Options:
    sample: int = DEFAULT_SAMPLE  # 0: every key
    max_lag: int = DEFAULT_MAX_LAG
    proxies: bool = True  # read the proxies (else etcd only)
    stuck_after: float = STUCK_AFTER


@dataclass
class Report:
    cluster: str
    epoch: int
    problems: list[Problem] = field(default_factory=list)
    passed: dict[Kind, str] = field(default_factory=dict)  # what each clean check found
    skipped: dict[Kind, str] = field(default_factory=dict)  # checks (or parts) not made

    @property
    def healthy(self) -> bool:
        return not self.problems

    def doc(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "epoch": self.epoch, "healthy": self.healthy,
                "problems": [{"check": p.kind.value, "subject": p.subject, "problem": p.text}
                             for p in self.problems],
                "passed": {k.value: v for k, v in self.passed.items()},
                "skipped": {k.value: v for k, v in self.skipped.items()}}

    def lines(self) -> list[str]:
        out = []
        for kind in Kind:
            for p in self.problems:
                if p.kind is kind:
                    out.append(f"[FAIL] {kind.value}: {p.subject}: {p.text}")
            if kind in self.passed:
                out.append(f"[ok]   {kind.value}: {self.passed[kind]}")
            if kind in self.skipped:
                out.append(f"[skip] {kind.value}: {self.skipped[kind]}")
        count = len(self.problems)
        if count:
            out.append(f"{plural(count, 'problem')} found")
        else:
            out.append("healthy as far as checked (see [skip])" if self.skipped else "healthy")
        return out


# -- the checks, pure ------------------------------------------------------------------------

def _role(view: ClusterView, nid: str) -> str:
    shard = view.shard_of(nid)
    assert shard is not None
    return f"{shard.id} {'master' if shard.master == nid else 'replica'}"


def _down(view: ClusterView, pool: Pool, nid: str) -> str:
    """Why a member cannot serve, from etcd ('' if nothing says so)."""
    st = pool.statuses.get(nid)
    if nid not in pool.nodes:
        return "not registered in etcd: its mesh-proxy is down or cut off from etcd"
    if st is None:
        return "registered but reports no status"
    if not st.backend_ok:
        return "its Redis is down, the node reports"
    if st.fenced:
        return "fenced: it serves no keys"
    return ""


def check_nodes(view: ClusterView, pool: Pool, readings: dict[str, Reading],
                report: Report) -> None:
    found = []
    for nid in view.node_ids:
        why = _down(view, pool, nid)
        if why:
            found.append(Problem(Kind.NODES, f"{nid} ({_role(view, nid)})", why))
        elif nid in readings and readings[nid].error:
            found.append(Problem(Kind.NODES, f"{nid} ({_role(view, nid)})",
                                 f"its proxy {view.address_of(nid).proxy} does not answer: "
                                 f"{readings[nid].error}"))
    if pool.leader is None:
        found.append(Problem(Kind.NODES, "leader", "no leader elected: nothing replaces "
                                                   "failed nodes or drives migrations"))
    report.problems += found
    if not found:
        report.passed[Kind.NODES] = (
            f"{plural(len(view.nodes), 'node')} registered, each Redis up, none fenced"
            + (", every proxy answers" if readings else "") + f"; leader {pool.leader}")


def check_epochs(view: ClusterView, pool: Pool, readings: dict[str, Reading],
                 report: Report) -> None:
    """Every member applied the view's epoch: its status in etcd, its proxy's GETEPOCH."""
    found = []
    down = 0
    for nid in view.node_ids:
        st = pool.statuses.get(nid)
        if _down(view, pool, nid) or st is None:
            down += 1
            continue  # the nodes check names it
        subject = f"{nid} ({_role(view, nid)})"
        if not st.serves(view.cluster, view.uid):
            found.append(Problem(Kind.EPOCHS, subject,
                                 f"serves {repr(st.cluster) if st.cluster else 'no cluster'}"
                                 + (" (another creation of it)" if st.cluster == view.cluster
                                    else "") + f", not this view (epoch {view.epoch})"))
        elif st.epoch != view.epoch:
            found.append(Problem(Kind.EPOCHS, subject, f"applied epoch {st.epoch}; the view "
                                                       f"is at {view.epoch}"))
        reading = readings.get(nid)
        if reading is not None and reading.epoch is not None and reading.epoch != view.epoch:
            found.append(Problem(Kind.EPOCHS, subject,
                                 f"its proxy answers UMCTL GETEPOCH {reading.epoch}; the view "
                                 f"is at {view.epoch}"))
    report.problems += found
    if not found:
        report.passed[Kind.EPOCHS] = (
            f"every node {'that is up ' if down else ''}applied epoch {view.epoch} (its status "
            "in etcd"
            + (", its proxy's UMCTL GETEPOCH)" if readings else ")"))


def owners(view: ClusterView) -> list[list[str]]:
    """Slot -> the shards that claim it."""
    claims: list[list[str]] = [[] for _ in range(SLOT_COUNT)]
    for shard in view.shards:
        for a, b in shard.slots:
            for slot in range(max(a, 0), min(b, SLOT_COUNT - 1) + 1):
                claims[slot].append(shard.id)
    return claims


def check_slots(view: ClusterView, pool: Pool, report: Report) -> None:
    found = []
    claims = owners(view)
    free = ranges_of(s for s in range(SLOT_COUNT) if not claims[s])
    if free:
        found.append(Problem(Kind.SLOTS, "coverage",
                             f"{plural(sum(b - a + 1 for a, b in free), 'slot')} have no "
                             f"shard: {_ranges(free)}"))
    shared = ranges_of(s for s in range(SLOT_COUNT) if len(claims[s]) > 1)
    if shared:
        found.append(Problem(Kind.SLOTS, "coverage",
                             f"{plural(sum(b - a + 1 for a, b in shared), 'slot')} have more "
                             f"than one shard: {_ranges(shared)}"))
    for shard in view.shards:
        why = _down(view, pool, shard.master)
        if why and shard.slots:
            found.append(Problem(Kind.SLOTS, shard.id,
                                 f"slots {_ranges(shard.slots)} are not served; its master "
                                 f"{shard.master}: {why}"))
    report.problems += found
    if not found:
        report.passed[Kind.SLOTS] = (f"all {SLOT_COUNT} covered, each by one shard of "
                                     f"{len(view.shards)}; every master serves")


def _ranges(ranges: tuple[tuple[int, int], ...], most: int = 4) -> str:
    text = " ".join(format_range(r) for r in ranges[:most])
    return text + (f" and {len(ranges) - most} more ranges" if len(ranges) > most else "")


def replica_offsets(info: dict[str, str]) -> dict[tuple[str, int], int]:
    """From a master's INFO replication: (ip, port) of each connected replica -> the offset it
    acknowledged."""
    out = {}
    for key, value in info.items():
        if not (key.startswith("slave") and key[5:].isdigit()):
            continue
        fields = dict(part.partition("=")[::2] for part in value.split(","))
        try:
            out[(fields["ip"], int(fields["port"]))] = int(fields["offset"])
        except (KeyError, ValueError):
            continue
    return out


def _parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def check_replicas(view: ClusterView, pool: Pool, readings: dict[str, Reading],
                   options: Options, report: Report) -> None:
    found: list[Problem] = []
    lags: list[int] = []
    via_etcd = False
    for shard in view.shards:
        declared = view.config.replicas
        if len(shard.replicas) < declared:
            found.append(Problem(Kind.REPLICAS, shard.id,
                                 f"has {len(shard.replicas)} of "
                                 f"{plural(declared, 'declared replica')}"))
        master_info = readings.get(shard.master, Reading(shard.master)).replication
        master_status = pool.statuses.get(shard.master)
        master_backend = _parse_address(view.address_of(shard.master).backend)
        for rid in shard.replicas:
            subject = f"{rid} ({shard.id} replica)"
            if rid in view.failed:
                found.append(Problem(Kind.REPLICAS, subject, "marked failed by the leader "
                                                             "(found dead); it rejoins when it "
                                                             "is back"))
                continue
            if _down(view, pool, rid):
                found.append(Problem(Kind.REPLICAS, subject, "down: " + _down(view, pool, rid)))
                continue
            st = pool.statuses[rid]
            if st.role != "replica":
                found.append(Problem(Kind.REPLICAS, subject, "its Redis is a master, not a "
                                                             "replica of its shard's master"))
                continue
            if not st.synced:
                found.append(Problem(Kind.REPLICAS, subject, "has not finished a full sync "
                                                             "with its master"))
            info = readings.get(rid, Reading(rid)).replication
            if info is not None:
                followed = (info.get("master_host", ""), int(info.get("master_port") or 0))
                if followed != master_backend:
                    found.append(Problem(Kind.REPLICAS, subject,
                                         f"its Redis follows {followed[0]}:{followed[1]}, not "
                                         f"its master's Redis "
                                         f"{view.address_of(shard.master).backend}"))
                    continue
                if info.get("master_link_status") != "up":
                    found.append(Problem(Kind.REPLICAS, subject,
                                         "its Redis's link to its master is "
                                         f"{info.get('master_link_status', 'unknown')}"))
                    continue
            lag = _lag(view, rid, master_info, master_status, st)
            if lag is None:
                if master_info is not None:
                    found.append(Problem(Kind.REPLICAS, subject,
                                         f"not connected to its master's Redis "
                                         f"{view.address_of(shard.master).backend} (not in "
                                         "its INFO replication)"))
                continue
            via_etcd |= master_info is None
            lags.append(lag)
            if lag > options.max_lag:
                found.append(Problem(Kind.REPLICAS, subject,
                                     f"{lag} bytes behind its master (more than --max-lag "
                                     f"{options.max_lag})"))
    report.problems += found
    if found:
        return
    replicas = sum(len(s.replicas) for s in view.shards)
    if not replicas:
        report.passed[Kind.REPLICAS] = "the cluster declares none and has none"
        return
    source = ("the nodes' replication offsets in etcd, up to a second old" if via_etcd
              else "INFO replication through the masters' proxies")
    report.passed[Kind.REPLICAS] = (
        f"{plural(replicas, 'replica')} linked and synced, at most {max(lags, default=0)} "
        f"bytes behind ({source})")


def _lag(view: ClusterView, rid: str, master_info: dict[str, str] | None,
         master_status: NodeStatus | None, status: NodeStatus) -> int | None:
    """Bytes the replica is behind: from the master's INFO replication when read (None if the
    replica is not among its connected replicas), else from the offsets in etcd."""
    if master_info is not None:
        offsets = replica_offsets(master_info)
        host, port = _parse_address(view.address_of(rid).backend)
        acked = offsets.get((host, port))
        if acked is None:  # the master sees the replica's IP, which may not be its name
            same_port = [o for (_, p), o in offsets.items() if p == port]
            acked = same_port[0] if len(same_port) == 1 else None
        if acked is None:
            return None
        return max(0, int(master_info.get("master_repl_offset") or 0) - acked)
    if master_status is None:
        return None
    return max(0, master_status.repl_offset - status.repl_offset)


def _hint(errors: Iterable[str]) -> str:
    """How to get past a refusal that asks for authentication."""
    if any(word in e for e in errors for word in ("NOAUTH", "WRONGPASS", "NOT_ADMIN")):
        return CREDENTIALS_HINT
    return ""


def check_keys(view: ClusterView, pool: Pool, readings: dict[str, Reading], options: Options,
               report: Report) -> None:
    claims = owners(view)
    moving: dict[int, set[str]] = {}  # a migrating slot's keys may be on source and target
    for m in view.migrations:
        for a, b in m.slots:
            for slot in range(a, b + 1):
                moving.setdefault(slot, set()).update((m.source, m.target))
    found, not_read = [], []
    sampled = masters = 0
    for shard in view.shards:
        reading = readings.get(shard.master)
        if reading is None or reading.keys is None:  # a master down is the nodes check's
            if reading is not None and reading.refused and not _down(view, pool, shard.master):
                not_read.append(f"{shard.master} ({reading.refused})")
            continue
        sampled += len(reading.keys)
        masters += 1
        wrong = [(k, s) for k in reading.keys
                 if shard.id not in claims[s := key_slot(k)] and shard.id not in moving.get(s, ())]
        if wrong:
            examples = ", ".join(f"{k.decode(errors='replace')!r} (slot {s}, owned by "
                                 f"{'/'.join(claims[s]) or 'nobody'})"
                                 for k, s in wrong[:MAX_EXAMPLES])
            found.append(Problem(Kind.KEYS, f"{shard.master} ({shard.id} master)",
                                 f"holds keys in slots its shard does not own: {len(wrong)} of "
                                 f"{len(reading.keys)} sampled, e.g. {examples}"))
    report.problems += found
    if not_read:
        report.skipped[Kind.KEYS] = "not sampled on " + "; ".join(not_read) + _hint(not_read)
    if not found and masters:
        how = ("every key" if options.sample == 0
               else f"the first {options.sample} keys of a SCAN of each master's Redis")
        report.passed[Kind.KEYS] = (f"{plural(sampled, 'key')} read on "
                                    f"{plural(masters, 'master')} ({how}), none in a slot "
                                    "its shard does not own")


def check_migrations(view: ClusterView, pool: Pool, options: Options, now: float,
                     report: Report) -> None:
    found = []
    masters = {s.id: s.master for s in view.shards}
    for m in view.migrations:
        subject = f"{m.id} ({_ranges(m.slots)})"
        if pool.leader is None:
            found.append(Problem(Kind.MIGRATIONS, subject, "stuck: no leader drives it"))
        for side, sid in (("source", m.source), ("target", m.target)):
            why = _down(view, pool, masters[sid])
            if why:
                found.append(Problem(Kind.MIGRATIONS, subject,
                                     f"stuck; its {side} {sid}'s master {masters[sid]}: "
                                     f"{why}"))
        if m.state is not MigrationState.MIGRATING:
            continue
        st = pool.statuses.get(masters[m.source])
        progress = st.progress(m.id) if st is not None else None
        if progress is None:
            continue
        if progress.error:
            found.append(Problem(Kind.MIGRATIONS, subject,
                                 f"failing: the source reports {progress.error!r}"))
        elif (not progress.done and progress.moved_keys == 0 and progress.started_at
              and now - progress.started_at > options.stuck_after):
            found.append(Problem(Kind.MIGRATIONS, subject,
                                 f"stuck: no key moved in {now - progress.started_at:.0f} s"))
    report.problems += found
    if not found:
        running = sum(m.state is MigrationState.MIGRATING for m in view.migrations)
        report.passed[Kind.MIGRATIONS] = (
            "none" if not view.migrations else
            f"{plural(len(view.migrations), 'migration')} ({running} running), none failing "
            "or stuck, every source and target serving")


def evaluate(view: ClusterView, pool: Pool, readings: dict[str, Reading], options: Options,
             now: float) -> Report:
    """Every check on one reading of the cluster; `readings` empty: etcd alone."""
    report = Report(view.cluster, view.epoch)
    check_nodes(view, pool, readings, report)
    check_epochs(view, pool, readings, report)
    check_slots(view, pool, report)
    check_replicas(view, pool, readings, options, report)
    if options.proxies:
        check_keys(view, pool, readings, options, report)
        refused = {nid: r.refused for nid, r in readings.items()
                   if r.refused and r.replication is None and not _down(view, pool, nid)
                   and nid not in view.failed}
        if refused:
            report.skipped[Kind.REPLICAS] = (
                f"INFO replication not read on {', '.join(refused)}: links to the masters "
                "not checked, lag from the offsets in etcd" + _hint(refused.values()))
    else:
        report.skipped[Kind.KEYS] = "--no-proxies"
    check_migrations(view, pool, options, now, report)
    return report


def invalid_view(cluster: str, error: str) -> Report:
    """A view in etcd that does not decode: a migration naming a shard that is gone, two
    shards claiming a slot, ... nothing else can be checked."""
    report = Report(cluster, 0)
    report.problems.append(Problem(Kind.VIEW, cluster, f"the view in etcd is invalid: {error}"))
    return report


# -- reading the proxies ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Credentials:
    mesh_secret: bytes | None = None
    password: str | None = None


def parse_info(text: bytes) -> dict[str, str]:
    return dict(line.partition(":")[::2] for line in text.decode(errors="replace").splitlines()
                if line and not line.startswith("#"))


async def read_proxy(nid: str, address: str, credentials: Credentials, sample: int | None,
                     full: bool) -> Reading:
    """One member's proxy: GETEPOCH; with `full`, INFO replication and (when `sample` is not
    None: a master) its keys. The caller owns the timeout."""
    ctl = RedisCtl(address)
    try:
        try:
            epoch = await ctl.call("UMCTL", "GETEPOCH")
        except RedisCtlError as exc:
            return Reading(nid, error=str(exc))
        epoch = epoch if isinstance(epoch, int) else None
        if not full:
            return Reading(nid, epoch=epoch)
        try:
            await authenticate(ctl, credentials)
            info = await ctl.call("INFO", "replication")
            replication = parse_info(info) if isinstance(info, bytes) else {}
        except RedisCtlError as exc:
            return Reading(nid, epoch=epoch, refused=short_error(exc))
        if sample is None:
            return Reading(nid, epoch=epoch, replication=replication)
        try:
            keys, everything = await _scan(ctl, sample)
        except RedisCtlError as exc:
            return Reading(nid, epoch=epoch, replication=replication, refused=short_error(exc))
        return Reading(nid, epoch=epoch, replication=replication, keys=keys,
                       scanned_all=everything)
    finally:
        await ctl.aclose()


def short_error(exc: RedisCtlError) -> str:
    text = str(exc)
    return text.partition(" replied: ")[2] or text


async def authenticate(ctl: RedisCtl, credentials: Credentials) -> None:
    if credentials.mesh_secret is not None:
        nonce = await ctl.call("UMCTL", "CHALLENGE")
        if not isinstance(nonce, bytes):
            raise RedisCtlError(f"unexpected UMCTL CHALLENGE reply {nonce!r}")
        await ctl.call("UMCTL", "PROVE", secret.proof(credentials.mesh_secret, nonce))
    elif credentials.password is not None:
        await ctl.call("AUTH", credentials.password)


async def _scan(ctl: RedisCtl, sample: int) -> tuple[tuple[bytes, ...], bool]:
    """The first `sample` keys a SCAN returns (0: all); whether it went round."""
    keys: list[bytes] = []
    cursor = b"0"
    while True:
        reply = await ctl.call("SCAN", cursor, "COUNT", SCAN_COUNT)
        if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)):
            raise RedisCtlError(f"unexpected SCAN reply {reply!r}")
        cursor = reply[0]
        keys += reply[1]
        if cursor == b"0":
            return tuple(keys[:sample] if sample else keys), not sample or len(keys) <= sample
        if sample and len(keys) >= sample:
            return tuple(keys[:sample]), False


async def read_proxies(view: ClusterView, pool: Pool, credentials: Credentials,
                       options: Options, full: bool, timeout: float) -> dict[str, Reading]:
    """Every registered member's proxy, at once, each within `timeout`."""
    readings: dict[str, Reading] = {}
    masters = {s.master for s in view.shards}

    async def one(nid: str) -> None:
        address = view.address_of(nid).proxy
        sample = options.sample if nid in masters else None
        with anyio.move_on_after(timeout) as scope:
            readings[nid] = await read_proxy(nid, address, credentials, sample, full)
        if scope.cancelled_caught:
            readings[nid] = Reading(nid, error=f"no answer within {timeout:g} s")

    async with anyio.create_task_group() as tg:
        for nid in view.node_ids:
            if nid in pool.nodes:
                tg.start_soon(one, nid)
    return readings


def _behind(view: ClusterView, pool: Pool, readings: dict[str, Reading]) -> bool:
    """A live member has not applied the view yet (it may in a moment)."""
    for nid in view.node_ids:
        st = pool.statuses.get(nid)
        if nid not in pool.nodes or st is None:
            continue
        if st.applied(view.cluster, view.uid) < view.epoch:
            return True
        epoch = readings[nid].epoch if nid in readings else None
        if epoch is not None and epoch < view.epoch:
            return True
    return False


async def check_cluster(store: EtcdStore, name: str, credentials: Credentials,
                        options: Options, timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Read the cluster (nodes behind the view get APPLY_GRACE to catch up) and check it."""
    deadline = time.monotonic() + APPLY_GRACE
    while True:
        read = await MeshRepo(store).read_views()
        if name in read.invalid:
            return invalid_view(name, read.invalid[name])
        pool = await read_pool(store)
        if name not in pool.views:
            raise OpError(f"unknown cluster '{name}'")
        view = pool.views[name].view
        readings = (await read_proxies(view, pool, credentials, options, False, timeout)
                    if options.proxies else {})
        if not _behind(view, pool, readings) or time.monotonic() > deadline:
            break
        await anyio.sleep(0.2)
    if options.proxies:
        readings = await read_proxies(view, pool, credentials, options, True, timeout)
    return evaluate(view, pool, readings, options, time.time())
