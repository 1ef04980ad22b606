"""`mesh-probe`: the health checks deploy/ runs (Kubernetes probes and hooks, Docker's
HEALTHCHECK). Each subcommand checks one thing and answers with its exit code: 0 yes, 1 no
(the reason on stderr), 2 usage.

    mesh-probe live      [--addr HOST:PORT]   a RESP server answers PING there (any reply,
                                              NOAUTH and LOADING included: its event loop turns)
    mesh-probe ready     [--addr HOST:PORT] [--etcd URLS --node-id ID]
                                              PING answers PONG or NOAUTH (a proxy of a cluster
                                              with a password; Redis with requirepass), and with
                                              --etcd: the node's record is registered in etcd on
                                              a lease (the agent has joined the pool)
    mesh-probe wait-down [--addr HOST:PORT] [--timeout S]
                                              wait until nothing accepts connections there (the
                                              proxy has exited), at most S seconds

`ready` says "can serve or can join", not "owns slots" (that is `UMCTL READY`): a free node
is ready. A record left by a killed predecessor with the same id counts until its lease expires
(mesh.agent.LEASE_TTL). Only `ready --etcd` imports the etcd client; the rest is stdlib.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

DEFAULT_ADDR = "127.0.0.1:7000"
ETCD_ENV = "MOONMESH_ETCD"  # defaults for `ready`: a probe's exec command expands no variables
NODE_ID_ENV = "MOONMESH_NODE_ID"
PING = b"*1\r\n$4\r\nPING\r\n"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class ProbeFailed(Exception):
    pass


def split_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def ping(addr: tuple[str, int], timeout: float) -> bytes:
    """The first line of the reply to PING (a RESP simple string or error)."""
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(PING)
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(512)
                if not chunk:
                    raise ProbeFailed(f"{addr[0]}:{addr[1]} closed the connection")
                buf += chunk
    except OSError as exc:
        raise ProbeFailed(f"{addr[0]}:{addr[1]}: {exc}") from None
    line = buf.split(b"\r\n", 1)[0]
    if line[:1] not in (b"+", b"-"):
        raise ProbeFailed(f"{addr[0]}:{addr[1]} does not speak RESP: {line[:40]!r}")
    return line


def live(addr: tuple[str, int], timeout: float) -> None:
    ping(addr, timeout)


def answers(addr: tuple[str, int], timeout: float) -> None:
    line = ping(addr, timeout)
    if line != b"+PONG" and not line.startswith(b"-NOAUTH"):
        raise ProbeFailed(f"PING answered {line.decode(errors='replace')}")


async def registered(etcd: str, node_id: str, root: str) -> None:
    from core.nodes import NodeRecord, RecordError
    from mesh.store.etcd import EtcdStore, StoreError

    try:
        async with EtcdStore(etcd, root=root) as store:
            kv = await store.get(store.keys.node(node_id))
    except StoreError as exc:
        raise ProbeFailed(str(exc)) from None
    if kv is None:
        raise ProbeFailed(f"node {node_id} is not registered in etcd")
    try:
        NodeRecord.decode(kv.value)
    except RecordError as exc:
        raise ProbeFailed(f"node {node_id}: unreadable record: {exc}") from None
    if not kv.lease:
        raise ProbeFailed(f"node {node_id}: its record has no lease")


def ready(addr: tuple[str, int], timeout: float, etcd: str, node_id: str, root: str) -> None:
    answers(addr, timeout)
    if etcd:
        import anyio

        async def check() -> None:
            with anyio.fail_after(timeout):
                await registered(etcd, node_id, root)

        try:
            anyio.run(check)
        except TimeoutError:
            raise ProbeFailed(f"etcd at {etcd} did not answer within {timeout:g} s") from None


def wait_down(addr: tuple[str, int], timeout: float, interval: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(addr, timeout=min(interval, 1.0)):
                pass
        except ConnectionRefusedError:
            return
        except OSError:
            pass  # a timeout or an unreachable host proves nothing: keep waiting
        if time.monotonic() >= deadline:
            raise ProbeFailed(f"{addr[0]}:{addr[1]} still accepts connections after {timeout:g} s")
        time.sleep(interval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh-probe", description="Health checks for deploy/: exit 0 yes, 1 no.")
    sub = parser.add_subparsers(dest="check", required=True, metavar="CHECK")
    addr = argparse.ArgumentParser(add_help=False)
    addr.add_argument("--addr", type=split_addr, default=DEFAULT_ADDR, metavar="HOST:PORT",
                      help=f"the proxy (or Redis) to check (default {DEFAULT_ADDR})")
    addr.add_argument("--timeout", type=float, default=3.0, metavar="S",
                      help="give up after S seconds (default 3)")
    sub.add_parser("live", parents=[addr], help="the server there answers PING at all")
    rd = sub.add_parser("ready", parents=[addr],
                        help="PING answers PONG or NOAUTH; with --etcd, the node is registered")
    rd.add_argument("--etcd", default=os.environ.get(ETCD_ENV, ""), metavar="URL[,URL...]",
                    help=f"etcd endpoints (default ${ETCD_ENV}); without: PING only")
    rd.add_argument("--node-id", default=os.environ.get(NODE_ID_ENV, ""), metavar="ID",
                    help=f"the node's id in the pool (default ${NODE_ID_ENV})")
    rd.add_argument("--etcd-root", default="/moonmesh", metavar="PREFIX",
                    help="key prefix in etcd (default /moonmesh)")
    wd = sub.add_parser("wait-down", parents=[addr],
                        help="wait until nothing accepts connections at --addr")
    wd.add_argument("--interval", type=float, default=0.5, metavar="S",
                    help="between two tries (default 0.5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check == "ready" and args.etcd and not args.node_id:
        parser.error(f"ready --etcd needs --node-id (or ${NODE_ID_ENV})")
    try:
        if args.check == "live":
            live(args.addr, args.timeout)
        elif args.check == "ready":
            ready(args.addr, args.timeout, args.etcd, args.node_id, args.etcd_root)
        else:
            wait_down(args.addr, args.timeout, args.interval)
    except ProbeFailed as exc:
        print(f"mesh-probe {args.check}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
