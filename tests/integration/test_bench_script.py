"""The benchmark suite runs end to end in a short, bounded form (no timing is asserted)."""
from __future__ import annotations

import subprocess
import sys


def test_bench_suite_prints_every_target_and_the_ratios():
    out = subprocess.run([sys.executable, "tools/bench_proxy.py", "--requests", "2000",
                          "--runs", "1", "--pipelines", "1,4", "--probe-requests", "50",
                          "--connections", "20"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ")]
    targets = {r[0].strip() for r in rows}
    assert {"direct", "moonmesh", "mesh-3", "native-3", "moonmesh / direct",
            "mesh-3 / native-3"} <= targets
    assert any(r[0].strip() == "moonmesh" and float(r[1]) > 0 for r in rows if len(r) == 2)
    fairness = [r for r in rows if len(r) == 5 and r[0].strip() == "moonmesh"]
    assert fairness and all(float(x) > 0 for x in fairness[0][1].split("/"))
