"""Every test here starts real processes (redis-server, mesh-proxy, etcd): marked
`integration`, so `pytest -m "not integration"` runs the fast suite alone."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)
