"""The chunked-copy measurement runs end to end in a short form (no timing asserted)."""
from __future__ import annotations

import subprocess
import sys


def test_chunked_copy_benchmark_copies_both_keys_identically():
    out = subprocess.run([sys.executable, "tools/bench_chunked.py", "--hash-fields", "3000",
                          "--string-mb", "3", "--aof", "--compare-migrate"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    copies = [line for line in out.stdout.splitlines() if "copy identical" in line]
    assert len(copies) == 4, out.stdout  # chunked and MIGRATE, for the hash and the string
    assert out.stdout.count("longest PING") == 8
