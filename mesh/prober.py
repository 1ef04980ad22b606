"""The leader's probes of nodes' proxies: one connection per node, a PING every
PROBE_INTERVAL; any reply (+PONG, -NOAUTH) means the process runs. Results are `Checks`
(mesh/model/health.py); `suspects()` names the nodes the leader should stop trusting: nothing
listens at the proxy's port for SUSPECT_REFUSED (a killed process), or no reply for
SUSPECT_SILENT (a frozen or unreachable one: longer than a pause the mesh must ride out).

Suspicion only decides when the leader revokes a node's lease; what makes a failover safe is
the fence rule (mesh/model/fencing.py), so a wrong suspicion costs a failover, never a second
master.
"""
from __future__ import annotations

import anyio
import structlog
from anyio.abc import SocketStream

from core.address import Address

from .model.health import SUSPECT_REFUSED, SUSPECT_SILENT, Checks
from .notify import Changed
from .redisctl import connection_refused

log = structlog.get_logger("mesh.prober")

PROBE_INTERVAL = 0.1  # seconds between two PINGs of one proxy
PROBE_TIMEOUT = 0.5  # seconds a proxy has to answer one
PROBE_READ = 4096


class Prober:
    """Probes the nodes `watch()` names (the leader's task group runs `run`)."""

    def __init__(self, wake: Changed) -> None:
        self.wake = wake  # notified when a node becomes a suspect
        self.checks: dict[str, Checks] = {}
        self._targets: dict[str, str] = {}  # node id -> proxy address
        self._targets_changed = Changed()
        self._suspected: frozenset[str] = frozenset()  # logged as such

    def watch(self, targets: dict[str, str]) -> None:
        if targets != self._targets:
            self._targets = dict(targets)
            self._targets_changed.notify()

    def suspects(self, now: float) -> set[str]:
        return {n for n, c in self.checks.items()
                if c.dead(now, SUSPECT_SILENT, SUSPECT_REFUSED)}

    def forget(self, node: str) -> None:
        """Start over for `node` (its lease was revoked: judge its next incarnation afresh)."""
        self.checks.pop(node, None)
        self._suspected = self._suspected - {node}

    async def run(self) -> None:
        while True:
            changed = self._targets_changed.waiter()
            targets = dict(self._targets)
            async with anyio.create_task_group() as tg:
                for node, address in targets.items():
                    tg.start_soon(self._probe, node, Address.parse(address))
                await changed.wait()
                tg.cancel_scope.cancel()
            for node in set(self.checks) - set(self._targets):
                del self.checks[node]

    async def _probe(self, node: str, address: Address) -> None:
        stream: SocketStream | None = None
        try:
            while True:
                ok = refused = False
                connected = stream is not None
                try:
                    with anyio.fail_after(PROBE_TIMEOUT):
                        if stream is None:
                            stream = await anyio.connect_tcp(address.host, address.port)
                        await stream.send(b"PING\r\n")
                        ok = bool(await stream.receive(PROBE_READ))
                except (OSError, TimeoutError, anyio.EndOfStream,
                        anyio.BrokenResourceError) as exc:
                    refused = connection_refused(exc)
                    if stream is not None:
                        await stream.aclose()
                        stream = None
                self._record(node, ok, refused)
                if not ok and not refused and connected:
                    continue  # a connection that worked broke: reconnect at once, so a killed
                    # process shows as refused in this probe, not the next
                await anyio.sleep(PROBE_INTERVAL)
        finally:
            if stream is not None:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()

    def _record(self, node: str, ok: bool, refused: bool) -> None:
        now = anyio.current_time()
        after = self.checks.get(node, Checks()).record(ok, now, refused)
        self.checks[node] = after
        suspected = after.dead(now, SUSPECT_SILENT, SUSPECT_REFUSED)
        if suspected and node not in self._suspected:
            log.warning("node_suspected", node=node,
                        reason="nothing listens" if after.refused else "no reply")
            self.wake.notify()
        self._suspected = self._suspected | {node} if suspected else self._suspected - {node}
