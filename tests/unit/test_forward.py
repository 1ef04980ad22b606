"""Plain clients' forwards (proxy/forward.py, proxy/plain.py): the pure parts, as tables."""
from __future__ import annotations

import pytest

from proxy.forward import redirect_target
from proxy.plain import _info_reply, _random_key


@pytest.mark.parametrize(("reply", "target"), [
    (b"-MOVED 3999 127.0.0.1:7001\r\n", (3999, "127.0.0.1:7001", False)),
    (b"-ASK 12 10.0.0.5:6379\r\n", (12, "10.0.0.5:6379", True)),
    (b"-MOVED 7 ::1:7000\r\n", (7, "[::1]:7000", False)),  # IPv6 without brackets, as Redis
    (b"-MOVED 7 fe80::1:2:7000\r\n", (7, "[fe80::1:2]:7000", False)),
    (b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n", None),
    (b"-CLUSTERDOWN Hash slot not served\r\n", None),
    (b"$5\r\nMOVED\r\n", None),
    (b"-MOVED 3999\r\n", None),
    (b"-MOVED x 127.0.0.1:7001\r\n", None),
    (b"-MOVED 1 127.0.0.1:notaport\r\n", None),
    (b"-MOVED 1 127.0.0.1:7001 extra\r\n", None),
])
def test_redirect_target_reads_the_slot_and_address_of_moved_and_ask(reply, target):
    assert redirect_target(reply) == target


INFO_HEAD = b"# Server\r\nredis_mode:cluster\r\n\r\n# Cluster\r\ncluster_enabled:1\r\n\r\n"


def bulk(text: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(text), text)


@pytest.mark.parametrize(("local", "keyspaces", "expected"), [
    # the local INFO's keyspace replaced by the sum, standalone markers back
    (INFO_HEAD + b"# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n",
     [b"# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n",
      b"# Keyspace\r\ndb0:keys=5,expires=1,avg_ttl=10\r\n"],
     b"# Server\r\nredis_mode:standalone\r\n\r\n# Cluster\r\ncluster_enabled:0\r\n\r\n"
     b"# Keyspace\r\ndb0:keys=6,expires=1,avg_ttl=10\r\n"),
    # a section after the keyspace stays; the mesh's own db1 is not shown
    (b"# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n\r\n# Proxy\r\nproxy_epoch:3\r\n",
     [b"# Keyspace\r\ndb0:keys=2,expires=0,avg_ttl=0\r\ndb1:keys=1,expires=0,avg_ttl=0\r\n",
      b"# Keyspace\r\n"],
     b"# Keyspace\r\ndb0:keys=2,expires=0,avg_ttl=0\r\n\r\n# Proxy\r\nproxy_epoch:3\r\n"),
    # no keyspace section asked: unchanged but for the markers
    (INFO_HEAD, [b"# Keyspace\r\n"],
     b"# Server\r\nredis_mode:standalone\r\n\r\n# Cluster\r\ncluster_enabled:0\r\n\r\n"),
])
def test_plain_info_is_standalone_with_the_keyspace_of_every_shard(local, keyspaces, expected):
    assert _info_reply([bulk(local)] + [bulk(k) for k in keyspaces]) == bulk(expected)


def test_plain_info_keeps_resp3_verbatim_strings():
    body = b"txt:# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n"
    verbatim = b"=%d\r\n%s\r\n" % (len(body), body)
    merged = _info_reply([verbatim, bulk(b"# Keyspace\r\ndb0:keys=4,expires=0,avg_ttl=0\r\n")])
    text = b"txt:# Keyspace\r\ndb0:keys=4,expires=0,avg_ttl=0\r\n"
    assert merged == b"=%d\r\n%s\r\n" % (len(text), text)


def test_plain_info_passes_a_shards_error_on():
    assert _info_reply([bulk(INFO_HEAD), b"-ERR busy\r\n"]) == b"-ERR busy\r\n"


@pytest.mark.parametrize(("replies", "choices"), [
    ([b"$-1\r\n", b"$1\r\na\r\n", b"$-1\r\n"], {b"$1\r\na\r\n"}),
    ([b"$1\r\na\r\n", b"$1\r\nb\r\n"], {b"$1\r\na\r\n", b"$1\r\nb\r\n"}),
    ([b"$-1\r\n", b"$-1\r\n"], {b"$-1\r\n"}),
    ([b"_\r\n", b"_\r\n"], {b"_\r\n"}),
    ([b"$1\r\na\r\n", b"-ERR x\r\n"], {b"-ERR x\r\n"}),
])
def test_randomkey_of_the_cluster_is_a_key_of_some_shard(replies, choices):
    assert {_random_key(replies) for _ in range(20)} <= choices
