"""Tests of parexec._display and the trace export: HTML tables, Gantt chart, Chrome trace."""

from __future__ import annotations

import json

import pytest
from helpers import boom, flaky, sleep_then

import parexec as px


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    counter = tmp_path_factory.mktemp("c") / "count"
    with px.Workflow("show <me>") as wf:
        a = wf.add(px.task(sleep_then).options(id="a"), 0.05, 1)
        wf.add(px.task(boom).options(id="bad", on_error="ignore", after=[a]), "x < y")
        wf.add(px.task(flaky).options(id="retried", retry=px.Retry(1, initial_delay=0)),
               str(counter), 1)
        wf.add(px.task(sleep_then).options(id="proc", isolation="process"), 0.05, 2)
    return px.run(wf, max_workers=2, progress=False)


def test_result_html_has_rows_colours_and_escaping(result):
    """The HTML table has one row per task, status colours, and escapes text."""
    page = result._repr_html_()
    assert page.count("<tr>") == 1 + len(result.tasks)
    assert "show &lt;me&gt;" in page and "x &lt; y" in page and "x < y" not in page
    assert "#c62828" in page and "#2e7d32" in page  # failed and succeeded colours
    assert "critical path" in page


def test_workflow_html_lists_tasks_levels_and_path():
    """A workflow's HTML names its tasks, levels and critical path, even when invalid."""
    with px.Workflow("w") as wf:
        a = wf.add(px.task(sleep_then).options(id="first"), 0)
        wf.add(px.task(sleep_then).options(id="second"), 0, a)
    page = wf._repr_html_()
    assert "first" in page and "levels:" in page and "first → second" in page
    wf.add(px.task(sleep_then).options(id="loop", after=["loop"]), 0)
    assert "CycleError" in wf._repr_html_()


def test_plot_draws_one_row_per_worker_and_a_bar_per_attempt(result, tmp_path):
    """The Gantt chart has a row per worker and a bar per attempt (retries included)."""
    pytest.importorskip("matplotlib")
    fig = result.plot()
    ax = fig.axes[0]
    workers = {str(t.worker) for t in result.tasks.values()} | \
        {str(h[3]) for t in result.tasks.values() for h in t.history or ()}
    assert len(ax.get_yticks()) == len(workers)
    attempts = sum(t.attempts for t in result.tasks.values())
    assert len(ax.patches) == attempts
    fig.savefig(tmp_path / "gantt.png")
    assert (tmp_path / "gantt.png").stat().st_size > 1000


def test_chrome_trace_has_an_event_per_attempt_and_names(result, tmp_path):
    """The trace has one complete event per attempt and names for every row."""
    path = tmp_path / "trace.json"
    result.to_chrome_trace(path)
    data = json.loads(path.read_text())
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(events) == sum(t.attempts for t in result.tasks.values())
    assert {e["args"]["status"] for e in events if e["name"] == "retried"} == \
        {"failed", "succeeded"}
    rows = {e["tid"] for e in events}
    named = {e["tid"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert rows <= named
    assert all(e["ts"] >= 0 and e["dur"] >= 0 for e in events)


def test_every_final_status_has_its_own_colour():
    """COLORS is keyed by TaskStatus: each final status has a colour of its own, and a
    status given as plain text finds the same colour."""
    from parexec._display import COLORS
    from parexec._status import FINAL, TaskStatus
    assert FINAL <= set(COLORS) and all(isinstance(k, TaskStatus) for k in COLORS)
    assert len({COLORS[s] for s in FINAL}) == len(FINAL)
    assert all(COLORS[str(s)] == COLORS[s] for s in FINAL)


def test_chrome_trace_writes_statuses_as_text(result, tmp_path):
    """The Chrome trace carries statuses as their text, whatever type the records hold."""
    path = tmp_path / "t.json"
    result.to_chrome_trace(path)
    data = json.loads(path.read_text())
    assert data["otherData"]["status"] == str(result.status)
    cats = {e["args"]["task"]: e["cat"] for e in data["traceEvents"] if e["ph"] == "X"}
    assert cats["a"] == "succeeded" and cats["bad"] == "failed"
