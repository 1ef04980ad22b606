"""How umctl-mesh draws: tables, progress and status lines with `rich` on a terminal, plain
text otherwise (no ANSI codes, no `\\r` redraws: a log or a pipe gets whole lines).

A stream counts as a terminal when `isatty()` says so; `--json` output never comes here.
The plain forms are what scripts and the tests read, so they stay as they were.

Cells and lines carry data from outside (hot keys, slowlog arguments, client names): they
reach rich only as `rich.text.Text` (never parsed as markup, so `[/x]` cannot crash a table
and `[link=...]` cannot make a hyperlink), and `literal` shows their control characters
escaped (`\\x1b`) on both paths, so no escape sequence reaches the operator's terminal.
"""
from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

# a plain (not a terminal) progress or status line is printed again at most this often,
# unless what it says changed
PLAIN_REPEAT_EVERY = 10.0

# C0 controls (newline and tab too: a cell or a status line is one line), DEL and C1
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")


def literal(value: object) -> str:
    """`value` as text with every control character written as `\\xNN`; pure."""
    return CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    cells = [[literal(h) for h in headers]] + [[literal(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                stream: IO[str] | None = None) -> None:
    """A table on `stream` (stdout): a rich table on a terminal, `plain_table` otherwise."""
    out = stream if stream is not None else sys.stdout
    if not is_terminal(out):
        print(plain_table(headers, rows), file=out)
        return
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 2, 0, 0))
    for header in headers:
        table.add_column(Text(literal(header)), overflow="fold")
    for row in rows:
        table.add_row(*(Text(literal(c)) for c in row))
    Console(file=out, highlight=False).print(table)


class ProgressLine:
    """One task's progress on stderr: a rich bar (done/total, text, elapsed) on a terminal;
    otherwise a plain line each time the text changes, at most every PLAIN_REPEAT_EVERY
    seconds (and the last one always), so a log gets a few whole lines, not a redraw per
    poll. `quiet` (--json) draws nothing."""

    def __init__(self, description: str, quiet: bool = False,
                 stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.description = literal(description)
        self.rich: Progress | None = None
        self.task: TaskID | None = None
        self.last_text = ""
        self.pending = ""  # the newest text, printed at close if it never was
        self.last_at = float("-inf")
        if not quiet and is_terminal(self.stream):
            self.rich = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                                 TextColumn("{task.fields[text]}", markup=False),
                                 TimeElapsedColumn(),
                                 console=Console(file=self.stream, highlight=False),
                                 transient=False)
            self.task = self.rich.add_task(self.description, total=None, text="")
            self.rich.start()

    def update(self, done: float, total: float | None, text: str) -> None:
        if self.quiet:
            return
        text = literal(text)
        if self.rich is not None and self.task is not None:
            self.rich.update(self.task, completed=done, total=total, text=text)
            return
        now = time.monotonic()
        if text != self.last_text and now - self.last_at >= PLAIN_REPEAT_EVERY:
            self._plain(text)
            self.last_at = now
        self.pending = text

    def _plain(self, text: str) -> None:
        print(f"{self.description} {text}", file=self.stream, flush=True)
        self.last_text = text

    def close(self, final: str = "") -> None:
        """Stop drawing; `final` (if any) is printed as a line of its own."""
        if self.quiet:
            return
        if self.rich is not None:
            self.rich.stop()
        elif self.pending and self.pending != self.last_text:
            self._plain(self.pending)
        if final:
            print(literal(final), file=self.stream, flush=True)


class StatusLine:
    """`umctl-mesh up`'s live status: redrawn in place on a terminal (rich), else printed as
    a line only when it changed (and at most every PLAIN_REPEAT_EVERY seconds)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.live = None
        self.last_text = ""
        self.last_at = float("-inf")
        if is_terminal(self.stream):
            from rich.live import Live

            self.live = Live(Text(""), console=Console(file=self.stream, highlight=False),
                             auto_refresh=False, transient=False)
            self.live.start()

    def show(self, text: str) -> None:
        text = literal(text)
        stamped = f"[{time.strftime('%H:%M:%S')}] {text}"
        if self.live is not None:
            self.live.update(Text(stamped), refresh=True)
            return
        now = time.monotonic()
        if text != self.last_text and now - self.last_at >= PLAIN_REPEAT_EVERY:
            print(stamped, file=self.stream, flush=True)
            self.last_text, self.last_at = text, now

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
