"""The benchmark script runs end to end in a short, bounded form (no timing is asserted)."""
from __future__ import annotations

import subprocess
import sys


def test_bench_script_prints_a_ratio_per_test():
    out = subprocess.run([sys.executable, "tools/bench_proxy.py", "--requests", "3000",
                          "--clients", "5", "--pipelines", "1,4"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith(("SET", "GET"))]
    assert {(r[0], r[1]) for r in rows} == {("SET", "1"), ("GET", "1"), ("SET", "4"), ("GET", "4")}
    assert all(float(r[-1]) > 0 for r in rows)
