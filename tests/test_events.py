"""Tests of parexec._events: order, subscribers, failing callbacks, progress bar."""

from __future__ import annotations

import io
import logging

import pytest
from helpers import boom, noop

import parexec as px
from parexec._events import ProgressBar


def test_event_order_per_task_and_run():
    """workflow:started first; queued < started < completed per task; one final event."""
    with px.Workflow("ev") as wf:
        a = wf.add(noop)
        wf.add(noop, a)
    events = []
    wf.on("*", events.append)
    px.run(wf, progress=False)
    kinds = [e.kind for e in events]
    assert kinds[0] == "workflow:started" and kinds[-1] == "workflow:completed"
    for tid in ("noop", "noop-2"):
        mine = [e.kind for e in events if e.task_id == tid]
        assert mine == ["task:queued", "task:started", "task:completed"]
    done = [e for e in events if e.kind == "task:completed"]
    assert all(e.workflow == "ev" and e.attempt == 1 and e.duration >= 0 for e in done)


def test_kind_filter_and_on_event_together():
    """wf.on(kind) sees only that kind; run(on_event=) sees everything."""
    with px.Workflow("ev") as wf:
        wf.add(px.task(boom).options(on_error="ignore"))
    failed, everything = [], []
    wf.on("task:failed", failed.append)
    px.run(wf, on_event=everything.append, progress=False)
    assert [e.kind for e in failed] == ["task:failed"]
    assert isinstance(failed[0].error, ValueError)
    assert len(everything) > 1


def test_failing_callback_is_logged_once_and_run_goes_on(caplog):
    """A callback that raises is logged once on the parexec logger; the run succeeds."""
    with px.Workflow("ev") as wf:
        for _ in range(5):
            wf.add(noop)
    calls = []

    def bad(event):
        calls.append(event)
        raise RuntimeError("subscriber bug")

    with caplog.at_level(logging.ERROR, logger="parexec"):
        result = px.run(wf, on_event=bad, progress=False)
    assert result.ok and len(calls) > 5
    logged = [r for r in caplog.records if "event callback" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].exc_info is not None and "subscriber bug" in str(logged[0].exc_info[1])


def test_progress_bar_counts_and_closes():
    """The progress bar counts finished tasks and failures, and closes at the end."""
    with px.Workflow("bar") as wf:
        for _ in range(3):
            wf.add(noop)
        wf.add(px.task(boom).options(on_error="ignore"))
    bar = ProgressBar(len(wf), "bar")
    bar._bar.fp = io.StringIO()
    px.run(wf, on_event=bar, progress=False)
    assert bar._bar.n == 4 and bar.failed == 1 and bar._closed


def test_progress_option_is_validated():
    """progress= accepts only True, False or 'auto'."""
    with pytest.raises(px.TaskOptionError, match="progress="):
        px.run(px.Workflow("w"), progress="sometimes")


def test_progress_on_a_non_terminal_writes_whole_lines(monkeypatch):
    """When stderr is a file, the bar writes whole lines, so log lines never glue onto it."""
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    log = logging.getLogger("parexec")
    handler = logging.StreamHandler(err)
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        with px.Workflow("w") as wf:
            wf.add(px.task(boom).options(id="bad", on_error="ignore"))
            wf.add(px.task(noop).options(id="fine"))
        px.run(wf, progress=True)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert any(line.startswith("task 'bad' failed") for line in lines), lines
    assert any(line.startswith("w: 100%|") for line in lines), lines


def test_event_kinds_are_named_once():
    """The event kinds come from _status (one place names them): EVENT_KINDS is the tuple of
    the EventKind Literal, and Event.kind is typed EventKind."""
    import typing

    from parexec import _events, _status
    assert px.EVENT_KINDS is _status.EVENT_KINDS is _events.EVENT_KINDS
    assert px.EVENT_KINDS == typing.get_args(_status.EventKind)
    assert typing.get_type_hints(px.Event, vars(_events))["kind"] == _status.EventKind
    with pytest.raises(px.TaskOptionError, match="did you mean 'task:failed'"):
        _events.check_kind("task:faild")
