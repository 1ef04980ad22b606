"""`mesh-proxy`: a Redis Cluster node in front of one Redis; with --etcd, a mesh node whose
agent (mesh/) drives the data path (proxy/) through its control port."""
from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING

import anyio
import structlog
from anyio.abc import TaskGroup

from core import logs
from core.address import Address, AddressError
from proxy.migration import DEFAULT_KEYS_PER_SECOND
from proxy.server import ProxyServer

if TYPE_CHECKING:
    from mesh.agent import NodeAgent


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
    parser.add_argument("--backend", type=parse_address, required=True, metavar="HOST:PORT",
                        help="the Redis this proxy fronts")
    parser.add_argument("--announce", type=parse_address, metavar="HOST:PORT",
                        help="address shown to clients in redirects and CLUSTER replies "
                             "(default: --listen)")
    parser.add_argument("--backend-password", metavar="PASSWORD",
                        help="password of the backend Redis (requirepass)")
    mesh = parser.add_argument_group("mesh mode (with --etcd)")
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
    parser.add_argument("--log-level", choices=logs.LEVELS, default="info")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    return parser


async def serve(args: argparse.Namespace) -> None:
    server = ProxyServer(args.listen, args.backend, args.announce, args.backend_password,
                         args.migration_rate)
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        agent = await start_agent(tg, server, args) if args.etcd else None
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                structlog.get_logger("proxy").info("proxy_stopping", signal=signum.name)
                if agent is not None:
                    await agent.leave()
                tg.cancel_scope.cancel()
                break


async def start_agent(tg: TaskGroup, server: ProxyServer, args: argparse.Namespace) -> NodeAgent:
    """Start the node's agent in `tg`; its etcd store closes when the task group ends."""
    from mesh.agent import NodeAgent, NodeConfig
    from mesh.store.etcd import EtcdStore

    store = EtcdStore(args.etcd, root=args.etcd_root)
    server.control.managed = True
    announce = Address.parse(server.announce)
    config = NodeConfig(
        node_id=args.node_id or f"node-{announce.port}",
        proxy=server.announce, backend=server.backend_address,
        host=args.host_tag or announce.host,
        backend_password=args.backend_password)
    agent = NodeAgent(store, server.control, config)

    async def run() -> None:
        async with store:
            await agent.run()

    tg.start_soon(run)
    return agent


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_json)
    try:
        anyio.run(serve, args, backend_options={"use_uvloop": True})
    except OSError as exc:
        structlog.get_logger("proxy").error("proxy_failed", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
