"""The seed document's session, reproduced with real redis-server and redis-cli."""
from __future__ import annotations

import re
import subprocess

import pytest

from tests.procs import command, free_port


def cli(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                         timeout=10)
    return out.stdout.strip()


@pytest.mark.parametrize("spelling", ["v2", "old"])
def test_seed_session_is_reproduced(spawn, spelling):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    peer = f"127.0.0.1:{free_port()}"
    if spelling == "v2":
        line = ["UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb", backend.addr, "1", "0-8000",
                "PEER", peer, "1", "8001-16383"]
    else:
        line = ["UMCTL", "SETCLUSTER", "1", "NOFLAGS", "mydb", backend.addr, "1", "0-8000",
                "PEER", "mydb", peer, "1", "8001-16383"]
    assert cli(proxy.port, *line) == "OK"

    nodes = cli(proxy.port, "CLUSTER", "NODES").splitlines()
    assert len(nodes) == 2
    me, other = (line.split(" ") for line in nodes)
    assert re.fullmatch(r"mydb_{16}[0-9a-f]{16}_{4}", me[0])
    assert me[1:] == [proxy.addr, "myself,master", "-", "0", "0", "1", "connected", "0-8000"]
    assert re.fullmatch(r"mydb_{16}[0-9a-f]{16}_{4}", other[0]) and other[0] != me[0]
    assert other[1:] == [peer, "master", "-", "0", "0", "1", "connected", "8001-16383"]

    assert cli(proxy.port, "get", "a") == f"MOVED 15495 {peer}"
    assert cli(proxy.port, "set", "b", "1") == "OK"
    assert cli(proxy.port, "get", "b") == "1"


def test_older_epoch_is_refused_unless_forced(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    base = ["UMCTL", "SETCLUSTER", "v2"]
    tail = ["mydb", backend.addr, "1", "0-16383"]
    assert command(proxy.port, *base, "5", "NOFLAGS", *tail) == b"+OK\r\n"
    assert command(proxy.port, *base, "5", "NOFLAGS", *tail).startswith(b"-OLD_EPOCH")
    assert command(proxy.port, *base, "4", "NOFLAGS", *tail).startswith(b"-OLD_EPOCH")
    assert command(proxy.port, "UMCTL", "GETEPOCH") == b":5\r\n"
    assert command(proxy.port, *base, "3", "FORCE", *tail) == b"+OK\r\n"
    assert command(proxy.port, "UMCTL", "GETEPOCH") == b":3\r\n"


def test_setcluster_naming_another_backend_is_refused(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    reply = command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb",
                    "127.0.0.1:1", "1", "0-16383")
    assert reply.startswith(b"-ERR_NOT_MY_META")
    assert command(proxy.port, "UMCTL", "GETEPOCH") == b":0\r\n"


def test_umctl_ready_and_info(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    assert command(proxy.port, "UMCTL", "READY") == b":0\r\n"
    command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb", backend.addr,
            "1", "0-16383")
    assert command(proxy.port, "UMCTL", "READY") == b":1\r\n"
    info = command(proxy.port, "UMCTL", "INFO")
    assert b"mydb" in info and b"0-16383" in info


def test_migrating_and_importing_ranges_parse(spawn):
    backend = spawn.redis()
    proxy = spawn.proxy(backend)
    src, dst = proxy.addr, "127.0.0.1:7002"
    meta = ["2", src, backend.addr, dst, "127.0.0.1:7102"]
    reply = command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "2", "NOFLAGS", "mydb",
                    backend.addr, "1", "0-8000",
                    backend.addr, "migrating", "1", "8001-16383", *meta,
                    "PEER", dst, "importing", "1", "8001-16383", *meta)
    assert reply == b"+OK\r\n"
    # until the migration issue, the source keeps serving a migrating range
    assert command(proxy.port, "SET", "a", "1") == b"+OK\r\n"
    bad = command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "3", "NOFLAGS", "mydb",
                  backend.addr, "migrating", "1", "8001-16383", "2", src)
    assert bad.startswith(b"-ERR invalid UMCTL SETCLUSTER arguments")
