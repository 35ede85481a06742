"""Stress tests: concurrent and repeated runs, nested runs, and the suite's own leak check."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
VENV = Path(sys.prefix)


# The leak check of tests/conftest.py (issue 22 item 1, issue 13 item 4) -------------------

def _inner_session(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, folder: str,
                   test_source: str, grace: float = 0.5) -> pytest.RunResult:
    """Run ``test_source`` under a copy of tests/conftest.py, in ``<tmp>/<folder>``, with
    this venv reached through ``<tmp>/<folder>/.venv`` (as in a clone of that name)."""
    root = pytester.path / folder
    root.mkdir()
    (root / ".venv").symlink_to(VENV, target_is_directory=True)
    conftest = (HERE / "conftest.py").read_text()
    assert "LEAK_GRACE = 5.0" in conftest
    (root / "conftest.py").write_text(conftest.replace("LEAK_GRACE = 5.0",
                                                       f"LEAK_GRACE = {grace}"))
    (root / "test_inner.py").write_text(test_source)
    monkeypatch.chdir(root)
    return pytester.run(str(root / ".venv" / "bin" / "python"), "-m", "pytest", "-q",
                        "-p", "no:cacheprovider", "-p", "no:randomly", str(root), timeout=110)


@pytest.mark.timeout(120)
def test_leak_check_passes_in_a_clone_named_parexec(pytester, monkeypatch):
    """Run from a folder named parexec (so the venv's resource trackers have 'parexec' in
    their command line), a test that used a process task passes with no error."""
    result = _inner_session(pytester, monkeypatch, "parexec", (
        "import os\n"
        "import parexec as px\n"
        "def test_process_task():\n"
        "    with px.Workflow('w') as wf:\n"
        "        px.task(os.getpid).options(isolation='process')()\n"
        "    assert px.run(wf, progress=False).ok\n"))
    result.assert_outcomes(passed=1, errors=0)


@pytest.mark.timeout(120)
def test_leak_check_reports_the_test_that_leaked(pytester, monkeypatch, tmp_path):
    """A test that leaves a child process running gets the error, not the test after it;
    a process the pool keeps for the next run is not a leak."""
    pidfile = tmp_path / "leaked.pid"
    try:
        result = _inner_session(pytester, monkeypatch, "clone", (
            "import os, subprocess\n"
            "import parexec as px\n"
            "def test_leaky():\n"
            "    child = subprocess.Popen(['sleep', '60'])\n"
            f"    open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
            "def test_pool_worker_at_rest():\n"
            "    with px.Workflow('w') as wf:\n"
            "        px.task(os.getpid).options(isolation='process')()\n"
            "    assert px.run(wf, progress=False).ok\n"
            "def test_clean():\n"
            "    subprocess.run(['true'], check=True)\n"))
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    result.assert_outcomes(passed=3, errors=2)  # at test_leaky's teardown and session end
    out = result.stdout.str()
    assert "ERROR test_inner.py::test_leaky - AssertionError" in out
    assert "E               AssertionError: test_inner.py::test_leaky left 1 process(es)" in out
    assert "test_pool_worker_at_rest left" not in out
    assert "started during test_inner.py::test_leaky" in out
