"""Tests of parexec._monitor: measured memory per task, memory limits, run stats."""

from __future__ import annotations

import pytest

import parexec as px
import helpers
from helpers import hold_memory, leak_memory, sleep_pid

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
