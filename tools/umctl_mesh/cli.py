"""`umctl-mesh`: the operator's tool.

Exit codes: 0 done (also when it was already so: a balanced cluster rebalanced, a cluster
scaled to its size, a cancel with nothing running), 1 the operation failed (unknown cluster,
not enough free nodes, ...; `check`: problems found), 2 bad usage, 3 etcd unreachable,
130 Ctrl-C, 141 stdout closed early.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio

from core import __version__, secret
from core.address import Address
from core.slots import format_range, slot_count
from core.view import MAX_MIGRATION_RATE, REASSIGN_AFTER, ClusterView, Shard, slots_of
from mesh.store.etcd import EtcdStore, StoreError
from mesh.store.repo import MeshRepo
from proxy.routing import node_id as cluster_node_id

from . import api, local, ops, passwords, render, serve, slowlog
from . import check as check_mod
from . import top as top_mod
from .progress import MigrationTracker
from .text import plural

EXIT_FAILED, EXIT_USAGE, EXIT_ETCD = 1, 2, 3
EXIT_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (`| head`)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
DEFAULT_ETCD = "127.0.0.1:2379"
# a first read of etcd must answer within this, or the command ends (exit 3) with a hint;
# later calls retry for longer (mesh/store/etcd.py, RETRY_WINDOW)
ETCD_FIRST_READ_TIMEOUT = 2.0
NODE_FLAG = "default"  # `migrate throttle --rate default`: back to each node's --migration-rate
COMPLETION_SHELLS = ("bash", "zsh")
FINAL_REPORT_WAIT = 3.0  # --wait: seconds to wait for the final reports of migrations that
FINAL_REPORT_POLL = 0.2  # committed between two reads (their keys moved), polled this often
BACKEND_PASSWORD_ENV = "MOONMESH_BACKEND_PASSWORD"  # mesh-proxy's (node/main.py)


def rate_arg(text: str) -> int | str:
    """A migration rate on the command line: keys/s (0: no limit) or `default`."""
    if text == NODE_FLAG:
        return NODE_FLAG
    try:
        rate = int(text)
    except ValueError:
        rate = -1
    if not 0 <= rate <= MAX_MIGRATION_RATE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate: keys/s from 0 (no limit) to {MAX_MIGRATION_RATE}, "
            f"or '{NODE_FLAG}' (the nodes' --migration-rate)")
    return rate


def rate_text(rate: int | None) -> str:
    if rate is None:
        return "default (node flag)"
    return f"{rate} keys/s" if rate else "unlimited"


def rate_change(old: int | None, new: int | None) -> str:
    """`20000 -> 5000 keys/s`, or with words where either side is not a number."""
    if old and new:
        return f"{old} -> {new} keys/s"
    return f"{rate_text(old)} -> {rate_text(new)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umctl-mesh",
        description="Operate a Moonmesh: a pool of Redis Cluster proxies that serves named "
                    "clusters. Reads and edits the mesh's state in etcd.",
        epilog="exit codes: 0 done, 1 operation failed, 2 bad usage, 3 etcd unreachable")
    parser.add_argument("--version", action="version", version=f"umctl-mesh {__version__}")
    parser.add_argument("--etcd", metavar="URL[,URL...]",
                        help=f"etcd endpoints (default ${local.ETCD_ENV}, else the endpoint a "
                             f"running `umctl-mesh up` wrote to {local.endpoint_file()}, "
                             f"else {DEFAULT_ETCD})")
    parser.add_argument("--etcd-root", default="/moonmesh", metavar="PREFIX")
    parser.add_argument("--mesh-secret-file", metavar="FILE",
                        help="the nodes' shared secret, for commands that act on a node "
                             f"(failover, drain); default ${secret.SECRET_ENV}")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --json is also accepted after the command (`umctl-mesh nodes --json`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of tables")

    nodes = sub.add_parser("nodes", parents=[common], aliases=["node"],
                           help="list the pool: every registered node",
                           description="List every node of the pool with its addresses, host, "
                                       "cluster, role, applied epoch and health; * marks the "
                                       "leader.")
    nodes.set_defaults(func=cmd_nodes)
    nodes_sub = nodes.add_subparsers(dest="nodes_command", metavar="ACTION")
    release = nodes_sub.add_parser("release", parents=[common], help="return a held node to the free pool",
                                   description="Release a node kept out of the pool by "
                                               "`cluster delete --keep-data` or `nodes drain`; "
                                               "its data is erased when it next joins a "
                                               "cluster.")
    release.add_argument("node")
    release.set_defaults(func=cmd_release)
    drain = nodes_sub.add_parser("drain", parents=[common],
                                 help="take a node out of its cluster for good",
                                 description="A replica leaves its cluster; a master hands over "
                                             "to a replica first; either is then held out of "
                                             "the pool until `nodes release` (the leader fills "
                                             "the cluster's declared replicas from free "
                                             "nodes). A master without replicas has its slots "
                                             "migrated to the other shards and returns to the "
                                             "pool. A node stopped with SIGTERM, by contrast, "
                                             "stays in its cluster and returns to its place "
                                             "when it restarts.")
    drain.add_argument("node")
    drain.add_argument("--wait", action="store_true", help="wait for the migrations")
    drain.add_argument("--timeout", type=float, default=3600.0)
    drain.set_defaults(func=cmd_drain)

    cluster = sub.add_parser("cluster", help="create, show, list and delete clusters")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    create = csub.add_parser("create", parents=[common], help="create a cluster from free nodes",
                             description="Take free nodes from the pool (masters and their "
                                         "replicas on different hosts where possible), empty "
                                         "their Redis, split the 16384 slots evenly and wait "
                                         "until every node serves the new view.")
    create.add_argument("name")
    create.add_argument("--shards", type=int, required=True, help="number of masters")
    create.add_argument("--replicas", type=int, default=0, help="replicas per master (default 0)")
    passwords.add_options(create, "the password clients must AUTH with (kept hashed)")
    create.add_argument("--min-replicas-ack", type=int, default=0, metavar="N",
                        help="synchronous mode: acknowledge a write only once N replicas have "
                             "it (WAIT); a failover then loses no acknowledged write")
    create.add_argument("--reassign-after", type=int, default=REASSIGN_AFTER,
                        metavar="SECONDS",
                        help="when every node of a shard has been dead this long, give its "
                             "slots to a free node or the other shards, EMPTY: its data is "
                             f"lost (default {REASSIGN_AFTER}; never in "
                             "synchronous mode)")
    create.add_argument("--migration-rate", type=rate_arg, default=None, metavar="N",
                        help="keys/s the cluster's migrations move (0: no limit; default: each "
                             "node's mesh-proxy --migration-rate); `migrate throttle` changes it")
    create.add_argument("--no-wait", action="store_true",
                        help="return once the view is written, without waiting for the nodes")
    create.add_argument("--timeout", type=float, default=30.0,
                        help="how long to wait for the nodes (default 30 s)")
    create.set_defaults(func=cmd_create)
    show = csub.add_parser("show", parents=[common], help="shards, nodes, slots and who has applied the view")
    show.add_argument("name")
    show.set_defaults(func=cmd_show)
    lst = csub.add_parser("list", parents=[common], help="every cluster with its epoch and size")
    lst.set_defaults(func=cmd_list)
    delete = csub.add_parser("delete", parents=[common],
                             help="delete a cluster; its nodes return to the pool",
                             description="Delete the cluster's view. Its nodes become free "
                                         "(their data is erased when they join another "
                                         "cluster) unless --keep-data holds them for recovery. "
                                         "On a terminal it asks you to type the cluster's name; "
                                         "without one it needs --yes.")
    delete.add_argument("name")
    delete.add_argument("--keep-data", action="store_true",
                        help="keep the nodes (and their data) out of the pool until "
                             "`umctl-mesh nodes release NODE`")
    delete.add_argument("--yes", "-y", action="store_true",
                        help="delete without asking (needed when stdin is no terminal)")
    delete.set_defaults(func=cmd_delete)

    def plan_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
        p.add_argument("--wait", action="store_true",
                       help="wait until every migration is committed (and, with --replicas, "
                            "every replica synced), with a progress bar")
        p.add_argument("--timeout", type=float, default=3600.0,
                       help="how long --wait waits (default 3600 s)")

    scale = csub.add_parser("scale", parents=[common], help="grow or shrink a cluster online",
                            description="--shards: add shards (free nodes from the pool, with "
                                        "the cluster's declared replicas) or remove the last "
                                        "ones; slots move online until counts are even. "
                                        "Removed shards' nodes return to the pool. "
                                        "--replicas: declare the replicas per shard; free "
                                        "nodes join (or surplus replicas return to the pool) "
                                        "at once, and the leader keeps the count from then on, "
                                        "replacing a replica dead for the cluster's "
                                        "reassign-after from the pool.")
    scale.add_argument("name")
    scale.add_argument("--shards", type=int, help="the number of shards wanted")
    scale.add_argument("--replicas", type=int, help="the number of replicas per shard wanted")
    plan_options(scale)
    scale.set_defaults(func=cmd_scale)
    rebalance = csub.add_parser("rebalance", parents=[common], help="even out slot counts between shards")
    rebalance.add_argument("name")
    plan_options(rebalance)
    rebalance.set_defaults(func=cmd_rebalance)

    migrate = sub.add_parser(
        "migrate", parents=[common],
        help="move slots to a shard, cancel migrations, or set their rate",
        description="`migrate NAME --slots A-B --to SHARD` moves slots online; "
                    "`migrate cancel NAME` drops planned migrations and sends running ones "
                    "back to their source; `migrate throttle NAME --rate N` sets the keys/s "
                    "the cluster's migrations move (0: no limit; `--rate default`: each "
                    "node's mesh-proxy --migration-rate), live: a running migration takes it "
                    "as soon as its source applies the new epoch (with --wait, wait until "
                    "every node of the cluster has).")
    migrate.add_argument("words", nargs="+", metavar="NAME | cancel NAME | throttle NAME")
    migrate.add_argument("--slots", action="append", default=[], metavar="A-B",
                         help="slot range to move (repeatable)")
    migrate.add_argument("--to", metavar="SHARD", help="the shard that receives the slots")
    migrate.add_argument("--rate", type=rate_arg, metavar="N|default",
                         help="throttle: keys/s (0: no limit), or 'default' for the nodes' "
                              "--migration-rate")
    plan_options(migrate)
    migrate.set_defaults(func=cmd_migrate)
    failover = sub.add_parser(
        "failover", parents=[common], help="make a replica the master, losing no write",
        description="Graceful failover: the master's Redis pauses writes and waits for the "
                    "replica to catch up (Redis FAILOVER), then the view records the swap. "
                    "Clients see -TRYAGAIN for writes during the switch, then -MOVED.")
    failover.add_argument("name")
    failover.add_argument("shard")
    failover.add_argument("--to", metavar="NODE",
                          help="the replica to promote (default: the most up to date)")
    failover.set_defaults(func=cmd_failover)
    migrations = sub.add_parser("migrations", parents=[common],
                                help="each migration of a cluster with progress")
    migrations.add_argument("name")
    migrations.set_defaults(func=cmd_migrations)

    check = sub.add_parser(
        "check", parents=[common], help="is the cluster whole? (as redis-cli --cluster check)",
        description="Check one cluster: every member registered, its Redis up and not fenced, "
                    "on the view's epoch (its status in etcd and its proxy's UMCTL GETEPOCH); "
                    "every slot covered by exactly one shard whose master serves; each shard "
                    "with its declared replicas, each following its master's Redis with its "
                    "link up and at most --max-lag bytes behind (INFO replication through the "
                    "masters' proxies, else the offsets the nodes report in etcd); no key on a "
                    "master outside its shard's slots (the first --sample keys of a SCAN of "
                    "each master's Redis, through its proxy: hash table order, not a uniform "
                    "sample); no migration failing, stuck, or whose source or target is down. "
                    "Reading the nodes' INFO and keys needs the mesh secret or, with a "
                    "password, the cluster's password. Nodes behind the view get "
                    f"{check_mod.APPLY_GRACE:g} s to catch up.",
        epilog="exit codes: 0 healthy, 1 problems found (or unknown cluster), 2 bad usage, "
               "3 etcd unreachable (nothing checked)")
    check.add_argument("name")
    check.add_argument("--sample", type=int, default=check_mod.DEFAULT_SAMPLE, metavar="N",
                       help="keys read per master (default "
                            f"{check_mod.DEFAULT_SAMPLE}); 0: every key")
    check.add_argument("--max-lag", type=int, default=check_mod.DEFAULT_MAX_LAG,
                       metavar="BYTES", help="bytes a replica may be behind its master "
                                             f"(default {check_mod.DEFAULT_MAX_LAG})")
    check.add_argument("--timeout", type=float, default=check_mod.DEFAULT_TIMEOUT,
                       help="seconds for what one proxy is asked (default "
                            f"{check_mod.DEFAULT_TIMEOUT:g})")
    check.add_argument("--no-proxies", action="store_true",
                       help="read etcd only (from a host that cannot reach the proxies): no "
                            "GETEPOCH, INFO or key sample")
    passwords.add_options(check, "the cluster's password, to read its nodes' INFO and keys "
                                 "without the mesh secret")
    check.set_defaults(func=cmd_check)

    slow = sub.add_parser(
        "slowlog", parents=[common], help="the slow commands of a cluster's nodes, newest first",
        description="SLOWLOG GET from the Redis of every node of the cluster (masters and "
                    "replicas, at their backend addresses), merged newest first; each entry "
                    "names its node and shard. Redis logs what runs longer than its "
                    "slowlog-log-slower-than (CONFIG SET through a proxy changes it).")
    slow.add_argument("name")
    slow.add_argument("--count", type=int, default=slowlog.DEFAULT_COUNT, metavar="N",
                      help=f"entries shown (default {slowlog.DEFAULT_COUNT}, at most "
                           f"{slowlog.MAX_COUNT})")
    slow.add_argument("--backend-password", metavar="P",
                      default=os.environ.get(BACKEND_PASSWORD_ENV) or None,
                      help="the nodes' Redis password, if they have one (default "
                           f"${BACKEND_PASSWORD_ENV}, as mesh-proxy)")
    slow.set_defaults(func=cmd_slowlog)

    top = sub.add_parser(
        "top", parents=[common], help="a cluster's hot keys, hot slots and busiest nodes",
        description="Ask every node of the cluster at once: its hot keys (UMCTL HOTKEYS: "
                    "estimates from a sample of the commands it served; needs the mesh "
                    "secret), its busiest slots by CPU time (CLUSTER SLOT-STATS, which also "
                    "counts its Redis's keys with a SCAN), and its commands per second over "
                    "--interval. A key or slot read on replicas counts their work too.")
    top.add_argument("name")
    top.add_argument("--count", type=int, default=top_mod.DEFAULT_COUNT, metavar="N",
                     help=f"rows per table (default {top_mod.DEFAULT_COUNT}, at most "
                          f"{top_mod.MAX_COUNT})")
    top.add_argument("--interval", type=float, default=top_mod.DEFAULT_INTERVAL, metavar="SEC",
                     help=f"seconds the ops/s are measured over (default "
                          f"{top_mod.DEFAULT_INTERVAL:g})")
    top.add_argument("--timeout", type=float, default=top_mod.DEFAULT_TIMEOUT,
                     help=f"seconds for what one proxy is asked (default "
                          f"{top_mod.DEFAULT_TIMEOUT:g})")
    passwords.add_options(top, "the cluster's password, for CLUSTER SLOT-STATS without the mesh "
                               "secret")
    top.set_defaults(func=cmd_top)

    completion = sub.add_parser(
        "completion", help="print a shell completion script (bash or zsh)",
        description="Print a completion script for umctl-mesh. bash: "
                    "`source <(umctl-mesh completion bash)` (or save it in "
                    "/etc/bash_completion.d/umctl-mesh); zsh: save it as `_umctl-mesh` in a "
                    "directory of your $fpath.")
    completion.add_argument("shell", choices=COMPLETION_SHELLS)
    completion.set_defaults(func=cmd_completion)

    up = sub.add_parser(
        "up", help="start a local mesh on loopback and keep it running until Ctrl-C",
        description="Start etcd, redis-servers and mesh-proxies on 127.0.0.1, create a "
                    "cluster, print how to connect and a live status line; Ctrl-C or SIGTERM "
                    "stops everything and removes its data.")
    up.add_argument("--shards", type=int, default=3, help="masters (default 3)")
    up.add_argument("--replicas", type=int, default=1, help="replicas per master (default 1)")
    up.add_argument("--port", type=int, default=7000,
                    help="first proxy port; redis servers use PORT+10000.. (default 7000)")
    up.add_argument("--cluster", default="mydb", help="cluster name (default mydb)")
    passwords.add_options(up, "the cluster's password")
    up.add_argument("--min-replicas-ack", type=int, default=0, metavar="N",
                    help="synchronous mode: writes acknowledged once N replicas have them")
    up.add_argument("--standalone", action="store_true",
                    help="no etcd: proxies configured with UMCTL SETCLUSTER, no replicas")
    up.add_argument("--spare", type=int, default=0, metavar="N",
                    help="also start N free nodes (in the pool, in no cluster), so the "
                         "cluster can scale out: `cluster scale NAME --shards N`")
    up.add_argument("--dashboard-port", type=int, default=serve.DASHBOARD_PORT, metavar="PORT",
                    help="the web dashboard's port on 127.0.0.1 (default "
                         f"{serve.DASHBOARD_PORT}; 0: none)")
    up.set_defaults(func=local.up)
    serve.add_parser(sub)
    return parser


# -- rendering -------------------------------------------------------------------------------


def table(headers: list[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a table on stdout: rich on a terminal, plain columns otherwise."""
    render.print_table(headers, rows)


def view_doc(view: ClusterView, pool: ops.Pool) -> dict:
    """`replicas_live` per shard: replicas alive, applied the view and synced."""
    synced = ops.replicas_in_sync(view, pool)
    shards = []
    for shard in view.shards:
        members = []
        for nid in shard.members:
            st = pool.statuses.get(nid)
            members.append({
                "node": nid, "role": "master" if nid == shard.master else "replica",
                "cluster_node_id": cluster_node_id(view.cluster, nid),  # CLUSTER NODES's id
                "failed": nid in view.failed,
                "proxy": view.address_of(nid).proxy, "backend": view.address_of(nid).backend,
                "applied_epoch": st.epoch if st and st.cluster == view.cluster else None,
                "alive": nid in pool.nodes, "backend_ok": st.backend_ok if st else None,
            })
        shards.append({"id": shard.id, "slots": [list(r) for r in shard.slots],
                       "slot_count": slots_of(shard), "nodes": members,
                       "replicas_live": len(synced[shard.id])})
    return {"cluster": view.cluster, "epoch": view.epoch,
            "replicas_declared": view.config.replicas,
            "migration_rate": view.config.migration_rate,  # keys/s, 0: no limit, None: node flag
            "password": view.config.password_hash is not None, "shards": shards,
            "failed": list(view.failed), "lost": list(view.lost),
            "migrations": [{"slots": [list(r) for r in m.slots], "from": m.source,
                            "to": m.target, "state": m.state.value} for m in view.migrations]}


# -- commands --------------------------------------------------------------------------------

# what `nodes --json` says of each node (api.node_rows, which the dashboard reads too, has more)
NODE_FIELDS = ("node", "leader", "alive", "proxy", "backend", "host", "cluster", "role",
               "cluster_node_id", "applied_epoch", "health", "leaving")

async def cmd_nodes(store: EtcdStore, args: argparse.Namespace) -> int:
    pool = await ops.read_pool(store)
    rows = [{key: row[key] for key in NODE_FIELDS} for row in api.node_rows(pool, {})]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        table(["NODE", "PROXY", "BACKEND", "HOST", "CLUSTER", "ROLE", "EPOCH", "HEALTH",
               "CLUSTER NODES ID"],
              [[("*" if r["leader"] else "") + r["node"], r["proxy"], r["backend"],
                r["host"], r["cluster"] or "-", r["role"],
                r["applied_epoch"] if r["applied_epoch"] is not None else "-",
                r["health"], r["cluster_node_id"] or "-"] for r in rows])
        print(f"\n{len(pool.nodes)} nodes alive, {len(pool.free())} free; "
              f"leader: {pool.leader or 'none'}")
    return 0


async def cmd_release(store: EtcdStore, args: argparse.Namespace) -> int:
    await ops.release_node(store, args.node)
    print(json.dumps({"released": args.node}) if args.json else f"node {args.node} is free")
    return 0


async def cmd_create(store: EtcdStore, args: argparse.Namespace) -> int:
    rate = None if args.migration_rate == NODE_FLAG else args.migration_rate
    password = passwords.read(args, confirm=True)
    view = await ops.create_cluster(store, args.name, args.shards, args.replicas,
                                    password.value if password else None,
                                    args.min_replicas_ack, args.reassign_after, rate)
    behind: list[str] = []
    if not args.no_wait:
        bar = render.ProgressLine(f"nodes on epoch {view.epoch}:", quiet=args.json)

        def progress(done: int, total: int) -> None:
            bar.update(done, total, f"{done}/{total}")

        try:
            behind = await ops.wait_applied(store, view, args.timeout, progress)
        finally:
            bar.close()
    pool = await ops.read_pool(store)
    if args.json:
        print(json.dumps({**view_doc(view, pool), "not_applied": behind}, indent=2))
    else:
        print_view(view, pool)
        first = Address.parse(view.address_of(view.shards[0].master).proxy)
        print("\nconnect: " + passwords.redis_cli(password, f"-c -h {first.host} -p {first.port}"))
    if behind:
        print(f"umctl-mesh: nodes {', '.join(behind)} have not applied epoch {view.epoch} "
              f"after {args.timeout:g}s", file=sys.stderr)
        return EXIT_FAILED
    return 0


def print_view(view: ClusterView, pool: ops.Pool) -> None:
    doc = view_doc(view, pool)
    print(f"cluster {view.cluster}  epoch {view.epoch}  "
          f"{'password required' if doc['password'] else 'no password'}")
    rows = []
    for shard in doc["shards"]:
        for n in shard["nodes"]:
            ranges = " ".join(f"{a}-{b}" if a != b else str(a) for a, b in shard["slots"])
            applied = n["applied_epoch"]
            rows.append([shard["id"], n["role"] + (" (failed)" if n["failed"] else ""),
                         n["node"], n["proxy"], n["backend"],
                         ranges if n["role"] == "master" else "",
                         "yes" if applied is not None and applied >= view.epoch
                         else f"no ({applied if applied is not None else '-'})",
                         n["cluster_node_id"]])
    table(["SHARD", "ROLE", "NODE", "PROXY", "BACKEND", "SLOTS", "APPLIED", "CLUSTER NODES ID"],
          rows)
    live = ", ".join(f"{s['id']} {s['replicas_live']}" for s in doc["shards"])
    print(f"replicas per shard: {view.config.replicas} declared; live and synced: {live}")
    print(f"migration rate: {rate_text(view.config.migration_rate)}")
    for line in doc["lost"]:
        print(f"DATA LOST: {line}")


async def cmd_show(store: EtcdStore, args: argparse.Namespace) -> int:
    pool = await ops.read_pool(store)
    if args.name not in pool.views:
        raise ops.OpError(f"unknown cluster '{args.name}'")
    view = pool.views[args.name][0]
    if args.json:
        print(json.dumps(view_doc(view, pool), indent=2))
    else:
        print_view(view, pool)
    return 0


async def cmd_list(store: EtcdStore, args: argparse.Namespace) -> int:
    pool = await ops.read_pool(store)
    rows = [{"cluster": name, "epoch": view.epoch, "shards": len(view.shards),
             "nodes": len(view.nodes), "password": view.config.password_hash is not None}
            for name, (view, _) in sorted(pool.views.items())]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        table(["CLUSTER", "EPOCH", "SHARDS", "NODES", "PASSWORD"],
                    [[r["cluster"], r["epoch"], r["shards"], r["nodes"],
                      "yes" if r["password"] else "no"] for r in rows])
    else:
        print("no clusters")
    return 0


def confirm_delete(view: ClusterView, keep_data: bool) -> bool:
    """Ask on the terminal (stderr, so --json output stays clean) for the cluster's name."""
    fate = ("held out of the pool with their data" if keep_data
            else "returned to the pool; their data is erased when they join another cluster")
    print(f"cluster {view.cluster} (epoch {view.epoch}, {plural(len(view.shards), 'shard')}, "
          f"{plural(len(view.nodes), 'node')}) will be deleted; its clients lose it at once "
          f"and its nodes are {fate}.\nType the cluster's name to delete it: ",
          end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip() == view.cluster


async def cmd_delete(store: EtcdStore, args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise ops.UsageError(f"cluster delete asks for confirmation on a terminal; "
                                 f"without one, add --yes: umctl-mesh cluster delete "
                                 f"{args.name} --yes")
        pool = await ops.read_pool(store)
        if args.name not in pool.views:
            raise ops.OpError(f"unknown cluster '{args.name}'")
        if not confirm_delete(pool.views[args.name][0], args.keep_data):
            raise ops.OpError(f"not confirmed: cluster {args.name} is not deleted")
    view = await ops.delete_cluster(store, args.name, args.keep_data)
    nodes = list(view.node_ids)
    if args.json:
        print(json.dumps({"deleted": args.name, "nodes": nodes, "held": args.keep_data}))
    else:
        fate = "held with their data" if args.keep_data else "returned to the pool"
        print(f"cluster {args.name} deleted; {len(nodes)} nodes {fate}")
    return 0


def shard_members(shard: Shard) -> dict[str, Any]:
    return {"id": shard.id, "master": shard.master, "replicas": list(shard.replicas)}


def plan_doc(old: ClusterView, new: ClusterView, dry_run: bool) -> dict[str, Any]:
    """The plan of a scale, rebalance or migrate: its migrations, the shards it adds (their
    nodes taken from the pool now) and those it empties (they leave the cluster, their
    nodes back to the pool, when their last migration commits)."""
    rows: list[dict[str, Any]] = [
        {"slots": [list(r) for r in m.slots], "slot_count": slot_count(m.slots),
         "from": m.source, "to": m.target} for m in new.migrations]
    before = {s.id for s in old.shards}
    added = [s for s in new.shards if s.id not in before]
    leaving: dict[str, int] = {}
    for m in new.migrations:
        leaving[m.source] = leaving.get(m.source, 0) + slot_count(m.slots)
    removed = [s for s in new.shards if s.id in before and s.slots
               and leaving.get(s.id, 0) == slots_of(s)]
    return {"cluster": new.cluster, "epoch": new.epoch, "dry_run": dry_run,
            "changed": new is not old, "new_shards": [s.id for s in added],
            "removed_shards": [s.id for s in removed],
            "nodes_taken": [n for s in added for n in s.members],
            "nodes_freed": [n for s in removed for n in s.members],
            "shards": {s.id: shard_members(s) for s in added + removed},
            "migrations": rows}


def members_text(shard: dict[str, Any]) -> str:
    replicas = shard["replicas"]
    return f"master {shard['master']}" + (
        f", {'replica' if len(replicas) == 1 else 'replicas'} {', '.join(replicas)}"
        if replicas else "")


def print_plan(old: ClusterView, new: ClusterView, dry_run: bool, as_json: bool) -> None:
    doc = plan_doc(old, new, dry_run)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    rows = doc["migrations"]
    verb = "would move" if dry_run else "moves"
    total = sum(r["slot_count"] for r in rows)
    print(f"cluster {new.cluster}: {verb} {plural(total, 'slot')} in "
          f"{plural(len(rows), 'migration')}" + (" (dry run: nothing written)" if dry_run else ""))
    for sid in doc["new_shards"]:
        print(f"  {'would add' if dry_run else 'adds'} shard {sid}: "
              f"{members_text(doc['shards'][sid])} "
              f"({'would be ' if dry_run else ''}taken from the pool)")
    for sid in doc["removed_shards"]:
        print(f"  {'would remove' if dry_run else 'removes'} shard {sid}: "
              f"{members_text(doc['shards'][sid])} (back to the pool when its last "
              "migration commits)")
    table(["FROM", "TO", "SLOTS", "RANGES"],
                [[r["from"], r["to"], r["slot_count"],
                  " ".join(format_range((a, b)) for a, b in r["slots"])] for r in rows])


async def follow(store: EtcdStore, args: argparse.Namespace, name: str) -> int:
    """--wait for migrations: slots and keys moved of the total, rate, ETA (progress.py)."""
    started = time.monotonic()
    tracker = MigrationTracker(started)
    bar = render.ProgressLine("migrating", quiet=args.json)
    last: list = []

    def progress(view: ClusterView, pool: ops.Pool) -> None:
        snap = tracker.observe(ops.migration_rows(view, pool), time.monotonic(),
                               ops.finished_reports(pool))
        last[:] = [snap]
        bar.update(snap.slots_moved, snap.slots_total or None, snap.line())

    try:
        ok = await ops.wait_migrations(store, name, args.timeout, progress)
        # a migration committed between two reads: its source publishes its final report
        # within a backend check of applying the view that dropped it
        # (a deadline, not a cancel scope: a read of etcd is not cut in the middle)
        deadline = time.monotonic() + FINAL_REPORT_WAIT
        while ok and last and last[0].unreported and time.monotonic() < deadline:
            await anyio.sleep(FINAL_REPORT_POLL)
            pool = await ops.read_pool(store)
            if name not in pool.views:
                break
            progress(pool.views[name][0], pool)
    finally:
        bar.close()
    if not ok:
        print(f"umctl-mesh: migrations of '{name}' not finished after {args.timeout:g}s",
              file=sys.stderr)
        return EXIT_FAILED
    if last and not args.json:
        print(last[0].final(time.monotonic() - started), file=sys.stderr)
    return 0


def replica_plan_doc(plan: ops.ReplicaPlan, dry_run: bool) -> dict:
    return {"cluster": plan.new.cluster, "epoch": plan.new.epoch, "dry_run": dry_run,
            "replicas": plan.new.config.replicas, "was": plan.old.config.replicas,
            "changed": plan.new is not plan.old,
            "added": {k: list(v) for k, v in plan.added.items()},
            "removed": {k: list(v) for k, v in plan.removed.items()}}


def print_replica_plan(plan: ops.ReplicaPlan, dry_run: bool) -> None:
    name, want = plan.new.cluster, plan.new.config.replicas
    if plan.new is plan.old:
        print(f"cluster {name} already declares {plural(want, 'replica')} per shard")
        return
    verb = "would declare" if dry_run else "declares"
    print(f"cluster {name}: {verb} {plural(want, 'replica')} per shard (was "
          f"{plan.old.config.replicas})" + (" (dry run: nothing written)" if dry_run else ""))
    rows = [[s.id, ", ".join(plan.added.get(s.id, ())) or "-",
             ", ".join(plan.removed.get(s.id, ())) or "-"] for s in plan.new.shards]
    table(["SHARD", "JOIN (from the pool)", "LEAVE (to the pool)"], rows)


async def follow_replicas(store: EtcdStore, args: argparse.Namespace, name: str) -> int:
    bar = render.ProgressLine("replicas synced:", quiet=args.json)

    def progress(view: ClusterView, synced: dict[str, list[str]]) -> None:
        line = ", ".join(f"{sid} {len(r)}/{view.config.replicas}" for sid, r in synced.items())
        bar.update(sum(len(r) for r in synced.values()),
                   view.config.replicas * len(view.shards) or None, line)

    try:
        ok = await ops.wait_replicas(store, name, args.timeout, progress)
    finally:
        bar.close()
    if not ok:
        print(f"umctl-mesh: the replicas of '{name}' are not all synced after "
              f"{args.timeout:g}s", file=sys.stderr)
        return EXIT_FAILED
    return 0


async def cmd_scale(store: EtcdStore, args: argparse.Namespace) -> int:
    """--replicas first (new shards then get the new count), then --shards. --json prints
    the shards plan alone as before, the replicas plan alone, or {"replicas", "shards"}."""
    if args.shards is None and args.replicas is None:
        print("umctl-mesh: cluster scale needs --shards N and/or --replicas N", file=sys.stderr)
        return EXIT_USAGE
    docs: dict[str, Any] = {}
    if args.replicas is not None:
        plan = await ops.scale_replicas(store, args.name, args.replicas, args.dry_run)
        docs["replicas"] = replica_plan_doc(plan, args.dry_run)
        if not args.json:
            print_replica_plan(plan, args.dry_run)
    if args.shards is not None:
        old, new = await ops.scale_cluster(store, args.name, args.shards, args.dry_run)
        if new is old:
            docs["shards"] = {"cluster": args.name, "shards": args.shards, "changed": False}
            if not args.json:
                print(f"cluster {args.name} already has {args.shards} shards")
        else:
            docs["shards"] = plan_doc(old, new, args.dry_run)
            if not args.json:
                print_plan(old, new, args.dry_run, False)
    if args.json:
        print(json.dumps(docs if len(docs) > 1 else next(iter(docs.values())), indent=2))
    if not args.wait or args.dry_run:
        return 0
    code = await follow(store, args, args.name)
    if code == 0 and args.replicas is not None:
        code = await follow_replicas(store, args, args.name)
    return code


async def cmd_rebalance(store: EtcdStore, args: argparse.Namespace) -> int:
    old, new = await ops.rebalance_cluster(store, args.name, args.dry_run)
    if new is old and not args.json:
        print(f"cluster {args.name} is already balanced: its {len(old.shards)} shards' slot "
              "counts differ by at most one")
        return 0
    print_plan(old, new, args.dry_run, args.json)
    if new is old:
        return 0
    return await follow(store, args, args.name) if args.wait and not args.dry_run else 0


async def cmd_throttle(store: EtcdStore, args: argparse.Namespace) -> int:
    if len(args.words) != 2 or args.rate is None or args.slots or args.to:
        print("umctl-mesh: usage: umctl-mesh migrate throttle NAME --rate N|default",
              file=sys.stderr)
        return EXIT_USAGE
    name = args.words[1]
    rate = None if args.rate == NODE_FLAG else args.rate
    old, new = await ops.set_migration_rate(store, name, rate, args.dry_run)
    was = old.config.migration_rate
    changed = new is not old
    behind: list[str] = []
    if changed and args.wait and not args.dry_run:
        behind = await ops.wait_applied(store, new, args.timeout)
    if args.json:
        doc: dict[str, Any] = {"cluster": name, "epoch": new.epoch, "migration_rate": rate,
                               "was": was, "changed": changed, "dry_run": args.dry_run}
        if args.wait and not args.dry_run:
            doc["not_applied"] = behind
        print(json.dumps(doc))
    elif not changed:
        print(f"{name}: migration rate already {rate_text(rate)}")
    else:
        print(f"{name}: migration rate {rate_change(was, rate)}"
              + (" (dry run: nothing written)" if args.dry_run else ""))
    if behind:
        print(f"umctl-mesh: nodes {', '.join(behind)} have not applied epoch {new.epoch} "
              f"after {args.timeout:g}s", file=sys.stderr)
        return EXIT_FAILED
    return 0


async def cmd_migrate(store: EtcdStore, args: argparse.Namespace) -> int:
    if args.words[0] == "throttle":
        return await cmd_throttle(store, args)
    if args.rate is not None:
        print("umctl-mesh: --rate goes with `migrate throttle NAME`", file=sys.stderr)
        return EXIT_USAGE
    if args.words[0] == "cancel":
        if len(args.words) != 2:
            raise ops.UsageError("usage: umctl-mesh migrate cancel NAME")
        old, new = await ops.cancel_migrations(store, args.words[1])
        back = [m for m in new.migrations] if new is not old else []
        if args.json:
            print(json.dumps({"cluster": new.cluster, "epoch": new.epoch,
                              "changed": new is not old, "returning": [m.id for m in back]}))
        elif new is old:
            print(f"cluster {new.cluster} has no migrations to cancel")
        else:
            print(f"cluster {new.cluster}: {len(old.migrations) - len(back)} planned "
                  f"migrations dropped, {len(back)} running ones sent back")
        return await follow(store, args, new.cluster) if args.wait and new is not old else 0
    if len(args.words) != 1 or not args.slots or not args.to:
        raise ops.UsageError("usage: umctl-mesh migrate NAME --slots A-B [--slots C-D] --to "
                             "SHARD")
    from core.slots import SlotRangeError, normalize, parse_range

    try:
        ranges = normalize(parse_range(r) for r in args.slots)
    except SlotRangeError as exc:
        raise ops.UsageError(str(exc)) from None
    old, new = await ops.migrate_slots(store, args.words[0], ranges, args.to, args.dry_run)
    if new is old and not args.json:
        print(f"shard {args.to} of {old.cluster} already owns those slots")
        return 0
    print_plan(old, new, args.dry_run, args.json)
    if new is old:
        return 0
    return await follow(store, args, args.words[0]) if args.wait and not args.dry_run else 0


async def cmd_drain(store: EtcdStore, args: argparse.Namespace) -> int:
    how, view = await ops.drain_node(store, args.node, args.mesh_secret)
    if args.json:
        print(json.dumps({"node": args.node, "how": how, "cluster": view.cluster if view else None,
                          "epoch": view.epoch if view else None}))
    elif how == "removed":
        print(f"node {args.node} left cluster {view.cluster} (epoch {view.epoch}); it is held "
              f"out of the pool (stop it, or `umctl-mesh nodes release {args.node}`); the "
              f"leader adds a free node in its place while the cluster declares "
              f"{view.config.replicas} replicas per shard")
    else:
        print(f"node {args.node}: its slots are migrating away in {view.cluster}; it returns to "
              "the pool when the last migration commits")
    if how == "migrating" and args.wait:
        return await follow(store, args, view.cluster)
    return 0


async def cmd_failover(store: EtcdStore, args: argparse.Namespace) -> int:
    view = await ops.graceful_failover(store, args.name, args.shard, args.to, args.mesh_secret)
    shard = next(s for s in view.shards if s.id == args.shard)
    behind = await ops.wait_applied(store, view, 30)
    if args.json:
        print(json.dumps({"cluster": view.cluster, "epoch": view.epoch, "shard": shard.id,
                          "master": shard.master, "not_applied": behind}))
    else:
        print(f"shard {shard.id} of {view.cluster}: {shard.master} is the master "
              f"(epoch {view.epoch})")
    return EXIT_FAILED if behind else 0


async def cmd_check(store: EtcdStore, args: argparse.Namespace) -> int:
    if args.sample < 0 or args.max_lag < 0 or args.timeout <= 0:
        raise ops.UsageError("--sample and --max-lag must be 0 or more, --timeout above 0")
    password = passwords.read(args)
    credentials = check_mod.Credentials(args.mesh_secret, password.value if password else None)
    options = check_mod.Options(sample=args.sample, max_lag=args.max_lag,
                                proxies=not args.no_proxies)
    report = await check_mod.check_cluster(store, args.name, credentials, options, args.timeout)
    if args.json:
        print(json.dumps(report.doc(), indent=2))
    else:
        print(f"cluster {report.cluster}  epoch {report.epoch}")
        print("\n".join(report.lines()))
    return 0 if report.healthy else EXIT_FAILED


async def cmd_migrations(store: EtcdStore, args: argparse.Namespace) -> int:
    pool = await ops.read_pool(store)
    if args.name not in pool.views:
        raise ops.OpError(f"unknown cluster '{args.name}'")
    rows = ops.migration_rows(pool.views[args.name][0], pool)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        table(["ID", "FROM", "TO", "SLOTS", "STATE", "MOVED", "LEFT", "KEYS/S", "ETA",
                     "ERROR"],
                    [[r["id"], r["from"], r["to"], r["slot_count"], r["state"],
                      r["moved_keys"], "-" if r["left_keys"] is None else r["left_keys"],
                      r["keys_per_sec"], "-" if r["eta_sec"] is None else f"{r['eta_sec']:g}s",
                      r["error"] or "-"] for r in rows])
    else:
        print(f"cluster {args.name} has no migrations")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    """A completion script generated from the parser itself (shtab), so it never lags."""
    import shtab

    print(shtab.complete(build_parser(), args.shell), end="")
    return 0


async def cmd_slowlog(store: EtcdStore, args: argparse.Namespace) -> int:
    if not 1 <= args.count <= slowlog.MAX_COUNT:
        raise ops.UsageError(f"--count must be 1 to {slowlog.MAX_COUNT}")
    pool = await ops.read_pool(store)
    if args.name not in pool.views:
        raise ops.OpError(f"unknown cluster '{args.name}'")
    view = pool.views[args.name][0]
    entries, failed = await slowlog.read_cluster(view, args.backend_password, args.count)
    if args.json:
        print(json.dumps({"cluster": view.cluster, "entries": [e.doc() for e in entries],
                          "unreadable": failed}, indent=2))
    else:
        if entries:
            table(["TIME", "NODE", "SHARD", "ROLE", "MICROSECONDS", "COMMAND", "CLIENT"],
                  [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time)), e.node,
                    e.shard, e.role, e.duration_us,
                    " ".join(e.args[:slowlog.ARGS_SHOWN])
                    + (" ..." if len(e.args) > slowlog.ARGS_SHOWN else ""),
                    e.client or "-"] for e in entries])
        else:
            print(f"no slow commands logged on the nodes of {view.cluster}")
        for nid, why in sorted(failed.items()):
            print(f"umctl-mesh: could not read the slowlog of {nid}: {render.literal(why)}",
                  file=sys.stderr)
    return EXIT_FAILED if failed and not entries else 0


async def cmd_top(store: EtcdStore, args: argparse.Namespace) -> int:
    if not 1 <= args.count <= top_mod.MAX_COUNT or not 0 < args.interval <= 60 \
            or args.timeout <= 0:
        raise ops.UsageError(f"--count must be 1 to {top_mod.MAX_COUNT}, --interval above 0 "
                             "and at most 60, --timeout above 0")
    password = passwords.read(args)
    credentials = check_mod.Credentials(args.mesh_secret, password.value if password else None)
    report = await top_mod.top(store, args.name, credentials, args.count, args.interval,
                               args.timeout)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"cluster {report['cluster']}  epoch {report['epoch']}")
    print("\nhot keys (estimated ops at the owning shard, of recent traffic: halved each minute)")
    if report["hot_keys"]:
        table(["KEY", "OPS", "SHARD", "NODES"],
              [[k["key"], k["ops"], k["shard"] or "-", " ".join(k["nodes"])]
               for k in report["hot_keys"]])
    else:
        print("  none sampled yet" if args.mesh_secret else "  (needs the mesh secret)")
    print("\nhot slots (by CPU time in the proxies)")
    if report["hot_slots"]:
        table(["SLOT", "SHARD", "CPU-USEC", "BYTES-IN", "BYTES-OUT", "KEYS"],
              [[s["slot"], s["shard"] or "-", s["cpu-usec"], s["network-bytes-in"],
                s["network-bytes-out"], s["key-count"]] for s in report["hot_slots"]])
    else:
        print("  none")
    print(f"\nnodes (commands per second over {args.interval:g} s)")
    table(["NODE", "SHARD", "ROLE", "OPS/S"],
          [[n["node"], n["shard"] or "-", n["role"],
            "-" if n["ops_per_sec"] is None else n["ops_per_sec"]] for n in report["nodes"]])
    for node, problems in sorted(report["problems"].items()):
        for problem in problems:
            print(f"umctl-mesh: {node}: {render.literal(problem)}", file=sys.stderr)
    return 0


def etcd_endpoint(flag: str | None) -> tuple[str, str]:
    """(the etcd endpoints to use, where they came from, in words for an error)."""
    if flag:
        return flag, "from --etcd"
    env = os.environ.get(local.ETCD_ENV, "").strip()
    if env:
        return env, f"from ${local.ETCD_ENV}"
    written = local.read_endpoint()
    if written:
        return written, (f"from {local.endpoint_file()}, which `umctl-mesh up` writes while "
                         "it runs: has it stopped?")
    return DEFAULT_ETCD, (f"the default: no --etcd, no ${local.ETCD_ENV}, no running "
                          "`umctl-mesh up`")


async def listening(endpoints: list[tuple[str, int]]) -> bool:
    """Whether any endpoint accepts a TCP connection (a refusal is known at once, where the
    etcd client would retry it)."""
    for host, port in endpoints:
        with contextlib.suppress(OSError):
            stream = await anyio.connect_tcp(host, port)
            await stream.aclose()
            return True
    return False


async def run_with_store(store: EtcdStore, args: argparse.Namespace) -> int:
    async with store:
        try:
            with anyio.fail_after(ETCD_FIRST_READ_TIMEOUT):
                if not await listening(store.endpoints):
                    raise TimeoutError
                await MeshRepo(store).nodes()
        except (TimeoutError, StoreError):
            raise StoreError(
                f"etcd unreachable at {store.describe()} ({args.etcd_source}); give "
                f"--etcd HOST:PORT or set ${local.ETCD_ENV}") from None
        return await args.func(store, args)


def main(argv: list[str] | None = None) -> int:
    """The console script. A reader that goes away (`umctl-mesh ... | head`) ends it quietly
    with EXIT_PIPE, as SIGPIPE ends a shell tool."""
    try:
        try:
            return run(argv)
        finally:  # also after argparse's SystemExit (--help, --version, usage errors)
            sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
    except BrokenPipeError:
        # nothing more can reach the reader; stdout's last flush at exit must not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except KeyboardInterrupt:  # Ctrl-C at a prompt or while --wait waits: no traceback
        print("\numctl-mesh: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is cmd_completion:
        return cmd_completion(args)
    if args.func is local.up:
        try:
            return local.up(args)
        except ops.UsageError as exc:
            print(f"umctl-mesh: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (local.LaunchError, OSError) as exc:
            print(f"umctl-mesh: {exc}", file=sys.stderr)
            return EXIT_FAILED
    try:
        args.etcd, args.etcd_source = etcd_endpoint(args.etcd)
        store = EtcdStore(args.etcd, root=args.etcd_root)
        args.mesh_secret = secret.load(args.mesh_secret_file)
    except (ValueError, OSError) as exc:  # a malformed --etcd, an unreadable secret file
        print(f"umctl-mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return anyio.run(run_with_store, store, args)
    except ops.UsageError as exc:
        print(f"umctl-mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ops.OpError as exc:
        print(f"umctl-mesh: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except StoreError as exc:
        print(f"umctl-mesh: {exc}", file=sys.stderr)
        return EXIT_ETCD


if __name__ == "__main__":
    sys.exit(main())
