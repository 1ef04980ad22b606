"""A cluster's password on umctl-mesh's command line, kept off it when wanted.

`--password P` (seen by `ps` and kept in shell history), `--password-file FILE` (its first
line), `--ask-password` (typed at a prompt, twice when it sets the password), or
`$MOONMESH_CLUSTER_PASSWORD` when none of the three is given. `redis_cli()` prints a
redis-cli command line that authenticates the way the password came, never printing one that
was not on the command line already.
"""
from __future__ import annotations

import argparse
import getpass
import os
import shlex
import sys
from dataclasses import dataclass
from enum import Enum

from .ops import OpError, UsageError

PASSWORD_ENV = "MOONMESH_CLUSTER_PASSWORD"


class Source(Enum):
    FLAG = "--password"
    FILE = "--password-file"
    PROMPT = "--ask-password"
    ENV = f"${PASSWORD_ENV}"


@dataclass(frozen=True, slots=True)
class Password:
    value: str
    source: Source
    path: str = ""  # the --password-file


def add_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--password, --password-file, --ask-password (one at most); `what` ends each help."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--password", metavar="P",
                       help=f"{what} (visible to `ps`; see --password-file, --ask-password, "
                            f"${PASSWORD_ENV})")
    group.add_argument("--password-file", metavar="FILE",
                       help=f"read {what} from the first line of FILE")
    group.add_argument("--ask-password", action="store_true",
                       help=f"type {what} at a prompt")


def read(args: argparse.Namespace, confirm: bool = False) -> Password | None:
    """The password the options (else $MOONMESH_CLUSTER_PASSWORD) give; None: none.
    `confirm`: the password is being set, so a prompt asks twice."""
    if args.password is not None:
        return Password(_nonempty(args.password, "--password"), Source.FLAG)
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                line = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --password-file: {exc}") from None
        return Password(_nonempty(line, f"the first line of {args.password_file}"),
                        Source.FILE, args.password_file)
    if args.ask_password:
        if not sys.stdin.isatty():
            raise UsageError(f"--ask-password needs a terminal; give --password-file FILE "
                             f"or ${PASSWORD_ENV} instead")
        try:
            value = _nonempty(getpass.getpass("cluster password: "), "the password typed")
            if confirm and getpass.getpass("the same again: ") != value:
                raise OpError("the two passwords typed differ; nothing was done")
        except EOFError:
            raise OpError("no password typed; nothing was done") from None
        return Password(value, Source.PROMPT)
    env = os.environ.get(PASSWORD_ENV)
    if env:
        return Password(env, Source.ENV)
    return None


def _nonempty(value: str, what: str) -> str:
    if not value:
        raise UsageError(f"{what} is empty: a cluster password cannot be")
    return value


def redis_cli(password: Password | None, args: str) -> str:
    """`redis-cli ARGS`, authenticating as `password` came: -a for a password already on the
    command line, REDISCLI_AUTH from the file or the variable, --askpass for a typed one."""
    if password is None:
        return f"redis-cli {args}"
    if password.source is Source.FLAG:
        return f"redis-cli {args} -a {shlex.quote(password.value)}"
    if password.source is Source.FILE:
        return f'REDISCLI_AUTH="$(head -n1 {shlex.quote(password.path)})" redis-cli {args}'
    if password.source is Source.ENV:
        return f'REDISCLI_AUTH="${PASSWORD_ENV}" redis-cli {args}'
    return f"redis-cli {args} --askpass"
