"""`mesh-proxy`: a Redis Cluster node in front of one Redis; with --etcd, a mesh node whose
agent (mesh/) drives the data path (proxy/) through its control port."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import TYPE_CHECKING

if __name__ == "__main__":
    # structlog renders tracebacks with rich when it can import it (umctl-mesh installs it):
    # the proxy's log lines need no boxes, and importing rich cost ~0.1 s of CPU at every
    # start (a test run starts about a thousand proxies)
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]  # None: not importable

import anyio
import structlog

from core import logs, secret
from core.address import Address, AddressError
from node.config import mesh_address_problem
from proxy.mover import DEFAULT_KEYS_PER_SECOND
from proxy.server import ProxyServer

if TYPE_CHECKING:
    from mesh.agent import NodeAgent
    from mesh.store.etcd import EtcdStore


EXIT_USAGE = 2  # as argparse exits on a bad flag
BACKEND_PASSWORD_ENV = "MOONMESH_BACKEND_PASSWORD"  # kept off the command line (ps shows it)


def parse_address(text: str) -> str:
    try:
        return str(Address.parse(text))
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh-proxy",
        description="Serve one Redis as a Redis Cluster node. Without --etcd the proxy runs "
                    "standalone and is configured in-band with UMCTL SETCLUSTER.")
    parser.add_argument("--listen", type=parse_address, required=True, metavar="HOST:PORT",
                        help="address clients connect to")
    parser.add_argument("--plain-listen", type=parse_address, metavar="HOST:PORT",
                        help="also serve clients that are not cluster clients here: they see "
                             "the whole cluster as one Redis (commands for other nodes' slots "
                             "are forwarded, multi-key commands split, SCAN/DBSIZE/KEYS cover "
                             "every shard); default: off")
    parser.add_argument("--backend", type=parse_address, required=True, metavar="HOST:PORT",
                        help="the Redis this proxy fronts")
    parser.add_argument("--announce", type=parse_address, metavar="HOST:PORT",
                        help="address shown to clients in redirects and CLUSTER replies "
                             "(default: --listen)")
    parser.add_argument("--backend-password", metavar="PASSWORD",
                        default=os.environ.get(BACKEND_PASSWORD_ENV) or None,
                        help="password of the backend Redis (requirepass; default: "
                             f"${BACKEND_PASSWORD_ENV})")
    parser.add_argument("--admin-password", metavar="PASSWORD",
                        help="standalone: the secret UMCTL SETCLUSTER/HANDOVER need (proven with "
                             "UMCTL CHALLENGE/PROVE); without it, anyone who reaches the proxy "
                             "may reconfigure it")
    mesh = parser.add_argument_group("mesh mode (with --etcd)")
    mesh.add_argument("--mesh-secret-file", metavar="FILE",
                      help="the secret every node of the mesh shares (first line of FILE; "
                           f"default: ${secret.SECRET_ENV}); peers and umctl-mesh prove it by "
                           "HMAC challenge-response; never stored in etcd")
    mesh.add_argument("--etcd", metavar="URL[,URL...]",
                      help="etcd endpoints; the proxy joins the pool and follows its views")
    mesh.add_argument("--node-id", metavar="ID",
                      help="this node's id in the pool (default: node-<announced port>)")
    mesh.add_argument("--host-tag", metavar="HOST", default="",
                      help="the machine this node runs on; replicas are placed on other hosts "
                           "than their master (default: the announced host)")
    mesh.add_argument("--etcd-root", default="/moonmesh", metavar="PREFIX",
                      help="key prefix in etcd (default /moonmesh)")
    mesh.add_argument("--migration-rate", type=int, default=DEFAULT_KEYS_PER_SECOND,
                      metavar="KEYS/S",
                      help="how many keys per second this node moves when its slots migrate "
                           f"(default {DEFAULT_KEYS_PER_SECOND}; 0: no limit)")
    parser.add_argument("--metrics", type=parse_address, metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics "
                             "(default: off)")
    parser.add_argument("--log-level", choices=logs.LEVELS, default="info")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    return parser


async def serve(args: argparse.Namespace, key: bytes | None) -> None:
    server = ProxyServer(args.listen, args.backend, args.announce, args.backend_password,
                         args.migration_rate, key, plain_listen=args.plain_listen)
    store, agent = make_agent(server, args, key) if args.etcd else (None, None)
    async with anyio.create_task_group() as tg:
        if args.metrics:
            from node.metrics import Collector, MetricsServer

            # bound before the proxy port, so a proxy that answers has its metrics up too
            node_id = agent.config.node_id if agent is not None else ""
            await tg.start(MetricsServer(args.metrics, Collector(server, agent, node_id)).run)
        await tg.start(server.run)
        if store is not None and agent is not None:
            tg.start_soon(run_agent, store, agent)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                structlog.get_logger("proxy").info("proxy_stopping", signal=signum.name)
                if agent is not None:
                    await agent.stop()  # hands a master's shard over; stays a member
                tg.cancel_scope.cancel()
                break


def make_agent(server: ProxyServer, args: argparse.Namespace,
               key: bytes | None) -> tuple[EtcdStore, NodeAgent]:
    """The node's agent and its etcd store, not yet started."""
    from mesh.agent import NodeAgent, NodeConfig
    from mesh.store.etcd import EtcdStore

    store = EtcdStore(args.etcd, root=args.etcd_root)
    server.control.managed = True
    announce = Address.parse(server.announce)
    config = NodeConfig(
        node_id=args.node_id or f"node-{announce.port}",
        proxy=server.announce, backend=server.backend_address,
        host=args.host_tag or announce.host,
        backend_password=args.backend_password, mesh_secret=key)
    return store, NodeAgent(store, server.control, config)


async def run_agent(store: EtcdStore, agent: NodeAgent) -> None:
    """Run `agent` until cancelled; its etcd store closes when it ends."""
    async with store:
        await agent.run()


def admin_secret(args: argparse.Namespace) -> bytes | None:
    if args.etcd:
        return secret.load(args.mesh_secret_file)
    return args.admin_password.encode() if args.admin_password else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_json)
    if args.etcd:
        problem = mesh_address_problem(Address.parse(args.announce or args.listen),
                                       Address.parse(args.backend))
        if problem is not None:
            parser.exit(EXIT_USAGE, f"{parser.prog}: error: {problem}\n")
    try:
        key = admin_secret(args)
    except (OSError, ValueError) as exc:
        parser.error(f"the mesh secret: {exc}")
    log = structlog.get_logger("proxy")
    if key is None and args.etcd:
        log.warning("no_mesh_secret", hint=f"set ${secret.SECRET_ENV} or --mesh-secret-file on "
                    "every node: without it graceful failover and peer authentication are off")
    elif key is None:
        log.warning("no_admin_password", hint="anyone who reaches this proxy may reconfigure "
                    "it with UMCTL SETCLUSTER; give --admin-password")
    failed = False
    try:
        anyio.run(serve, args, key, backend_options={"use_uvloop": True})
    except* OSError as group:  # a port taken, say; raised out of serve's task group
        for failure in leaves(group):
            log.error("proxy_failed", error=str(failure))
        failed = True
    return 1 if failed else 0


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions in `group` and in the groups inside it (task groups nest)."""
    return [leaf for exc in group.exceptions
            for leaf in (leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])]


if __name__ == "__main__":
    sys.exit(main())
