"""The admission decision as tables: every outcome of `decide()`, the fast path's agreement
with it, and the control port's swaps. In memory: no sockets, no clock."""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.slots import SLOT_COUNT, key_slot
from proxy import local
from proxy.admission import (
    CROSSSLOT,
    DEDICATED,
    FENCED,
    FORWARD,
    FORWARD_SYNCED,
    NOAUTH,
    PLAIN,
    SUBSCRIBE,
    TENANT_GONE,
    TRYAGAIN,
    Dedicated,
    Gate,
    Local,
    Queue,
    Redirect,
    Refuse,
    WritePermission,
    decide,
    keeps_shard_channel,
    plain_batch,
)
from proxy.control import FENCED_LEASE, Applied, ControlPort
from proxy.routing import SLOT_NOT_SERVED, MigratingSlots, NodeInfo, RoutingTable, empty_table, hash_password

A, B, C = key_slot(b"a"), key_slot(b"b"), key_slot(b"c")  # 15495, 3300, 7365
PEER = "10.0.0.2:7000"
MOVED_A = b"-MOVED %d %s\r\n" % (A, PEER.encode())
NOW = 100.0


@dataclass(frozen=True)
class Client:
    tenant: str = ""
    auth_hash: str | None = None
    asked: bool = False
    readonly: bool = False
    in_multi: bool = False
    multi_slots: frozenset[int] = frozenset()
    admin: bool = False


def make_table(routes: dict[int, object] | None = None, epoch: int = 1, cluster: str = "c",
               **fields: object) -> RoutingTable:
    """Every slot served here, except those `routes` names."""
    slots: list = [None] * SLOT_COUNT
    for slot, route in (routes or {}).items():
        slots[slot] = route
    me = NodeInfo("me", "10.0.0.1:7000", True, ((0, SLOT_COUNT - 1),))
    return RoutingTable(cluster=cluster, epoch=epoch, nodes=(me,), routes=tuple(slots),
                        **fields)  # type: ignore[arg-type]


ALL = make_table()
A_MOVED = make_table({A: MOVED_A})
A_UNSERVED = make_table({A: SLOT_NOT_SERVED})
SOURCE = MigratingSlots("m1", True, PEER)
TARGET = MigratingSlots("m1", False, PEER)
A_LEAVING = make_table({A: SOURCE})
A_ARRIVING = make_table({A: TARGET})
PASSWORD = make_table(password_hash=hash_password("pw"))
SYNCED = make_table(min_replicas_ack=1)
A_REPLICA = make_table({A: MOVED_A}, readable=bytes(1 if s == A else 0 for s in range(SLOT_COUNT)))

LEFT = replace(empty_table(), departed=make_table({A: MOVED_A}, tenant="old"))
LEFT_PASSWORD = replace(empty_table(), departed=make_table({A: MOVED_A}, tenant="old",
                                                           password_hash=hash_password("pw")))
OPEN = WritePermission()
EXPIRED = WritePermission(deadline=NOW - 1)
FENCED_NOW = WritePermission(fenced=True)
HANDING_OVER = WritePermission(handing_over=True)

CLIENT = Client()
ASKED = Client(asked=True)
IN_MULTI = Client(in_multi=True)
READONLY = Client(readonly=True)
AUTHED = Client(auth_hash=hash_password("pw"))
ASKED_IN_MULTI = Client(asked=True, in_multi=True)
MULTI_ON_A = Client(in_multi=True, multi_slots=frozenset({A}))
MULTI_ON_A_B = Client(in_multi=True, multi_slots=frozenset({B, A}))


def describe(outcome: object) -> tuple:
    if outcome is FORWARD:
        return ("forward",)
    if outcome is FORWARD_SYNCED:
        return ("forward-synced",)
    if outcome is DEDICATED:
        return ("dedicated",)
    if isinstance(outcome, Dedicated) and outcome.blocking:
        return ("dedicated-blocking", outcome.slot)
    if outcome is SUBSCRIBE:
        return ("subscribe",)
    if outcome is TENANT_GONE:
        return ("disconnect",)
    if isinstance(outcome, Queue):
        return ("queue", outcome.slot)
    if isinstance(outcome, Local):
        return ("local", outcome.name)
    if isinstance(outcome, Refuse):
        return ("refuse", outcome.reply)
    if isinstance(outcome, Redirect):
        return ("redirect", outcome.reply)
    if isinstance(outcome, Gate):
        return ("gate", outcome.migration_id, outcome.keys, outcome.slot)
    raise AssertionError(f"not an outcome: {outcome!r}")


def argv(text: str) -> list[bytes]:
    return [w.encode() for w in text.split()]


# (command, table, client, permission, expected: kind and, for replies, how the reply starts)
CASES = [
    # plain keyed commands
    ("GET a", ALL, CLIENT, OPEN, ("forward",)),
    ("get a", ALL, CLIENT, OPEN, ("forward",)),
    ("SET a 1", ALL, CLIENT, OPEN, ("forward",)),
    ("GET a", A_MOVED, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("SET a 1", A_MOVED, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("GET {a}x", A_MOVED, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("GET b", A_MOVED, CLIENT, OPEN, ("forward",)),
    ("GET a", A_UNSERVED, CLIENT, OPEN, ("redirect", b"-CLUSTERDOWN Hash slot not served")),
    ("EXISTS a {a}x", ALL, CLIENT, OPEN, ("forward",)),
    ("MGET a b", ALL, CLIENT, OPEN, ("refuse", CROSSSLOT)),
    ("MSET a 1 b 2", ALL, CLIENT, OPEN, ("refuse", CROSSSLOT)),
    ("MGET a {a}x", A_MOVED, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("DBSIZE", A_MOVED, CLIENT, OPEN, ("forward",)),  # keyless: answered for this node
    ("XADD a * f v", ALL, CLIENT, OPEN, ("forward",)),
    ("EVAL_RO s 1 a", A_MOVED, CLIENT, OPEN, ("redirect", MOVED_A)),
    # errors before any routing
    ("NOSUCH a", ALL, CLIENT, OPEN, ("refuse", b"-ERR unknown command 'NOSUCH'")),
    ("GET", ALL, CLIENT, OPEN, ("refuse", b"-ERR wrong number of arguments for 'get'")),
    ("GET a b", ALL, CLIENT, OPEN, ("refuse", b"-ERR wrong number of arguments for 'get'")),
    ("SET a", A_MOVED, CLIENT, OPEN, ("refuse", b"-ERR wrong number of arguments")),
    ("ZUNIONSTORE d x a", ALL, CLIENT, OPEN, ("refuse", b"-ERR")),  # bad numkeys
    # authentication
    ("GET a", PASSWORD, CLIENT, OPEN, ("refuse", NOAUTH)),
    ("GET a", PASSWORD, AUTHED, OPEN, ("forward",)),
    ("PING", PASSWORD, CLIENT, OPEN, ("refuse", NOAUTH)),
    ("CLUSTER NODES", PASSWORD, CLIENT, OPEN, ("refuse", NOAUTH)),
    ("AUTH pw", PASSWORD, CLIENT, OPEN, ("local", b"AUTH")),
    ("HELLO 3", PASSWORD, CLIENT, OPEN, ("local", b"HELLO")),
    ("QUIT", PASSWORD, CLIENT, OPEN, ("local", b"QUIT")),
    ("UMCTL READY", PASSWORD, CLIENT, OPEN, ("local", b"UMCTL")),
    ("GET a", ALL, AUTHED, OPEN, ("refuse", NOAUTH)),  # authenticated against an old password
    # the write fence and the handover
    ("SET a 1", ALL, CLIENT, EXPIRED, ("refuse", FENCED)),
    ("SET a 1", ALL, CLIENT, FENCED_NOW, ("refuse", FENCED)),
    ("SET a 1", ALL, CLIENT, HANDING_OVER, ("refuse", TRYAGAIN)),
    ("DEL a", ALL, CLIENT, EXPIRED, ("refuse", FENCED)),
    ("FLUSHALL", ALL, CLIENT, FENCED_NOW, ("refuse", FENCED)),
    # reads stop with writes (a promoted replica may have newer data)...
    ("GET a", ALL, CLIENT, EXPIRED, ("refuse", FENCED)),
    ("GET a", ALL, CLIENT, HANDING_OVER, ("refuse", TRYAGAIN)),
    ("GET a", A_MOVED, CLIENT, EXPIRED, ("redirect", MOVED_A)),  # ...where they are served
    ("SET a 1", A_MOVED, CLIENT, FENCED_NOW, ("refuse", FENCED)),  # fence before routing
    # synchronous mode
    ("SET a 1", SYNCED, CLIENT, OPEN, ("forward-synced",)),
    ("GET a", SYNCED, CLIENT, OPEN, ("forward",)),
    ("INCR a", SYNCED, CLIENT, OPEN, ("forward-synced",)),
    # READONLY reads on a replica
    ("GET a", A_REPLICA, READONLY, OPEN, ("forward",)),
    ("GET a", A_REPLICA, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("SET a 1", A_REPLICA, READONLY, OPEN, ("redirect", MOVED_A)),
    ("GET a", A_MOVED, READONLY, OPEN, ("redirect", MOVED_A)),
    # a migrating slot, on the source
    ("GET a", A_LEAVING, CLIENT, OPEN, ("gate", "m1", (b"a",), A)),
    ("SET a 1", A_LEAVING, CLIENT, OPEN, ("gate", "m1", (b"a",), A)),
    ("GET a", A_LEAVING, CLIENT, FENCED_NOW, ("refuse", FENCED)),  # a fenced gate serves none
    ("SET a 1", A_LEAVING, CLIENT, EXPIRED, ("refuse", FENCED)),
    ("MGET a {a}x", A_LEAVING, CLIENT, OPEN, ("gate", "m1", (b"a", b"{a}x"), A)),
    ("BLPOP a 0", A_LEAVING, CLIENT, OPEN, ("refuse", TRYAGAIN)),
    ("WATCH a", A_LEAVING, CLIENT, OPEN, ("refuse", TRYAGAIN)),
    ("GET b", A_LEAVING, CLIENT, OPEN, ("forward",)),
    # ... and on the target
    ("GET a", A_ARRIVING, CLIENT, OPEN, ("redirect", b"-MOVED %d %s" % (A, PEER.encode()))),
    ("GET a", A_ARRIVING, ASKED, OPEN, ("forward",)),
    ("MGET a {a}x", A_ARRIVING, ASKED, OPEN, ("gate", "m1", (b"a", b"{a}x"), A)),
    ("BLPOP a 0", A_ARRIVING, ASKED, OPEN, ("dedicated-blocking", A)),
    ("BLPOP a 0", A_ARRIVING, CLIENT, OPEN, ("redirect", b"-MOVED")),
    # commands the proxy answers itself
    ("PING", ALL, CLIENT, OPEN, ("local", b"PING")),
    ("ping", ALL, CLIENT, OPEN, ("local", b"PING")),
    ("ECHO x", ALL, CLIENT, OPEN, ("local", b"ECHO")),
    ("CLUSTER SLOTS", ALL, CLIENT, OPEN, ("local", b"CLUSTER")),
    ("CLUSTER SETSLOT 1 NODE x", ALL, CLIENT, OPEN, ("local", b"CLUSTER")),  # refused there
    ("ASKING", ALL, CLIENT, OPEN, ("local", b"ASKING")),
    ("READONLY", ALL, CLIENT, OPEN, ("local", b"READONLY")),
    ("CLIENT SETNAME n", ALL, CLIENT, OPEN, ("local", b"CLIENT|SETNAME")),
    ("CLIENT SETINFO lib-name x", ALL, CLIENT, OPEN, ("local", b"CLIENT|SETINFO")),
    ("CLIENT NOSUCH", ALL, CLIENT, OPEN, ("refuse", b"-ERR unknown or unsupported subcommand 'NOSUCH'")),
    ("CONFIG SET maxmemory 1", ALL, CLIENT, OPEN, ("local", b"CONFIG|SET")),
    ("CONFIG GET maxmemory", ALL, CLIENT, OPEN, ("local", b"CONFIG|GET")),  # masked reply
    ("CONFIG RESETSTAT", ALL, CLIENT, OPEN, ("refuse", b"-ERR CONFIG RESETSTAT is not allowed")),
    ("INFO", ALL, CLIENT, OPEN, ("local", b"INFO")),
    ("SELECT 0", ALL, CLIENT, OPEN, ("local", b"SELECT")),
    # inside MULTI
    ("PING", ALL, IN_MULTI, OPEN, ("forward",)),  # Redis queues it
    ("ECHO x", ALL, IN_MULTI, OPEN, ("forward",)),
    ("CLUSTER NODES", ALL, IN_MULTI, OPEN, ("refuse", b"-ERR CLUSTER inside MULTI")),
    ("QUIT", ALL, IN_MULTI, OPEN, ("local", b"QUIT")),
    ("UMCTL GETEPOCH", ALL, IN_MULTI, OPEN, ("local", b"UMCTL")),
    ("SET a 1", ALL, IN_MULTI, OPEN, ("queue", A)),
    ("GET b", A_MOVED, IN_MULTI, OPEN, ("queue", B)),
    ("SET a 1", A_MOVED, IN_MULTI, OPEN, ("redirect", MOVED_A)),
    ("DBSIZE", ALL, IN_MULTI, OPEN, ("forward",)),  # keyless: nothing to follow
    ("SET a 1", A_LEAVING, IN_MULTI, OPEN, ("refuse", TRYAGAIN)),  # the gate would run it now
    ("GET a", A_ARRIVING, ASKED_IN_MULTI, OPEN, ("queue", A)),
    ("MGET a {a}x", A_ARRIVING, ASKED_IN_MULTI, OPEN, ("refuse", TRYAGAIN)),
    ("EXEC", ALL, MULTI_ON_A, OPEN, ("dedicated",)),
    ("EXEC", A_MOVED, MULTI_ON_A_B, OPEN, ("redirect", MOVED_A)),  # a slot left meanwhile
    ("EXEC", A_LEAVING, MULTI_ON_A, OPEN, ("refuse", TRYAGAIN)),  # a migration started
    ("EXEC", A_MOVED, IN_MULTI, OPEN, ("dedicated",)),  # queued nothing of slot A
    ("DISCARD", A_MOVED, MULTI_ON_A, OPEN, ("dedicated",)),
    # scripts and transactions may write: they meet the fence
    ("EXEC", ALL, MULTI_ON_A, FENCED_NOW, ("refuse", FENCED)),
    ("EXEC", ALL, IN_MULTI, HANDING_OVER, ("refuse", TRYAGAIN)),
    ("EVAL s 1 a", ALL, CLIENT, FENCED_NOW, ("refuse", FENCED)),
    ("EVALSHA 0123 1 a", ALL, CLIENT, EXPIRED, ("refuse", FENCED)),
    ("FCALL f 1 a", ALL, CLIENT, HANDING_OVER, ("refuse", TRYAGAIN)),
    ("EVAL_RO s 1 a", ALL, CLIENT, OPEN, ("dedicated",)),
    ("EVAL_RO s 1 a", ALL, CLIENT, FENCED_NOW, ("refuse", FENCED)),  # reads stop with writes
    ("EVALSHA_RO 0123 1 a", ALL, CLIENT, OPEN, ("dedicated",)),
    ("EVALSHA_RO 0123 1 a", ALL, CLIENT, FENCED_NOW, ("refuse", FENCED)),  # reads stop with writes
    ("FCALL_RO f 1 a", ALL, CLIENT, OPEN, ("dedicated",)),
    ("FCALL_RO f 1 a", ALL, CLIENT, FENCED_NOW, ("refuse", FENCED)),  # reads stop with writes
    ("DISCARD", ALL, IN_MULTI, FENCED_NOW, ("dedicated",)),
    # own connections: transactions, scripts, blocking commands
    ("MULTI", ALL, CLIENT, OPEN, ("dedicated",)),
    ("EXEC", ALL, IN_MULTI, OPEN, ("dedicated",)),
    ("WATCH a", ALL, CLIENT, OPEN, ("dedicated",)),
    ("WATCH a", A_MOVED, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("BLPOP a 0", ALL, CLIENT, OPEN, ("dedicated-blocking", A)),
    ("BLMOVE {b}x {b}y LEFT LEFT 0", ALL, CLIENT, OPEN, ("dedicated-blocking", B)),
    ("XREAD BLOCK 0 STREAMS a $", ALL, CLIENT, OPEN, ("dedicated-blocking", A)),
    ("WAIT 1 0", ALL, CLIENT, OPEN, ("dedicated",)),
    ("BLPOP a b 0", ALL, CLIENT, OPEN, ("refuse", CROSSSLOT)),
    ("EVAL s 1 a", ALL, CLIENT, OPEN, ("dedicated",)),
    ("EVAL s 1 a", A_MOVED, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("EVAL s 0", ALL, CLIENT, OPEN, ("dedicated",)),
    ("XREAD BLOCK 0 STREAMS a $", A_MOVED, CLIENT, OPEN, ("redirect", MOVED_A)),
    # inside MULTI, commands of clients' own connections queue, and EXEC checks their slots
    ("EVAL s 1 a", ALL, IN_MULTI, OPEN, ("queue", A)),
    ("BLPOP a 0", ALL, IN_MULTI, OPEN, ("queue", A)),  # Redis does not block inside MULTI
    ("SUBSCRIBE ch", ALL, IN_MULTI, OPEN, ("refuse", b"-ERR SUBSCRIBE inside MULTI")),
    ("SSUBSCRIBE a", ALL, IN_MULTI, OPEN, ("refuse", b"-ERR SSUBSCRIBE inside MULTI")),
    # a script that may write declares its keys where the node does not serve every slot
    ("EVAL s 0", A_MOVED, CLIENT, OPEN, ("refuse", b"-ERR a script that may write must")),
    ("FCALL f 0", A_MOVED, CLIENT, OPEN, ("refuse", b"-ERR a script that may write must")),
    ("EVAL_RO s 0", A_MOVED, CLIENT, OPEN, ("dedicated",)),
    ("EVAL s 0", ALL, CLIENT, OPEN, ("dedicated",)),
    # what would show secrets or the proxy's own connections
    ("ACL LIST", ALL, CLIENT, OPEN, ("refuse", b"-ERR ACL LIST is not allowed")),
    ("ACL GETUSER default", ALL, CLIENT, OPEN, ("refuse", b"-ERR ACL GETUSER is not allowed")),
    ("CLIENT LIST", ALL, CLIENT, OPEN, ("refuse", b"-ERR CLIENT LIST is not allowed")),
    # pub/sub
    ("SUBSCRIBE ch", ALL, CLIENT, OPEN, ("subscribe",)),
    ("UNSUBSCRIBE", ALL, CLIENT, OPEN, ("subscribe",)),
    ("SSUBSCRIBE a", A_MOVED, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("SSUBSCRIBE a", ALL, CLIENT, OPEN, ("subscribe",)),
    ("SUBSCRIBE ch", PASSWORD, CLIENT, OPEN, ("refuse", NOAUTH)),
    ("PUBLISH ch m", ALL, CLIENT, OPEN, ("local", b"PUBLISH")),  # to every master
    ("PUBLISH ch m", A_MOVED, CLIENT, FENCED_NOW, ("local", b"PUBLISH")),  # no data: no fence
    ("PUBLISH ch m", ALL, IN_MULTI, OPEN, ("forward",)),  # Redis queues it, as before
    ("PUBLISH ch m", PASSWORD, CLIENT, OPEN, ("refuse", NOAUTH)),
    ("PUBLISH ch", ALL, CLIENT, OPEN, ("refuse", b"-ERR wrong number of arguments")),
    # shard channels: by slot; subscriptions on a replica of the slot too (Redis 7.0)
    ("SPUBLISH a m", ALL, CLIENT, OPEN, ("forward",)),
    ("SPUBLISH a m", A_MOVED, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("SSUBSCRIBE a", A_REPLICA, CLIENT, OPEN, ("subscribe",)),
    ("SUNSUBSCRIBE a", A_REPLICA, CLIENT, OPEN, ("subscribe",)),
    ("SPUBLISH a m", A_REPLICA, CLIENT, OPEN, ("redirect", MOVED_A)),  # the master publishes
    ("SPUBLISH a m", A_REPLICA, READONLY, OPEN, ("redirect", MOVED_A)),
    ("SSUBSCRIBE a {a}x", A_REPLICA, CLIENT, OPEN, ("subscribe",)),
    ("SSUBSCRIBE a b", ALL, CLIENT, OPEN, ("refuse", CROSSSLOT)),
    # ... a channel is no key: the source of a migration serves it until the commit
    ("SPUBLISH a m", A_LEAVING, CLIENT, OPEN, ("forward",)),
    ("SSUBSCRIBE a", A_LEAVING, CLIENT, OPEN, ("subscribe",)),
    ("SPUBLISH a m", A_LEAVING, IN_MULTI, OPEN, ("queue", A)),
    ("SPUBLISH a m", A_ARRIVING, CLIENT, OPEN, ("redirect", b"-MOVED %d %s" % (A, PEER.encode()))),
    ("SSUBSCRIBE a", A_ARRIVING, CLIENT, OPEN, ("redirect", b"-MOVED")),
    ("SSUBSCRIBE a", A_ARRIVING, ASKED, OPEN, ("subscribe",)),
    # a client of the tenant the node served before
    ("GET a", ALL, Client(tenant="old"), OPEN, ("disconnect",)),
    # ... which this node left, while the cluster goes on: redirected to the new owners
    ("GET a", LEFT, Client(tenant="old"), OPEN, ("redirect", MOVED_A)),
    ("MSET a 1 {a}x 2", LEFT, Client(tenant="old"), OPEN, ("redirect", MOVED_A)),
    ("PING", LEFT, Client(tenant="old"), OPEN, ("disconnect",)),
    ("CLUSTER SLOTS", LEFT, Client(tenant="old"), OPEN, ("disconnect",)),
    ("GET a", LEFT, Client(tenant="other"), OPEN, ("disconnect",)),
    # ... and a client that connected since, likely a cluster client with the old slot map:
    # its keyed commands are redirected as well, the rest is a free node's
    ("GET a", LEFT, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("MSET a 1 {a}x 2", LEFT, CLIENT, OPEN, ("redirect", MOVED_A)),
    ("PING", LEFT, CLIENT, OPEN, ("local", b"PING")),
    ("CLUSTER SLOTS", LEFT, CLIENT, OPEN, ("local", b"CLUSTER")),
    # a node in no cluster lets nothing reach its Redis, which may still hold the keys of the
    # cluster it left (emptied when it joins another)
    ("DBSIZE", LEFT, CLIENT, OPEN, ("refuse", b"-CLUSTERDOWN Hash slot not served")),
    ("KEYS *", LEFT, CLIENT, OPEN, ("refuse", b"-CLUSTERDOWN Hash slot not served")),
    ("EVAL_RO s 0", empty_table(), CLIENT, OPEN, ("refuse", b"-CLUSTERDOWN Hash slot not served")),
    ("SUBSCRIBE ch", empty_table(), CLIENT, OPEN, ("refuse", b"-CLUSTERDOWN")),
    ("GET a", empty_table(), CLIENT, OPEN, ("refuse", b"-CLUSTERDOWN Hash slot not served")),
    ("PING", empty_table(), CLIENT, OPEN, ("local", b"PING")),
    # ... unless the cluster had a password the client did not give (it gets what a free
    # node answers; its own old connections were authenticated)
    ("GET a", LEFT_PASSWORD, CLIENT, OPEN, ("refuse", b"-CLUSTERDOWN Hash slot not served")),
    ("GET a", LEFT_PASSWORD, Client(tenant="old", auth_hash=hash_password("pw")), OPEN,
     ("redirect", MOVED_A)),
    ("GET a", LEFT_PASSWORD, Client(tenant="old"), OPEN, ("disconnect",)),
    ("PING", ALL, Client(tenant="old"), OPEN, ("disconnect",)),
    ("AUTH pw", PASSWORD, Client(tenant="old"), OPEN, ("disconnect",)),
    ("GET a", replace(ALL, tenant="new"), CLIENT, OPEN, ("disconnect",)),
    # what the mesh manages
    ("REPLICAOF NO ONE", ALL, CLIENT, OPEN, ("refuse", b"-ERR REPLICAOF is not allowed")),
    ("SHUTDOWN", ALL, CLIENT, OPEN, ("refuse", b"-ERR SHUTDOWN is not allowed")),
    ("CONFIG REWRITE", ALL, CLIENT, OPEN, ("refuse", b"-ERR CONFIG REWRITE is not allowed")),
    ("CLIENT KILL ID 1", ALL, CLIENT, OPEN, ("refuse", b"-ERR CLIENT KILL is not allowed")),
    ("MONITOR", ALL, CLIENT, OPEN, ("refuse", b"-ERR MONITOR is not allowed")),
    ("MIGRATE h 1 a 0 1", ALL, CLIENT, OPEN, ("refuse", b"-ERR MIGRATE is not allowed")),
]


@pytest.mark.parametrize("command,table,client,permission,expected", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_decide(command, table, client, permission, expected):
    got = describe(decide(argv(command), table, client, permission, NOW))
    if expected[0] in ("refuse", "redirect"):
        assert got[0] == expected[0] and got[1].startswith(expected[1]), got
    else:
        assert got == expected


def test_every_outcome_is_covered_by_the_table():
    kinds = {describe(decide(argv(c), t, cl, p, NOW))[0] for c, t, cl, p, _ in CASES}
    assert kinds == {"forward", "forward-synced", "queue", "local", "dedicated",
                     "dedicated-blocking", "subscribe", "refuse", "redirect", "gate",
                     "disconnect"}


@pytest.mark.parametrize("table,kept", [
    (ALL, True), (A_MOVED, False), (A_UNSERVED, False), (A_REPLICA, True),
    (A_LEAVING, True),  # until the commit
    (A_ARRIVING, True),  # subscribed after ASKING: the slot is coming
])
def test_a_shard_channel_stays_subscribed_while_its_slot_is_served_here(table, kept):
    assert keeps_shard_channel(table, A) is kept
    assert keeps_shard_channel(table, B) is True


def test_the_write_fence_is_read_at_the_moment_of_decision():
    permission = WritePermission(deadline=NOW)
    assert decide(argv("SET a 1"), ALL, CLIENT, permission, NOW) is FORWARD
    assert decide(argv("SET a 1"), ALL, CLIENT, permission, NOW + 0.001) == Refuse(FENCED)


def test_every_command_the_proxy_answers_has_a_handler():
    names = {describe(decide(argv(c), t, cl, p, NOW))[1] for c, t, cl, p, _ in CASES
             if describe(decide(argv(c), t, cl, p, NOW))[0] == "local"}
    from proxy.admission import _LOCAL
    assert names <= set(local.HANDLERS)
    assert set(_LOCAL) == set(local.HANDLERS)


# -- the fast path agrees with decide() ------------------------------------------------------
PLAIN_NAMES = sorted({n.upper() for n in PLAIN})
TABLES = [ALL, A_MOVED, A_LEAVING, A_ARRIVING, PASSWORD, SYNCED, A_REPLICA, empty_table()]
PERMISSIONS = [OPEN, EXPIRED, FENCED_NOW, HANDING_OVER]


@given(names=st.lists(st.sampled_from(PLAIN_NAMES), min_size=1, max_size=4),
       keys=st.lists(st.sampled_from([b"a", b"b", b"c", b"{a}x"]), min_size=4, max_size=4),
       extra=st.integers(0, 3), table=st.sampled_from(TABLES),
       permission=st.sampled_from(PERMISSIONS), authed=st.booleans(),
       tenant=st.sampled_from(["", "old"]))
def test_fast_path_takes_a_batch_only_when_decide_forwards_every_command(
        names, keys, extra, table, permission, authed, tenant):
    client = replace(AUTHED if authed else CLIENT, tenant=tenant)
    batch = [[n, k] + [b"1"] * extra for n, k in zip(names, keys)]
    fast = plain_batch(batch, table, tenant, client.auth_hash, permission, NOW)
    forwarded = all(decide(a, table, client, permission, NOW) is FORWARD for a in batch)
    # never more than decide() allows; as much outside synchronous mode (which it leaves to
    # the per-command path whole)
    assert fast == (forwarded and not table.min_replicas_ack), batch


def test_fast_path_refuses_what_is_not_plain():
    assert not plain_batch([argv("MGET a b")], ALL, "", None, OPEN, NOW)
    assert not plain_batch([argv("GET a"), argv("PING")], ALL, "", None, OPEN, NOW)
    assert plain_batch([argv("GET a"), argv("SET b 1")], ALL, "", None, OPEN, NOW)
    assert not plain_batch([argv("GET a")], ALL, "old", None, OPEN, NOW)


# -- the control port ------------------------------------------------------------------------
class NoMigrations:
    def __init__(self) -> None:
        self.seen: list[RoutingTable] = []

    def reconcile(self, table: RoutingTable) -> None:
        self.seen.append(table)

    def progress(self) -> dict[str, dict]:
        return {}

    def finished(self) -> dict[str, dict]:
        return {}


def test_control_port_applies_newer_tables_and_refuses_older_ones():
    migrations = NoMigrations()
    port = ControlPort(migrations)
    assert port.apply(make_table(epoch=2)) is Applied.APPLIED
    assert port.apply(make_table(epoch=1)) is Applied.STALE
    assert port.table.epoch == 2
    assert port.apply(make_table(epoch=2)) is Applied.APPLIED  # the same view, rebuilt
    assert port.apply(make_table(epoch=1), force=True) is Applied.APPLIED
    assert [t.epoch for t in migrations.seen] == [2, 2, 1]


def test_control_port_refuses_another_clusters_table_unless_joining():
    port = ControlPort(NoMigrations())
    assert port.apply(make_table(cluster="one", epoch=5)) is Applied.APPLIED
    assert port.apply(make_table(cluster="two", epoch=9)) is Applied.WRONG_CLUSTER
    assert port.table.cluster == "one"
    assert port.apply(make_table(cluster="two", epoch=1), joining=True) is Applied.APPLIED
    assert port.apply(empty_table()) is Applied.APPLIED  # leaving for no cluster


def test_write_permission_is_swapped_whole():
    port = ControlPort(NoMigrations())
    before = port.permission
    port.allow_writes_until(NOW)
    assert port.permission == WritePermission(deadline=NOW) and before == WritePermission()
    port.fence(FENCED_LEASE)
    port.allow_writes_until(NOW + 10)  # a fenced node stays fenced until unfenced
    assert port.permission.refusal(NOW - 1) == FENCED
    port.unfence(FENCED_LEASE, NOW + 10)
    assert port.permission.refusal(NOW) is None


def test_handover_ends_when_a_view_shows_this_node_a_replica():
    port = ControlPort(NoMigrations())
    port.apply(make_table(epoch=1))
    port.start_handover()
    assert port.permission.refusal(NOW) == TRYAGAIN
    port.apply(make_table(epoch=2))  # still the master: still handing over
    assert port.permission.handing_over
    replica = replace(make_table(epoch=3), nodes=(NodeInfo("me", "10.0.0.1:7000", True, (), "m"),))
    port.apply(replica)
    assert port.permission.refusal(NOW) is None


@pytest.mark.parametrize("script,writes", [
    (b"#!lua flags=no-writes\nreturn redis.call('GET', KEYS[1])", False),
    (b"#!lua flags=allow-stale,no-writes\nreturn 1", False),
    (b"#!lua\nreturn redis.call('SET', KEYS[1], 1)", True),
    (b"#!lua flags=allow-stale\nreturn 1", True),
    (b"return 1 -- flags=no-writes", True),  # not a shebang
    (b"#!lua name=x\nflags=no-writes", True),  # the flags are on the first line only
])
def test_a_script_is_a_read_only_when_its_shebang_says_so(script, writes):
    # only a script that may write must declare its keys on a node serving part of the slots
    outcome = decide([b"EVAL", script, b"0"], A_MOVED, CLIENT, OPEN, NOW)
    assert isinstance(outcome, Refuse) is writes, outcome


@pytest.mark.parametrize(("client", "routes", "expected"), [
    # a peer's part of a plain client's MGET: every slot served here -> one command here
    (Client(admin=True), {}, "forward"),
    # ... but one of its slots is another node's (or migrating): CROSSSLOT, as for anyone
    (Client(admin=True), {key_slot(b"b"): b"-MOVED 3300 10.0.0.2:7000\r\n"}, "crossslot"),
    # a client that is not a peer never gets multi-slot commands run
    (Client(), {}, "crossslot"),
])
def test_a_peer_may_send_keys_of_several_slots_this_node_all_serves(client, routes, expected):
    outcome = decide([b"MGET", b"a", b"b", b"c"], make_table(routes), client, OPEN, NOW)
    assert (outcome == Refuse(CROSSSLOT)) == (expected == "crossslot")
    assert (outcome is FORWARD) == (expected == "forward")
