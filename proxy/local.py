"""The commands the proxy answers itself (PING, AUTH, HELLO, CLUSTER, UMCTL, ...).

Each handler takes the client and the command's argv, after `decide()` returned `Local`;
`HANDLERS` maps the command's name (or 'CONTAINER|SUB') to it.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import hiredis

from core import __version__, secret
from core.address import Address
from core.slots import SLOT_COUNT, key_slot
from core.tenant_config import TENANT_SETTABLE

from . import broadcast, clusterinfo, commands, jobs, policy, slotstats
from .admission import NOAUTH
from .backend import BackendConnection, Pending
from .context import ProxyContext
from .control import Applied
from .hotkeys import DEFAULT_CAPACITY as MAX_HOTKEYS
from .replies import MAX_CLIENT_OUTPUT_BYTES, Rewrite
from .resp import OK, PONG, Err, bulk, encode, error, integer
from .routing import SLOT_NOT_SERVED, RoutingTable, format_ranges, hash_password, table_from_meta
from .umctl import ClusterMeta, UmctlError, parse_setcluster

REDIS_COMPAT_VERSION = "7.0.0"
# CLUSTER COUNTKEYSINSLOT/GETKEYSINSLOT scan the whole backend: at most this many at once
MAX_SLOT_SCANS = 2
# UMCTL's read-only probes (readiness, epoch) work without AUTH; the rest needs it.
UMCTL_WITHOUT_AUTH = frozenset({b"READY", b"GETEPOCH", b"CHALLENGE", b"PROVE", b"TENANT"})
# ... and these change the node or are peers' calls: they need the admin secret proven
# (UMCTL CHALLENGE/PROVE)
UMCTL_ADMIN = frozenset({b"SETCLUSTER", b"HANDOVER", b"PUBLISH", b"HOTKEYS"})
DEFAULT_HOTKEYS = 10  # UMCTL HOTKEYS without N (at most MAX_HOTKEYS: the keys tracked)
NOT_ADMIN = error("NOPERM this command needs the admin secret: UMCTL CHALLENGE, then UMCTL "
                  "PROVE <hex HMAC-SHA256 of the challenge>")
NO_SECRET = error("NOPERM this node has no mesh secret (--mesh-secret-file or MOONMESH_SECRET): "
                  "its admin commands are off")


class Client(Protocol):
    """What the handlers use of a client session."""

    id: int
    ctx: ProxyContext
    transport: asyncio.Transport | None
    resp3: bool
    name: bytes
    tenant: str  # whose client it is
    plain: bool  # a plain client (proxy/plain.py)
    auth_hash: str | None
    asking: bool
    readonly: bool
    closing: bool
    admin: bool  # proved the admin secret
    challenge: bytes | None  # the nonce of the UMCTL CHALLENGE to answer
    in_multi: bool
    multi_failed: bool
    multi_slots: set[int]
    subscribed: bool
    output_limit: int
    conn: BackendConnection  # where its commands go now
    dedicated: BackendConnection | None  # the client's own connection, if it has one
    owned: list[BackendConnection]  # every connection of its own, closed with it

    def reply(self, data: bytes) -> None: ...
    def reply_value(self, value: object) -> None: ...
    def reply_later(self) -> Pending: ...
    def replies_arrived(self) -> None: ...
    def forward(self, argv: list[bytes], pending: Pending | None = None) -> None: ...
    def switch_to(self, conn: BackendConnection) -> None: ...


Handler = Callable[[Client, list[bytes]], None]


def ping(c: Client, argv: list[bytes]) -> None:
    c.reply(PONG if len(argv) == 1 else bulk(argv[1]))


def echo(c: Client, argv: list[bytes]) -> None:
    c.reply(bulk(argv[1]))


def select(c: Client, argv: list[bytes]) -> None:
    c.reply(OK if argv[1] == b"0" else error("ERR SELECT is not allowed in cluster mode"))


def quit_(c: Client, argv: list[bytes]) -> None:
    c.reply(OK)
    c.closing = True


def reset(c: Client, argv: list[bytes]) -> None:
    """Back to a new client's state; subscriptions end with their connection."""
    old = c.dedicated
    if old is not None and old.raw_sink is not None:
        old.raw_sink = None
        old.close()
        c.owned.remove(old)
        c.reply(b"+RESET\r\n")
    elif old is not None:
        # let what is queued on it finish; RESET's own reply closes it
        def close_old(data: bytes) -> bytes:
            old.close()
            if old in c.owned:
                c.owned.remove(old)
            return data

        c.forward([b"RESET"], Rewrite(close_old))
    else:
        c.reply(b"+RESET\r\n")
    if old is not None or c.resp3:
        c.dedicated = None
        c.switch_to(c.ctx.pool.pick(False))
    c.resp3 = c.in_multi = c.multi_failed = c.asking = c.subscribed = c.readonly = False
    c.multi_slots.clear()
    c.output_limit = MAX_CLIENT_OUTPUT_BYTES
    c.auth_hash = c.challenge = None
    c.admin = False
    c.name = b""


def asking(c: Client, argv: list[bytes]) -> None:
    c.asking = True
    c.reply(OK)


def readonly(c: Client, argv: list[bytes]) -> None:
    c.readonly = True
    c.reply(OK)


def readwrite(c: Client, argv: list[bytes]) -> None:
    c.readonly = False
    c.reply(OK)


def _password_error(c: Client, user: bytes, password: bytes) -> bytes | None:
    """The error for a failed login, or None once `c` is authenticated."""
    expected = c.ctx.control.table.login_hash
    if expected is None:
        return error("ERR AUTH <password> called without any password configured for the "
                     "default user. Are you sure your configuration is correct?")
    if user != b"default" or hash_password(password.decode(errors="replace")) != expected:
        return error("WRONGPASS invalid username-password pair or user is disabled.")
    c.auth_hash = expected
    return None


def auth(c: Client, argv: list[bytes]) -> None:
    if len(argv) > 3:
        c.reply(error("ERR syntax error"))
        return
    user = argv[1] if len(argv) == 3 else b"default"
    c.reply(_password_error(c, user, argv[-1]) or OK)


def hello(c: Client, argv: list[bytes]) -> None:
    protocol = 3 if c.resp3 else 2
    i = 1
    if len(argv) > 1:
        try:
            protocol = int(argv[1])
        except ValueError:
            c.reply(error("ERR Protocol version is not an integer or out of range"))
            return
        if protocol not in (2, 3):
            c.reply(error("NOPROTO unsupported protocol version"))
            return
        i = 2
    name = None
    while i < len(argv):
        opt = argv[i].upper()
        if opt == b"AUTH" and i + 2 < len(argv):
            failed = _password_error(c, argv[i + 1], argv[i + 2])
            if failed is not None:
                c.reply(failed)
                return
            i += 3
        elif opt == b"SETNAME" and i + 1 < len(argv):
            name = argv[i + 1]
            i += 2
        else:
            c.reply(error(f"ERR Syntax error in HELLO option '{opt.decode(errors='replace')}'"))
            return
    table = c.ctx.control.table
    if c.auth_hash != table.password_hash and c.auth_hash != table.login_hash:
        c.reply(error("NOAUTH HELLO must be called with the client already authenticated, "
                      "otherwise the HELLO <proto> AUTH <user> <pass> option can be used "
                      "to authenticate the client and select the RESP protocol version "
                      "at the same time"))
        return
    if name is not None:
        c.name = name
    if (protocol == 3) != c.resp3 and c.dedicated is not None \
            and c.dedicated.raw_sink is not None:
        c.reply(error("ERR HELLO cannot change the protocol of a subscribed connection "
                      "through moonmesh; RESET first"))
        return
    if (protocol == 3) != c.resp3:  # later replies in that protocol, from Redis too
        c.resp3 = protocol == 3
        if c.dedicated is None:
            c.switch_to(c.ctx.pool.pick(c.resp3))
        else:
            c.dedicated.resp3 = c.resp3
            c.forward([b"HELLO", b"%d" % protocol], Rewrite(lambda _d: b""))
    c.reply_value({"server": "redis", "version": REDIS_COMPAT_VERSION, "proto": protocol,
                   "id": c.id, "mode": "cluster", "role": "master", "modules": []})


def client_setname(c: Client, argv: list[bytes]) -> None:
    c.name = argv[2]
    c.reply(OK)


def client_getname(c: Client, argv: list[bytes]) -> None:
    c.reply_value(c.name or None)


def client_id(c: Client, argv: list[bytes]) -> None:
    c.reply(integer(c.id))


def client_setinfo(c: Client, argv: list[bytes]) -> None:
    c.reply(OK)


def client_info(c: Client, argv: list[bytes]) -> None:
    peer = c.transport.get_extra_info("peername") if c.transport else None
    addr = f"{peer[0]}:{peer[1]}" if peer else "?"
    c.reply(bulk(f"id={c.id} addr={addr} name={c.name.decode(errors='replace')} "
                 f"db=0 resp={3 if c.resp3 else 2}\n"))


def config_set(c: Client, argv: list[bytes]) -> None:
    if not c.ctx.control.table.configured:  # nobody's to set: the next cluster's are reset
        c.reply(SLOT_NOT_SERVED)
        return
    if len(argv) % 2:
        c.reply(error(commands.arity_error(commands.COMMANDS[b"CONFIG"].subcommands[b"SET"])))  # type: ignore[index]  # CONFIG has subcommands
        return
    for param in argv[2::2]:
        name = param.decode(errors="replace").lower()
        if name not in TENANT_SETTABLE:
            c.reply(error(f"ERR CONFIG SET {name} is not allowed through moonmesh: the "
                          "operator sets it (a cluster's users may set slowlog, latency, "
                          "keyspace-notification and encoding parameters)"))
            return
    c.forward(argv)


def _mask_hidden(data: bytes) -> bytes:
    """CONFIG GET's reply with the values of HIDDEN_CONFIG blanked."""
    reader = hiredis.Reader()
    reader.feed(data)
    reply = reader.gets()
    if isinstance(reply, dict):  # RESP3
        return encode({k: b"" if k.decode(errors="replace").lower() in policy.HIDDEN_CONFIG
                       else v for k, v in reply.items()}, True)
    if not isinstance(reply, list):
        return data  # an error
    pairs = list(zip(reply[::2], reply[1::2]))
    return encode([x for k, v in pairs for x in (
        k, b"" if k.decode(errors="replace").lower() in policy.HIDDEN_CONFIG else v)])


def config_get(c: Client, argv: list[bytes]) -> None:
    if not c.ctx.control.table.configured:  # what the cluster it left had set
        c.reply(SLOT_NOT_SERVED)
        return
    c.forward(argv, Rewrite(_mask_hidden))


def info_section(ctx: ProxyContext) -> str:
    table = ctx.control.table
    fields = {
        "proxy_version": __version__,
        "proxy_pid": os.getpid(),
        "proxy_address": ctx.announce,
        "proxy_backend": ctx.backend_address,
        "proxy_backend_up": int(ctx.pool.healthy),
        "proxy_cluster": table.cluster,
        "proxy_epoch": table.epoch,
        "proxy_connected_clients": len(ctx.sessions),
        "proxy_commands_processed": ctx.commands_processed,
        "proxy_uptime_in_seconds": int(time.time() - ctx.started_at),
    }
    return "# Proxy\r\n" + "".join(f"{k}:{v}\r\n" for k, v in fields.items())


def info(c: Client, argv: list[bytes]) -> None:
    """The backend's INFO as a cluster node's (clients and `redis-cli --cluster` refuse a node
    whose INFO says cluster_enabled:0), with a `# Proxy` section where Redis would list every
    section or when asked for it."""
    sections = {a.lower() for a in argv[1:]}
    extra = info_section(c.ctx)
    if sections == {b"proxy"}:
        c.reply(bulk(extra))
        return
    if sections and not sections & {b"proxy", b"all", b"everything", b"default"}:
        extra = ""
    port = b"tcp_port:%d\r\n" % Address.parse(c.ctx.announce).port

    plain = c.plain  # a plain listener's client: this is one standalone Redis to it

    def as_cluster_node(data: bytes) -> bytes:
        if data[:1] not in (b"$", b"="):
            return data
        body = data[data.index(b"\r\n") + 2 : -2]
        if not plain:
            body = body.replace(b"cluster_enabled:0\r\n", b"cluster_enabled:1\r\n").replace(
                b"redis_mode:standalone\r\n", b"redis_mode:cluster\r\n")
        body = re.sub(rb"tcp_port:\d+\r\n", port, body)
        body = re.sub(rb"(executable|config_file):[^\r]*\r\n", rb"\1:\r\n", body)  # host paths
        if extra:
            body += b"\r\n" + extra.encode()
        return b"%s%d\r\n%s\r\n" % (data[:1], len(body), body)

    if not c.ctx.control.table.configured:
        # its Redis's other sections describe the data of the cluster it left (memory, key
        # counts, command statistics): a node in no cluster tells its server section only
        argv = [b"INFO", b"server"]
    c.forward([a for a in argv if a.lower() != b"proxy"], Rewrite(as_cluster_node))


def apply_setcluster(ctx: ProxyContext, meta: ClusterMeta) -> bytes:
    """Standalone mode's in-band metadata; returns the reply."""
    control = ctx.control
    if control.managed:
        return error("ERR this proxy follows the mesh's views in etcd; use umctl-mesh")
    if meta.epoch <= control.table.epoch and not meta.force:
        return error(f"OLD_EPOCH current epoch is {control.table.epoch}")
    foreign = [e.address for e in meta.local if e.address != ctx.backend_address]
    if foreign:
        return error(f"ERR_NOT_MY_META this proxy fronts {ctx.backend_address}, "
                     f"not {foreign[0]}")
    result = control.apply(table_from_meta(meta, ctx.announce), joining=True, force=meta.force)
    return OK if result is Applied.APPLIED else error(f"ERR view not applied: {result.value}")


def umctl_info(ctx: ProxyContext) -> list:
    table = ctx.control.table
    me = table.myself
    return [
        "Cluster", [table.cluster, "epoch", table.epoch,
                    "local", [f"{ctx.backend_address} {' '.join(format_ranges(me.ranges))}"]
                    if me else [],
                    "peer", [f"{n.address} {' '.join(format_ranges(n.ranges))}"
                             for n in table.nodes if not n.myself],
                    "config", [f"{k} {v}" for k, v in table.config]],
        "Backend", [ctx.backend_address, "up" if ctx.pool.healthy else "down"],
    ]


async def _handover(c: Client, pending: Pending, host: bytes, port: bytes,
                    timeout_ms: bytes) -> None:
    control = c.ctx.control
    reply = await jobs.handover(c.ctx.pool, host, port, timeout_ms)
    if reply != OK:
        control.end_handover()
    pending.data = reply
    c.replies_arrived()


def umctl(c: Client, argv: list[bytes]) -> None:
    sub = argv[1].upper() if len(argv) > 1 else b""
    ctx = c.ctx
    table = ctx.control.table
    if not c.admin and c.auth_hash != table.password_hash and sub not in UMCTL_WITHOUT_AUTH:
        c.reply(NOAUTH)
        return
    if sub in UMCTL_ADMIN and not c.admin:
        if ctx.admin_secret is not None:
            c.reply(NOT_ADMIN)
            return
        if ctx.control.managed:
            c.reply(NO_SECRET)
            return
        # a standalone proxy started without --admin-password: open, as the seed protocol
    if sub == b"SETCLUSTER":
        try:
            meta = parse_setcluster(argv[2:])
        except UmctlError as exc:
            c.reply(error(str(exc)))
            return
        c.reply(apply_setcluster(ctx, meta))
    elif sub == b"TENANT":  # UMCTL TENANT <tenant>: a peer's link is for that tenant only
        # (its view may be older than ours: a node that has since joined another cluster
        # must not run its forwards, so the link ends here)
        if len(argv) != 3 or argv[2].decode(errors="replace") != c.tenant:
            c.reply(error("ERR this node serves another cluster now"))
            c.closing = True
        else:
            c.reply(OK)
    elif sub == b"CHALLENGE":  # a peer or an operator's tool is about to prove the secret
        c.challenge = secret.new_nonce()
        c.reply(bulk(c.challenge))
    elif sub == b"PROVE":  # UMCTL PROVE <hex HMAC-SHA256(secret, challenge)>
        nonce, c.challenge = c.challenge, None  # one try per challenge
        if ctx.admin_secret is None:
            c.reply(NO_SECRET)
        elif nonce is None or len(argv) != 3:
            c.reply(error("ERR usage: UMCTL CHALLENGE, then UMCTL PROVE <answer>"))
        elif secret.proves(ctx.admin_secret, nonce, argv[2]):
            c.admin = True
            c.auth_hash = table.password_hash  # a peer or the operator acts for the cluster
            c.reply(OK)
        else:
            c.reply(error("WRONGPASS the answer does not prove the admin secret"))
    elif sub == b"HANDOVER":  # UMCTL HANDOVER <host> <port> <timeout ms>: graceful failover
        if len(argv) != 5 or not argv[3].isdigit() or not argv[4].isdigit():
            c.reply(error("ERR usage: UMCTL HANDOVER <replica host> <port> <timeout ms>"))
            return
        # writes answer TRYAGAIN from now until a view shows this node as a replica
        # (umctl-mesh writes it after the swap)
        ctx.control.start_handover()
        ctx.spawn(_handover, c, c.reply_later(), argv[2], argv[3], argv[4])
    elif sub == b"PUBLISH":  # UMCTL PUBLISH <tenant> <channel> <message>: a peer's broadcast
        if len(argv) != 5:
            c.reply(error("ERR usage: UMCTL PUBLISH <tenant> <channel> <message>"))
        elif argv[2] != table.tenant.encode():  # the secret is the pool's, not the cluster's
            c.reply(error("ERR UMCTL PUBLISH for another cluster than this node's"))
        else:  # on this node's Redis only: never sent on (no loops)
            c.forward([b"PUBLISH", argv[3], argv[4]])
    elif sub == b"HOTKEYS":  # UMCTL HOTKEYS [N]: [[key, estimated ops], ...], most first
        if len(argv) > 3 or (len(argv) == 3 and not (
                argv[2].isdigit() and 1 <= int(argv[2]) <= MAX_HOTKEYS)):
            c.reply(error(f"ERR usage: UMCTL HOTKEYS [N], N from 1 to {MAX_HOTKEYS}"))
            return
        n = int(argv[2]) if len(argv) == 3 else DEFAULT_HOTKEYS
        ctx.stats.age_hotkeys(time.monotonic())
        c.reply_value([[hot.key, hot.count] for hot in ctx.stats.hotkeys.top(n)])
    elif sub == b"GETEPOCH":
        c.reply(integer(table.epoch))
    elif sub == b"READY":
        me = table.myself
        c.reply(integer(1 if me is not None and me.ranges and ctx.pool.healthy else 0))
    elif sub == b"INFO":
        c.reply_value(umctl_info(ctx))
    elif sub == b"LISTCLUSTER":
        c.reply_value([table.cluster] if table.configured else [])
    else:
        c.reply(error("ERR unknown UMCTL subcommand; try SETCLUSTER, GETEPOCH, INFO, "
                      "READY, LISTCLUSTER or HOTKEYS"))


def publish(c: Client, argv: list[bytes]) -> None:
    """PUBLISH to every subscriber of the cluster (proxy/broadcast.py): this node's Redis if
    it is a master, and the other masters' through their proxies."""
    ctx = c.ctx
    broadcast.publish(c, c.reply_later(), c.conn, ctx.peers, ctx.stalled_peers,
                      ctx.control.table, argv[1], argv[2])


async def _keys_in_slot(c: Client, pending: Pending, slot: int, count: int | None) -> None:
    try:
        keys = await jobs.keys_in_slot(c.ctx.pool, slot, count)
    finally:
        c.ctx.slot_scans -= 1
    if isinstance(keys, Err):
        pending.data = error(keys)
    else:
        pending.data = encode(len(keys) if count is None else keys[:count], c.resp3)
    c.replies_arrived()


def served_slots(table: RoutingTable, within: slotstats.SlotsRange | None = None
                 ) -> frozenset[int]:
    """The slots of this node's shard (a replica: its master's), as CLUSTER SLOT-STATS lists
    (those `within` a range only, if given)."""
    me = table.myself
    if me is not None and me.master_id is not None:
        me = next((n for n in table.nodes if n.node_id == me.master_id), None)
    return frozenset(slotstats.served_slots(me.ranges, within)) if me is not None \
        else frozenset()


async def _slot_stats(c: Client, pending: Pending, request: slotstats.SlotsRange
                      | slotstats.OrderBy, served: frozenset[int], tenant: str,
                      epoch: int) -> None:
    ctx = c.ctx
    try:
        if c.transport is None:  # its client is gone: no scan for nobody
            return
        taken = time.monotonic()
        counts = await jobs.slot_key_counts(ctx.pool, lambda: c.transport is not None)
    finally:
        ctx.slot_scans -= 1
    if counts is None:  # given up: the client is gone
        return
    if isinstance(counts, Err):
        pending.data = error(counts)
    else:
        ctx.key_counts = jobs.KeyCounts(tenant, epoch, taken, tuple(counts))
        pending.data = encode(_slot_stats_rows(ctx, request, served, counts), c.resp3)
    c.replies_arrived()


def _slot_stats_rows(ctx: ProxyContext, request: slotstats.SlotsRange | slotstats.OrderBy,
                     served: frozenset[int], counts: Sequence[int]) -> list:
    stats = ctx.stats
    numbers = slotstats.SlotNumbers(counts, stats.slot_cpu_usec, stats.slot_bytes_in,
                                    stats.slot_bytes_out)
    return slotstats.rows(request, served, numbers)


def slot_stats(c: Client, argv: list[bytes]) -> None:
    """CLUSTER SLOT-STATS (proxy/slotstats.py). key-count takes a SCAN of the whole backend
    (it keeps no per-slot index), so it shares COUNTKEYSINSLOT's limit of MAX_SLOT_SCANS;
    its counts are reused for jobs.SLOT_COUNTS_FRESH seconds while the table's tenant and
    epoch stay (they may be that old). A node serving no slots answers at once."""
    try:
        request = slotstats.parse(argv)
    except slotstats.SlotStatsError as exc:
        c.reply(error(str(exc)))
        return
    ctx = c.ctx
    table = ctx.control.table
    served = served_slots(table, request if isinstance(request, slotstats.SlotsRange)
                          else None)
    if not served:
        c.reply_value([])
        return
    cached = ctx.key_counts
    if cached is not None and cached.fresh_for(table.tenant, table.epoch, time.monotonic()):
        c.reply_value(_slot_stats_rows(ctx, request, served, cached.counts))
        return
    if ctx.slot_scans >= MAX_SLOT_SCANS:
        c.reply(error(f"BUSY {MAX_SLOT_SCANS} scans of this node's keyspace are running "
                      "(CLUSTER COUNTKEYSINSLOT/GETKEYSINSLOT/SLOT-STATS); try again later"))
        return
    ctx.slot_scans += 1
    ctx.spawn(_slot_stats, c, c.reply_later(), request, served, table.tenant, table.epoch)


def cluster(c: Client, argv: list[bytes]) -> None:
    sub = argv[1].upper().decode(errors="replace") if len(argv) > 1 else "HELP"
    if sub not in policy.CLUSTER_LOCAL:
        c.reply(error(f"ERR CLUSTER {sub} is not allowed through moonmesh: the mesh "
                      "manages the cluster's topology"))
        return
    table = c.ctx.control.table
    if sub == "NODES":
        c.reply(bulk(clusterinfo.cluster_nodes(table)))
    elif sub == "SLOTS":
        c.reply_value(clusterinfo.cluster_slots(table))
    elif sub == "SHARDS":
        c.reply_value(clusterinfo.cluster_shards(table))
    elif sub == "INFO":
        c.reply(bulk(clusterinfo.cluster_info(table)))
    elif sub == "MYID":
        me = table.myself
        c.reply(bulk(me.node_id if me else ""))
    elif sub == "LINKS":
        c.reply_value([])
    elif sub in ("REPLICAS", "SLAVES"):
        if len(argv) != 3:
            c.reply(error(f"ERR wrong number of arguments for 'cluster|{sub.lower()}' command"))
            return
        master = argv[2].decode(errors="replace")
        if not any(n.node_id == master for n in table.nodes):
            c.reply(error(f"ERR Unknown node {master}"))
            return
        lines = clusterinfo.cluster_nodes(table).splitlines(keepends=True)
        c.reply_value([line for line in lines if f" {master} " in line])
    elif sub == "HELP":
        c.reply_value([f"CLUSTER {s}" for s in sorted(policy.CLUSTER_LOCAL)])
    elif sub == "SLOT-STATS":
        slot_stats(c, argv)
    elif sub == "KEYSLOT":
        if len(argv) != 3:
            c.reply(error("ERR wrong number of arguments for 'cluster|keyslot' command"))
            return
        c.reply(integer(key_slot(argv[2])))
    else:  # COUNTKEYSINSLOT slot / GETKEYSINSLOT slot count
        want = 3 if sub == "COUNTKEYSINSLOT" else 4
        if len(argv) != want:
            c.reply(error(f"ERR wrong number of arguments for 'cluster|{sub.lower()}' command"))
            return
        try:
            slot = int(argv[2])
            count = int(argv[3]) if want == 4 else None
        except ValueError:
            c.reply(error("ERR Invalid slot or number of keys"))
            return
        if not 0 <= slot < SLOT_COUNT or (count is not None and count < 0):
            c.reply(error("ERR Invalid slot or number of keys"))
            return
        if not table.configured:  # no slots, no keys: what its Redis holds is a cluster's it left
            c.reply_value(0 if count is None else [])
            return
        if c.ctx.slot_scans >= MAX_SLOT_SCANS:
            c.reply(error(f"BUSY {MAX_SLOT_SCANS} scans of this node's keyspace are running "
                          "(CLUSTER COUNTKEYSINSLOT/GETKEYSINSLOT); try again later"))
            return
        c.ctx.slot_scans += 1
        c.ctx.spawn(_keys_in_slot, c, c.reply_later(), slot, count)


UNSUBSCRIBE_KINDS = {b"UNSUBSCRIBE": b"unsubscribe", b"PUNSUBSCRIBE": b"punsubscribe",
                     b"SUNSUBSCRIBE": b"sunsubscribe"}


def unsubscribed(argv: list[bytes], resp3: bool) -> bytes:
    """Redis's answer to an UNSUBSCRIBE-family command from a client subscribed to nothing."""
    kind = UNSUBSCRIBE_KINDS[argv[0].upper()]
    head = b">3\r\n" if resp3 else b"*3\r\n"
    null = b"_\r\n" if resp3 else b"$-1\r\n"
    channels: list[bytes | None] = list(argv[1:]) or [None]
    return b"".join(head + bulk(kind) + (bulk(ch) if ch is not None else null) + b":0\r\n"
                    for ch in channels)


HANDLERS: dict[bytes, Handler] = {
    b"PING": ping, b"ECHO": echo, b"SELECT": select, b"QUIT": quit_, b"RESET": reset,
    b"AUTH": auth, b"HELLO": hello, b"INFO": info, b"CLUSTER": cluster, b"UMCTL": umctl,
    b"ASKING": asking, b"READONLY": readonly, b"READWRITE": readwrite, b"PUBLISH": publish,
    b"CLIENT|SETNAME": client_setname, b"CLIENT|GETNAME": client_getname,
    b"CLIENT|ID": client_id, b"CLIENT|SETINFO": client_setinfo, b"CLIENT|INFO": client_info,
    b"CONFIG|SET": config_set, b"CONFIG|GET": config_get,
}
