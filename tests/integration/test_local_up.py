"""`umctl-mesh up` (what `make run` runs): a working mesh, then nothing left behind."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

from redis.cluster import RedisCluster


def test_up_starts_a_mesh_that_clients_use_and_stops_cleanly():
    from tools.launch import port_free
    from tools.umctl_mesh.local import REDIS_PORT_OFFSET

    rng = random.Random()
    while True:  # 4 proxy ports and their redis ports (+10000), all free
        port = rng.randrange(20000, 30000)
        if all(port_free(p) and port_free(p + REDIS_PORT_OFFSET) for p in range(port, port + 4)):
            break
    proc = subprocess.Popen([sys.executable, "-m", "tools.umctl_mesh.cli", "up", "--shards", "2",
                             "--replicas", "1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            if line.startswith("connect with:"):
                break
        output = "".join(lines)
        assert f"redis-cli -c -p {port}" in output
        workdir = re.search(r"logs and data in (\S+)", output).group(1)
        rc = RedisCluster(host="127.0.0.1", port=port)
        for i in range(500):
            rc.set(f"up:{i}", i)
        assert [rc.get(f"up:{i}") for i in range(500)] == [str(i).encode() for i in range(500)]
        assert len(rc.get_primaries()) == 2 and len(rc.get_replicas()) == 2
        rc.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    assert not os.path.exists(workdir)
    leftovers = subprocess.run(["pgrep", "-f", f"--listen 127.0.0.1:{port}"],
                               capture_output=True, text=True).stdout
    assert leftovers == ""
