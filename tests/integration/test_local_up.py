"""`umctl-mesh up` (what `make run` runs): a working mesh that a bare `umctl-mesh` finds, then
nothing left behind."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from redis.cluster import RedisCluster

from tests.procs import free_up_ports, read_until


def test_up_starts_a_mesh_that_clients_use_and_stops_cleanly(tmp_path):
    from tools.launch import listening
    from tools.umctl_mesh.local import METRICS_PORT_OFFSET

    # where `up` leaves its etcd endpoint: this test's own, and no $MOONMESH_ETCD to win over it
    env = {k: v for k, v in os.environ.items() if k != "MOONMESH_ETCD"}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    endpoint_file = tmp_path / "moonmesh" / "etcd"
    password_file = tmp_path / "password"
    password_file.write_text("up s3cret\n")

    port = free_up_ports(4)
    proc = subprocess.Popen([sys.executable, "-m", "tools.umctl_mesh.cli", "up", "--shards", "2",
                             "--replicas", "1", "--port", str(port),
                             "--password-file", str(password_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        lines = read_until(proc, "stop with Ctrl-C")
        output = "".join(lines)
        # every node serves its metrics at PORT+30000
        assert (f"metrics (Prometheus):  http://127.0.0.1:{port + METRICS_PORT_OFFSET}/metrics"
                f" .. http://127.0.0.1:{port + 3 + METRICS_PORT_OFFSET}/metrics\n") in output
        for p in range(port, port + 4):
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{p + METRICS_PORT_OFFSET}/metrics", timeout=10) as page:
                assert b"moonmesh_view_epoch{" in page.read()
        # the password is not printed; the connect line reads it from the file
        connect = f'REDISCLI_AUTH="$(head -n1 {password_file})" redis-cli -c -p {port}'
        assert f"connect with:  {connect}\n" in output and "s3cret" not in output
        said = subprocess.run(["bash", "-c", f"{connect} set via-cli 1"], capture_output=True,
                              text=True, timeout=30)
        assert said.stdout.strip() == "OK", said
        workdir = re.search(r"logs and data in (\S+)", output).group(1)
        rc = RedisCluster(host="127.0.0.1", port=port, password="up s3cret")
        for i in range(500):
            rc.set(f"up:{i}", i)
        assert [rc.get(f"up:{i}") for i in range(500)] == [str(i).encode() for i in range(500)]
        assert len(rc.get_primaries()) == 2 and len(rc.get_replicas()) == 2
        rc.close()
        # a bare umctl-mesh (no --etcd, no $MOONMESH_ETCD) finds the mesh `up` started
        etcd = re.search(r"etcd on (\S+)", output).group(1)
        assert endpoint_file.read_text().strip() == etcd
        assert "see it with:   umctl-mesh cluster show mydb" in output
        bare = subprocess.run([sys.executable, "-m", "tools.umctl_mesh.cli", "--json", "nodes"],
                              capture_output=True, text=True, env=env, timeout=30)
        assert bare.returncode == 0, bare.stderr
        assert len(json.loads(bare.stdout)) == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    assert not os.path.exists(workdir)
    assert not endpoint_file.exists()
    # then a bare command says at once where it looked and what to do
    if listening(2379):
        return  # an etcd of someone else's on the default port
    started = time.monotonic()
    bare = subprocess.run([sys.executable, "-m", "tools.umctl_mesh.cli", "nodes"],
                          capture_output=True, text=True, env=env, timeout=30)
    assert bare.returncode == 3 and time.monotonic() - started < 5  # imports included
    assert "etcd unreachable at 127.0.0.1:2379" in bare.stderr
    assert "--etcd HOST:PORT or set $MOONMESH_ETCD" in bare.stderr
    leftovers = subprocess.run(["pgrep", "-f", f"--listen 127.0.0.1:{port}"],
                               capture_output=True, text=True).stdout
    assert leftovers == ""
