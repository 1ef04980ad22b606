"""mesh-probe against real processes (the commands deploy/ runs in its probes and hooks), and
deploy/entrypoint.sh's stop order: the proxy first, Redis once the proxy has exited."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import command, free_port, wait_for
from tools.launch import listening

ENTRYPOINT = Path(__file__).resolve().parents[2] / "deploy" / "entrypoint.sh"
MESH_PROXY = Path(sys.executable).parent / "mesh-proxy"  # the venv's console script


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOONMESH_")}
    return subprocess.run([sys.executable, "-m", "node.probe", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_a_free_mesh_node_is_live_and_ready(spawn):
    etcd = spawn.etcd()[0]
    redis = spawn.redis("--requirepass", "pw")
    proxy = spawn.proxy(redis, "--etcd", etcd.addr, "--node-id", "n1", "--backend-password", "pw")
    assert probe("live", "--addr", redis.addr).returncode == 0  # NOAUTH: alive
    assert probe("ready", "--addr", redis.addr).returncode == 0
    assert probe("live", "--addr", proxy.addr).returncode == 0
    # registered in etcd, owns no slot: ready (UMCTL READY would say no)
    wait_for(lambda: probe("ready", "--addr", proxy.addr, "--etcd", etcd.addr,
                           "--node-id", "n1").returncode == 0, timeout=60, what="n1 ready")
    assert command(proxy.port, "UMCTL", "READY") == b":0\r\n"
    missing = probe("ready", "--addr", proxy.addr, "--etcd", etcd.addr, "--node-id", "n2")
    assert missing.returncode == 1 and "not registered" in missing.stderr
    # SIGTERM: the proxy deregisters and exits; wait-down sees it go
    proxy.terminate()
    assert probe("wait-down", "--addr", proxy.addr, "--timeout", "20").returncode == 0
    assert probe("live", "--addr", proxy.addr).returncode == 1
    assert probe("ready", "--addr", proxy.addr).returncode == 1
    # etcd gone: not ready, and the probe says so within its timeout
    etcd.kill()
    started = time.monotonic()
    gone = probe("ready", "--addr", redis.addr, "--etcd", etcd.addr, "--node-id", "n1",
                 "--timeout", "2")
    assert gone.returncode == 1 and time.monotonic() - started < 30  # the probe gives up after --timeout


def test_a_proxy_of_a_cluster_with_a_password_is_live_and_ready(spawn):
    redis = spawn.redis()
    proxy = spawn.proxy(redis)
    assert command(proxy.port, "UMCTL", "SETCLUSTER", "v2", "1", "NOFLAGS", "mydb", redis.addr,
                   "1", "0-16383", "CONFIG", "password", "s3cret") == b"+OK\r\n"
    assert command(proxy.port, "PING").startswith(b"-NOAUTH")
    assert probe("live", "--addr", proxy.addr).returncode == 0
    assert probe("ready", "--addr", proxy.addr).returncode == 0


class Entrypoint:
    def __init__(self, tmp_path: Path) -> None:
        # `make venv` installs the console scripts (pip install -e .)
        assert MESH_PROXY.exists(), f"{MESH_PROXY} missing: run make venv"
        self.port, self.redis_port = free_port(), free_port()
        self.log = tmp_path / "entrypoint.log"
        env = {**os.environ, "MOONMESH_BIN": str(MESH_PROXY.parent), "MOONMESH_DATA": str(tmp_path),
               "MOONMESH_PORT": str(self.port), "MOONMESH_REDIS_PORT": str(self.redis_port)}
        env.pop("MOONMESH_ETCD", None)
        with self.log.open("w") as out:
            self.popen = subprocess.Popen([str(ENTRYPOINT)], env=env, stdout=out, stderr=out,
                                          start_new_session=True)
        wait_for(lambda: listening(self.port) and listening(self.redis_port), timeout=30,
                 what="the entrypoint's proxy and Redis")

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def index(self, text: str) -> int:
        return next(i for i, line in enumerate(self.lines()) if text in line)

    def close(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)  # the group this test started
            self.popen.wait()


@pytest.fixture
def entrypoint(tmp_path: Path):
    ep = Entrypoint(tmp_path)
    yield ep
    ep.close()


def test_entrypoint_stops_the_proxy_then_redis(entrypoint):
    assert probe("live", "--addr", f"127.0.0.1:{entrypoint.port}").returncode == 0
    assert probe("ready", "--addr", f"127.0.0.1:{entrypoint.redis_port}").returncode == 0
    entrypoint.popen.send_signal(signal.SIGTERM)
    assert entrypoint.popen.wait(timeout=30) == 0
    # the proxy got SIGTERM and exited before Redis got its SIGTERM
    assert entrypoint.index("proxy_stopping") < entrypoint.index("mesh-proxy exited") \
        < entrypoint.index("Received SIGTERM") < entrypoint.index("redis-server exited")
    assert not listening(entrypoint.port) and not listening(entrypoint.redis_port)


def test_entrypoint_ends_when_its_proxy_dies(entrypoint):
    pid = int(subprocess.run(["pgrep", "-P", str(entrypoint.popen.pid), "-f", "mesh-proxy"],
                             capture_output=True, text=True).stdout.split()[0])
    os.kill(pid, signal.SIGKILL)
    assert entrypoint.popen.wait(timeout=30) == 1
    assert entrypoint.index("a process ended by itself") < entrypoint.index("Received SIGTERM")
    assert not listening(entrypoint.redis_port)
