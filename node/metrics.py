"""`mesh-proxy --metrics HOST:PORT`: the Prometheus text format, served from the proxy's own
event loop.

The data path only bumps plain counters (proxy/stats.py, the pool's connections); `Collector`
turns them, and what the node's agent knows (role, fence, lease, replication, migrations), into
metric families when Prometheus scrapes. The HTTP endpoint is a small asyncio server in the
same loop, so a scrape never reads the counters while a callback changes them (no thread).
Every metric is prefixed `moonmesh_` and labelled `cluster`, `node`, `shard`.

The port faces whoever can reach it, so it is cheap to flood and hard to lock: a rendered body
is served to every scrape for SCRAPE_CACHE_SECONDS (a flood renders once per window), a
connection has HEAD_TIMEOUT to send its request head, and at MAX_SCRAPES connections the
oldest one that is still sending its head (or not reading its response) is closed for the
newcomer, which gets 503 only when every connection is being served.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector as CollectorBase

from core import clock
from core.address import Address
from proxy.server import ProxyServer
from proxy.stats import LATENCY_BUCKETS, REDIRECT_KINDS

if TYPE_CHECKING:
    from mesh.agent import NodeAgent

log = structlog.get_logger("node.metrics")

PREFIX = "moonmesh_"
MAX_REQUEST_BYTES = 8192  # request line and headers of a scrape; more: 431
HEAD_TIMEOUT = 1.0  # seconds a connection has to send its whole request head; then 400
SCRAPE_CACHE_SECONDS = 1.0  # a rendered body is served to every scrape this long
WRITE_STALL = 1.0  # a response unread this long makes its connection closable at the cap
WRITE_TIMEOUT = 5.0  # seconds a client has to read its whole response
MAX_SCRAPES = 8  # connections to the metrics port at once (see `closable`)
METRICS_PATHS = frozenset({"/metrics", "/"})
LABELS = ("cluster", "node", "shard")


class Collector(CollectorBase):
    """One proxy's metrics; `agent` is None for a standalone proxy."""

    def __init__(self, server: ProxyServer, agent: NodeAgent | None = None,
                 node_id: str = "") -> None:
        self.server = server
        self.agent = agent
        self.node_id = node_id or server.announce
        self.renders = 0  # bodies rendered (MetricsServer counts them)
        self.rendered_at = 0.0  # unix time of the newest

    def _labels(self) -> list[str]:
        table = self.server.control.table
        shard = ""
        agent = self.agent
        if agent is not None and agent.views.applied is not None:
            found = agent.views.applied.shard_of(agent.config.node_id)
            shard = found.id if found is not None else ""
        return [table.cluster, self.node_id, shard]

    def collect(self) -> Iterator[Metric]:
        ctx = self.server.context
        stats = ctx.stats
        control = self.server.control
        values = self._labels()

        def gauge(name: str, doc: str, value: float, extra: dict[str, str] | None = None,
                  ) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=[*LABELS, *(extra or {})])
            family.add_metric([*values, *(extra or {}).values()], value)
            return family

        commands = CounterMetricFamily(PREFIX + "commands", "Commands read from clients, by "
                                       "name (the Redis command table's; others: 'other')",
                                       labels=[*LABELS, "command"])
        for name, n in sorted(stats.command_counts().items()):
            commands.add_metric([*values, name], n)
        yield commands

        latency = HistogramMetricFamily(
            PREFIX + "command_latency_seconds",
            "Time from reading a command to writing its read's last reply, sampled (one "
            "command in proxy.stats.SAMPLE_EVERY; reads of clients waiting for nothing else)",
            labels=[*LABELS, "command"])
        for name, snap in sorted(stats.latency_snapshot().items()):
            buckets = [(str(b), c) for b, c in zip(LATENCY_BUCKETS, snap.buckets)]
            buckets.append(("+Inf", snap.buckets[-1]))
            latency.add_metric([*values, name], buckets, snap.total)
        yield latency

        errors = CounterMetricFamily(PREFIX + "errors", "Error replies the proxy made itself "
                                     "(refusals, redirects, its own commands' errors), by kind",
                                     labels=[*LABELS, "kind"])
        for kind, n in sorted(stats.errors.items()):
            errors.add_metric([*values, kind], n)
        yield errors
        redirects = CounterMetricFamily(PREFIX + "redirects", "Redirects answered to clients",
                                        labels=[*LABELS, "kind"])
        for kind in sorted(REDIRECT_KINDS):
            redirects.add_metric([*values, kind], stats.errors.get(kind, 0))
        yield redirects

        yield gauge("client_connections", "Clients connected now", len(ctx.sessions))
        accepted = CounterMetricFamily(PREFIX + "client_connections_accepted",
                                       "Client connections accepted", labels=list(LABELS))
        accepted.add_metric(values, stats.clients_accepted)
        yield accepted

        pooled = ctx.pool.connections()
        backend = GaugeMetricFamily(PREFIX + "backend_connections", "Connections to this "
                                    "node's Redis that are up, by kind",
                                    labels=[*LABELS, "kind"])
        backend.add_metric([*values, "pooled"], sum(1 for c in pooled if c.up))
        backend.add_metric([*values, "dedicated"], ctx.dedicated_open)
        yield backend
        yield gauge("backend_up", "1 while this node's Redis accepts the proxy's connections",
                    1 if ctx.pool.healthy else 0)
        reconnects = CounterMetricFamily(PREFIX + "backend_reconnects", "Pooled backend "
                                         "connections made again after the first",
                                         labels=list(LABELS))
        reconnects.add_metric(values, sum(max(0, c.connects - 1) for c in pooled))
        yield reconnects

        table = control.table
        yield gauge("view_epoch", "Epoch of the view (routing table) served", table.epoch)
        yield gauge("fenced", "1 while writes are fenced", 1 if control.fenced else 0)
        reasons = GaugeMetricFamily(PREFIX + "fence_reason", "Why writes are fenced (1 per "
                                    "reason held)", labels=[*LABELS, "reason"])
        for reason in sorted(control.fenced_for):
            reasons.add_metric([*values, reason], 1)
        yield reasons
        deadline = control.permission.deadline
        if deadline != math.inf:  # a standalone proxy has no lease
            left = max(0.0, deadline - clock.now()) if deadline != -math.inf else 0.0
            yield gauge("lease_seconds_left", "Seconds of writes the node's lease still "
                        "grants (0: none; fenced or no lease)", left)

        yield from self._mesh(values, gauge)

        renders = CounterMetricFamily(PREFIX + "metrics_renders", "Bodies this metrics port "
                                      "rendered (one serves every scrape for "
                                      f"{SCRAPE_CACHE_SECONDS:g} s)", labels=list(LABELS))
        renders.add_metric(values, self.renders)
        yield renders
        yield gauge("metrics_rendered_timestamp_seconds", "When this body was rendered (unix "
                    "seconds)", self.rendered_at)

    def _mesh(self, values: list[str], gauge) -> Iterator[Metric]:  # noqa: ANN001
        agent = self.agent
        if agent is None:
            return
        status = agent.status.status
        role = GaugeMetricFamily(PREFIX + "role", "The backend's role (1 for the current one)",
                                 labels=[*LABELS, "role"])
        for name in ("master", "replica"):
            role.add_metric([*values, name], 1 if status.role == name else 0)
        yield role
        yield gauge("replication_offset_bytes", "The backend's replication offset",
                    status.repl_offset)
        lag = 0
        view = agent.views.applied
        shard = view.shard_of(agent.config.node_id) if view is not None else None
        if shard is not None and shard.master != agent.config.node_id:
            master = agent.peers.statuses.get(shard.master)
            if master is not None:
                lag = max(0, master.repl_offset - status.repl_offset)
        yield gauge("replication_lag_bytes", "A replica's distance behind its master's "
                    "offset as their statuses report it (0 for a master)", lag)
        moved = GaugeMetricFamily(PREFIX + "migration_keys_moved", "Keys moved by a running "
                                  "migration this node is the source of",
                                  labels=[*LABELS, "migration"])
        left = GaugeMetricFamily(PREFIX + "migration_keys_left", "Keys still to move (-1: "
                                 "not counted yet)", labels=[*LABELS, "migration"])
        rate = GaugeMetricFamily(PREFIX + "migration_keys_per_second", "A running "
                                 "migration's rate", labels=[*LABELS, "migration"])
        for mid, progress in sorted(status.migrations.items()):
            moved.add_metric([*values, mid], progress.moved_keys)
            left.add_metric([*values, mid], -1 if progress.left_keys is None
                            else progress.left_keys)
            rate.add_metric([*values, mid], progress.keys_per_sec)
        yield moved
        yield left
        yield rate


def registry_for(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


def answer(request: bytes, body: Callable[[], bytes]) -> bytes:
    """The response to one HTTP request (its request line and headers); `body` renders (or
    reuses) the metrics. Pure but for `body`."""
    line = request.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _response("400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"GET only\n")
    if target not in METRICS_PATHS:
        return _response("404 Not Found", b"try /metrics\n")
    return _response("200 OK", body(), CONTENT_TYPE_LATEST, head_only=method == "HEAD")


@dataclass(frozen=True)
class Holder:
    """What the cap looks at of one open connection (times on `clock.now()`)."""
    opened: float
    head_sent: bool
    writing_since: float | None  # when its response was written; None before


def closable(holders: Sequence[Holder], now: float) -> int | None:
    """Which connection to close for a newcomer at the cap: the oldest still sending its
    request head, else the oldest whose response has gone unread WRITE_STALL; None: every
    one is being served (the newcomer gets 503). Pure."""
    waiting = [i for i, h in enumerate(holders) if not h.head_sent]
    if not waiting:
        waiting = [i for i, h in enumerate(holders) if h.writing_since is not None
                   and now - h.writing_since >= WRITE_STALL]
    return min(waiting, key=lambda i: holders[i].opened) if waiting else None


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.opened = clock.now()
        self.head_sent = False
        self.writing_since: float | None = None

    def holder(self) -> Holder:
        return Holder(self.opened, self.head_sent, self.writing_since)


class MetricsServer:
    def __init__(self, listen: str, collector: Collector) -> None:
        self.listen = listen
        self.collector = collector
        self.registry = registry_for(collector)
        self.connections: list[_Connection] = []
        self.cached = b""
        self.cached_at = -math.inf

    def body(self) -> bytes:
        """The rendered metrics, rendered again only SCRAPE_CACHE_SECONDS after the last."""
        now = clock.now()
        if now - self.cached_at >= SCRAPE_CACHE_SECONDS:
            self.collector.renders += 1  # the body counts itself
            self.collector.rendered_at = time.time()
            self.cached, self.cached_at = generate_latest(self.registry), now
        return self.cached

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        where = Address.parse(self.listen)
        server = await asyncio.start_server(self._serve, where.host, where.port,
                                            limit=MAX_REQUEST_BYTES, reuse_address=True)
        log.info("metrics_listening", listen=self.listen)
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            server.close()

    def _admit(self, conn: _Connection) -> bool:
        """Room for `conn`, closing another if the cap says so; False: answer 503."""
        if len(self.connections) >= MAX_SCRAPES:
            victim = closable([c.holder() for c in self.connections], clock.now())
            if victim is None:
                return False
            # its handler sees the connection lost (its read or drain fails) and ends
            self.connections.pop(victim).writer.transport.abort()
        self.connections.append(conn)
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        try:
            if not self._admit(conn):
                writer.write(_response("503 Service Unavailable", b"too many scrapes\n"))
            else:
                writer.write(await self._answer(reader, conn))
            conn.writing_since = clock.now()
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()  # a client not reading its response, or gone
        except Exception as exc:  # noqa: BLE001 - a scrape never takes the proxy down
            log.warning("metrics_request_failed", error=repr(exc))
        finally:
            if conn in self.connections:
                self.connections.remove(conn)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, conn: _Connection) -> bytes:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            return _response("431 Request Header Fields Too Large", b"request too large\n")
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return _response("400 Bad Request", b"incomplete request\n")
        conn.head_sent = True
        return answer(request, self.body)
