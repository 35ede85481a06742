"""Tests of parexec._results: RunResult access, errors, stats, summary."""

from __future__ import annotations

import pytest
from helpers import boom, noop, overlap_by_events, sleep_then
from hypothesis import given
from hypothesis import strategies as st

import parexec as px


def make_result():
    with px.Workflow("res") as wf:
        a = wf.add(sleep_then, 0.05, 1)
        b = wf.add(sleep_then, 0.05, 2)
        bad = wf.add(px.task(boom).options(id="bad", on_error="skip"), "nope")
        wf.add(px.task(noop).options(id="after-bad"), bad)
        total = wf.add(lambda x, y: x + y, a, b)
    return px.run(wf, progress=False), a, total


def test_values_errors_and_statuses():
    """Results, errors and per-task records are reachable by ref and by id."""
    result, a, total = make_result()
    assert result.status == "partial" and not result.ok
    assert result[a] == 1 and result[total] == 3
    assert result.results == {"sleep_then": 1, "sleep_then-2": 2, "<lambda>": 3}
    assert set(result.errors) == {"bad"} and isinstance(result.errors["bad"], ValueError)
    with pytest.raises(ValueError, match="nope"):
        result["bad"]
    with pytest.raises(px.Cancelled, match="skipped"):
        result["after-bad"]
    with pytest.raises(KeyError):
        result["missing"]
    tr = result.tasks["sleep_then"]
    assert tr.duration >= 0.04 and tr.wait_time >= 0 and tr.attempts == 1
    assert isinstance(tr.worker, str) and tr.worker.startswith("parexec-res")


def test_stats_make_sense():
    """Makespan, task time, speedup and concurrency agree with the run."""
    result, _, _ = make_result()
    s = result.stats
    assert s.makespan > 0.05 and s.total_task_time >= 0.1
    assert s.speedup == pytest.approx(s.total_task_time / s.makespan)
    # Concurrency as the task records show it (a, b and bad start together, so 2 or 3
    # depending on the machine's cores): never a fixed number.
    spans = [(t.started_at, t.finished_at) for t in result.tasks.values()
             if t.started_at is not None]
    assert s.max_concurrency == max(sum(s0 <= start < f for s0, f in spans)
                                    for start, _ in spans)
    assert 1 <= s.max_concurrency <= 3 and s["makespan"] == s.makespan
    assert s.critical_path[-1] == "<lambda>" and s.scheduler_overhead > 0


def test_summary_is_an_aligned_table():
    """summary() has a header, one row per task and a closing line."""
    result, _, _ = make_result()
    lines = result.summary().splitlines()
    assert lines[0].split()[:3] == ["task", "status", "attempts"]
    assert len(lines) == 2 + len(result.tasks) + 2
    assert any(line.startswith("bad ") and "failed" in line for line in lines)
    assert lines[-1].startswith("res: partial")


def test_raise_on_error_and_workflow_failed_group():
    """raise_on_error raises an ExceptionGroup of the task errors carrying the result."""
    result, _, _ = make_result()
    with pytest.raises(px.WorkflowFailed) as info:
        result.raise_on_error()
    assert isinstance(info.value, ExceptionGroup) and info.value.result is result
    with pytest.raises(ExceptionGroup):
        try:
            result.raise_on_error()
        except* ValueError as group:
            assert len(group.exceptions) == 1
            raise
    ok = px.run(px.Workflow("empty"), progress=False)
    assert ok.raise_on_error() is ok and ok.status == "succeeded"


def test_last_result_is_the_latest_run():
    """px.last_result() returns the most recent finished run."""
    result, _, _ = make_result()
    assert px.last_result() is result


def flaky_by_attempt(seconds):
    """Overrun the timeout on the first attempt, return at once on the next."""
    import time
    if px.current().attempt == 1:
        time.sleep(seconds)
    return "ok"


@pytest.mark.timeout(60)
def test_timed_out_attempts_count_in_total_and_critical_path():
    """A task whose first attempt timed out: 'total' and the critical path include that
    attempt, while 'duration' is the last attempt's."""
    with px.Workflow("w") as wf:
        slow = wf.add(px.task(flaky_by_attempt).options(
            id="slow", isolation="process", timeout=1.5, retry=px.Retry(1, initial_delay=0)), 30)
        for k in range(3):
            wf.add(px.task(sleep_then).options(id=f"quick{k}"), 0.2)
        wf.add(px.task(noop).options(id="after"), slow)
    result = px.run(wf, progress=False)
    tr = result.tasks["slow"]
    assert tr.attempts == 2 and len(tr.history) == 1 and tr.history[0][4] == "timed_out"
    assert tr.duration < 1.0 <= 1.5 <= tr.elapsed
    assert result.stats.critical_path == ["slow", "after"]
    header, _, *rows = result.summary().splitlines()
    assert "total" in header.split()
    row = next(r for r in rows if r.startswith("slow "))
    assert f"{tr.elapsed:.2f}s" in row


def test_worker_column_reads_as_thread_or_process():
    """Workers are shown as `thread N` or `process PID`, in the summary and the HTML."""
    import os
    with px.Workflow("w") as wf:
        wf.add(px.task(noop).options(id="t"))
        wf.add(px.task(os.getpid).options(id="p", isolation="process"))
    result = px.run(wf, progress=False)
    pid = result["p"]
    text = result.summary()
    assert f"process {pid}" in text and "thread 1" in text
    assert f"process {pid}" in result._repr_html_()
    assert result.tasks["p"].worker == pid  # the record keeps the raw pid (API section 5)


def test_levels_and_parallel_groups():
    """Each task records its dependency level; stats count the levels where more than one
    task ran at once, and the summary shows both."""
    import threading
    both = threading.Barrier(2, timeout=30)  # the two level-0 tasks provably overlap

    def meet():
        both.wait()
        return 1

    with px.Workflow("w") as wf:
        a = wf.add(px.task(meet).options(id="a"))
        b = wf.add(px.task(meet).options(id="b"))
        c = wf.add(px.task(lambda x, y: x + y).options(id="c"), a, b)
        wf.add(px.task(noop).options(id="d"), c)
    result = px.run(wf, max_workers=2, progress=False)
    assert [result.tasks[t].level for t in "abcd"] == [0, 0, 1, 2]
    assert result.stats.parallel_groups == 1
    assert "1 parallel group(s)" in result.summary()
    with px.Workflow("w") as wf:
        a, b = wf.add(noop), wf.add(noop)
        wf.add(noop, a, b)
    assert px.run(wf, parallel=False, progress=False).stats.parallel_groups == 0


def test_statuses_are_enums_that_equal_their_text():
    """RunResult.status is a RunStatus and TaskRun.status a TaskStatus, each equal to its
    text (issue 14: one TaskStatus); a pickle round trip keeps both."""
    import pickle

    from parexec._status import RunStatus, TaskStatus
    result, _, _ = make_result()
    assert type(result.status) is RunStatus and result.status == "partial"
    tr = result.tasks["bad"]
    assert isinstance(tr.status, TaskStatus) and tr.status == "failed"
    back = pickle.loads(pickle.dumps(result))
    assert back.status == "partial" and type(back.status) is RunStatus
    assert {tid: t.status for tid, t in back.tasks.items()} == {
        "sleep_then": "succeeded", "sleep_then-2": "succeeded", "bad": "failed",
        "after-bad": "skipped", "<lambda>": "succeeded"}
    assert all(isinstance(t.status, TaskStatus) for t in back.tasks.values())
    assert back.counts() == {"succeeded": 3, "failed": 1, "skipped": 1}


def test_task_run_starts_pending_and_accepts_plain_text():
    """A new TaskRun is TaskStatus.PENDING; a status assigned as plain text (as the
    scheduler still does) counts, prints and reads the same as the enum member."""
    from parexec._status import TaskStatus
    fresh = px.TaskRun("t")
    assert fresh.status is TaskStatus.PENDING and not fresh.ok
    plain, member = px.TaskRun("a"), px.TaskRun("b")
    plain.status, member.status = "cached", TaskStatus.CACHED
    assert plain.ok and member.ok
    result = px.RunResult("w", "succeeded", {"a": plain, "b": member}, px.RunStats(), 0.0, 1.0)
    assert result.counts() == {"cached": 2}
    assert "<TaskRun 'b' cached attempts=0>" == repr(member)
    assert "2 cached" in result.summary() and "w: succeeded" in result.summary()


def test_run_result_converts_a_plain_status_and_rejects_unknown_text():
    """RunResult(status="failed") holds RunStatus.FAILED; an unknown status is a ValueError
    naming the value and the valid ones."""
    from parexec._status import RunStatus
    result = px.RunResult("w", "failed", {}, px.RunStats(), 0.0, 1.0)
    assert result.status is RunStatus.FAILED
    assert "status 'failed'" in str(result._failure({}).exceptions[0])
    with pytest.raises(ValueError, match=r"'done'.*'succeeded', 'partial'"):
        px.RunResult("w", "done", {}, px.RunStats(), 0.0, 1.0)


def test_build_stats_derives_path_peak_and_pools_from_the_records():
    """build_stats computes from the task records what the scheduler used to pass in: the
    critical path weighted by each task's elapsed time (retries included), the peak memory
    (the driver's or a task's, None when nothing was monitored) and every named pool."""
    from parexec._graph import Graph
    from parexec._results import build_stats

    def record(tid, start, end, peak=None, first=None):
        tr = px.TaskRun(tid)
        tr.status, tr.attempts = "succeeded", 1
        tr.started_at, tr.finished_at, tr.peak_memory = start, end, peak
        tr.first_started_at = start if first is None else first
        return tr

    # a -> c and b -> c: b's last attempt is short, but its retries make it the longer one
    runs = [record("a", 0.5, 3.0), record("b", 2.5, 3.0, peak=500, first=0.0),
            record("c", 3.0, 4.0)]
    graph = Graph(ids=["a", "b", "c"], deps=[[], [], [0, 1]], dependents=[[2], [2], []],
                  order=[0, 1, 2], estimates=[1.0] * 3, rank=[0.0] * 3)
    stats = build_stats(runs, [False] * 3, makespan=4.0, graph=graph, pools=["db"],
                        pool_utilization={"net": 0.5}, driver_peak=200, cpu_utilization=12.0)
    assert stats.critical_path == ["b", "c"]
    assert stats.peak_memory == 500 and stats.cpu_utilization == 12.0
    assert stats.pool_utilization == {"net": 0.5, "db": 0.0}
    assert stats.total_task_time == 4.0 and stats.max_concurrency == 2
    unmonitored = build_stats(runs, [False] * 3, makespan=4.0, graph=graph)
    assert unmonitored.peak_memory is None and unmonitored.critical_path == ["b", "c"]
    # what older callers pass still wins
    old = build_stats(runs, [False] * 3, makespan=4.0, pool_utilization={},
                      critical_path=["a"], scheduler_overhead=0.1)
    assert old.critical_path == ["a"] and old.scheduler_overhead == 0.1
    assert build_stats([], [], makespan=0.0, graph=graph).critical_path == []


@given(st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0, 1.5]) | st.floats(0, 10),
                          st.sampled_from([0.0, 0.5]) | st.floats(0, 5)), max_size=40))
def test_peak_overlap_counts_the_most_open_intervals(raw):
    """max_concurrency's counter (sorted starts merged with sorted ends) equals the event
    sweep for any intervals, ties and empty ones included."""
    from parexec._results import _peak_overlap
    spans = [(s, s + d) for s, d in raw]
    assert _peak_overlap(spans) == overlap_by_events(spans)


_TIME = st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 10)
_RECORD = st.tuples(
    st.none() | _TIME,                                        # started_at
    st.none() | st.floats(0, 3),                              # duration (finished_at)
    st.none() | st.integers(0, 2),                            # level
    st.none() | st.lists(st.tuples(_TIME, st.floats(0, 2)), min_size=1, max_size=3),
    st.booleans(),                                            # is a group
    st.integers(0, 100), st.integers(0, 100))                 # shm, pipe bytes


@given(st.lists(_RECORD, max_size=25))
def test_build_stats_matches_the_plain_definitions(raw):
    """For any records (never started, retried, grouped, at any level), the one-pass figures
    equal their definitions: the time of every attempt of every non-group task, the most of
    them open at once, the levels whose attempts overlap, the bytes, the longest path by
    elapsed time."""
    from parexec._graph import Graph, critical_path
    from parexec._results import _peak_overlap, build_stats
    from parexec._status import AttemptRecord

    runs, groups = [], []
    for k, (start, took, level, history, group, shm, pipe) in enumerate(raw):
        tr = px.TaskRun(f"t{k}")
        tr.started_at = start
        tr.finished_at = None if start is None or took is None else start + took
        tr.level = level
        if history:
            tr.history = [AttemptRecord(n + 1, s, s + d, None, "failed")
                          for n, (s, d) in enumerate(history)]
            tr.first_started_at = history[0][0]
        tr.shm_bytes, tr.pipe_bytes = shm, pipe
        runs.append(tr)
        groups.append(group)
    n = len(runs)
    chain = Graph(ids=[tr.id for tr in runs], deps=[(k - 1,) if k else () for k in range(n)],
                  dependents=[(k + 1,) if k + 1 < n else () for k in range(n)],
                  order=list(range(n)), estimates=[1.0] * n, rank=[1.0] * n)
    stats = build_stats(runs, groups, makespan=10.0, graph=chain)

    spans, by_level = [], {}
    for tr, group in zip(runs, groups, strict=True):
        if group:
            continue
        mine = [(s, f) for _, s, f, _, _ in tr.history or ()]
        if tr.started_at is not None and tr.finished_at is not None:
            mine.append((tr.started_at, tr.finished_at))
        spans += mine
        if tr.level is not None:
            by_level.setdefault(tr.level, []).extend(mine)
    assert stats.total_task_time == pytest.approx(sum(f - s for s, f in spans))
    assert stats.max_concurrency == overlap_by_events(spans)
    assert stats.parallel_groups == sum(1 for level in by_level.values()
                                        if _peak_overlap(level) > 1)
    assert (stats.shm_bytes, stats.pipe_bytes) == (sum(r[5] for r in raw),
                                                   sum(r[6] for r in raw))
    assert stats.critical_path == critical_path(chain, [tr.elapsed or 0.0 for tr in runs])
