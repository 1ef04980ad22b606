"""The node's status key (`status/<id>`): what it has applied and observes, on its lease."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import anyio

from core.nodes import NodeStatus

from .notify import Changed
from .store.repo import MeshRepo

STATUS_HEARTBEAT = 3.0  # the status key is rewritten at least this often


class StatusReporter:
    """Holds the node's current status; `run` publishes it on every change (and at least
    every STATUS_HEARTBEAT) for one lease."""

    def __init__(self, repo: MeshRepo, node_id: str) -> None:
        self.repo = repo
        self.status = NodeStatus(node_id)
        self.changed = Changed()

    def set(self, **changes: Any) -> None:
        new = replace(self.status, **changes)
        if new != self.status:
            self.status = new
            self.changed.notify()

    async def run(self, lease: int) -> None:
        while True:
            changed = self.changed.waiter()
            await self.repo.put_status(replace(self.status, updated=time.time()), lease)
            with anyio.move_on_after(STATUS_HEARTBEAT):
                await changed.wait()
