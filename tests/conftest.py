from __future__ import annotations

import pytest

from tests import procs


@pytest.fixture
def spawn():
    """Start real processes; every one is stopped and its directory removed afterwards."""
    started: list[procs.Process] = []

    class Spawner:
        def redis(self, *args: str) -> procs.Process:
            p = procs.start_redis(None, *args)
            started.append(p)
            return p

        def proxy(self, backend, *args: str) -> procs.Process:
            p = procs.start_proxy(backend, None, *args)
            started.append(p)
            return p

    yield Spawner()
    procs.cleanup(started)


@pytest.fixture
def redis_server(spawn) -> procs.Process:
    return spawn.redis()
