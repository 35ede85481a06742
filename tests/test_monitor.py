"""Tests of parexec._monitor: measured memory per task, memory limits, run stats."""

from __future__ import annotations

import helpers
import pytest
from helpers import hold_memory, leak_memory, sleep_pid

import parexec as px

MiB = 2**20


def test_process_task_peak_memory_is_measured():
    """A process task holding 200 MiB reports a peak of at least that (and not wildly more)."""
    with px.Workflow("m", isolation="process") as wf:
        wf.add(px.task(hold_memory).options(id="big"), 200, 0.05)
        wf.add(px.task(hold_memory).options(id="small", after=["big"]), 10, 0.05)
    result = px.run(wf, max_workers=1, progress=False)
    big, small = result.tasks["big"].peak_memory, result.tasks["small"].peak_memory
    assert 200 * MiB <= big < 400 * MiB
    # the same reused worker: the peak was reset between tasks
    assert result.tasks["big"].worker == result.tasks["small"].worker
    assert small < 150 * MiB
    assert result.stats.peak_memory >= big


def test_thread_task_reports_process_wide_peak():
    """A thread task's peak is the driver process's sampled peak during its run."""
    with px.Workflow("m") as wf:
        wf.add(px.task(hold_memory).options(id="t"), 150, 0.5)
    result = px.run(wf, progress=False)
    assert result.tasks["t"].peak_memory >= 150 * MiB
    assert result.stats.cpu_utilization is not None


def test_memory_limit_stops_a_runaway_task_alone():
    """A leaking process task above its declared memory is killed with MemoryLimitExceeded,
    retried per its policy, while a sibling finishes undisturbed."""
    with px.Workflow("m", isolation="process") as wf:
        # 20 MiB every 20 ms: a sample delayed by load still catches it well under 1.5 GB
        wf.add(px.task(leak_memory).options(id="leak", memory="300MB", on_error="ignore",
                                            retry=px.Retry(1, initial_delay=0)), 20)
        wf.add(px.task(sleep_pid).options(id="sibling"), 1.5)
    result = px.run(wf, max_workers=2, progress=False)
    leak = result.tasks["leak"]
    assert leak.status == "failed" and isinstance(leak.error, px.MemoryLimitExceeded)
    assert isinstance(leak.error, MemoryError) and "'leak'" in str(leak.error)
    assert leak.attempts == 2
    assert 300e6 < leak.peak_memory < 1.5e9  # stopped long before it reached 4 GB
    sib = result.tasks["sibling"]
    assert sib.status == "succeeded" and sib.attempts == 1 and sib.value == sib.worker


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_blas_threads_are_capped_at_cpus(isolation):
    """Inside a task, numpy's BLAS uses as many threads as the task's cpus."""
    pytest.importorskip("numpy")
    pytest.importorskip("threadpoolctl")
    with px.Workflow("b", isolation=isolation) as wf:
        wf.add(px.task(helpers.blas_threads).options(id="one", cpus=1))
        wf.add(px.task(helpers.blas_threads).options(id="two", cpus=2, after=["one"]))
        wf.add(px.task(helpers.blas_threads).options(id="one-again", cpus=1, after=["two"]))
    result = px.run(wf, max_workers=2, progress=False)
    assert (result["one"], result["two"], result["one-again"]) == (1, 2, 1)


def test_driver_blas_and_environment_are_restored_after_a_thread_run():
    """Capping BLAS inside thread tasks leaves the driver's settings as they were."""
    pytest.importorskip("numpy")
    import os

    from threadpoolctl import threadpool_info
    before = [i["num_threads"] for i in threadpool_info()]
    env_before = os.environ.get("OPENBLAS_NUM_THREADS")
    with px.Workflow("b") as wf:
        wf.add(px.task(helpers.blas_threads).options(cpus=1))
    assert px.run(wf, progress=False)["blas_threads"] == 1
    assert [i["num_threads"] for i in threadpool_info()] == before
    assert os.environ.get("OPENBLAS_NUM_THREADS") == env_before


def test_task_waits_for_measured_memory(monkeypatch):
    """A task declaring memory waits while psutil reports too little available, and starts
    at the next re-check once the memory is there."""
    import threading

    import psutil

    from parexec import _scheduler

    monkeypatch.setattr(_scheduler, "MEMORY_RECHECK", 0.05)
    free = threading.Event()
    refusals = threading.Semaphore(0)  # one per measurement that found too little memory
    real = psutil.virtual_memory

    class Fake:
        def __init__(self):
            v = real()
            self.total = v.total
            self.available = v.available if free.is_set() else 1
            if not free.is_set():
                refusals.release()

    monkeypatch.setattr(psutil, "virtual_memory", Fake)
    release = threading.Event()

    def needs_memory():
        return free.is_set(), release.is_set()

    def on_event(e):
        if e.kind == "task:completed" and e.task_id == "needs-memory":
            release.set()

    with px.Workflow("m") as wf:
        wf.add(px.task(helpers.ignore_cancel).options(id="blocker"), release)
        wf.add(px.task(needs_memory).options(id="needs-memory", memory="50MB"))
    handle = px.start(wf, max_workers=2, memory_budget="1GB", on_event=on_event,
                      progress=False)
    try:
        # Refused when first ready, and again at a re-check: it waits and measures again.
        assert refusals.acquire(timeout=10) and refusals.acquire(timeout=10)
        free.set()
        result = handle.wait(30)
    finally:
        free.set()
        release.set()
        handle.wait(30)
    assert result.ok
    # It started once the memory was there, while "blocker" still ran: at a re-check, not
    # because the run had nothing else running.
    assert result["needs-memory"] == (True, False)


def record_hold(folder, mib, seconds):
    """Hold ``mib`` MiB (touched) for ``seconds``; write when the hold began and ended."""
    import os
    import time
    block = bytearray(mib * MiB)
    for k in range(0, len(block), 4096):
        block[k] = 1
    began = time.monotonic()
    time.sleep(seconds)
    ended = time.monotonic()
    path = os.path.join(folder, f"{os.getpid()}-{began}")
    with open(path, "w") as f:
        f.write(f"{began} {ended} {len(block)}")
    return len(block)


def grow(mib, step=20):
    """Grow by ``step`` MiB every 20 ms up to ``mib`` MiB, then return the bytes held."""
    import time
    blocks = []
    while len(blocks) * step < mib:
        block = bytearray(step * MiB)
        for k in range(0, len(block), 4096):
            block[k] = 1
        blocks.append(block)
        time.sleep(0.02)
    return len(blocks) * step * MiB


def _max_held(folder):
    """Largest sum of bytes held at one moment, from the records of ``record_hold``."""
    import os
    edges = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            began, ended, size = f.read().split()
        edges += [(float(began), int(size)), (float(ended), -int(size))]
    held = peak = 0
    for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):  # ends before starts
        held += delta
        peak = max(peak, held)
    return peak


@pytest.mark.timeout(180)
def test_measured_memory_gate_keeps_undeclared_tasks_under_the_budget(tmp_path):
    """Six undeclared 500 MiB process tasks under memory_budget=1.5GB: the memory they hold
    at once stays under the budget (the first one's measured peak is the others' need), and
    all succeed at their first attempt, none stopped for the budget."""
    import warnings
    with px.Workflow("m", isolation="process") as wf:
        for k in range(6):
            wf.add(px.task(record_hold).options(id=f"hold{k}"), str(tmp_path), 500, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = px.run(wf, max_workers=6, memory_budget="1.5GB", progress=False)
    assert not [w for w in caught if "queued again" in str(w.message)]
    assert result.ok
    assert all(t.attempts == 1 for t in result.tasks.values())
    assert len(list(tmp_path.iterdir())) == 6
    assert _max_held(tmp_path) < 1.5e9


@pytest.mark.timeout(180)
def test_over_budget_stops_the_newest_process_task_and_queues_it_again(tmp_path):
    """When the run's process tasks together go above memory_budget, the most recently
    started one is stopped with a warning and queued again, without counting an attempt;
    it starts again once its measured need fits."""
    with px.Workflow("m", isolation="process") as wf:
        wf.add(px.task(record_hold).options(id="steady", priority=1), str(tmp_path), 300, 2.0)
        wf.add(px.task(grow).options(id="grower"), 1000)
    with pytest.warns(RuntimeWarning, match="'grower'.*queued again"):
        result = px.run(wf, max_workers=2, memory_budget="700MB", progress=False)
    assert result.ok
    steady, grower = result.tasks["steady"], result.tasks["grower"]
    assert steady.attempts == 1 and grower.attempts == 1
    assert grower.started_at >= steady.finished_at - 0.05
    assert grower.peak_memory >= 1000 * MiB


def test_monitor_reports_a_memory_limit_and_kills_nothing():
    """Above a task's declared memory the monitor puts a report on the run queue; the
    decision (and the kill) is the scheduler's."""
    import os
    import queue

    from parexec._monitor import Monitor

    class Pool:
        killed = []

        def kill_for_memory(self, *args):
            self.killed.append(args)

    class Attempt:
        memory_limit = 1
        peak_memory = None
        pool = Pool()

    runq = queue.SimpleQueue()
    monitor = Monitor(interval=0.01, queue=runq)
    attempt = Attempt()
    try:
        monitor.watch(attempt, os.getpid())
        assert runq.get(timeout=10) == (None, "memory", None, None, None)
        kind, who, used, limit = monitor.reports.popleft()
        assert (kind, who, limit) == ("limit", attempt, 1) and used > 1
    finally:
        monitor.stop()
    assert Pool.killed == []
