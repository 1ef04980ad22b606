"""The migration benchmark runs end to end in a short, bounded form (no timing asserted)."""
from __future__ import annotations

import subprocess
import sys


def test_migration_benchmark_moves_a_third_of_the_keys_both_ways():
    out = subprocess.run([sys.executable, "tools/bench_migration.py", "--keys", "6000",
                          "--value-size", "64", "--timeout", "120"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split("  ")[0]: line.split() for line in out.stdout.splitlines()
            if line.startswith(("moonmesh scale", "redis-cli"))}
    assert len(rows) == 2
    for cells in rows.values():
        total, moved = int(cells[-9]), int(cells[-8])
        assert total == 6000 and 1500 < moved < 2500  # about a third of the slots' keys
        assert cells[-1] == "0"  # the client load saw no error
