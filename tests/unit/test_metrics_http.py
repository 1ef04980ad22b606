"""node/metrics.py: the metrics port's answers to each kind of request, and which connection
it closes at its cap (no network)."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from node.metrics import MAX_SCRAPES, WRITE_STALL, Holder, answer, closable


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
    response = answer(request_, lambda: generate_latest(registry))
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


def test_only_a_scrape_renders_the_body():
    rendered = []
    answer(b"POST /metrics HTTP/1.1\r\n\r\n", lambda: rendered.append(1) or b"")
    answer(b"GET /x HTTP/1.1\r\n\r\n", lambda: rendered.append(1) or b"")
    assert rendered == []


NOW = 100.0
HEAD = Holder(opened=NOW - 0.5, head_sent=False, writing_since=None)
SERVED = Holder(opened=NOW - 0.1, head_sent=True, writing_since=NOW - 0.05)
STALLED = Holder(opened=NOW - 3, head_sent=True, writing_since=NOW - WRITE_STALL - 0.1)


@pytest.mark.parametrize(("name", "holders", "want"), [
    ("every one being served: the newcomer gets 503", [SERVED] * MAX_SCRAPES, None),
    ("the one still sending its head", [SERVED, HEAD, SERVED], 1),
    ("the oldest of those sending their heads",
     [Holder(NOW - 0.2, False, None), Holder(NOW - 0.9, False, None), SERVED], 1),
    ("one sending its head before one not reading", [STALLED, SERVED, HEAD], 2),
    ("one not reading its response for WRITE_STALL", [SERVED, STALLED], 1),
    ("a response written just now is not stalled",
     [Holder(NOW - 9, True, NOW - WRITE_STALL + 0.01)], None),
])
def test_closable_at_the_cap(name, holders, want):
    assert closable(holders, NOW) == want
