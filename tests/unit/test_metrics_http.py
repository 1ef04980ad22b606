"""node/metrics.py: the metrics port's answers to each kind of request (no network)."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter

from node.metrics import answer


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("moonmesh_probe", "a test family", registry=registry).inc(3)
    return registry


@pytest.mark.parametrize(("request_", "status"), [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200 OK"),
    (b"GET / HTTP/1.0\r\n\r\n", b"200 OK"),
    (b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", b"200 OK"),
    (b"HEAD /metrics HTTP/1.1\r\n\r\n", b"200 OK"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405 Method Not Allowed"),
    (b"GET /other HTTP/1.1\r\n\r\n", b"404 Not Found"),
    (b"GET /metrics\r\n\r\n", b"400 Bad Request"),
    (b"GET /metrics SPDY/3\r\n\r\n", b"400 Bad Request"),
    (b"\xff\xfe\r\n\r\n", b"400 Bad Request"),
])
def test_answers(registry, request_, status):
    response = answer(request_, registry)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status)
    assert b"Connection: close" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    if request_.startswith(b"HEAD"):
        assert body == b"" and length > 0
    else:
        assert len(body) == length
    if status == b"200 OK" and not request_.startswith(b"HEAD"):
        assert b"moonmesh_probe_total 3.0" in body
