"""A resident `umctl-mesh` for the tests' reads of a mesh's state (`nodes`, `cluster show`,
`cluster list`, `migrations`): the same `tools.umctl_mesh.cli.main(argv)` the console script
runs, in one process that imported it once. A fresh `python -m tools.umctl_mesh.cli` spends
about half a second of CPU importing before it asks etcd anything, and the tests poll these
reads in loops (`wait_for`); operations (create, scale, failover, ...) still run as a process
each (tests/conftest.py, `Mesh.umctl`).

Protocol, one JSON line each way: in, the argv list; out, {"code", "stdout", "stderr"}, what
the process would have exited with and printed (an uncaught exception: its traceback on
stderr and 1, as Python does). It runs each command with its own event loop, as the process
would, and stops when its stdin closes. Only tests/conftest.py starts it."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def run(argv: list[str]) -> dict:
    from tools.umctl_mesh import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse's usage errors, sys.exit anywhere
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - what the interpreter would print, and exit 1
            traceback.print_exc()
            code = 1
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the commands' prints are captured
    for line in sys.stdin:
        replies.write(json.dumps(run(json.loads(line))) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
