"""The proxy server: the listener, and the parts its client sessions share."""
from __future__ import annotations

import asyncio

import anyio
import structlog

from core import clock
from core.address import Address

from .backend import BackendPool
from .context import ProxyContext
from .control import ControlPort
from .migration import Migrations
from .mover import DEFAULT_KEYS_PER_SECOND
from .peers import PeerPool
from .session import Session

log = structlog.get_logger("proxy.server")

LISTEN_BACKLOG = 1024


class ProxyServer:
    def __init__(self, listen: str, backend: str, announce: str | None = None,
                 backend_password: str | None = None,
                 migration_rate: int = DEFAULT_KEYS_PER_SECOND,
                 admin_secret: bytes | None = None, plain_listen: str | None = None) -> None:
        self.listen = listen
        self.plain_listen = plain_listen  # clients that are not cluster clients (proxy/plain.py)
        self.announce = announce or listen
        self.backend_address = backend
        pool = BackendPool(backend, password=backend_password)
        self.migrations = Migrations(pool, migration_rate, lambda: self.control.table,
                                     admin_secret,
                                     lambda: self.control.permission.refusal(clock.now()))
        self.control = ControlPort(self.migrations)  # the control plane's way in
        self.context = ProxyContext(listen, self.announce, backend, pool, self.control,
                                    self.migrations)
        self.context.admin_secret = admin_secret
        self.context.peers = PeerPool(admin_secret, self.context.spawn,
                                      lambda: self.control.table.tenant)
        self.control.followers.append(self.context.table_changed)
        self.control.on_fence.append(self.context.cut_in_flight)

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        listen = Address.parse(self.listen)
        context = self.context
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            context.task_group = tg
            await context.pool.run(tg)
            await tg.start(self.migrations.run)
            servers = [await loop.create_server(lambda: Session(context), listen.host,
                                                listen.port, reuse_address=True,
                                                backlog=LISTEN_BACKLOG)]
            if self.plain_listen is not None:
                plain = Address.parse(self.plain_listen)
                servers.append(await loop.create_server(lambda: Session(context, plain=True),
                                                        plain.host, plain.port,
                                                        reuse_address=True,
                                                        backlog=LISTEN_BACKLOG))
            log.info("proxy_listening", listen=self.listen, backend=self.backend_address,
                     announce=self.announce, plain_listen=self.plain_listen)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                for server in servers:
                    server.close()
                for session in list(context.sessions):
                    if session.transport is not None:
                        session.transport.abort()
                tg.cancel_scope.cancel()
