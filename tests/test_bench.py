"""The benchmark entry point runs in quick mode and prints its tables (no speed assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.timeout(400)
def test_bench_quick_completes_and_prints_tables():
    """`python -m bench --quick` finishes and prints a table for every benchmark."""
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=390)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("machine: ")
    for bench in ("overhead-threads", "cold-start", "overhead-processes", "cpu-speedup",
                  "schedule-quality", "scale", "memory-pressure"):
        assert f"\n{bench} " in out, bench
    assert "parexec threads" in out and "ThreadPoolExecutor (no deps)" in out
