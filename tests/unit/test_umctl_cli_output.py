"""umctl-mesh's output helpers: migration progress by keys and slots, plain rendering off a
terminal, the completion script, the slowlog merge, `up --spare` arguments, and the etcd
outage log's state machine."""
from __future__ import annotations

import io
import re
import subprocess

import pytest

from core.outage import OUTAGE_REPEAT, OutageLog, Say
from tools.umctl_mesh import cli, render, slowlog
from tools.umctl_mesh.progress import MigrationTracker, format_seconds


def row(mid, slots, moved, left, error="", epoch=1):
    """A row of ops.migration_rows: migration `mid` moving `slots` slots from s1."""
    return {"id": f"s1>{mid}@{epoch}", "from": "s1", "to": mid, "slots": [[0, slots - 1]],
            "slot_count": slots, "moved_keys": moved, "left_keys": left, "error": error}


# each case: polls of (time, rows) -> (slots moved, slots total, keys moved, keys total,
# unreported) after the last poll
TRACKER_CASES = [
    ("one migration counted, then committed",
     [(0, [row("a", 100, 0, None)]), (1, [row("a", 100, 400, 600)]), (2, [])],
     (100, 100, 1000, 1000, 0)),
    ("keys of a committed migration still count while another runs",
     [(0, [row("a", 50, 10, 90), row("b", 50, 0, None)]),
      (1, [row("b", 50, 30, 70)])],
     (50, 100, 130, 200, 0)),
    ("a migration that committed before any report: its slots, not its keys",
     [(0, [row("a", 10, 0, None)]), (1, [])],
     (10, 10, 0, 0, 1)),
    ("a running migration not counted yet: no key total",
     [(0, [row("a", 10, 5, None)])],
     (0, 10, 5, None, 0)),
    ("a planned migration started under a new id is one migration",
     [(0, [row("a", 10, 0, None, epoch=1)]), (1, [row("a", 10, 4, 6, epoch=2)]), (2, [])],
     (10, 10, 10, 10, 0)),
    ("the moved count never goes back (a stale status read)",
     [(0, [row("a", 10, 50, 50)]), (1, [row("a", 10, 20, 80)]), (2, [])],
     (10, 10, 100, 100, 0)),
]


@pytest.mark.parametrize("name,polls,want", TRACKER_CASES, ids=[c[0] for c in TRACKER_CASES])
def test_migration_progress_counts_keys_and_slots(name, polls, want):
    tracker = MigrationTracker(started=0.0)
    for now, rows in polls:
        snap = tracker.observe(rows, float(now))
    assert (snap.slots_moved, snap.slots_total, snap.keys_moved, snap.keys_total,
            snap.unreported) == want


def test_progress_rate_eta_and_the_final_line_name_keys_moved():
    tracker = MigrationTracker(started=0.0)
    tracker.observe([row("a", 16384, 0, 1000)], 0.0)
    snap = tracker.observe([row("a", 16384, 250, 750)], 1.0)
    assert snap.keys_per_sec == 250 and snap.eta_sec == 3.0
    assert snap.line() == "0/16384 slots, 250/1,000 keys, 250 keys/s, ETA 3s"
    done = tracker.observe([], 4.0)
    assert done.final(4.0) == "done: 16384 slots in 1 migration, 1,000 keys moved in 4s"
    assert not re.search(r"(^|\s)0 keys moved", done.final(4.0))


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (61, "1m01s"),
                                          (3600 + 120, "1h02m")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_tables_off_a_terminal_are_plain_columns():
    out = io.StringIO()
    render.print_table(["A", "LONGER"], [["x", 1], ["yyyy", "z"]], out)
    assert out.getvalue() == "A     LONGER\nx     1\nyyyy  z\n"


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_tables_on_a_terminal_go_through_rich():
    out = Tty()
    render.print_table(["NODE", "ROLE"], [["node-1", "master"]], out)
    text = out.getvalue()
    assert "node-1" in text and "master" in text and "\x1b[" in text  # the bold header


def test_progress_off_a_terminal_prints_whole_lines_when_the_text_changes(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 11.0, 12.0, 30.0])
    monkeypatch.setattr(render.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = render.ProgressLine("migrating", stream=out)
    for text in ["a", "b", "b", "c", "d", "d"]:
        bar.update(0, 10, text)
    bar.close("done")
    # "a" at once; "b" and "c" within PLAIN_REPEAT_EVERY of it wait; "c" at 11 s; "d" last
    assert out.getvalue() == "migrating a\nmigrating c\nmigrating d\ndone\n"
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_json_mode_draws_no_progress():
    out = Tty()
    bar = render.ProgressLine("migrating", quiet=True, stream=out)
    bar.update(1, 2, "x")
    bar.close("done")
    assert out.getvalue() == ""


def test_the_status_line_off_a_terminal_is_printed_when_it_changes(monkeypatch):
    clock = iter([0.0, 20.0, 40.0])
    monkeypatch.setattr(render.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    line = render.StatusLine(out)
    for text in ["3 nodes", "3 nodes", "2 nodes"]:
        line.show(text)
    line.close()
    lines = out.getvalue().splitlines()
    assert [x.split("] ", 1)[1] for x in lines] == ["3 nodes", "2 nodes"]


def test_the_bash_completion_script_loads_and_completes_subcommands(capsys):
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    probe = script + """
complete -p umctl-mesh
fn=$(complete -p umctl-mesh | sed -E 's/.*-F ([^ ]+).*/\\1/')
COMP_WORDS=(umctl-mesh clu); COMP_CWORD=1; COMP_LINE="umctl-mesh clu"; COMP_POINT=${#COMP_LINE}
$fn umctl-mesh clu umctl-mesh; echo "top: ${COMPREPLY[*]}"
COMP_WORDS=(umctl-mesh cluster sc); COMP_CWORD=2; COMP_LINE="umctl-mesh cluster sc"
COMP_POINT=${#COMP_LINE}; $fn umctl-mesh sc cluster; echo "sub: ${COMPREPLY[*]}"
"""
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", probe], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "-F " in out.stdout and out.stdout.rstrip().endswith("sub: scale")
    assert "top: cluster" in out.stdout


def test_the_zsh_completion_script_names_the_commands(capsys):
    assert cli.main(["completion", "zsh"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#compdef umctl-mesh") and "slowlog" in script


def test_completion_for_an_unknown_shell_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["completion", "fish"])
    assert exc.value.code == 2


@pytest.mark.parametrize("argv,words", [
    (["up", "--spare", "-1"], "--spare must be 0 to"),
    (["up", "--spare", "65"], "--spare must be 0 to 64"),
    (["up", "--standalone", "--spare", "1"], "--spare needs the mesh"),
    # 3 shards x 2 nodes + 2 spare: 8 nodes, the last metrics port 35529 + 7 + 30000 > 65535
    (["up", "--port", "35529", "--spare", "2"], "PORT must be 1 to 35528"),
])
def test_up_spare_arguments_that_cannot_be_exit_2(argv, words, capsys):
    assert cli.main(argv) == cli.EXIT_USAGE
    assert words in capsys.readouterr().err


def entry(i, t, us, *args):
    return [i, t, us, [a.encode() for a in args], b"127.0.0.1:5000", b""]


SLOWLOG_CASES = [
    ("newest first across nodes",
     {"n1": [entry(1, 100, 5, "GET", "a"), entry(0, 90, 5, "SET", "a", "1")],
      "n2": [entry(7, 95, 9, "DEBUG", "SLEEP", "0")]},
     10, [("n1", 1), ("n2", 7), ("n1", 0)]),
    ("the longer first within one second, then cut to count",
     {"n1": [entry(1, 100, 5, "GET", "a")], "n2": [entry(3, 100, 50, "KEYS", "*")]},
     1, [("n2", 3)]),
    ("no entries", {"n1": [], "n2": []}, 5, []),
]


@pytest.mark.parametrize("name,replies,count,want", SLOWLOG_CASES,
                         ids=[c[0] for c in SLOWLOG_CASES])
def test_slowlogs_merge_newest_first(name, replies, count, want):
    parsed = [slowlog.parse_entries(reply, node, "s1", "master")
              for node, reply in replies.items()]
    merged = slowlog.merge(parsed, count)
    assert [(e.node, e.id) for e in merged] == want


def test_a_slowlog_entry_keeps_its_command_and_client():
    [e] = slowlog.parse_entries([entry(4, 100, 12, "DEBUG", "SLEEP", "0")], "n1", "s2",
                                "replica")
    assert e.doc() == {"node": "n1", "shard": "s2", "role": "replica", "id": 4, "time": 100,
                       "duration_us": 12, "args": ["DEBUG", "SLEEP", "0"],
                       "client": "127.0.0.1:5000", "client_name": ""}


@pytest.mark.parametrize("reply", [b"oops", [b"x"], [[1, 2, 3]], [["a", 1, 2, []]]])
def test_a_malformed_slowlog_reply_is_an_error(reply):
    with pytest.raises(slowlog.SlowlogError):
        slowlog.parse_entries(reply, "n1", "s1", "master")


def test_an_etcd_outage_is_said_once_then_at_most_every_repeat_then_back():
    log = OutageLog()
    said = [log.failed(t) for t in (0.0, 0.1, 0.2, 5.0, OUTAGE_REPEAT - 0.1)]
    assert said == [Say.LOST, None, None, None, None]
    assert log.failed(OUTAGE_REPEAT) is Say.STILL
    assert log.failed(OUTAGE_REPEAT + 1) is None
    assert log.failed(2 * OUTAGE_REPEAT) is Say.STILL
    assert log.down and log.failures == 8
    assert log.succeeded(70.0) == 70.0
    assert not log.down and log.succeeded(71.0) is None  # back once
    assert log.failed(80.0) is Say.LOST  # a new outage is news again


def test_a_final_report_counts_the_keys_of_a_migration_committed_between_reads():
    tracker = MigrationTracker(started=0.0)
    tracker.observe([row("a", 8192, 0, None), row("b", 100, 0, None)], 0.0)
    gone = tracker.observe([], 1.0)
    assert gone.unreported == 2 and gone.keys_moved == 0
    final = tracker.observe([], 1.5, {"s1>a@1": 1500, "s1>b@1": 7, "s1>c@9": 99})
    assert final.unreported == 0 and final.keys_moved == 1507 and final.keys_total == 1507
    assert final.final(2.0) == "done: 8292 slots in 2 migrations, 1,507 keys moved in 2s"


def test_a_migration_seen_only_while_planned_takes_the_report_of_its_start():
    tracker = MigrationTracker(started=0.0)
    tracker.observe([row("a", 8192, 0, None, epoch=2)], 0.0)  # planned at epoch 2
    gone = tracker.observe([], 1.0, {"s1>a@3": 1002, "s1>b@3": 5})  # started at 3, committed
    assert gone.unreported == 0 and gone.keys_moved == 1002


# -- data from outside stays literal text (hot keys, slowlog arguments, client names) --------

HOSTILE = ["[/oops]", "[link=https://evil.example]hotkey[/link]", "a\x1b]0;pwned\x07b",
           "[red]x", "c1\x9b31m", "del\x7f"]


@pytest.mark.parametrize(("value", "shown"), [
    ("[/oops]", "[/oops]"),
    ("a\x1b]0;pwned\x07b", "a\\x1b]0;pwned\\x07b"),
    ("two\nlines\ttab\r", "two\\x0alines\\x09tab\\x0d"),
    ("\x00\x7f\x80\x9f", "\\x00\\x7f\\x80\\x9f"),
    ("é ключ 🔑 \xa0", "é ключ 🔑 \xa0"),  # printable non-ASCII stays as it is
    (42, "42"),
])
def test_literal_escapes_control_characters_only(value, shown):
    assert render.literal(value) == shown


# what rich itself writes to a terminal: SGR styles, cursor moves and hiding, line erases
RICH_OWN = re.compile(r"\x1b\[[0-9;]*[mAK]|\x1b\[\?25[lh]|\r")


def no_injected_sequences(text: str) -> None:
    """Once rich's own sequences are gone, nothing but printable text and newlines."""
    rest = RICH_OWN.sub("", text)
    assert all(c.isprintable() or c == "\n" for c in rest), repr(rest)


def test_hostile_cells_on_a_terminal_are_shown_as_typed():
    out = Tty()
    render.print_table(["KEY", "OPS"], [[key, 1] for key in HOSTILE], out)
    text = out.getvalue()
    assert "\x1b[1m" in text  # rich drew it (the bold header): the terminal path
    for shown in ["[/oops]", "[link=https://evil.example]hotkey[/link]",
                  "a\\x1b]0;pwned\\x07b", "[red]x", "c1\\x9b31m", "del\\x7f"]:
        assert shown in text
    assert "\x1b[31m" not in text  # [red] made no colour
    no_injected_sequences(text)


def test_hostile_cells_off_a_terminal_are_escaped_too():
    out = io.StringIO()
    render.print_table(["KEY", "OPS"], [[key, 1] for key in HOSTILE], out)
    text = out.getvalue()
    assert "a\\x1b]0;pwned\\x07b" in text and "[/oops]" in text and "\x1b" not in text
    assert len(text.splitlines()) == 1 + len(HOSTILE)


def test_progress_and_status_lines_keep_hostile_text_literal():
    out = Tty()
    bar = render.ProgressLine("[/d]\x1b]0;t\x07", stream=out)
    bar.update(1, 2, "[/oops] [link=https://evil.example]x[/link] \x1b]0;pwned\x07")
    bar.close("[/final]\x1b[2J")
    line = render.StatusLine(out)
    line.show("[/status] \x1b]0;pwned\x07")
    line.close()
    text = out.getvalue()
    for shown in ["[/d]\\x1b]0;t\\x07", "[/oops]", "[link=https://evil.example]x[/link]",
                  "\\x1b]0;pwned\\x07", "[/final]\\x1b[2J", "[/status]"]:
        assert shown in text
    no_injected_sequences(text)


def test_plain_progress_and_status_lines_escape_control_characters():
    out = io.StringIO()
    bar = render.ProgressLine("migrating", stream=out)
    bar.update(0, 1, "k\x1b]0;pwned\x07")
    bar.close("done\x1b[2J")
    line = render.StatusLine(out)
    line.show("s\x1b]0;x\x07")
    text = out.getvalue()
    assert "\x1b" not in text and "k\\x1b]0;pwned\\x07" in text and "done\\x1b[2J" in text
    assert "s\\x1b]0;x\\x07" in text
