"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart_runs_and_reports():
    """examples/quickstart.py runs to the end and prints its report and summary."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1,598,402 kept" in proc.stdout
    assert "sensor-report: succeeded (17 succeeded)" in proc.stdout


PATTERNS = {
    "multi_source_aggregation.py": ["aggregate: {'rows': 125"],
    "redundant_sources.py": ["price=42.0 (from us-mirror)", "'query-2': 'cancelled'"],
    "best_effort_enrichment.py": ["'missing': ['enrich-2']", "run status: succeeded"],
    "fastest_answer.py": ["greedy found the answer", "'solve': 'cancelled'",
                          "'solve-3': 'cancelled'"],
    "rate_limited_batch.py": ["checksum 999000 over 1000 items", "at most 8 calls in flight"],
    "nested_groups.py": ["eu: data@eu-2 + us: data@us-1"],
}


import pytest  # noqa: E402


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_examples_run(name):
    """Each wait-strategy example runs in seconds and prints what it promises."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "patterns" / name)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for words in PATTERNS[name]:
        assert words in proc.stdout, (words, proc.stdout)
