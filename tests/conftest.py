"""Shared fixtures, the process-leak check and the hypothesis profiles.

Leak check: each test must leave behind no process it started. After a test's teardown, any
direct child of this interpreter that appeared during the test (after its fixtures were set
up) and is still alive, or any process worker that left the process pool during the test but
still runs, is reported as an error of that test. Process pool workers at rest (reused by the
next run) and the resource trackers of multiprocessing and loky are not leaks. Only this
interpreter's own children are looked at, never the rest of the machine, and never by
command line: a clone in a folder named ``parexec`` (issue 22 item 1) must not trip it. At
the end of the session the pool is shut down and every child left is reported with the test
during which it appeared.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, settings

from parexec import _pools

pytest_plugins = ["pytester"]  # tests/test_stress.py runs the leak check in an inner session

HERE = Path(__file__).parent
LEAK_GRACE = 5.0  # seconds a process a test stopped gets to exit before it counts as leaked

# Hypothesis profiles (tests/test_properties.py). "ci" is the default and keeps that file
# near a minute on the 2-core test machine, with fixed examples so CI is reproducible; run
# the exploration with `pytest tests/test_properties.py --hypothesis-profile=long`.
# Examples start processes and wait on timeouts, so no per-example deadline.
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)
settings.load_profile("ci")


def worker_pids() -> set[int]:
    """Pids of this interpreter's descendant processes."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def _pool_pids() -> set[int]:
    pool = getattr(_pools, "_process_pool", None)
    return set(pool.pids) if pool is not None else set()


def _is_helper(pid: int) -> bool:
    """Resource trackers of multiprocessing and loky: started once, live as long as we do."""
    try:
        return any("resource_tracker" in part for part in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def _still_alive(pids: set[int], grace: float) -> set[int]:
    """The pids that have not exited within ``grace`` seconds.

    Waits on pidfds, which become readable when the process ends, without reaping it: the
    pool (multiprocessing) must still collect its children's exit status.
    """
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    alive = set(fds.values())
    deadline = time.monotonic() + grace
    try:
        while alive:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([fd for fd, p in fds.items() if p in alive], [], [],
                                       remaining)
            alive -= {fds[fd] for fd in ready}
    finally:
        for fd in fds:
            os.close(fd)
    return alive


def _describe(pid: int) -> str:
    try:
        p = psutil.Process(pid)
        return f"pid {pid} ({' '.join(p.cmdline())[:120]!r}, status {p.status()})"
    except psutil.Error:
        return f"pid {pid}"


_session_start: set[int] = set()
_first_seen: dict[int, str] = {}  # pid -> the test during which it appeared
_BEFORE = pytest.StashKey[tuple[set[int], set[int]]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    _session_start.update(_children())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):  # type: ignore[no-untyped-def]
    try:
        return (yield)
    finally:
        # After the fixtures: processes of module- or session-scoped fixtures (a Dask
        # cluster) belong to the fixture, not to the first test that used it.
        item.stash[_BEFORE] = (_children(), _pool_pids())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    result = yield
    before = item.stash.get(_BEFORE, None)
    if before is None:
        return result
    children_before, pool_before = before
    children, pool = _children(), _pool_pids()
    for pid in children - children_before:
        _first_seen.setdefault(pid, item.nodeid)
    candidates = ((children - children_before) | (pool_before - pool)) - pool
    candidates = {pid for pid in candidates if not _is_helper(pid)}
    if candidates:
        leaked = _still_alive(candidates, LEAK_GRACE)
        if leaked:
            raise AssertionError(
                f"{item.nodeid} left {len(leaked)} process(es) running: "
                + "; ".join(_describe(pid) for pid in sorted(leaked))
                + ". Stop what the test started (or the library leaked a worker).")
    return result


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_workers():
    """At the end of the session no child is left once the process pool is shut down."""
    yield
    _pools.shutdown_process_pool()
    left = {pid for pid in _children() - _session_start if not _is_helper(pid)}
    alive = _still_alive(left, LEAK_GRACE)
    assert not alive, "processes left behind: " + "; ".join(
        f"{_describe(pid)}, started during {_first_seen.get(pid, 'an unknown test')}"
        for pid in sorted(alive))


ISOLATIONS = ("thread", "process")


@pytest.fixture(params=ISOLATIONS)
def isolation(request: pytest.FixtureRequest) -> str:
    """Each pool kind a behaviour must not depend on: a test using it runs once per kind.

    As CPython's ``create_executor_tests`` does for its executors. Cluster runs need a Dask
    cluster and live in tests/test_cluster.py.
    """
    return str(request.param)


@pytest.fixture
def run_script(tmp_path):
    """Run a Python script in a fresh interpreter; return the CompletedProcess."""
    def run(source: str, timeout: float = 60, **kwargs):
        path = tmp_path / "script.py"
        path.write_text(textwrap.dedent(source))
        env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=tmp_path, **kwargs)
    return run
