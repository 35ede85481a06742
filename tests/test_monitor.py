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

    from parexec import _dispatch

    monkeypatch.setattr(_dispatch, "MEMORY_RECHECK", 0.05)
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

    from parexec._messages import OverLimit
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
        report = runq.get(timeout=10)
        assert type(report) is OverLimit
        assert (report.attempt, report.limit) == (attempt, 1) and report.used > 1
    finally:
        monitor.stop()
    assert Pool.killed == []


# Learned memory and memory_factor (issue 17 items 2, 3 and 5) ----------------------------------

def _touch(mib):
    block = bytearray(mib * MiB)
    for k in range(0, len(block), 4096):
        block[k] = 1
    return block


def _wait_for(path, seconds):
    """Poll for a file for at most ``seconds``; whether it appeared."""
    import os
    import time
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def peak_first(folder, mib):
    """Peak at once, then wait (at most 3 s) until the other task is up: run together, the
    two tasks overlap in time but not in memory."""
    import os
    del_me = _touch(mib)
    del del_me
    open(os.path.join(folder, "first-done"), "w").close()
    _wait_for(os.path.join(folder, "second-up"), 3)


def peak_second(folder, mib):
    """Say it is up, wait (at most 30 s) for the first task's peak to be over, then peak."""
    import os
    open(os.path.join(folder, "second-up"), "w").close()
    _wait_for(os.path.join(folder, "first-done"), 30)
    del_me = _touch(mib)
    del del_me


@pytest.mark.timeout(180)
def test_learned_memory_changes_what_runs_at_once(tmp_path):
    """Two undeclared process tasks whose peaks never overlap run together under the
    budget; the next run with the same store admits each with its recorded peak, and the
    two peaks do not fit the budget together, so they run one at a time."""
    db = str(tmp_path / "runs.db")
    budget = 1100 * MiB  # above one 600 MiB peak plus two workers, below two peaks

    def run(folder):
        folder.mkdir()
        with px.Workflow("learned", isolation="process") as wf:
            wf.add(px.task(peak_first).options(id="first", priority=1), str(folder), 600)
            wf.add(px.task(peak_second).options(id="second"), str(folder), 600)
        return px.run(wf, max_workers=2, memory_budget=budget, store=db, progress=False)

    before = run(tmp_path / "one")
    assert before.ok and before.stats.max_concurrency == 2
    assert before.tasks["first"].memory_source is None
    peak = before.tasks["first"].peak_memory
    assert peak >= 600 * MiB
    after = run(tmp_path / "two")
    assert after.ok and after.stats.max_concurrency == 1
    first = after.tasks["first"]
    assert (first.memory_need, first.memory_source) == (peak, "learned")
    assert "learned" in after.summary() and "learned" in after._repr_html_()


@pytest.mark.timeout(120)
def test_a_learned_need_above_the_budget_is_capped_with_a_warning(tmp_path):
    """A recorded peak above the run's budget is admitted as the whole budget, with a
    warning naming the task: it still runs."""
    db = str(tmp_path / "runs.db")
    with px.Workflow("capped", isolation="process") as wf:
        wf.add(px.task(hold_memory).options(id="big"), 300, 0.2)
    assert px.run(wf, store=db, progress=False).tasks["big"].peak_memory >= 300 * MiB
    with pytest.warns(RuntimeWarning, match="task 'big': its last successful run peaked at .*"
                      "above memory_budget=200 MB; it is admitted with the whole budget"):
        result = px.run(wf, store=db, memory_budget="200MB", progress=False)
    big = result.tasks["big"]
    assert result.ok and (big.memory_need, big.memory_source) == (200 * 10**6, "learned")


def grow_and_hold(mib, seconds=1.0):
    """Hold ``mib`` MiB (touched) for ``seconds`` so the monitor samples it."""
    import time
    block = _touch(mib)
    time.sleep(seconds)
    return len(block)


@pytest.mark.timeout(120)
def test_retry_with_memory_factor_succeeds_where_the_same_retry_fails():
    """A process task stopped by MemoryLimitExceeded is retried with memory x4 and succeeds;
    the same policy without memory_factor fails again with MemoryLimitExceeded."""
    def run(retry):
        with px.Workflow("factor", isolation="process") as wf:
            wf.add(px.task(grow_and_hold).options(id="grow", memory="150MB", retry=retry), 200)
        return px.run(wf, memory_budget="2GB", progress=False, check=False)

    plain = run(px.Retry(1, initial_delay=0))
    assert plain.status == "failed"
    assert isinstance(plain.tasks["grow"].error, px.MemoryLimitExceeded)
    assert plain.tasks["grow"].attempts == 2
    grown = run(px.Retry(1, initial_delay=0, memory_factor=4))
    grow = grown.tasks["grow"]
    assert grown.ok and grow.attempts == 2 and grow.value == 200 * MiB
    assert (grow.memory_need, grow.memory_source) == (600 * 10**6, "declared")


@pytest.mark.timeout(60)
def test_memory_factor_never_goes_above_the_budget():
    """The grown limit and need stop at the run's budget."""
    with px.Workflow("factor", isolation="process") as wf:
        wf.add(px.task(grow_and_hold).options(
            id="grow", memory="150MB", retry=px.Retry(2, initial_delay=0, memory_factor=10)),
            400)
    result = px.run(wf, memory_budget="300MB", progress=False, check=False)
    grow = result.tasks["grow"]
    assert isinstance(grow.error, px.MemoryLimitExceeded) and grow.attempts == 3
    assert grow.memory_need == 300 * 10**6


def test_a_learned_need_grows_when_its_task_is_stopped_for_the_budget():
    """A task admitted with a learned need and stopped for the run's budget comes back with
    the larger of its measured peak and its need times memory_factor, at most the budget;
    declared needs are left alone."""
    from types import SimpleNamespace

    from parexec._gates import MemoryGate
    from parexec._results import TaskRun
    from parexec._scheduler import Scheduler as _Scheduler

    gate = MemoryGate(1000, [300.0, 300.0, 300.0])
    runs = [TaskRun("a"), TaskRun("b"), TaskRun("c")]
    for tr, source in zip(runs, ("learned", "learned", "declared"), strict=True):
        tr.memory_source = source
    specs = [SimpleNamespace(retry=px.Retry(1, memory_factor=2)), SimpleNamespace(retry=None),
             SimpleNamespace(retry=None)]
    me = SimpleNamespace(mem_gate=gate, runs=runs, specs=specs)
    _Scheduler.evicted_need(me, 0, 400)
    assert gate.needs[0] == 600 and runs[0].memory_need == 600  # 300 x 2 > its peak
    _Scheduler.evicted_need(me, 0, 900)
    assert gate.needs[0] == 1000  # max(900, 1200), capped at the budget
    _Scheduler.evicted_need(me, 1, 450)
    assert gate.needs[1] == 450  # no factor: its measured peak
    _Scheduler.evicted_need(me, 2, 900)
    assert gate.needs[2] == 300 and runs[2].memory_need is None
