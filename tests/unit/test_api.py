"""The REST API's pure parts (tools/umctl_mesh/api.py) as tables: the token check, request
bodies into ops arguments (or a clear UsageError), ops/s from two INFO reads, failovers seen
between two reads of the views, and the documents the page draws."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from core.nodes import Assignment, NodeRecord, NodeStatus
from core.view import ClusterConfig, Migration, MigrationState
from tests.unit.test_view import make_view
from tools.umctl_mesh import api, ops

TOKEN = "t" * 20


@pytest.mark.parametrize("header, token, ok", [
    (f"Bearer {TOKEN}", TOKEN, True),
    (f"bearer   {TOKEN}  ", TOKEN, True),
    (f"Bearer {TOKEN}x", TOKEN, False),
    (f"Bearer {TOKEN[:-1]}", TOKEN, False),
    (f"Basic {TOKEN}", TOKEN, False),
    (TOKEN, TOKEN, False),
    ("Bearer ", TOKEN, False),
    ("", TOKEN, False),
    (None, TOKEN, False),
    (f"Bearer {TOKEN}", None, False),  # no token configured: nothing matches
    ("Bearer ", None, False),
])
def test_the_bearer_token(header, token, ok):
    assert api.token_matches(header, token) is ok


@pytest.mark.parametrize("text, error", [
    ("short", "shorter than 16"),
    ("a" * 15, "shorter than 16"),
    ("a" * 10 + " " + "b" * 10, "spaces or control"),
    ("a" * 16 + "\x01", "spaces or control"),
])
def test_a_weak_or_malformed_token_is_refused(text, error):
    with pytest.raises(ops.UsageError, match=error):
        api.check_token(text, "in F")


def test_a_token_line_loses_its_newline():
    assert api.check_token(TOKEN + "\n", "in F") == TOKEN


@pytest.mark.parametrize("raw, doc, error", [
    (b"", {}, None),
    (b"  \n", {}, None),
    (b'{"shards": 3}', {"shards": 3}, None),
    (b"[1]", None, "must be a JSON object"),
    (b"{", None, "not JSON"),
    (b"\xff", None, "not JSON"),
    (b" " * (api.MAX_BODY_BYTES + 1), None, f"over {api.MAX_BODY_BYTES} bytes"),
])
def test_request_bodies(raw, doc, error):
    if error:
        with pytest.raises(ops.UsageError, match=error):
            api.parse_body(raw)
    else:
        assert api.parse_body(raw) == doc


@pytest.mark.parametrize("body, expected, error", [
    ({"shards": 3}, api.ScaleRequest(3, None, False), None),
    ({"replicas": 0, "dry_run": True}, api.ScaleRequest(None, 0, True), None),
    ({"shards": 2, "replicas": 1}, api.ScaleRequest(2, 1, False), None),
    ({}, None, "shards and/or replicas"),
    ({"shards": 0}, None, "shards must be at least 1"),
    ({"shards": "3"}, None, "shards must be an integer"),
    ({"shards": True}, None, "shards must be an integer"),
    ({"shards": 2.5}, None, "shards must be an integer"),
    ({"replicas": -1}, None, "replicas must be at least 0"),
    ({"shards": 2, "dry_run": "yes"}, None, "dry_run must be true or false"),
    ({"shards": 2, "shard": 3}, None, "unknown field shard; expected dry_run, replicas, shards"),
])
def test_scale_requests(body, expected, error):
    if error:
        with pytest.raises(ops.UsageError, match=error):
            api.scale_request(body)
    else:
        assert api.scale_request(body) == expected


@pytest.mark.parametrize("body, expected, error", [
    ({"slots": ["0-99", "200"], "to": "s2"}, api.MigrateRequest(((0, 99), (200, 200)), "s2", False),
     None),
    ({"slots": "100-199, 0-99 300", "to": "s1", "dry_run": True},
     api.MigrateRequest(((0, 199), (300, 300)), "s1", True), None),
    ({"slots": ["0-99"]}, None, "to is required"),
    ({"slots": ["0-99"], "to": ""}, None, "to must be a non-empty string"),
    ({"slots": [], "to": "s1"}, None, "slots must be a list"),
    ({"slots": [5], "to": "s1"}, None, "slots must be a list"),
    ({"slots": ["99-0"], "to": "s1"}, None, "invalid slot range '99-0'"),
    ({"slots": ["16384"], "to": "s1"}, None, "invalid slot range '16384'"),
    ({"slots": [str(i) for i in range(api.MAX_RANGES + 1)], "to": "s1"}, None,
     f"at most {api.MAX_RANGES} slot ranges"),
])
def test_migrate_requests(body, expected, error):
    if error:
        with pytest.raises(ops.UsageError, match=error):
            api.migrate_request(body)
    else:
        assert api.migrate_request(body) == expected


@pytest.mark.parametrize("body, expected, error", [
    ({"name": "a", "shards": 2}, api.CreateRequest("a", 2, 0, None, 0, None), None),
    ({"name": "a", "shards": 2, "replicas": 1, "password": "pw", "min_replicas_ack": 1,
      "migration_rate": 0}, api.CreateRequest("a", 2, 1, "pw", 1, 0), None),
    ({"shards": 2}, None, "name is required"),
    ({"name": "a"}, None, "shards is required"),
    ({"name": "a", "shards": 2, "migration_rate": -1}, None, "migration_rate must be 0 to"),
    ({"name": "a", "shards": 2, "password": 5}, None, "password must be a non-empty string"),
])
def test_create_requests(body, expected, error):
    if error:
        with pytest.raises(ops.UsageError, match=error):
            api.create_request(body)
    else:
        assert api.create_request(body) == expected


def test_failover_and_bodiless_requests():
    assert api.failover_request({"shard": "s1"}) == api.FailoverRequest("s1", None)
    assert api.failover_request({"shard": "s1", "to": "n2"}) == api.FailoverRequest("s1", "n2")
    with pytest.raises(ops.UsageError, match="shard is required"):
        api.failover_request({})
    api.empty_request({}, "cancel")
    with pytest.raises(ops.UsageError, match="cancel takes no fields, got x"):
        api.empty_request({"x": 1}, "cancel")


S = api.Sample


@pytest.mark.parametrize("before, now, rates", [
    ({}, {"a": S(100, 1, 10.0)}, {"a": None}),  # first read
    ({"a": S(100, 1, 10.0)}, {"a": S(301, 1, 12.0)}, {"a": 100.0}),  # less our own INFO
    ({"a": S(100, 1, 10.0)}, {"a": S(103, 1, 11.0, own=3)}, {"a": 0.0}),  # a fresh connection
    ({"a": S(100, 1, 10.0)}, {"a": S(100, 1, 11.0)}, {"a": 0.0}),  # never below 0
    ({"a": S(500, 1, 10.0)}, {"a": S(40, 2, 11.0)}, {"a": None}),  # restarted: another pid
    ({"a": S(500, 1, 10.0)}, {"a": S(40, 1, 11.0)}, {"a": None}),  # counter went back
    ({"a": S(100, 1, 10.0)}, {"a": S(200, 1, 10.0)}, {"a": None}),  # no time passed
    ({"a": S(1, 1, 1.0), "gone": S(1, 1, 1.0)}, {"a": S(12, 1, 2.0)}, {"a": 10.0}),
])
def test_ops_per_second(before, now, rates):
    assert api.ops_rates(before, now) == rates


@pytest.mark.parametrize("text, sample", [
    (b"# Proxy\r\nproxy_pid:42\r\nproxy_commands_processed:1234\r\n", S(1234, 42, 0.0)),
    (b"# Proxy\r\nproxy_pid:42\r\n", None),
    (b"proxy_pid:x\r\nproxy_commands_processed:1\r\n", None),
    (b"", None),
])
def test_info_proxy_is_read(text, sample):
    assert api.parse_proxy_info(text) == sample


def test_failovers_are_master_changes_of_one_creation():
    view = replace(make_view(2, 1), uid="u1")  # s1: node-0 (+node-1), s2: node-2 (+node-3)
    s1, s2 = view.shards
    swapped = view.next(shards=(replace(s1, master="node-1", replicas=("node-0",)), s2),
                        failed=("node-0",))
    assert api.failovers({"mydb": view}, {"mydb": swapped}, 5.0) == [
        {"at": 5.0, "cluster": "mydb", "shard": "s1", "from": "node-0", "to": "node-1",
         "epoch": 2, "from_failed": True}]
    # nothing before, the same epoch, or another creation under the same name: no event
    assert api.failovers({}, {"mydb": swapped}, 5.0) == []
    assert api.failovers({"mydb": swapped}, {"mydb": swapped}, 5.0) == []
    assert api.failovers({"mydb": view}, {"mydb": replace(swapped, uid="u2")}, 5.0) == []
    # a scale (no master changed) is none either
    assert api.failovers({"mydb": view}, {"mydb": view.next()}, 5.0) == []


def pool_of(view, **statuses):  # noqa: ANN001, ANN201
    nodes = {nid: NodeRecord(nid, a.proxy, a.backend, host=f"h{i % 2}")
             for i, (nid, a) in enumerate(view.nodes)}
    base = {nid: NodeStatus(nid, view.cluster, view.uid, view.epoch,
                            "master" if any(s.master == nid for s in view.shards) else "replica")
            for nid in view.node_ids}
    base.update(statuses)
    assignments = {nid: ops.Held(Assignment(view.cluster), 1) for nid in view.node_ids}
    return ops.Pool(nodes, base, assignments, {view.cluster: ops.ViewAt(view, 7)}, "node-2")


def test_node_rows_and_hosts():
    view = replace(make_view(2, 1), uid="u1", epoch=3)
    pool = pool_of(view, **{
        "node-1": NodeStatus("node-1", "mydb", "u1", 3, "replica", synced=False),
        "node-3": NodeStatus("node-3", "mydb", "u1", 2, "replica")})
    free = NodeRecord("node-9", "127.0.0.1:7009", "127.0.0.1:17009")
    pool = replace(pool, nodes={**pool.nodes, "node-9": free},
                   statuses={**pool.statuses, "node-9": NodeStatus("node-9")})
    rows = api.node_rows(pool, {"node-0": 12.5})
    by = {r["node"]: r for r in rows}
    assert [r["node"] for r in rows] == ["node-0", "node-1", "node-2", "node-3", "node-9"]
    assert [(by[n]["role"], by[n]["health"], by[n]["applied_epoch"]) for n in by] == [
        ("master", "ok", 3), ("replica", "syncing", 3), ("master", "ok", 3),
        ("replica", "behind", 2), ("free", "ok", None)]
    assert by["node-0"]["ops_per_sec"] == 12.5 and by["node-1"]["ops_per_sec"] is None
    assert by["node-2"]["leader"] and not by["node-0"]["leader"]
    assert [(h["host"], [n["node"] for n in h["nodes"]]) for h in api.hosts(rows)] == [
        ("h0", ["node-0", "node-2"]), ("h1", ["node-1", "node-3"]), ("", ["node-9"])]


def test_the_cluster_document_has_the_slot_map_migrations_and_lost_notes():
    view = replace(make_view(2, 1), uid="u1", failed=("node-1",),
                   lost=("epoch 2: shard s9 lost every node",),
                   config=ClusterConfig(password_hash="ab" * 32, replicas=1),
                   migrations=(Migration(((0, 99),), "s1", "s2", 1, MigrationState.MIGRATING),))
    doc = api.cluster_doc(view, pool_of(view))
    assert [(s["id"], s["slots"], s["slot_count"], s["master"]) for s in doc["shards"]] == [
        ("s1", [[0, 8191]], 8192, "node-0"), ("s2", [[8192, 16383]], 8192, "node-2")]
    assert [(n["node"], n["role"], n["failed"]) for n in doc["shards"][0]["nodes"]] == [
        ("node-0", "master", False), ("node-1", "replica", True)]
    assert doc["lost"] == ["epoch 2: shard s9 lost every node"] and doc["password"] is True
    assert [(m["id"], m["slot_count"], m["state"]) for m in doc["migrations"]] == [
        ("s1>s2@1", 100, "migrating")]
    json.dumps(doc)  # JSON as it is


def test_the_view_document_hides_the_password_hash():
    view = replace(make_view(1, 0), config=ClusterConfig(password_hash="ab" * 32))
    doc = api.view_doc(view, 12)
    assert doc["config"]["password"] is True and "password_hash" not in doc["config"]
    assert "ab" * 32 not in json.dumps(doc)
    assert doc["revision"] == 12 and doc["shards"][0]["slots"] == [[0, 16383]]


def test_change_documents():
    view = make_view(2, 0)
    assert api.change_doc(view, view)["changed"] is False
    grown = view.next(migrations=(Migration(((0, 9),), "s1", "s2", 2, MigrationState.PENDING),))
    doc = api.change_doc(view, grown)
    assert doc["changed"] and doc["epoch"] == 2 and doc["was_epoch"] == 1
    assert doc["migrations"] == [{"slots": [[0, 9]], "slot_count": 10, "from": "s1",
                                  "to": "s2", "state": "pending"}]


@pytest.mark.parametrize("argv, message", [
    (["serve", "--listen", "nohost"], "argument --listen: expected HOST:PORT, got 'nohost'"),
    (["serve", "--listen", "127.0.0.1:99999"], "argument --listen:"),
    (["serve", "--token-file", "{short}"], "is shorter than 16 characters"),
    (["serve", "--token-file", "{missing}"], "cannot read"),
    (["serve", "--allow-host", "mesh.example:8470"], "expected a host name or an IP address"),
    (["serve", "--allow-host", "*.example"], "expected a host name or an IP address"),
    (["serve", "--allow-host", ""], "expected a host name or an IP address"),
])
def test_serve_refuses_bad_arguments_before_reaching_etcd(argv, message, tmp_path, capsys):
    from tools.umctl_mesh.cli import build_parser

    (tmp_path / "short").write_text("abc\n")
    argv = [a.format(short=tmp_path / "short", missing=tmp_path / "missing") for a in argv]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_serve_reads_its_token_file(tmp_path):
    from tools.umctl_mesh.cli import build_parser

    (tmp_path / "token").write_text(TOKEN + "\nignored\n")
    args = build_parser().parse_args(["serve", "--token-file", str(tmp_path / "token")])
    assert args.token_file.token == TOKEN and str(args.listen) == "127.0.0.1:8470"


@pytest.mark.parametrize("listen, extra, want", [
    ("127.0.0.1", [], ["127.0.0.1", "localhost", "[::1]"]),
    ("::1", [], ["[::1]", "localhost", "127.0.0.1"]),
    ("127.0.0.2", [], ["127.0.0.2", "localhost", "127.0.0.1", "[::1]"]),
    ("localhost", [], ["localhost", "127.0.0.1", "[::1]"]),
    ("10.1.2.3", [], ["10.1.2.3"]),
    ("10.1.2.3", ["mesh.example", "fd00::1", "10.1.2.3"], ["10.1.2.3", "mesh.example",
                                                          "[fd00::1]"]),
    ("fd00::7", ["mesh.example"], ["[fd00::7]", "mesh.example"]),
    ("Dash.Example", [], ["dash.example"]),
    ("0.0.0.0", ["mesh.example"], ["0.0.0.0", "mesh.example", "localhost", "127.0.0.1",
                                   "[::1]"]),
])
def test_allowed_hosts(listen, extra, want):
    from tools.umctl_mesh.serve import allowed_hosts

    assert allowed_hosts(listen, extra) == want


def test_allow_host_on_loopback_is_refused():
    from tools.umctl_mesh.serve import allowed_hosts

    with pytest.raises(ops.UsageError, match="--allow-host is for a server off loopback"):
        allowed_hosts("127.0.0.1", ["mesh.example"])


@pytest.mark.parametrize("given, kept", [("Mesh.Example", "mesh.example"), ("[::1]", "::1"),
                                         ("10.0.0.1", "10.0.0.1"), ("a-b.c", "a-b.c")])
def test_allow_host_values(given, kept):
    from tools.umctl_mesh.cli import build_parser

    args = build_parser().parse_args(["serve", "--allow-host", given, "--allow-host", "x.y"])
    assert args.allow_host == [kept, "x.y"]
