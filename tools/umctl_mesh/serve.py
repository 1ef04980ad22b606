"""`umctl-mesh serve`: the REST API and the web dashboard (Starlette on uvicorn).

Reads are open to anyone who reaches the port; actions (create, scale, migrate, cancel,
failover, drain) need `Authorization: Bearer TOKEN`, the token of `--token-file` or
$MOONMESH_API_TOKEN, and are refused when the server has none. Each action calls the same
`ops` function as the CLI command of that name, with the same checks.

A monitor task reads etcd and every registered proxy's `INFO proxy` each POLL_INTERVAL: the
page polls `/api/state`, which is that read (pool by host, clusters with their slot maps,
migrations with progress, failovers seen, DATA LOST notes, ops/s per node). The other JSON
endpoints read etcd when asked. The page itself is static HTML and JavaScript in `static/`.

Every request's Host header must name this server (Starlette's TrustedHostMiddleware, 400
otherwise), so a page of another site whose name was rebound to this address (DNS
rebinding) cannot read the API from a browser: on a loopback listener only `localhost`,
127.0.0.1 and ::1 (any port); otherwise the listen host and the `--allow-host` names
(`allowed_hosts` decides, pure).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from core import secret
from core.address import Address, AddressError
from core.view import ClusterView
from mesh.redisctl import RedisCtl, RedisCtlError
from mesh.store.etcd import EtcdStore, StoreError
from mesh.store.repo import MeshRepo

from . import api, ops

TOKEN_ENV = "MOONMESH_API_TOKEN"
DASHBOARD_PORT = 8470  # `serve`'s default, and where `umctl-mesh up` starts its dashboard
DEFAULT_LISTEN = f"127.0.0.1:{DASHBOARD_PORT}"
POLL_INTERVAL = 1.0  # seconds between the monitor's reads (and the page's)
READ_TIMEOUT = 5.0  # one read of etcd by the monitor
INFO_TIMEOUT = 1.0  # one proxy's INFO
STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # the Host names a loopback server accepts
HOST_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                       r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def add_parser(sub: Any) -> None:
    """`serve` among umctl-mesh's commands (`sub`: its subparsers)."""
    serve = sub.add_parser(
        "serve", help="the REST API and web dashboard",
        description="Serve a web dashboard and a JSON API of the mesh on HOST:PORT: the pool "
                    "by host, each cluster's shards and slot map, migrations with progress, "
                    "failovers, DATA LOST notes and each node's ops/s, updated live. Reads "
                    "need nothing; actions (create, scale, migrate, cancel, failover, drain) "
                    "need `Authorization: Bearer TOKEN` and are refused when no token is "
                    "configured. Failover and drain also need the mesh secret "
                    f"(--mesh-secret-file or ${secret.SECRET_ENV}).")
    serve.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", type=listen_arg,
                       help=f"where to serve (default {DEFAULT_LISTEN}); the token crosses "
                            "the network in clear: off loopback, put TLS in front")
    serve.add_argument("--token-file", metavar="FILE", type=token_file_arg,
                       help=f"the API token (its first line; at least {api.MIN_TOKEN_LENGTH} "
                            f"characters); default ${TOKEN_ENV}; neither: read-only")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       type=allow_host_arg,
                       help="a name (or address) browsers and clients reach the server by, "
                            "accepted in the Host header besides the --listen host (again for "
                            "more); a server on loopback accepts only localhost, 127.0.0.1 "
                            "and ::1")
    serve.set_defaults(func=cmd_serve)


def allow_host_arg(text: str) -> str:
    """--allow-host: a DNS name or an IP address, without a port (lowercase, no brackets)."""
    name = text.lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not HOST_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected a host name or an IP address without a "
                                         f"port, got '{text}'")
    return name


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def allowed_hosts(listen_host: str, extra: list[str]) -> list[str]:
    """The Host header values (TrustedHostMiddleware's patterns: IPv6 in brackets) a server
    listening on `listen_host` accepts; pure. A loopback listener accepts the loopback names
    only (and its own address); a wildcard one (0.0.0.0, ::) also listens on loopback, so it
    accepts those too. ops.UsageError: --allow-host on loopback."""
    ip = _ip(listen_host)
    loopback = listen_host.lower() == "localhost" or (ip is not None and ip.is_loopback)
    if loopback and extra:
        raise ops.UsageError(f"--allow-host is for a server off loopback: on {listen_host} "
                             f"only {', '.join(LOOPBACK_NAMES)} reach it")
    names = [listen_host.lower(), *extra]
    if loopback or (ip is not None and ip.is_unspecified):
        names += LOOPBACK_NAMES
    out: list[str] = []
    for name in names:
        pattern = f"[{name}]" if ":" in name else name
        if pattern not in out:
            out.append(pattern)
    return out


def listen_arg(text: str) -> Address:
    """--listen, checked as the command line is read (a usage error: exit 2)."""
    try:
        return Address.parse(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclasses.dataclass(frozen=True, slots=True)
class TokenFile:
    path: str
    token: str


def token_file_arg(path: str) -> TokenFile:
    """--token-file, read and checked as the command line is read."""
    try:
        with open(path) as f:
            line = f.readline()
        return TokenFile(path, api.check_token(line, f"in {path}"))
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ops.UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_token(given: TokenFile | None) -> tuple[str | None, str]:
    """(the token or None, where it came from in words)."""
    if given is not None:
        return given.token, f"from {given.path}"
    env = os.environ.get(TOKEN_ENV, "")
    if env.strip():
        return api.check_token(env, f"in ${TOKEN_ENV}"), f"from ${TOKEN_ENV}"
    return None, f"none (no --token-file, no ${TOKEN_ENV}): read-only"


# -- the monitor -----------------------------------------------------------------------------

class Monitor:
    """Reads etcd and the proxies every POLL_INTERVAL (at once when nudged after an action)
    into `state`, the document the page shows."""

    def __init__(self, store: EtcdStore, mesh_secret: bytes | None) -> None:
        self.store = store
        self.mesh_secret = mesh_secret
        self.state: dict[str, Any] = {"ready": False, "error": None}
        self.samples: dict[str, api.Sample] = {}
        self.rates: dict[str, float | None] = {}
        self.views: dict[str, ClusterView] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=api.MAX_FAILOVER_EVENTS)
        self.readers: dict[str, tuple[str, RedisCtl]] = {}  # node -> (proxy, open connection)
        self._wake = anyio.Event()

    def nudge(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self.poll()
                with anyio.move_on_after(POLL_INTERVAL):
                    await self._wake.wait()
                self._wake = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                for _, ctl in self.readers.values():
                    await ctl.aclose()

    async def poll(self) -> None:
        try:
            with anyio.fail_after(READ_TIMEOUT):
                pool = await ops.read_pool(self.store)
        except (TimeoutError, StoreError) as exc:
            self.state = {**self.state, "error": str(exc) or "etcd did not answer within "
                          f"{READ_TIMEOUT:g} s", "time": time.time()}
            return
        samples = await self.read_samples(pool)
        self.rates = api.ops_rates(self.samples, samples)
        self.samples = samples
        views = {name: held.view for name, held in pool.views.items()}
        for event in api.failovers(self.views, views, time.time()):
            self.events.appendleft(event)
        self.views = views
        rows = api.node_rows(pool, self.rates)
        self.state = {
            "ready": True, "error": None, "time": time.time(), "interval": POLL_INTERVAL,
            "etcd": self.store.describe(), "leader": pool.leader, "free": len(pool.free()),
            "nodes": rows, "hosts": api.hosts(rows),
            "clusters": [api.cluster_doc(views[name], pool) for name in sorted(views)],
            "failovers": list(self.events)}

    async def read_samples(self, pool: ops.Pool) -> dict[str, api.Sample]:
        samples: dict[str, api.Sample] = {}
        for nid in [n for n in self.readers if n not in pool.nodes]:
            await self.readers.pop(nid)[1].aclose()

        async def one(nid: str, proxy: str) -> None:
            held = self.readers.get(nid)
            if held is not None and held[0] != proxy:  # the node came back elsewhere
                await held[1].aclose()
                held = None
            fresh = held is None
            ctl = RedisCtl(proxy) if held is None else held[1]
            self.readers[nid] = (proxy, ctl)
            try:
                with anyio.fail_after(INFO_TIMEOUT):
                    own = 1  # the previous read's INFO counts in this one
                    if fresh and self.mesh_secret is not None:
                        nonce = await ctl.call("UMCTL", "CHALLENGE")
                        if not isinstance(nonce, bytes):
                            raise RedisCtlError(f"unexpected UMCTL CHALLENGE reply {nonce!r}")
                        await ctl.call("UMCTL", "PROVE", secret.proof(self.mesh_secret, nonce))
                        own += 2
                    info = await ctl.call("INFO", "proxy")
            except (RedisCtlError, TimeoutError, AddressError):
                await self.readers.pop(nid)[1].aclose()
                return
            sample = api.parse_proxy_info(info) if isinstance(info, bytes) else None
            if sample is not None:
                samples[nid] = dataclasses.replace(sample, at=time.monotonic(), own=own)

        async with anyio.create_task_group() as tg:
            for nid, record in pool.nodes.items():
                tg.start_soon(one, nid, record.proxy)
        return samples


# -- the app ---------------------------------------------------------------------------------

def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def read_body(request: Request) -> bytes:
    """The body, refused (UsageError, 413) past MAX_BODY_BYTES before more is read."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > api.MAX_BODY_BYTES):
        raise TooLarge()
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > api.MAX_BODY_BYTES:
            raise TooLarge()
    return body


class TooLarge(Exception):
    pass


Handler = Callable[[Request], Awaitable[Response]]


def build_app(store: EtcdStore, token: str | None, mesh_secret: bytes | None,
              monitor: Monitor, hosts: list[str]) -> Starlette:
    """The API and page; `hosts`: the Host header values accepted (`allowed_hosts`)."""
    repo = MeshRepo(store)

    def action(fn: Callable[[Request, dict[str, Any]], Awaitable[Response]]) -> Handler:
        """Token first, then the bounded JSON body; errors as JSON with a 4xx (503: etcd)."""
        async def handler(request: Request) -> Response:
            if token is None:
                return error(403, "actions are disabled: this server has no API token (start "
                                  f"it with --token-file or ${TOKEN_ENV}); reads only")
            if not api.token_matches(request.headers.get("authorization"), token):
                return error(401, "this action needs the API token: Authorization: Bearer "
                                  "TOKEN", **{"WWW-Authenticate": "Bearer"})
            try:
                body = api.parse_body(await read_body(request))
                response = await fn(request, body)
            except TooLarge:
                return error(413, f"the request body is over {api.MAX_BODY_BYTES} bytes")
            except ops.UsageError as exc:
                return error(400, str(exc))
            except ops.OpError as exc:
                return error(409, str(exc))
            except StoreError as exc:
                return error(503, str(exc))
            monitor.nudge()
            return response
        return handler

    async def known(name: str) -> JSONResponse | None:
        """A 404 for a cluster etcd does not hold."""
        if await repo.view(name) is None:
            return error(404, f"unknown cluster '{name}'")
        return None

    # -- reads

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def state(request: Request) -> Response:
        doc = dict(monitor.state)
        doc["auth"] = {"token_configured": token is not None,
                       "token_valid": api.token_matches(request.headers.get("authorization"),
                                                        token)}
        return JSONResponse(doc)

    async def nodes(request: Request) -> Response:
        return JSONResponse(api.node_rows(await ops.read_pool(store), monitor.rates))

    async def clusters(request: Request) -> Response:
        pool = await ops.read_pool(store)
        return JSONResponse([api.cluster_summary(pool.views[n].view) for n in sorted(pool.views)])

    async def cluster(request: Request) -> Response:
        name = request.path_params["name"]
        pool = await ops.read_pool(store)
        if name not in pool.views:
            return error(404, f"unknown cluster '{name}'")
        return JSONResponse(api.cluster_doc(pool.views[name].view, pool))

    async def views(request: Request) -> Response:
        stored = await repo.views()
        return JSONResponse({n: api.view_doc(v.view, v.revision) for n, v in sorted(stored.items())})

    async def view(request: Request) -> Response:
        name = request.path_params["name"]
        stored = await repo.view(name)
        if stored is None:
            return error(404, f"unknown cluster '{name}'")
        return JSONResponse(api.view_doc(stored.view, stored.revision))

    async def migrations(request: Request) -> Response:
        name = request.path_params["name"]
        pool = await ops.read_pool(store)
        if name not in pool.views:
            return error(404, f"unknown cluster '{name}'")
        return JSONResponse(ops.migration_rows(pool.views[name].view, pool))

    async def statuses(request: Request) -> Response:
        return JSONResponse({nid: dataclasses.asdict(st)
                             for nid, st in sorted((await repo.statuses()).items())})

    async def failovers(request: Request) -> Response:
        return JSONResponse(list(monitor.events))

    # -- actions

    async def create(request: Request, body: dict[str, Any]) -> Response:
        req = api.create_request(body)
        view = await ops.create_cluster(store, req.name, req.shards, req.replicas, req.password,
                                        req.min_replicas_ack,
                                        migration_rate=req.migration_rate)
        pool = await ops.read_pool(store)
        return JSONResponse(api.cluster_doc(view, pool), status_code=201)

    async def scale(request: Request, body: dict[str, Any]) -> Response:
        name = request.path_params["name"]
        req = api.scale_request(body)
        if (missing := await known(name)) is not None:
            return missing
        doc: dict[str, Any] = {"cluster": name}
        if req.replicas is not None:  # first, as the CLI: new shards then get the new count
            plan = await ops.scale_replicas(store, name, req.replicas, req.dry_run)
            doc["replicas"] = {"epoch": plan.new.epoch, "changed": plan.new is not plan.old,
                               "replicas": plan.new.config.replicas,
                               "was": plan.old.config.replicas,
                               "added": {k: list(v) for k, v in plan.added.items()},
                               "removed": {k: list(v) for k, v in plan.removed.items()}}
        if req.shards is not None:
            old, new = await ops.scale_cluster(store, name, req.shards, req.dry_run)
            doc["shards"] = api.change_doc(old, new, req.dry_run)
        return JSONResponse(doc)

    async def migrate(request: Request, body: dict[str, Any]) -> Response:
        name = request.path_params["name"]
        req = api.migrate_request(body)
        if (missing := await known(name)) is not None:
            return missing
        old, new = await ops.migrate_slots(store, name, req.slots, req.to, req.dry_run)
        return JSONResponse(api.change_doc(old, new, req.dry_run))

    async def cancel(request: Request, body: dict[str, Any]) -> Response:
        name = request.path_params["name"]
        api.empty_request(body, "cancel")
        if (missing := await known(name)) is not None:
            return missing
        old, new = await ops.cancel_migrations(store, name)
        return JSONResponse(api.change_doc(old, new))

    async def failover(request: Request, body: dict[str, Any]) -> Response:
        name = request.path_params["name"]
        req = api.failover_request(body)
        if (missing := await known(name)) is not None:
            return missing
        new = await ops.graceful_failover(store, name, req.shard, req.to, mesh_secret)
        shard = next(s for s in new.shards if s.id == req.shard)
        return JSONResponse({"cluster": name, "epoch": new.epoch, "shard": shard.id,
                             "master": shard.master})

    async def drain(request: Request, body: dict[str, Any]) -> Response:
        node = request.path_params["node"]
        api.empty_request(body, "drain")
        how, new = await ops.drain_node(store, node, mesh_secret)
        return JSONResponse({"node": node, "how": how, "cluster": new.cluster,
                             "epoch": new.epoch})

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return error(exc.status_code, str(exc.detail))
        return error(500, "internal error")

    async def etcd_down(request: Request, exc: Exception) -> Response:
        return error(503, str(exc))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor.run)
            yield
            tg.cancel_scope.cancel()

    routes = [
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/api/state", state),
        Route("/api/nodes", nodes),
        Route("/api/statuses", statuses),
        Route("/api/views", views),
        Route("/api/views/{name}", view),
        Route("/api/failovers", failovers),
        Route("/api/clusters", clusters),
        Route("/api/clusters", action(create), methods=["POST"]),
        Route("/api/clusters/{name}", cluster),
        Route("/api/clusters/{name}/migrations", migrations),
        Route("/api/clusters/{name}/scale", action(scale), methods=["POST"]),
        Route("/api/clusters/{name}/migrate", action(migrate), methods=["POST"]),
        Route("/api/clusters/{name}/cancel", action(cancel), methods=["POST"]),
        Route("/api/clusters/{name}/failover", action(failover), methods=["POST"]),
        Route("/api/nodes/{node}/drain", action(drain), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts,
                                            www_redirect=False)],
                     exception_handlers={HTTPException: http_error, StoreError: etcd_down})


async def cmd_serve(store: EtcdStore, args: argparse.Namespace) -> int:
    address = args.listen
    hosts = allowed_hosts(address.host, args.allow_host)
    token, source = load_token(args.token_file)
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        raise ops.OpError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    sock.listen(128)
    monitor = Monitor(store, args.mesh_secret)
    app = build_app(store, token, args.mesh_secret, monitor, hosts)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    print(f"dashboard and API on http://{address}/ (etcd {store.describe()}; API token "
          f"{source})", flush=True)
    try:
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        sock.close()
    return 0
