"""The failover benchmark runs end to end in its short form (--quick: one run of a node kill,
Moonmesh and native, and of a Redis-only kill); no timing asserted, only that every figure is
a recovery time below the give-up bound."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

GIVE_UP = 30.0  # --quick's give-up bound, seconds


@pytest.mark.timeout(600)  # three fresh clusters and three faults; a loaded machine is slow
def test_failover_benchmark_quick_run_reports_recoveries(tmp_path):
    report = tmp_path / "failover.json"
    out = subprocess.run([sys.executable, "tools/bench_failover.py", "--quick",
                          "--json", str(report)], capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| scenario | moonmesh median (min-max) | native median (min-max) | ratio |" in out.stdout
    assert "cluster-node-timeout 1500 ms" in out.stdout and "commit " in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 1.")
            or line.startswith("| 2.")]
    assert len(rows) == 2, out.stdout
    assert "FAILURE" not in out.stdout

    doc = json.loads(report.read_text())
    assert doc["give_up_s"] == GIVE_UP
    scenarios = doc["scenarios"]
    assert set(scenarios) == {"kill-node", "kill-redis"}
    assert scenarios["kill-redis"]["native"] is None  # n/a: the same as a node kill natively
    figures = [scenarios["kill-node"]["moonmesh"], scenarios["kill-node"]["native"],
               scenarios["kill-redis"]["moonmesh"]]
    for summary in figures:
        assert len(summary["runs"]) == 1, summary
        for value in (summary["median"], summary["runs"][0]["seconds"],
                      summary["runs"][0]["direct_seconds"]):
            assert isinstance(value, float) and 0 < value < GIVE_UP, summary
