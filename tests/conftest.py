"""Shared fixtures: every test session ends with no parexec worker process left."""

from __future__ import annotations

import os
import sys
import textwrap
import subprocess
from pathlib import Path

import psutil
import pytest

from parexec import _pools

HERE = Path(__file__).parent


def worker_pids() -> set[int]:
    """Pids of this interpreter's descendant processes."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_workers():
    yield
    _pools.shutdown_process_pool()
    leftover = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "parexec" in " ".join(p.cmdline()):
                leftover.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(leftover, timeout=5)
    assert not alive, f"worker processes left behind: {alive}"


@pytest.fixture
def run_script(tmp_path):
    """Run a Python script in a fresh interpreter; return the CompletedProcess."""
    def run(source: str, timeout: float = 60, **kwargs):
        path = tmp_path / "script.py"
        path.write_text(textwrap.dedent(source))
        env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=tmp_path, **kwargs)
    return run
