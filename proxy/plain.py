"""What a plain client's session does differently (proxy/session.py, `Session.plain`).

A plain client knows nothing of slots: where `admission.decide()` would redirect it, its
command is forwarded to the owner (proxy/forward.py); multi-key commands across slots are
split by slot and their replies merged; keyspace commands (SCAN, DBSIZE, KEYS, RANDOMKEY,
FLUSHALL/FLUSHDB, INFO keyspace) are answered for the whole cluster from every shard's master.
Everything else takes the cluster client's path. The pure parts (splitting, merging, the SCAN
cursor) are in proxy/fanout.py.
"""
from __future__ import annotations

import asyncio
import functools
import random
from collections import deque
from typing import Protocol

from core.slots import key_slot

from . import fanout, forward, policy
from .admission import CROSSSLOT, PLAIN, Forward, Local, Outcome, Redirect, Refuse
from .backend import BackendConnection, Pending
from .context import ProxyContext
from .control import ControlPort
from .forward import Fanout, Hop, redirect_target
from .replies import newest_unanswered
from .resp import encode_command, error
from .routing import SLOT_NOT_SERVED


class Session(forward.Client, Protocol):
    """What this module uses of a plain client's session (proxy/session.py)."""

    ctx: ProxyContext
    control: ControlPort
    replies: deque[Pending]
    barrier: Pending | None
    tenant: str
    resp3: bool
    in_multi: bool

    def refuse(self, reply: bytes) -> None: ...
    def reply_later(self) -> Pending: ...
    def hold_again(self, argv: list[bytes]) -> None: ...

# a transaction's commands run on one connection to one Redis: a plain client's transaction
# runs where its connection is
TRANSACTION = frozenset({b"MULTI", b"EXEC", b"DISCARD", b"WATCH", b"UNWATCH"})
# commands a forward sends on the client's own link to the owner: the owner runs them on a
# connection of their own (they may block), which must not hold up other clients' commands
OWN_CONNECTION = frozenset(name.encode() for name in policy.DEDICATED) - TRANSACTION
SUBSCRIBE = frozenset(name.encode() for name in policy.SUBSCRIBE)
SPLIT = frozenset({b"MGET", b"MSET", b"DEL", b"UNLINK", b"EXISTS", b"TOUCH"})
KEYSPACE = frozenset({b"SCAN", b"DBSIZE", b"KEYS", b"RANDOMKEY", b"FLUSHALL", b"FLUSHDB"})
# a fan-out's part (KEYS, FLUSHALL, SCAN... of one shard) gets its reply within this, or the
# link to that node is cut and the client gets an error
FANOUT_REPLY_TIMEOUT = 30.0
FLUSH_DURING_MIGRATION = error(
    "ERR FLUSHALL/FLUSHDB refused while slots migrate (or a scale has more to move): keys "
    "in flight would come back; wait for the migrations to finish (umctl-mesh migrations)")


def shard_channel_elsewhere(slot: int, address: str) -> bytes:
    return error(f"ERR moonmesh plain connection: shard channels of slot {slot} are served by "
                 f"{address}: SSUBSCRIBE there, or use SUBSCRIBE (PUBLISH reaches every node)")


def transaction_elsewhere(slot: int, address: str) -> bytes:
    return error(f"ERR moonmesh plain connection: a transaction (MULTI/EXEC, WATCH) runs on "
                 f"the keys of the node it is connected to; slot {slot} is served by "
                 f"{address}: connect there or use a cluster client")


def handle(c: Session, argv: list[bytes], outcome: Outcome) -> bool:
    """Carry out `outcome` for a plain client where that differs from a cluster client's;
    False: nothing was done, the session goes on as for any client."""
    table = c.control.table
    if c.tenant != table.tenant or not table.configured:
        # a client of a cluster this node left, or a node in no cluster: redirects at most
        # (as a cluster client gets them), never forwards, which go as the mesh's admin
        return False
    kind = outcome.__class__
    if kind is Redirect:
        target = redirect_target(outcome.reply)  # type: ignore[union-attr]  # the class test above
        if target is None:  # nobody serves the slot: CLUSTERDOWN, as for anyone
            return False
        slot, address, _ = target
        name = argv[0].upper()
        if c.in_multi or name in TRANSACTION:
            c.refuse(transaction_elsewhere(slot, address))
            return True
        if name in SUBSCRIBE:  # a subscription holds its link: it is this node's
            c.refuse(shard_channel_elsewhere(slot, address))
            return True
        link = c.peer_conn(address, argv)
        if _wait_for_hops(c, argv, slot, link):
            return True
        pending = c.reply_later()
        Hop(c, argv, slot, pending, _hop_done).send(address)
        if link.own and pending.data is None:
            # a script or blocking command: the client's later commands wait for it, as a
            # cluster client's do (they would overtake it on the shared link)
            c.barrier = pending
        return True
    if kind is Refuse and outcome.reply is CROSSSLOT and not c.in_multi:  # type: ignore[union-attr]  # the class test above
        return _split(c, argv)
    if kind is Forward:
        name = argv[0].upper()
        # a node that serves every slot answers for the cluster itself, but SCAN keeps the
        # cluster's cursor: one may have been made before this node got every slot
        if name in KEYSPACE and not c.in_multi and (
                name == b"SCAN" or not c.control.table.serves_all):
            return _keyspace(c, name, argv)
    elif kind is Local and argv[0].upper() == b"INFO" and not c.in_multi:
        return _info(c, argv)
    if c.hops and kind is not Refuse:
        # a command run here waits for this client's earlier commands that went elsewhere
        # for the same slot (or for any slot, when its slot is not known cheaply): the slot
        # may have moved here meanwhile, and they must run first
        here = key_slot(argv[1]) if argv[0] in PLAIN and len(argv) > 1 else None
        return _wait_for_hops(c, argv, here, None)
    return False


def _hop_done(hop: Hop) -> None:
    hop.session.replies_arrived_soon()


def _wait_for_hops(c: Session, argv: list[bytes], slot: int | None,
                   link: BackendConnection | None) -> bool:
    """Hold `argv` until this client's earlier replies are in, when an earlier command for
    its slot (any slot: None) is on its way over another link than `link` (None: this
    node's own path): only one link keeps their order."""
    if slot is None:
        busy = bool(c.hops)
    else:
        links = c.hops.get(slot)
        busy = links is not None and any(d is not link for d in links)
    return busy and _wait_for_earlier(c, argv)


def _wait_for_earlier(c: Session, argv: list[bytes]) -> bool:
    """Hold `argv` until every earlier command of this client has its reply (a fan-out's
    parts run on other links: it then sees their writes). False: none is owed."""
    earlier = newest_unanswered(c.replies)
    if earlier is None:
        return False
    c.barrier = earlier
    c.hold_again(argv)
    return True


def _behind(c: Session, merged: Fanout) -> None:
    """Queue the fan-out's reply slot, and hold the client's later commands until it is
    filled: its parts go over other links than theirs, which would overtake them."""
    c.replies.append(merged)
    c.barrier = merged


def _split(c: Session, argv: list[bytes]) -> bool:
    """A multi-key command across slots: one sub-command per node that serves some of its
    keys (the node runs it as one command when it serves all its slots; else it answers
    CROSSSLOT, and that part goes again as one sub-command per slot)."""
    plan = fanout.split(argv)
    if plan is None:
        return False
    if _wait_for_earlier(c, argv):
        return True
    by_node: dict[str | None, list[fanout.Part]] = {}
    for part in plan.parts:
        by_node.setdefault(c.owner_of(part.slot), []).append(part)
    groups = list(by_node.items())
    grouped = fanout.Split(command=plan.command, merge=plan.merge, key_count=plan.key_count,
                           parts=tuple(_joined(argv[0], parts) for _, parts in groups))
    merged = Fanout(c.replies_arrived_soon, lambda replies: fanout.merge(grouped, replies))
    _behind(c, merged)
    for (address, parts), joined in zip(groups, grouped.parts):
        pending = merged.part()
        if address is None:
            pending.data = SLOT_NOT_SERVED
            merged.part_done()
        elif len(parts) == 1:
            Hop(c, list(joined.argv), joined.slot, pending, merged.part_done).send(address)
        else:
            done = functools.partial(_node_part_done, c, parts=parts, outer=merged)
            Hop(c, list(joined.argv), joined.slot, pending, done).send(address)
    return True


def _joined(name: bytes, parts: list[fanout.Part]) -> fanout.Part:
    """One sub-command for the keys of several slots (in the client's order of first slot)."""
    return fanout.Part(slot=parts[0].slot,
                       argv=(name, *(a for p in parts for a in p.argv[1:])),
                       positions=tuple(i for p in parts for i in p.positions))


def _node_part_done(c: Session, hop: Hop, parts: list[fanout.Part], outer: Fanout) -> None:
    """A node's part came back; CROSSSLOT: the node does not serve all of its slots now (one
    migrates, or our view is behind), so it goes again slot by slot, and their replies make
    the reply the node would have given."""
    if not hop.pending.data.startswith(b"-CROSSSLOT"):  # type: ignore[union-attr]  # done: filled
        outer.part_done()
        return
    offset = 0
    local = []
    for p in parts:
        local.append(fanout.Part(slot=p.slot, argv=p.argv,
                                 positions=tuple(range(offset, offset + len(p.positions)))))
        offset += len(p.positions)
    plan = fanout.Split(command=parts[0].argv[0].decode(errors="replace").upper(),
                        merge=fanout.SPLITTABLE[parts[0].argv[0].upper()][0],
                        parts=tuple(local), key_count=offset)
    slot_pending = hop.pending

    def finished() -> None:
        slot_pending.data = inner.data
        outer.part_done()

    inner = Fanout(finished, lambda replies: fanout.merge(plan, replies))
    for p in local:
        _send_part(c, inner, p.slot, list(p.argv))


def _send_part(c: Session, merged: Fanout, slot: int, argv: list[bytes]) -> None:
    pending = merged.part()
    address = c.owner_of(slot)
    if address is None:
        pending.data = SLOT_NOT_SERVED
        merged.part_done()
        return
    Hop(c, argv, slot, pending, merged.part_done).send(address)


class _NodePart:
    """A fan-out's sub-command sent to one node (not routed by slot)."""

    __slots__ = ("merged", "pending", "timer")

    def __init__(self, merged: Fanout) -> None:
        self.merged = merged
        self.pending = merged.part()
        self.timer: asyncio.TimerHandle | None = None

    def replies_arrived(self) -> None:
        if self.pending.data is not None:
            if self.timer is not None:
                self.timer.cancel()
            self.merged.part_done()


def _send_to_node(c: Session, merged: Fanout, address: str, argv: list[bytes]) -> None:
    part = _NodePart(merged)
    conn = c.ctx.peers.get(address, c.resp3)
    conn.queue(encode_command(argv), part.pending, part)
    if part.pending.data is not None:
        part.replies_arrived()
    else:  # a node that stops answering cuts its link: the fan-out answers, never hangs
        part.timer = asyncio.get_running_loop().call_later(FANOUT_REPLY_TIMEOUT, conn.abort)


def masters(c: Session) -> list[fanout.ScanTarget]:
    """Every shard's master in the table, whether it serves slots yet or not."""
    table = c.control.table
    return [fanout.ScanTarget(node_id=n.node_id, address=n.address,
                              receiving=n.address in table.receiving, layout=repr(n.ranges))
            for n in table.nodes if n.master_id is None]


def _random_key(replies: list[bytes]) -> bytes:
    """RANDOMKEY of the cluster: a random shard's answer, among those that have keys."""
    error = fanout.first_error(replies)
    if error is not None:
        return error
    found = [r for r in replies if r[:1] == b"$" and r[:3] != b"$-1"]
    return random.choice(found) if found else replies[0]


def _all_ok(replies: list[bytes]) -> bytes:
    return fanout.first_error(replies) or b"+OK\r\n"


def _keyspace(c: Session, name: bytes, argv: list[bytes]) -> bool:
    nodes = masters(c)
    if not nodes:
        return False  # not in a cluster yet: this node's Redis answers
    if _wait_for_earlier(c, argv):
        return True
    if name == b"SCAN":
        order = fanout.scan_order(nodes)
        step = fanout.scan_step(argv[1], order)
        if isinstance(step, bytes):
            c.refuse(step)
            return True
        merged = Fanout(c.replies_arrived_soon, lambda replies: fanout.scan_reply(step, order, replies[0]))
        _behind(c, merged)
        _send_to_node(c, merged, step.target.address, fanout.scan_argv(argv, step))
        return True
    if name in (b"FLUSHALL", b"FLUSHDB") and c.control.table.receiving:
        c.refuse(FLUSH_DURING_MIGRATION)
        return True
    if name == b"RANDOMKEY":
        merged = Fanout(c.replies_arrived_soon, _random_key)
    elif name == b"KEYS":
        merged = Fanout(c.replies_arrived_soon, fanout.concat_arrays)
    elif name == b"DBSIZE":
        merged = Fanout(c.replies_arrived_soon, fanout.sum_integers)
    else:  # FLUSHALL, FLUSHDB
        merged = Fanout(c.replies_arrived_soon, _all_ok)
    _behind(c, merged)
    for node in nodes:
        _send_to_node(c, merged, node.address, argv)
    return True



# INFO sections that include the keyspace
_WITH_KEYSPACE = frozenset({b"keyspace", b"all", b"everything", b"default"})


def _info(c: Session, argv: list[bytes]) -> bool:
    """INFO as one Redis would answer it: standalone, and the keyspace of every shard."""
    sections = {a.lower() for a in argv[1:]}
    nodes = masters(c)
    if not nodes or (sections and not sections & _WITH_KEYSPACE):
        return False  # this node's INFO (as a standalone Redis: local.info asks c.plain)
    if _wait_for_earlier(c, argv):
        return True
    merged = Fanout(c.replies_arrived_soon, _info_reply)
    _behind(c, merged)
    _send_to_node(c, merged, c.ctx.announce, argv)
    for node in nodes:
        _send_to_node(c, merged, node.address, [b"INFO", b"keyspace"])
    return True


def _info_reply(replies: list[bytes]) -> bytes:
    error = fanout.first_error(replies)
    if error is not None:
        return error
    head, _, body = replies[0].partition(b"\r\n")  # $len or =len (RESP3 verbatim: "txt:")
    text = body[:-2]
    prefix = b""
    if head[:1] == b"=":
        prefix, text = text[:4], text[4:]
    text = _as_standalone(text)
    start = text.find(b"# Keyspace\r\n")
    if start >= 0:
        end = text.find(b"\r\n# ", start + 1)
        rest = text[end + 2:] if end >= 0 else b""
        # db0 only: the others hold the mesh's own keys (the mover's journal), not the client's
        summed = b"".join(line for line in fanout.sum_keyspace(replies[1:]).splitlines(True)
                          if not line.startswith(b"db") or line.startswith(b"db0:"))
        text = text[:start] + summed.rstrip(b"\r\n") + b"\r\n" + (b"\r\n" + rest if rest else b"")
    body = prefix + text
    return b"%s%d\r\n%s\r\n" % (head[:1], len(body), body)


def _as_standalone(text: bytes) -> bytes:
    """A node's INFO as a standalone Redis says it: clients that see cluster_enabled:1 may
    switch to cluster mode, which a plain listener does not speak."""
    return text.replace(b"cluster_enabled:1\r\n", b"cluster_enabled:0\r\n").replace(
        b"redis_mode:cluster\r\n", b"redis_mode:standalone\r\n")
