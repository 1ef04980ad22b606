"""What the client sessions of one proxy share. Built and run by proxy/server.py."""
from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from anyio.abc import TaskGroup

from .backend import BackendPool
from .control import ControlPort
from .jobs import KeyCounts
from .migration import Migrations
from .peers import PeerPool
from .routing import RoutingTable
from .stats import ProxyStats


class ProxyContext:
    def __init__(self, listen: str, announce: str, backend_address: str, pool: BackendPool,
                 control: ControlPort, migrations: Migrations) -> None:
        self.listen = listen
        self.announce = announce  # the address shown to clients
        self.backend_address = backend_address
        self.pool = pool
        self.control = control  # the routing table and write permission, swapped whole
        self.migrations = migrations  # the gates of running migrations
        self.sessions: set[Any] = set()  # the client sessions connected now
        self.commands_processed = 0
        self.stats = ProxyStats()  # counters and samples for metrics, HOTKEYS, SLOT-STATS
        self.stats_tenant = control.table.tenant  # whose `stats` are (reset when it changes)
        # CLUSTER SLOT-STATS' last key counts (proxy/local.py), reused while fresh
        self.key_counts: KeyCounts | None = None
        self.dedicated_open = 0  # connections of clients' own (proxy/dedicated.py)
        self.slot_scans = 0  # CLUSTER COUNTKEYSINSLOT/GETKEYSINSLOT running (proxy/local.py)
        self.started_at = time.time()
        # the mesh secret, or a standalone proxy's admin password; None: none was given
        self.admin_secret: bytes | None = None
        self.task_group: TaskGroup | None = None  # set while the server runs
        # connections to the other proxies of the cluster (set up by the server)
        self.peers = PeerPool(None, self.spawn, lambda: self.control.table.tenant)
        # peers a PUBLISH stopped waiting for (proxy/broadcast.py): not waited for again
        # until they answer
        self.stalled_peers: set[str] = set()

    def table_changed(self, table: RoutingTable) -> None:
        """A new table is served: clients of another tenant lose their own connections,
        clients blocked on a slot that left are unblocked (proxy/session.py), and the
        connections to proxies that left the view are closed. Another tenant (or none: the
        node is free) starts from empty statistics: the last one's keys and traffic are
        not shown to it."""
        if table.tenant != self.stats_tenant:
            self.stats_tenant = table.tenant
            self.stats.reset()
            self.key_counts = None
        self.peers.retain({n.address for n in table.nodes}, table.tenant)
        for session in list(self.sessions):
            session.table_changed(table)

    def cut_in_flight(self) -> None:
        """Writes were just fenced: drop every backend connection with commands in flight.
        Their clients get -UNCERTAIN now instead of an acknowledgement later: a Redis that is
        stalled (a long script) would run them after the leader promoted a replica, and the
        acknowledged writes would vanish in the resync."""
        self.pool.drop_in_flight()
        self.migrations.cut_in_flight()
        for session in list(self.sessions):
            for conn in session.owned:
                conn.abort()

    def spawn(self, job: Callable[..., Coroutine[Any, Any, None]], *args: object) -> None:
        """Run `job(*args)` in the server's task group (it ends when the server stops)."""
        assert self.task_group is not None, "the server is not running"
        self.task_group.start_soon(job, *args)
