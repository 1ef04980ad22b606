"""umctl-mesh's parsing, output and view edits over the in-memory store of test_mesh_repo
(no etcd): `migrate throttle`, `cluster create --migration-rate`, `cluster show`, and
`cluster scale --replicas` through the one compare-and-swap edit path."""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest

from core.nodes import NodeRecord, NodeStatus
from core.view import MAX_MIGRATION_RATE, ClusterConfig
from mesh.store.repo import MeshRepo, ViewCommit
from tests.unit.test_mesh_repo import MemoryStore
from tests.unit.test_view import make_view
from tools.umctl_mesh import cli, ops

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def mesh_with(view=None) -> MemoryStore:  # noqa: ANN001
    """A store holding `view` (default: mydb, 2 shards of master + replica) as umctl-mesh
    created it, with every member registered, its Redis up and on the view's epoch."""
    view = view or make_view(2, 1)
    store = MemoryStore()
    repo = MeshRepo(store)  # type: ignore[arg-type]  # duck-typed: the part of EtcdStore it uses
    assert await repo.commit_view(view.cluster, 0, view, ViewCommit(claim=view.node_ids))
    for lease, (nid, address) in enumerate(view.nodes, 1):
        await add_node(store, nid, address.proxy, address.backend, lease)
        shard = view.shard_of(nid)
        await repo.put_status(NodeStatus(nid, view.cluster, view.uid, view.epoch,
                                         "master" if shard and shard.master == nid else "replica"),
                              lease=lease)
    return store


async def add_node(store: MemoryStore, nid: str, proxy: str, backend: str, lease: int) -> None:
    repo = MeshRepo(store)  # type: ignore[arg-type]
    await repo.register(NodeRecord(nid, proxy, backend, host=nid), lease=lease)
    await repo.put_status(NodeStatus(nid), lease=lease)


async def stored(store: MemoryStore, name: str = "mydb"):  # noqa: ANN201
    return (await MeshRepo(store).view(name)).view  # type: ignore[arg-type, union-attr]


async def umctl(store: MemoryStore, *argv: str) -> int:
    """Run one command as main() does, minus etcd: parse, then the command on `store`."""
    args = cli.build_parser().parse_args(argv)
    args.mesh_secret = None
    try:
        return await args.func(store, args)
    except ops.UsageError as exc:
        print(f"umctl-mesh: {exc}", file=sys.stderr)
        return cli.EXIT_USAGE
    except ops.OpError as exc:
        print(f"umctl-mesh: {exc}", file=sys.stderr)
        return cli.EXIT_FAILED


# -- parsing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, rate", [
    ("5000", 5000), ("0", 0), ("default", "default"), (str(MAX_MIGRATION_RATE), MAX_MIGRATION_RATE),
])
def test_rate_arguments(text, rate):
    args = cli.build_parser().parse_args(["migrate", "throttle", "orders", "--rate", text])
    assert args.words == ["throttle", "orders"] and args.rate == rate
    args = cli.build_parser().parse_args(["cluster", "create", "orders", "--shards", "1",
                                          "--migration-rate", text])
    assert args.migration_rate == rate


def test_create_without_a_rate_leaves_it_to_the_nodes():
    args = cli.build_parser().parse_args(["cluster", "create", "orders", "--shards", "1"])
    assert args.migration_rate is None


@pytest.mark.parametrize("text", ["-1", "fast", "1.5", "", str(MAX_MIGRATION_RATE + 1),
                                  "Default"])
def test_a_bad_rate_is_a_usage_error(text, capsys):
    for argv in (["migrate", "throttle", "orders", "--rate", text],
                 ["cluster", "create", "orders", "--shards", "1", "--migration-rate", text]):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == cli.EXIT_USAGE
        assert f"{text!r} is not a rate" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ("migrate", "throttle", "mydb"),  # no --rate
    ("migrate", "throttle", "--rate", "5"),  # no cluster
    ("migrate", "throttle", "mydb", "other", "--rate", "5"),
    ("migrate", "throttle", "mydb", "--rate", "5", "--slots", "0-1", "--to", "s2"),
    ("migrate", "mydb", "--slots", "0-1", "--to", "s2", "--rate", "5"),  # --rate is throttle's
    ("migrate", "cancel", "mydb", "--rate", "5"),
])
async def test_throttle_usage_errors_exit_2_and_write_nothing(argv, capsys):
    store = await mesh_with()
    before = store.transactions
    assert await umctl(store, *argv) == cli.EXIT_USAGE
    assert "umctl-mesh: " in capsys.readouterr().err
    assert store.transactions == before


def test_help_names_the_throttle(capsys):
    with pytest.raises(SystemExit):
        cli.main(["migrate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "migrate throttle NAME --rate N" in out and "--rate N|default" in out
    with pytest.raises(SystemExit):
        cli.main(["cluster", "create", "--help"])
    assert "--migration-rate N" in capsys.readouterr().out


# -- migrate throttle ------------------------------------------------------------------------

async def test_throttle_edits_the_view_and_says_what_changed(capsys):
    store = await mesh_with()
    assert (await stored(store)).config.migration_rate is None
    steps = [("5000", 5000, "mydb: migration rate default (node flag) -> 5000 keys/s"),
             ("20000", 20000, "mydb: migration rate 5000 -> 20000 keys/s"),
             ("0", 0, "mydb: migration rate 20000 keys/s -> unlimited"),
             ("default", None, "mydb: migration rate unlimited -> default (node flag)")]
    for epoch, (text, rate, said) in enumerate(steps, 2):
        assert await umctl(store, "migrate", "throttle", "mydb", "--rate", text) == 0
        assert capsys.readouterr().out.strip() == said
        view = await stored(store)
        assert (view.epoch, view.config.migration_rate) == (epoch, rate)
        # nothing else of the view changed
        assert replace(view, epoch=1, config=replace(view.config, migration_rate=None)) \
            == make_view(2, 1)


async def test_the_same_rate_again_is_already_so_and_writes_nothing(capsys):
    view = make_view(2, 1)
    store = await mesh_with(replace(view, config=ClusterConfig(migration_rate=5000)))
    before = store.transactions
    assert await umctl(store, "migrate", "throttle", "mydb", "--rate", "5000") == 0
    assert capsys.readouterr().out.strip() == "mydb: migration rate already 5000 keys/s"
    assert await umctl(store, "--json", "migrate", "throttle", "mydb", "--rate", "5000") == 0
    assert json.loads(capsys.readouterr().out) == {
        "cluster": "mydb", "epoch": 1, "migration_rate": 5000, "was": 5000, "changed": False,
        "dry_run": False}
    assert store.transactions == before and (await stored(store)).epoch == 1
    fresh = await mesh_with()
    before = fresh.transactions
    assert await umctl(fresh, "migrate", "throttle", "mydb", "--rate", "default") == 0
    assert capsys.readouterr().out.strip() == "mydb: migration rate already default (node flag)"
    assert fresh.transactions == before


async def test_throttle_json_dry_run_and_wait(capsys):
    store = await mesh_with()
    before = store.transactions
    assert await umctl(store, "migrate", "throttle", "mydb", "--rate", "700", "--dry-run") == 0
    assert capsys.readouterr().out.strip() == (
        "mydb: migration rate default (node flag) -> 700 keys/s (dry run: nothing written)")
    assert store.transactions == before and (await stored(store)).config.migration_rate is None
    assert await umctl(store, "migrate", "throttle", "mydb", "--rate", "700", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {
        "cluster": "mydb", "epoch": 2, "migration_rate": 700, "was": None, "changed": True,
        "dry_run": False}
    # --wait: the nodes (statuses still at epoch 1 here) never apply epoch 3
    code = await umctl(store, "--json", "migrate", "throttle", "mydb", "--rate", "0", "--wait",
                       "--timeout", "0.3")
    out = capsys.readouterr()
    assert code == cli.EXIT_FAILED and "have not applied epoch 3 after 0.3s" in out.err
    assert json.loads(out.out)["not_applied"] == sorted(make_view(2, 1).node_ids)
    view = await stored(store)
    repo = MeshRepo(store)  # type: ignore[arg-type]
    for lease, nid in enumerate(view.node_ids, 1):
        await repo.put_status(NodeStatus(nid, "mydb", view.uid, view.epoch + 1), lease=lease)
    assert await umctl(store, "--json", "migrate", "throttle", "mydb", "--rate", "9",
                       "--wait", "--timeout", "5") == 0
    assert json.loads(capsys.readouterr().out)["not_applied"] == []


async def test_throttle_of_an_unknown_cluster_fails(capsys):
    store = await mesh_with()
    assert await umctl(store, "migrate", "throttle", "nosuch", "--rate", "5") == cli.EXIT_FAILED
    assert capsys.readouterr().err.strip() == "umctl-mesh: unknown cluster 'nosuch'"


async def test_set_migration_rate_refuses_what_the_view_would_refuse():
    store = await mesh_with()
    for rate in (-1, MAX_MIGRATION_RATE + 1):
        with pytest.raises(ops.OpError, match="--rate must be 0 \\(no limit\\) to 10000000"):
            await ops.set_migration_rate(store, "mydb", rate)  # type: ignore[arg-type]


# -- cluster create and show -----------------------------------------------------------------

async def free_pool(nodes: int) -> MemoryStore:
    store = MemoryStore()
    for i in range(nodes):
        await add_node(store, f"free-{i}", f"127.0.0.1:{7100 + i}", f"127.0.0.1:{17100 + i}",
                       i + 1)
    return store


async def test_create_declares_the_rate_and_show_prints_it(capsys):
    store = await free_pool(2)
    assert await umctl(store, "--json", "cluster", "create", "orders", "--shards", "2",
                       "--migration-rate", "3000", "--no-wait") == 0
    assert json.loads(capsys.readouterr().out)["migration_rate"] == 3000
    assert (await stored(store, "orders")).config.migration_rate == 3000
    assert await umctl(store, "cluster", "show", "orders") == 0
    assert "migration rate: 3000 keys/s" in capsys.readouterr().out.splitlines()
    assert await umctl(store, "migrate", "throttle", "orders", "--rate", "0") == 0
    capsys.readouterr()
    assert await umctl(store, "cluster", "show", "orders") == 0
    assert "migration rate: unlimited" in capsys.readouterr().out.splitlines()


async def test_show_without_a_rate_says_the_node_flag_decides(capsys):
    store = await free_pool(1)
    assert await umctl(store, "cluster", "create", "orders", "--shards", "1", "--no-wait") == 0
    capsys.readouterr()
    assert (await stored(store, "orders")).config.migration_rate is None
    assert await umctl(store, "cluster", "show", "orders") == 0
    assert "migration rate: default (node flag)" in capsys.readouterr().out.splitlines()
    assert await umctl(store, "--json", "cluster", "show", "orders") == 0
    assert json.loads(capsys.readouterr().out)["migration_rate"] is None


# -- cluster scale --replicas, through _edit_view --------------------------------------------

async def test_scale_replicas_claims_and_releases_in_one_commit(capsys):
    store = await mesh_with(replace(make_view(2, 0), config=ClusterConfig(migration_rate=42)))
    await add_node(store, "free-a", "127.0.0.1:7200", "127.0.0.1:17200", 10)
    await add_node(store, "free-b", "127.0.0.1:7201", "127.0.0.1:17201", 11)
    repo = MeshRepo(store)  # type: ignore[arg-type]
    before = store.transactions
    plan = await ops.scale_replicas(store, "mydb", 1, dry_run=True)
    assert plan.new.config.replicas == 1 and sorted(n for ns in plan.added.values()
                                                    for n in ns) == ["free-a", "free-b"]
    assert store.transactions == before  # a dry run writes nothing
    plan = await ops.scale_replicas(store, "mydb", 1, dry_run=False)
    view = await stored(store)
    assert view == plan.new and view.epoch == 2 and view.config.migration_rate == 42
    assert all(len(s.replicas) == 1 for s in view.shards)
    assert set(await repo.assigned()) == set(view.node_ids)
    again = await ops.scale_replicas(store, "mydb", 1, dry_run=False)
    assert again.new is again.old and (await stored(store)).epoch == 2  # already so
    down = await ops.scale_replicas(store, "mydb", 0, dry_run=False)
    assert sorted(n for ns in down.removed.values() for n in ns) == ["free-a", "free-b"]
    assert set(await repo.assigned()) == {"node-0", "node-1"}  # the replicas went back
    with pytest.raises(ops.OpError, match="unknown cluster 'nosuch'"):
        await ops.scale_replicas(store, "nosuch", 1, dry_run=False)


async def test_an_edit_that_keeps_losing_the_race_gives_up():
    store = await mesh_with()
    commit = store.commit

    async def always_lose(checks, puts, deletes=(), *, fence=None):  # noqa: ANN001, ANN202
        await commit({}, {}, ())  # someone else wrote meanwhile
        return False

    store.commit = always_lose  # type: ignore[method-assign]
    for edit in (ops.set_migration_rate(store, "mydb", 5),
                 ops.scale_replicas(store, "mydb", 1, dry_run=False)):  # declares 0 so far
        with pytest.raises(ops.OpError, match="cluster 'mydb' kept changing; try again"):
            await edit
    assert (await stored(store)).epoch == 1


# -- the rough edges a new user meets --------------------------------------------------------

def test_version_prints_the_project_version(capsys):
    from core import __version__

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"umctl-mesh {__version__}"


async def test_what_is_already_so_exits_0_with_a_message_and_writes_nothing(capsys):
    store = await mesh_with()  # 2 shards, even split, no migration
    before = store.transactions
    cases = [(("cluster", "rebalance", "mydb"),
              "cluster mydb is already balanced: its 2 shards' slot counts differ by at most one"),
             (("cluster", "scale", "mydb", "--shards", "2"), "cluster mydb already has 2 shards"),
             (("migrate", "cancel", "mydb"), "cluster mydb has no migrations to cancel"),
             (("migrate", "mydb", "--slots", "0-100", "--to", "s1"),
              "shard s1 of mydb already owns those slots")]
    for argv, said in cases:
        assert await umctl(store, *argv) == 0, argv
        assert capsys.readouterr().out.strip() == said
        assert await umctl(store, *argv, "--wait", "--timeout", "1") == 0, argv
        capsys.readouterr()
        assert await umctl(store, "--json", *argv) == 0, argv
        assert json.loads(capsys.readouterr().out)["changed"] is False
    assert store.transactions == before and (await stored(store)).epoch == 1


@pytest.mark.parametrize("argv", [
    ("migrate", "mydb"),  # no --slots/--to
    ("migrate", "mydb", "--slots", "0-10"),  # no --to
    ("migrate", "cancel"),
    ("migrate", "mydb", "--slots", "99999", "--to", "s2"),
    ("cluster", "scale", "mydb", "--shards", "0"),
    ("cluster", "scale", "mydb", "--replicas", "17"),
    ("cluster", "scale", "mydb"),
    ("cluster", "create", "bad name", "--shards", "1"),
    ("cluster", "create", "other", "--shards", "0"),
    ("cluster", "create", "other", "--shards", "1", "--min-replicas-ack", "1"),
    ("check", "mydb", "--sample", "-1"),
    ("check", "mydb", "--timeout", "0"),
])
async def test_wrong_arguments_exit_2_whatever_the_mesh_holds(argv, capsys):
    store = await mesh_with()
    before = store.transactions
    assert await umctl(store, *argv) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("umctl-mesh: ")
    assert store.transactions == before


@pytest.mark.parametrize("argv", [
    ["up", "--port", "65533"], ["up", "--port", "0"], ["up", "--port", "-1"],
    ["up", "--port", "45534"],  # 6 nodes: the last plain listener would be 65539
    ["up", "--shards", "0"], ["up", "--standalone", "--port", "65000"],
])
def test_up_with_ports_that_cannot_be_exits_2_before_starting_anything(argv, capsys):
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("umctl-mesh: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_up_port_range_is_exact():
    from tools.umctl_mesh import local

    # 6 nodes: metrics ports 65530..65535
    args = cli.build_parser().parse_args(["up", "--port", "35530"])
    proxies, redis, plain = local.check_shape(args)
    assert proxies == list(range(35530, 35536)) and proxies[-1] + local.METRICS_PORT_OFFSET == 65535
    assert redis == [p + local.REDIS_PORT_OFFSET for p in proxies]
    assert plain == [p + local.PLAIN_PORT_OFFSET for p in proxies]
    with pytest.raises(local.UsageError, match="PORT must be 1 to 35530"):
        local.check_shape(cli.build_parser().parse_args(["up", "--port", "35531"]))


class ClosedPipe:
    """stdout whose reader went away: every flush fails as a pipe's would."""

    def __init__(self, file) -> None:  # noqa: ANN001
        self.file = file

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        return self.file.fileno()


def test_a_reader_that_goes_away_ends_it_quietly(monkeypatch, tmp_path, capsys):
    with open(tmp_path / "out", "w") as file:
        monkeypatch.setattr(sys, "stdout", ClosedPipe(file))
        assert cli.main(["--version"]) == cli.EXIT_PIPE
    assert capsys.readouterr().err == ""


# -- where etcd is -----------------------------------------------------------------------------

def test_the_etcd_endpoint_comes_from_the_flag_the_variable_the_file_up_wrote_or_the_default(
        monkeypatch, tmp_path):
    from tools.umctl_mesh import local

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("MOONMESH_ETCD", raising=False)
    assert local.endpoint_file() == tmp_path / "moonmesh" / "etcd"
    assert cli.etcd_endpoint(None) == ("127.0.0.1:2379", "the default: no --etcd, no "
                                       "$MOONMESH_ETCD, no running `umctl-mesh up`")
    local.write_endpoint("127.0.0.1:40001")
    endpoint, source = cli.etcd_endpoint(None)
    assert endpoint == "127.0.0.1:40001" and str(local.endpoint_file()) in source
    monkeypatch.setenv("MOONMESH_ETCD", "10.0.0.1:2379")
    assert cli.etcd_endpoint(None) == ("10.0.0.1:2379", "from $MOONMESH_ETCD")
    assert cli.etcd_endpoint("10.0.0.2:2379") == ("10.0.0.2:2379", "from --etcd")
    # another `up` took the file over: the first one's stop leaves it alone
    local.write_endpoint("127.0.0.1:40002")
    local.remove_endpoint("127.0.0.1:40001")
    assert local.read_endpoint() == "127.0.0.1:40002"
    local.remove_endpoint("127.0.0.1:40002")
    assert not local.endpoint_file().exists() and local.read_endpoint() is None


def test_without_xdg_runtime_dir_the_file_is_in_the_home(monkeypatch, tmp_path):
    from tools.umctl_mesh import local

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert local.endpoint_file() == tmp_path / ".moonmesh" / "etcd"


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers (no etcd behind it)."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_an_unreachable_etcd_fails_fast_naming_the_endpoint_and_the_fix(kind, silent_port,
                                                                        monkeypatch, capsys):
    import time

    from tools.launch import free_port

    port = free_port() if kind == "refused" else silent_port
    monkeypatch.setenv("MOONMESH_ETCD", f"127.0.0.1:{port}")
    started = time.monotonic()
    assert cli.main(["nodes"]) == cli.EXIT_ETCD
    assert time.monotonic() - started < 3
    assert capsys.readouterr().err.strip() == (
        f"umctl-mesh: etcd unreachable at 127.0.0.1:{port} (from $MOONMESH_ETCD); give "
        "--etcd HOST:PORT or set $MOONMESH_ETCD")


# -- cluster delete asks first ---------------------------------------------------------------

class Terminal:
    """stdin on a terminal where the operator types `typed`."""

    def __init__(self, typed: str) -> None:
        self.typed = typed

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        return self.typed + "\n"


async def test_delete_without_a_terminal_needs_yes(monkeypatch, capsys):
    import io

    store = await mesh_with()
    monkeypatch.setattr(sys, "stdin", io.StringIO("mydb\n"))  # a pipe: typing is no answer
    before = store.transactions
    assert await umctl(store, "cluster", "delete", "mydb") == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == (
        "umctl-mesh: cluster delete asks for confirmation on a terminal; without one, add "
        "--yes: umctl-mesh cluster delete mydb --yes")
    assert store.transactions == before and await stored(store) is not None
    assert await umctl(store, "--json", "cluster", "delete", "mydb", "--yes") == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == "mydb"
    assert await MeshRepo(store).view("mydb") is None  # type: ignore[arg-type]


async def test_delete_on_a_terminal_asks_for_the_cluster_name(monkeypatch, capsys):
    store = await mesh_with()
    monkeypatch.setattr(sys, "stdin", Terminal("mydb2"))
    assert await umctl(store, "cluster", "delete", "mydb") == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "cluster mydb (epoch 1, 2 shards, 4 nodes) will be deleted" in err
    assert "Type the cluster's name to delete it: " in err
    assert err.strip().endswith("umctl-mesh: not confirmed: cluster mydb is not deleted")
    assert await stored(store) is not None
    monkeypatch.setattr(sys, "stdin", Terminal("nosuch"))
    assert await umctl(store, "cluster", "delete", "nosuch") == cli.EXIT_FAILED
    assert capsys.readouterr().err.strip() == "umctl-mesh: unknown cluster 'nosuch'"
    monkeypatch.setattr(sys, "stdin", Terminal("mydb"))
    assert await umctl(store, "cluster", "delete", "mydb", "--keep-data") == 0
    out = capsys.readouterr()
    assert "held out of the pool with their data" in out.err
    assert out.out.strip() == "cluster mydb deleted; 4 nodes held with their data"
    assert await MeshRepo(store).view("mydb") is None  # type: ignore[arg-type]


# -- passwords off the command line ----------------------------------------------------------

def parse_create(*extra: str):  # noqa: ANN201
    return cli.build_parser().parse_args(["cluster", "create", "orders", "--shards", "1",
                                          *extra])


def test_a_password_comes_from_the_flag_a_file_a_prompt_or_the_variable(monkeypatch, tmp_path):
    from tools.umctl_mesh import passwords

    monkeypatch.delenv("MOONMESH_CLUSTER_PASSWORD", raising=False)
    assert passwords.read(parse_create()) is None
    assert passwords.read(parse_create("--password", "p w")) == passwords.Password(
        "p w", passwords.Source.FLAG)
    path = tmp_path / "pw"
    path.write_text("from file \nsecond line\n")
    assert passwords.read(parse_create("--password-file", str(path))) == passwords.Password(
        "from file ", passwords.Source.FILE, str(path))
    monkeypatch.setenv("MOONMESH_CLUSTER_PASSWORD", "from env")
    assert passwords.read(parse_create()) == passwords.Password("from env",
                                                                passwords.Source.ENV)
    assert passwords.read(parse_create("--password", "flag")).value == "flag"  # the flag wins
    typed = iter(["typed", "typed", "typed", "other"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(typed))
    monkeypatch.setattr(sys, "stdin", Terminal(""))
    assert passwords.read(parse_create("--ask-password"), confirm=True) == passwords.Password(
        "typed", passwords.Source.PROMPT)
    with pytest.raises(ops.OpError, match="the two passwords typed differ"):
        passwords.read(parse_create("--ask-password"), confirm=True)


def test_password_options_that_cannot_give_a_password_are_usage_errors(monkeypatch, tmp_path,
                                                                       capsys):
    import io

    from tools.umctl_mesh import passwords

    empty = tmp_path / "empty"
    empty.write_text("\n")
    for argv, message in [(("--password-file", str(tmp_path / "missing")),
                           "cannot read --password-file"),
                          (("--password-file", str(empty)), "is empty"),
                          (("--password", ""), "--password is empty")]:
        with pytest.raises(ops.UsageError, match=message):
            passwords.read(parse_create(*argv))
    monkeypatch.setattr(sys, "stdin", io.StringIO("typed\n"))
    with pytest.raises(ops.UsageError, match="--ask-password needs a terminal"):
        passwords.read(parse_create("--ask-password"))
    with pytest.raises(SystemExit) as exited:  # one source at most
        parse_create("--password", "a", "--password-file", str(empty))
    assert exited.value.code == cli.EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_connect_line_authenticates_as_the_password_came(tmp_path):
    from tools.umctl_mesh.passwords import Password, Source, redis_cli

    assert redis_cli(None, "-c -p 7000") == "redis-cli -c -p 7000"
    assert redis_cli(Password("s3 cret", Source.FLAG), "-c -p 7000") == \
        "redis-cli -c -p 7000 -a 's3 cret'"
    assert redis_cli(Password("x", Source.FILE, "/etc/my pw"), "-p 7000") == \
        "REDISCLI_AUTH=\"$(head -n1 '/etc/my pw')\" redis-cli -p 7000"
    assert redis_cli(Password("x", Source.ENV), "-p 7000") == \
        'REDISCLI_AUTH="$MOONMESH_CLUSTER_PASSWORD" redis-cli -p 7000'
    assert redis_cli(Password("x", Source.PROMPT), "-p 7000") == "redis-cli -p 7000 --askpass"


async def test_create_takes_the_password_from_a_file_and_prints_how_to_connect(tmp_path,
                                                                               monkeypatch,
                                                                               capsys):
    from core.view import hash_password

    monkeypatch.delenv("MOONMESH_CLUSTER_PASSWORD", raising=False)
    store = await free_pool(2)
    path = tmp_path / "pw"
    path.write_text("s3cret\n")
    assert await umctl(store, "cluster", "create", "orders", "--shards", "1", "--no-wait",
                       "--password-file", str(path)) == 0
    out = capsys.readouterr().out
    assert (await stored(store, "orders")).config.password_hash == hash_password("s3cret")
    assert f'connect: REDISCLI_AUTH="$(head -n1 {path})" redis-cli -c -h 127.0.0.1 -p 710' in out
    assert "s3cret" not in out
    monkeypatch.setenv("MOONMESH_CLUSTER_PASSWORD", "from env")
    assert await umctl(store, "cluster", "create", "other", "--shards", "1", "--no-wait") == 0
    assert (await stored(store, "other")).config.password_hash == hash_password("from env")
    assert 'REDISCLI_AUTH="$MOONMESH_CLUSTER_PASSWORD" redis-cli -c' in capsys.readouterr().out


def test_standalone_setcluster_carries_the_password():
    from tools.umctl_mesh.local import setcluster_commands

    [cmd] = setcluster_commands("mydb", ["127.0.0.1:7000"], ["127.0.0.1:17000"], password="p")
    assert cmd[-3:] == ["CONFIG", "password", "p"]
    [cmd] = setcluster_commands("mydb", ["127.0.0.1:7000"], ["127.0.0.1:17000"])
    assert "CONFIG" not in cmd


# -- scale plans say which shards and nodes come and go --------------------------------------

async def test_a_scale_out_plan_names_the_new_shard_and_the_nodes_it_takes(capsys):
    view = make_view(2, 1)
    store = await mesh_with(replace(view, config=ClusterConfig(replicas=1)))
    await add_node(store, "free-a", "127.0.0.1:7200", "127.0.0.1:17200", 10)
    await add_node(store, "free-b", "127.0.0.1:7201", "127.0.0.1:17201", 11)
    assert await umctl(store, "cluster", "scale", "mydb", "--shards", "3", "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "cluster mydb: would move 5461 slots in 2 migrations (dry run: nothing " \
                       "written)"
    assert lines[1] in ("  would add shard s3: master free-a, replica free-b (would be taken "
                        "from the pool)",
                        "  would add shard s3: master free-b, replica free-a (would be taken "
                        "from the pool)")
    assert await umctl(store, "--json", "cluster", "scale", "mydb", "--shards", "3") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["new_shards"] == ["s3"] and doc["removed_shards"] == []
    assert sorted(doc["nodes_taken"]) == ["free-a", "free-b"] and doc["nodes_freed"] == []
    assert doc["shards"]["s3"]["master"] in ("free-a", "free-b")
    assert await umctl(store, "cluster", "scale", "mydb", "--replicas", "1") == 0
    assert capsys.readouterr().out.strip() == "cluster mydb already declares 1 replica per shard"


async def test_a_scale_in_plan_names_the_shard_that_goes_and_the_nodes_it_frees(capsys):
    store = await mesh_with(make_view(3, 1))
    assert await umctl(store, "cluster", "scale", "mydb", "--shards", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "cluster mydb: moves 5461 slots in 2 migrations",
        "  removes shard s3: master node-4, replica node-5 (back to the pool when its last "
        "migration commits)"]
    assert lines[2].split() == ["FROM", "TO", "SLOTS", "RANGES"]
    assert await umctl(store, "migrate", "cancel", "mydb") == 0
    capsys.readouterr()
    assert await umctl(store, "--json", "cluster", "scale", "mydb", "--shards", "2",
                       "--dry-run") == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["removed_shards"], doc["nodes_freed"]) == (["s3"], ["node-4", "node-5"])


async def test_one_slot_in_one_migration_is_said_so(capsys):
    store = await mesh_with()
    assert await umctl(store, "migrate", "mydb", "--slots", "0", "--to", "s2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "cluster mydb: moves 1 slot in 1 migration"
    assert lines[2].split() == ["s1", "s2", "1", "0"]


def test_ctrl_c_ends_it_quietly(monkeypatch, capsys):
    def interrupted(prompt: str) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("getpass.getpass", interrupted)
    monkeypatch.setattr(sys, "stdin", Terminal(""))
    assert cli.main(["up", "--ask-password"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "\numctl-mesh: interrupted\n"
