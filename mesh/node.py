"""Composition of a mesh node: the proxy server plus its agent, on one etcd store."""
from __future__ import annotations

import argparse

from anyio.abc import TaskGroup

from proxy.server import ProxyServer

from .agent import NodeAgent, NodeConfig
from .store.etcd import EtcdStore


async def start_agent(tg: TaskGroup, server: ProxyServer, args: argparse.Namespace) -> NodeAgent:
    """Start the agent in `tg`; the store closes when the task group ends."""
    store = EtcdStore(args.etcd, root=args.etcd_root)
    server.managed = True
    announce = server.announce
    config = NodeConfig(
        node_id=args.node_id or f"node-{announce.rpartition(':')[2]}",
        proxy=announce, backend=server.backend_address,
        host=args.host_tag or announce.rpartition(":")[0],
        backend_password=args.backend_password)
    agent = NodeAgent(store, server, config)

    async def run() -> None:
        async with store:
            await agent.run()

    tg.start_soon(run)
    return agent
