"""Tests of parexec._results: RunResult access, errors, stats, summary."""

from __future__ import annotations

import pytest

import parexec as px
from helpers import boom, noop, sleep_then


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
    assert s.max_concurrency == 2 and s["makespan"] == s.makespan
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
