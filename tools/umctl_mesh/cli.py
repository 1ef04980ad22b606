"""`umctl-mesh`: the operator's tool."""
from __future__ import annotations

import argparse
import sys

from . import local


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umctl-mesh",
        description="Operate a Moonmesh: a mesh of Redis Cluster proxies.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser(
        "up", help="start a local mesh on loopback and keep it running until Ctrl-C",
        description="Start redis-servers and standalone mesh-proxies on 127.0.0.1, configure "
                    "them with UMCTL SETCLUSTER so they form one Redis Cluster, print how to "
                    "connect, and stop everything (removing its data) on Ctrl-C or SIGTERM.")
    up.add_argument("--shards", type=int, default=2, help="number of proxies/redis pairs (default 2)")
    up.add_argument("--port", type=int, default=7000,
                    help="first proxy port; proxies use PORT.., redis servers PORT+10000.. "
                         "(default 7000)")
    up.add_argument("--cluster", default="mydb", help="cluster name (default mydb)")
    up.set_defaults(func=local.up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except local.LaunchError as exc:
        print(f"umctl-mesh: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
