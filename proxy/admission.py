"""Whether a command may run, and where: one pure decision. No sockets, no clock.

`decide()` is evaluated when a command is about to be sent to Redis (never earlier), from one
routing table and one write permission, each an immutable snapshot the control port swaps
whole. The session turns the outcome into action; tests feed it tables (tests/unit/
test_admission.py).
"""
from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from core.slots import SLOT_MASK, key_slot

from . import commands, policy
from .policy import Kind
from .resp import error
from .routing import SLOT_NOT_SERVED, MigratingSlots, RoutingTable

CROSSSLOT = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
NOAUTH = b"-NOAUTH Authentication required.\r\n"
TRYAGAIN = b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"
TENANT_CHANGED = (b"-CLUSTERDOWN this node was given to another cluster since you connected; "
                  b"reconnect\r\n")
FENCED = (b"-CLUSTERDOWN this node lost contact with the mesh and serves no keys until it "
          b"rejoins\r\n")

# Answered without AUTH (as Redis does); everything else needs it when a password is set.
NO_AUTH_NEEDED = frozenset({b"AUTH", b"HELLO", b"QUIT", b"RESET", b"UMCTL"})
# The proxy's own commands that take effect at once even inside MULTI.
RUN_INSIDE_MULTI = frozenset({b"QUIT", b"RESET", b"UMCTL"})
# ... and those Redis can queue and answer in EXEC's reply (a PUBLISH queued in a
# transaction reaches this node's Redis and its replicas only: docs/architecture.md)
QUEUE_INSIDE_MULTI = frozenset({b"PING", b"ECHO", b"PUBLISH"})
# Commands of shard channels, routed by the channel's slot. A channel is no key: during a
# migration the source serves it until the commit (nothing moves), and a replica of the
# slot's master serves subscriptions (its Redis gets SPUBLISH by replication), as Redis 7.0
# Cluster does; SPUBLISH itself goes to the master, which publishes for the whole shard.
SHARD_CHANNEL_COMMANDS = frozenset({b"SPUBLISH", b"SSUBSCRIBE", b"SUNSUBSCRIBE"})
SHARD_SUBSCRIPTIONS = frozenset({b"SSUBSCRIBE", b"SUNSUBSCRIBE"})
# Commands Redis does not flag as writes that may write all the same: they meet the write
# fence. A script declared `#!lua flags=no-writes` and the _RO forms are reads.
SCRIPTS = frozenset({b"EVAL", b"EVALSHA", b"FCALL"})
MAY_WRITE = SCRIPTS | {b"EXEC"}


@dataclass(frozen=True, slots=True)
class WritePermission:
    """May this node take writes now? Swapped whole by the control port; read per write."""

    deadline: float = float("inf")  # core.clock.now() past which writes are refused
    fenced: bool = False  # the lease may have expired: no writes until the view is re-read
    handing_over: bool = False  # a graceful failover is switching masters: retry soon

    def refusal(self, now: float) -> bytes | None:
        """The reply to a write at `now`, or None when it may run."""
        if self.fenced or now > self.deadline:
            return FENCED
        if self.handing_over:
            return TRYAGAIN
        return None


class ClientState(Protocol):
    """What the decision reads of a client (a Session, or a value in tests)."""

    tenant: str  # the table's tenant when the client connected
    auth_hash: str | None  # the password hash this client authenticated against
    asked: bool  # ASKING came right before this command
    readonly: bool  # READONLY: reads of a replica's slots are served here
    in_multi: bool
    admin: bool  # proved the mesh secret: a peer proxy (or the operator's tool)

    @property
    def multi_slots(self) -> AbstractSet[int]: ...  # of the commands queued in MULTI


# -- outcomes --------------------------------------------------------------------------------
class Forward:
    """Send the command to this node's Redis on the client's current connection."""

    __slots__ = ("synced",)

    def __init__(self, synced: bool) -> None:
        self.synced = synced  # synchronous mode: acknowledge once WAIT says replicas have it


class Queue:
    """Inside MULTI: send it (Redis queues it); EXEC runs only while `slot` is still here."""

    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot


class Local:
    """The proxy answers it itself (`name`: the command or 'CONTAINER|SUB')."""

    __slots__ = ("name",)

    def __init__(self, name: bytes) -> None:
        self.name = name


class Dedicated:
    """Needs a backend connection of the client's own (transactions, scripts, blocking)."""

    __slots__ = ("blocking", "slot")

    def __init__(self, blocking: bool, slot: int = -1) -> None:
        # it may block: what the client sends after it waits (it is decided once this has
        # returned, not while Redis holds it), and it is unblocked if `slot` leaves this node
        self.blocking = blocking
        self.slot = slot


class Subscribe:
    """Pub/sub: a dedicated connection whose replies all go to the client as they come."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer `reply` (an error) and send nothing."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Answer `reply` and close the connection: nothing more of this client may run here."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answer `reply` (-MOVED, or -CLUSTERDOWN for a slot nobody serves) and send nothing."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class Gate:
    """A slot of a running migration: the migration's gate checks where the keys are."""

    migration_id: str
    keys: tuple[bytes, ...]
    slot: int


Outcome = Forward | Queue | Local | Dedicated | Subscribe | Refuse | Redirect | Gate | Disconnect
TENANT_GONE = Disconnect(TENANT_CHANGED)
IN_NO_CLUSTER = Refuse(SLOT_NOT_SERVED)  # what a cluster node without slots answers

FORWARD = Forward(False)
FORWARD_SYNCED = Forward(True)
DEDICATED = Dedicated(False)
SUBSCRIBE = Subscribe()


def _build_dispatch() -> dict[bytes, tuple[Kind, commands.CommandSpec]]:
    table = {name: (policy.kind_of(name.decode()), spec)
             for name, spec in commands.COMMANDS.items()}
    # the proxy's own command, unknown to Redis
    table[b"UMCTL"] = (Kind.LOCAL, commands.CommandSpec(
        name=b"UMCTL", arity=-2, flags=frozenset(), first_key=0, last_key=0, key_step=0,
        movable=False, min_argc=2, max_argc=1 << 31,
        arity_error="ERR wrong number of arguments for 'umctl' command"))
    return table


DISPATCH = _build_dispatch()
_LOCAL = {spec.name: Local(spec.name) for kind, spec in DISPATCH.values() if kind is Kind.LOCAL}
for _kind, _spec in DISPATCH.values():
    for _sub in (_spec.subcommands or {}).values():
        if policy.kind_of(_sub.name.decode()) is Kind.LOCAL:
            _LOCAL[_sub.name] = Local(_sub.name)
# Redis 7.2's, sent by new clients, unknown to the 7.0 table: nothing to keep
CLIENT_SETINFO = _LOCAL[b"CLIENT|SETINFO"] = Local(b"CLIENT|SETINFO")


def unknown_command(argv: list[bytes]) -> bytes:
    shown = " ".join(f"'{a.decode(errors='replace')[:128]}'" for a in argv[1:21])
    return error(f"ERR unknown command '{argv[0].decode(errors='replace')[:128]}', "
                 f"with args beginning with: {shown}")


def decide(argv: list[bytes], table: RoutingTable, client: ClientState,
           permission: WritePermission, now: float) -> Outcome:
    """Where `argv` goes, decided from `table` and `permission` as they are now."""
    if client.tenant != table.tenant:
        return _departed(argv, table.departed, client, client.tenant) or TENANT_GONE
    if not table.tenant and table.departed is not None:
        # a node that just left a cluster, and a client that connected since, most likely a
        # cluster client with the old slot map: its keyed commands are redirected too (the
        # departed cluster's password, if it has one, first); the rest as on any free node
        departed = _departed(argv, table.departed, client, table.departed.tenant)
        if departed is not None:
            return departed
    name = argv[0].upper()
    entry = DISPATCH.get(name)
    if entry is None:
        return Refuse(unknown_command(argv))
    kind, spec = entry
    if spec.subcommands is not None and len(argv) > 1 and kind is not Kind.LOCAL:
        sub = spec.subcommands.get(argv[1].upper())
        if sub is not None:
            spec = sub
            kind = policy.kind_of(spec.name.decode())
        elif name == b"CLIENT":
            if argv[1].upper() == b"SETINFO":
                return CLIENT_SETINFO
            return Refuse(error(f"ERR unknown or unsupported subcommand "
                                f"'{argv[1].upper().decode(errors='replace')}' of CLIENT "
                                "through moonmesh"))
    if not spec.min_argc <= len(argv) <= spec.max_argc:
        return Refuse(error(commands.arity_error(spec)))
    if not table.configured and kind is not Kind.LOCAL:
        # a node in no cluster: its Redis may still hold the keys of the cluster it left (it is
        # emptied when the node joins another), so nothing reaches it, keyed or not
        return IN_NO_CLUSTER
    if client.auth_hash != table.password_hash and name not in NO_AUTH_NEEDED \
            and not client.admin and client.auth_hash != table.login_hash:
        # a peer acts for the cluster, whatever its password now; on a node that left a
        # cluster, that cluster's password logs in (its keyed commands are redirected above)
        return Refuse(NOAUTH)
    write = "write" in spec.flags or (spec.name in MAY_WRITE and not _declared_read_only(argv))
    if write:
        refusal = permission.refusal(now)
        if refusal is not None:
            return Refuse(refusal)
    if kind is Kind.KEYED:
        if spec.first_key or spec.movable:
            # inside MULTI the gate cannot run a command now without breaking the transaction
            routed = _route(spec, argv, table, client, gated=not client.in_multi)
            if not isinstance(routed, (int, Gate)):
                return routed
            if client.in_multi and isinstance(routed, int) and routed >= 0:
                return Queue(routed)
        else:
            routed = -1
        if not write:
            # reads stop with writes: past the deadline a replica may have been promoted and
            # taken newer writes, and a read here would go back in time
            refusal = permission.refusal(now)
            if refusal is not None:
                return Refuse(refusal)
        if isinstance(routed, Gate):
            return routed
        return FORWARD_SYNCED if write and table.min_replicas_ack else FORWARD
    if kind is Kind.LOCAL:
        if client.in_multi and name not in RUN_INSIDE_MULTI:
            if name in QUEUE_INSIDE_MULTI:
                return FORWARD  # Redis queues it and answers it in EXEC's reply
            return Refuse(error(f"ERR {name.decode()} inside MULTI is not supported through "
                                "moonmesh"))
        return _LOCAL[spec.name]
    if kind is Kind.DEDICATED or kind is Kind.SUBSCRIBE:
        if kind is Kind.SUBSCRIBE and client.in_multi:  # Redis would queue it, then be stuck
            return Refuse(error(f"ERR {name.decode()} inside MULTI is not supported through "
                                "moonmesh"))
        routed = -1
        if spec.first_key or spec.movable:
            routed = _route(spec, argv, table, client, gated=False)
            if not isinstance(routed, int):
                return routed
        if not write and routed >= 0:  # reads stop with writes (above)
            refusal = permission.refusal(now)
            if refusal is not None:
                return Refuse(refusal)
        if routed < 0 and write and name in SCRIPTS and not table.serves_all:
            # keys it does not declare could be anybody's slots: Redis Cluster refuses them
            return Refuse(error("ERR a script that may write must declare its keys through "
                                "moonmesh (numkeys is 0 here)"))
        if client.in_multi and routed >= 0:
            return Queue(routed)  # queued in the transaction: EXEC checks the slot again
        if name == b"EXEC" and client.multi_slots:
            moved = _gone(client.multi_slots, table)
            if moved is not None:
                return moved
        if kind is Kind.SUBSCRIBE:
            return SUBSCRIBE
        return Dedicated(True, routed) if "blocking" in spec.flags else DEDICATED
    return Refuse(error(policy.refusal(spec.name.decode())))


def _departed(argv: list[bytes], departed: RoutingTable | None, client: ClientState,
              tenant: str) -> Redirect | None:
    """A client of the cluster this node left: a keyed command's redirect to its slot's
    owner as the node last knew it (None: anything else, which ends a connection made while
    the node was in that cluster). `tenant`: the cluster the client is one of."""
    if departed is None or departed.tenant != tenant:
        return None
    if departed.password_hash is not None and client.auth_hash != departed.password_hash \
            and not client.admin:
        return None
    entry = DISPATCH.get(argv[0].upper())
    if entry is None or entry[0] is Kind.LOCAL:
        return None
    spec = entry[1]
    if not (spec.first_key or spec.movable) or not spec.min_argc <= len(argv) <= spec.max_argc:
        return None
    routed = _route(spec, argv, departed, client, gated=False)
    return routed if isinstance(routed, Redirect) else None


def _declared_read_only(argv: list[bytes]) -> bool:
    """EVAL of a script whose shebang declares `flags=no-writes` (Redis refuses its writes)."""
    if argv[0].upper() != b"EVAL" or len(argv) < 2 or not argv[1].startswith(b"#!"):
        return False
    shebang = argv[1].split(b"\n", 1)[0]
    for word in shebang.split()[1:]:
        if word.startswith(b"flags="):
            return b"no-writes" in word[6:].split(b",")
    return False


def _gone(slots: AbstractSet[int], table: RoutingTable) -> Outcome | None:
    """EXEC's answer when a slot its queued commands touch is no longer served here."""
    for slot in slots:
        route = table.routes[slot]
        if route is not None:
            return Redirect(route) if isinstance(route, bytes) else Refuse(TRYAGAIN)
    return None


# what a peer may send across slots when this node serves them all: the part of a plain
# client's multi-key command for this node (one command runs them as Redis would)
PEER_MULTI_SLOT = frozenset({b"MGET", b"MSET", b"DEL", b"UNLINK", b"EXISTS", b"TOUCH"})


def _route(spec: commands.CommandSpec, argv: list[bytes], table: RoutingTable,
           client: ClientState, gated: bool) -> Outcome | int:
    """The slot when this node serves the command's keys now (-1: it has none), else the
    outcome. `gated`: the command may go through the gate of a migrating slot; otherwise such
    a slot answers -TRYAGAIN (on the target: a command of several keys)."""
    if spec.movable or spec.last_key != spec.first_key:
        try:
            positions = commands.key_indices(spec, argv)
        except commands.CommandArgsError as exc:
            return Refuse(error(str(exc)))
        if not positions:
            positions = commands.shard_channel_indices(spec, argv)
            if not positions:
                return -1
        slot = key_slot(argv[positions[0]])
        for i in positions[1:]:
            if key_slot(argv[i]) != slot:
                if client.admin and spec.name in PEER_MULTI_SLOT and all(
                        table.routes[key_slot(argv[j])] is None for j in positions):
                    return slot  # a plain client's keys that all live here (proxy/plain.py)
                return Refuse(CROSSSLOT)
    else:
        positions = [spec.first_key]
        slot = key_slot(argv[spec.first_key])
    route = table.routes[slot]
    if route is None:
        return slot
    if route.__class__ is bytes:
        if table.readable and table.readable[slot] and (
                (client.readonly and "readonly" in spec.flags)
                or spec.name in SHARD_SUBSCRIPTIONS):
            # READONLY: a replica serves reads of its master's slots, and subscriptions
            return slot
        return Redirect(route)
    assert isinstance(route, MigratingSlots)
    if spec.name in SHARD_CHANNEL_COMMANDS:  # no keys to look for: the source serves them
        return slot if route.source or client.asked else Redirect(route.moved(slot))
    if not route.source:  # the target serves a migrating slot only after ASKING
        if not client.asked:
            return Redirect(route.moved(slot))
        if len(positions) == 1 or not (gated or client.in_multi):
            return slot
        if not gated:
            return Refuse(TRYAGAIN)  # inside MULTI: some of the keys may not be here yet
    elif not gated:
        return Refuse(TRYAGAIN)
    return Gate(route.migration_id, tuple(argv[i] for i in positions), slot)


def keeps_shard_channel(table: RoutingTable, slot: int) -> bool:
    """Does a subscription to a shard channel of `slot` stay on this node under `table`?
    Until the slot has left it (a migration's source keeps its channels until the commit),
    and on a replica of its master. When it has left, the subscriber is told `sunsubscribe`
    (proxy/dedicated.py), as Redis Cluster does, and subscribes again at the new owner."""
    route = table.routes[slot]
    return route is None or isinstance(route, MigratingSlots) or bool(
        table.readable and table.readable[slot])


def _build_plain() -> dict[bytes, tuple[int, int]]:
    """Commands of one key at argv[1] that need nothing but routing (GET, SET, HSET, ...):
    name as clients usually spell it -> (min argc, max argc). Reads and writes alike meet
    the fence (`decide()`)."""
    plain = {}
    for name, (kind, spec) in DISPATCH.items():
        if (kind is Kind.KEYED and spec.subcommands is None and not spec.movable
                and spec.first_key == spec.last_key == 1):
            entry = (spec.min_argc, spec.max_argc)
            plain[name] = plain[name.lower()] = entry
    return plain


PLAIN = _build_plain()


def plain_batch(batch: list[list[bytes]], table: RoutingTable, tenant: str,
                auth_hash: str | None, permission: WritePermission, now: float) -> bool:
    """The fast path's decision: True when every command of `batch` is plain and `decide()`
    would forward it here unsynced, so the batch may go to Redis as the client sent it.
    Same rules, one pass, no per-command outcome (tests check the two agree)."""
    if tenant != table.tenant or auth_hash != table.password_hash or table.min_replicas_ack:
        return False
    routes = None if table.serves_all else table.routes
    for argv in batch:
        entry = PLAIN.get(argv[0])
        if entry is None or not entry[0] <= len(argv) <= entry[1]:
            return False
        if routes is not None:
            key = argv[1]
            if routes[key_slot(key) if b"{" in key else crc_hqx(key, 0) & SLOT_MASK] \
                    is not None:
                return False
    return permission.refusal(now) is None  # reads and writes alike (see decide())
