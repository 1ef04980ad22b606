"""tools/launch.py, the one launcher of the tests, the benchmarks and `umctl-mesh up`."""
from __future__ import annotations

import os
import signal
import sys

import pytest

from tests.procs import command
from tools.launch import Launcher, LaunchError, free_port


@pytest.fixture
def launcher():
    launcher = Launcher(prefix="mm-launch-test-")
    yield launcher
    launcher.cleanup()


def open_files() -> set[str]:
    fds = os.listdir("/proc/self/fd")
    return {os.path.realpath(f"/proc/self/fd/{fd}") for fd in fds
            if os.path.exists(f"/proc/self/fd/{fd}")}


def test_a_started_process_listens_and_its_log_is_not_held_open_here(launcher):
    redis = launcher.redis()
    assert command(redis.port, "PING") == b"+PONG\r\n"
    assert redis.log_path.exists() and "Ready to accept connections" in redis.log()
    assert not any(f.startswith(str(launcher.workdir)) for f in open_files())


def test_a_process_that_exits_at_once_fails_with_the_end_of_its_log(launcher):
    with pytest.raises(LaunchError, match="(?s)exited with code 1.*no-such-directive"):
        launcher.redis(None, "--no-such-directive", "x")
    assert launcher.dead() == [launcher.processes[0].name]


def test_stop_kills_what_ignores_sigterm(launcher):
    port = free_port()
    stubborn = launcher.start("stubborn", [
        sys.executable, "-c",
        "import signal, socket, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"s = socket.create_server(('127.0.0.1', {port}))\n"
        "time.sleep(60)\n"], port)
    launcher.stop(timeout=0.5)
    assert not stubborn.alive() and stubborn.popen.returncode == -signal.SIGKILL


def test_restart_comes_back_on_the_same_port(launcher):
    redis = launcher.redis()
    redis.kill()
    assert redis.restart().alive()
    assert command(redis.port, "PING") == b"+PONG\r\n"


def test_processes_get_the_launchers_environment():
    launcher = Launcher(prefix="mm-launch-test-", env={"MM_LAUNCH_TEST": "yes"})
    try:
        port = free_port()
        p = launcher.start("env", [
            sys.executable, "-c",
            "import os, socket, time\n"
            "print(os.environ['MM_LAUNCH_TEST'], flush=True)\n"
            f"s = socket.create_server(('127.0.0.1', {port}))\n"
            "time.sleep(60)\n"], port)
        assert p.log() == "yes\n"
    finally:
        launcher.cleanup()
