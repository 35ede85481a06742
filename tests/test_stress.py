"""Stress tests: concurrent and repeated runs, nested runs, and the suite's own leak check."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import parexec as px
from parexec import _pools

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


# Concurrent runs of one workflow (issue 13 item 3) ----------------------------------------

def _shared_workflow():
    """Thread and process tasks, a static map and a map over a task's result."""
    import helpers
    with px.Workflow("shared", max_workers=2) as wf:
        a = px.task(helpers.add).options(id="a")(1, 2)
        b = px.task(helpers.add).options(id="b", isolation="process")(a, 10)
        items = px.task(lambda x, y: list(range(x, y))).options(id="items")(a, b)
        squares = px.task(helpers.square_pid).map(items, id="sq")
        static = px.task(helpers.add).map([1, 2, 3], id="static", b=100)
        px.task(lambda s, t: sum(v for v, _ in s) + sum(t)).options(id="total")(
            squares, static)
    expected = {"a": 3, "b": 13, "items": list(range(3, 13)),
                "total": sum(x * x for x in range(3, 13)) + 306}
    return wf, expected


def _check(result, expected):
    assert result.status == "succeeded", result.summary()
    for tid, value in expected.items():
        assert result[tid] == value, tid
    assert sorted(k for k in result.tasks if k.startswith("sq[")) == \
        sorted(f"sq[{k}]" for k in range(10))


@pytest.mark.timeout(120)
def test_one_workflow_run_from_four_threads_at_once():
    """Four threads run the same workflow (with a map over a task's result) at once: each
    gets the full, right result, and the workflow is unchanged for a fifth run."""
    wf, expected = _shared_workflow()
    ntasks = len(wf)
    barrier = threading.Barrier(4)
    results, errors = [], []

    def go():
        barrier.wait(30)
        try:
            results.append(px.run(wf, progress=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors and len(results) == 4, errors
    for result in results:
        _check(result, expected)
    assert len(wf) == ntasks
    _check(px.run(wf, progress=False), expected)


@pytest.mark.timeout(120)
def test_start_twice_on_one_workflow():
    """px.start twice on one workflow with a map over a task's result: two independent
    runs, both complete and right."""
    wf, expected = _shared_workflow()
    first, second = px.start(wf, progress=False), px.start(wf, progress=False)
    r1, r2 = first.wait(100), second.wait(100)
    _check(r1, expected)
    _check(r2, expected)
    assert r1.tasks["a"] is not r2.tasks["a"]


# Many runs in a row (issue 13 item 3) ------------------------------------------------------

def _usage():
    me = psutil.Process()
    return {"threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd")),
            "children": len(me.children(recursive=True)), "rss": me.memory_info().rss}


@pytest.mark.timeout(300)
def test_two_hundred_runs_leave_no_threads_fds_processes_or_memory():
    """200 runs in a row (threads, processes, a run-time map, a failure, a timeout) leave
    the counts of threads, file descriptors and child processes as they were, and RSS
    within 30 MiB."""
    import helpers

    def workflow():
        with px.Workflow("again", max_workers=2) as wf:
            a = px.task(helpers.add).options(id="a")(1, 2)
            b = px.task(helpers.pid).options(id="b", isolation="process")()
            items = px.task(lambda x: list(range(x))).options(id="items")(a)
            px.task(helpers.add).map(items, id="m", b=1)
            px.task(helpers.boom).options(id="bad", on_error="ignore", after=[b])()
            px.task(helpers.sleep_then).options(id="late", timeout=0.01,
                                                on_error="ignore")(0.05)
        return wf

    def one():
        r = px.run(workflow(), progress=False)
        assert r.status == "partial" and r["m"] == [1, 2, 3]
        assert r.tasks["late"].status == "timed_out"

    for _ in range(10):  # warm up: the pool's workers, imports, caches
        one()
    gc.collect()
    threads_before = set(threading.enumerate())
    before = _usage()
    for _ in range(200):
        one()
    gc.collect()
    # A timed-out thread task returns 40 ms after its run: let the last ones end.
    deadline = time.monotonic() + 10
    for t in set(threading.enumerate()) - threads_before:
        t.join(max(0.0, deadline - time.monotonic()))
    after = _usage()
    assert after["threads"] <= before["threads"], (before, after)
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["children"] <= before["children"], (before, after)
    assert after["rss"] - before["rss"] < 30 * 2**20, (before, after)


# Nested runs (issue 13 item 3; process in process: issue 12 item 15) -----------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("outer, inner", [("thread", "thread"), ("thread", "process"),
                                          ("process", "thread"), ("process", "process")])
def test_nested_runs(outer, inner):
    """A task runs a workflow of its own (thread or process tasks, with a run-time map)
    from a thread or a process task; the inner processes end with the outer run."""
    import helpers
    with px.Workflow("outer") as wf:
        px.task(helpers.nested_run).options(id="nested", isolation=outer)(inner)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = px.run(wf, progress=False)
    values, pids, runner = result["nested"]
    assert values == [(k + 10) ** 2 for k in range(3)]
    if outer == "process":
        assert runner != os.getpid()
    if inner == "process":
        assert runner not in pids and os.getpid() not in pids
    else:
        assert pids == [runner]
    # Inner process workers are children of the task's worker, never of this test's process
    # beyond the pool's own workers.
    pool = set(_pools.process_pool().pids) if outer == "process" or inner == "process" \
        else set()
    left = {p.pid for p in psutil.Process().children()} - before - pool
    assert not {pid for pid in left if not any(
        "resource_tracker" in part for part in psutil.Process(pid).cmdline())}
