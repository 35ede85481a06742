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
