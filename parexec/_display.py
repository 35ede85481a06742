"""Looking at runs and workflows: HTML tables for notebooks and a Gantt chart.

``RunResult._repr_html_`` and ``Workflow._repr_html_`` make Jupyter show a table instead of a
repr; ``RunResult.plot()`` draws one row per worker (thread or process), one bar per attempt
coloured by outcome, the critical path outlined. matplotlib is optional (the ``plot`` extra)
and only imported by ``plot()``; it uses ``matplotlib.figure.Figure`` directly, so no
backend is chosen on the user's behalf.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from ._format import fmt_bytes as _mem
from ._format import fmt_secs as _secs
from ._format import memory_need_label, worker_label
from ._status import TaskStatus

if TYPE_CHECKING:  # only for annotations: _results imports this module (lazily) to draw
    from ._results import RunResult
    from ._workflow import Workflow

__all__ = ["COLORS", "result_html", "result_plot", "workflow_html"]

# One colour per task status (every final one, and the states before it). A run's status
# takes the colour of the task status of the same name ("partial" has none: black).
COLORS: dict[str, str] = {
    TaskStatus.SUCCEEDED: "#2e7d32", TaskStatus.CACHED: "#81c784", TaskStatus.FAILED: "#c62828",
    TaskStatus.TIMED_OUT: "#ef6c00", TaskStatus.CANCELLED: "#757575",
    TaskStatus.SKIPPED: "#bdbdbd", TaskStatus.PENDING: "#90a4ae", TaskStatus.READY: "#90a4ae",
    TaskStatus.RUNNING: "#1565c0", TaskStatus.RETRYING: "#f9a825",
}


def result_html(result: RunResult, max_rows: int = 200) -> str:
    """An HTML table of a run: one row per task with status colours, then the figures."""
    e = html.escape
    s = result.stats
    counts = ", ".join(f"{v} {e(k)}" for k, v in result.counts().items())
    head = (f"<div><b>{e(result.workflow)}</b>: <span style='color:"
            f"{COLORS.get(result.status, '#000')}'><b>{e(result.status)}</b></span> "
            f"({counts}) in {_secs(s.makespan)}; task time {_secs(s.total_task_time)}, "
            f"speedup {s.speedup:.2f}, max concurrency {s.max_concurrency}"
            + (f", peak memory {_mem(s.peak_memory)}" if s.peak_memory else "") + "</div>")
    cols: tuple[str, ...] = ("task", "status", "attempts", "duration", "total", "wait",
                             "worker", "peak memory", "error")
    needs = any(tr.memory_source for tr in result.tasks.values())
    if needs:  # what admission counted, and where it came from
        cols = cols[:-1] + ("memory need", "error")
    rows = []
    for n, tr in enumerate(result.tasks.values()):
        if n == max_rows:
            rows.append(f"<tr><td colspan='{len(cols)}'>… {len(result.tasks) - max_rows} more "
                        "tasks (see .tasks)</td></tr>")
            break
        color = COLORS.get(tr.status, "#000")
        err = "" if tr.error is None else f"{type(tr.error).__name__}: {tr.error}"
        status = f"<span style='color:{color}'><b>{e(tr.status)}</b></span>"
        cells: tuple[str, ...] = (
            e(tr.id), status, str(tr.attempts), _secs(tr.duration), _secs(tr.elapsed),
            _secs(tr.wait_time), e(worker_label(tr.worker)), _mem(tr.peak_memory))
        if needs:
            cells += (e(memory_need_label(tr)),)
        cells += (e(err[:200]),)
        rows.append("<tr>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in cells)
                    + "</tr>")
    table = ("<table><thead><tr>" + "".join(f"<th style='text-align:left'>{c}</th>"
                                            for c in cols)
             + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    path = " → ".join(e(t) for t in s.critical_path)
    return head + table + (f"<div>critical path: {path}</div>" if path else "")


def workflow_html(wf: Workflow) -> str:
    """An HTML summary of a workflow: its tasks, levels and critical path."""
    e = html.escape
    try:
        levels = wf.levels()
        path = wf.critical_path()
        problem = ""
    except Exception as exc:  # noqa: BLE001 - an invalid workflow still displays
        levels, path, problem = [], [], f"{type(exc).__name__}: {exc}"
    rows = []
    for tid, spec in list(wf.tasks.items())[:200]:
        kind = "group" if spec.group is not None else (spec.isolation or wf.isolation)
        rows.append(f"<tr><td>{e(tid)}</td><td>{e(kind)}</td>"
                    f"<td>{e(', '.join(spec.deps))}</td></tr>")
    head = (f"<div><b>Workflow {e(wf.name)}</b>: {len(wf)} tasks, {len(levels)} levels"
            + (f"; <span style='color:#c62828'>{e(problem)}</span>" if problem else "")
            + "</div>")
    table = ("<table><thead><tr><th style='text-align:left'>task</th><th style='text-align:"
             "left'>runs on</th><th style='text-align:left'>depends on</th></tr></thead>"
             "<tbody>" + "".join(rows) + "</tbody></table>")
    lv = "".join(f"<li>{k}: {e(', '.join(level[:20]))}{' …' if len(level) > 20 else ''}</li>"
                 for k, level in enumerate(levels[:30]))
    return (head + table + (f"<div>levels:<ul>{lv}</ul></div>" if lv else "")
            + (f"<div>critical path: {' → '.join(e(p) for p in path)}</div>" if path else ""))


def result_plot(result: RunResult, ax: Any = None) -> Any:
    """A Gantt chart of the run (see ``RunResult.plot``); returns the matplotlib Figure."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError("RunResult.plot() needs matplotlib: pip install 'parexec[plot]'") \
            from None
    bars: list[tuple[str, float, float, str, str]] = []  # worker, start, end, status, task
    t0 = result.started_at
    for tid, tr in result.tasks.items():
        for _, start, end, worker, outcome in tr.history or ():
            bars.append((worker_label(worker) or "driver", start - t0, end - t0, outcome, tid))
        if tr.started_at is not None and tr.finished_at is not None and tr.attempts:
            bars.append((worker_label(tr.worker) or "driver", tr.started_at - t0,
                         tr.finished_at - t0, tr.status,
                         tid))
    workers = sorted({b[0] for b in bars}, key=lambda w: (w.startswith("process"), w))
    row = {w: k for k, w in enumerate(workers)}
    if ax is None:
        fig = Figure(figsize=(10, 1.2 + 0.45 * max(1, len(workers))), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    critical = set(result.stats.critical_path)
    span = max((b[2] for b in bars), default=1.0) or 1.0
    for worker, start, end, status, tid in bars:
        y = row[worker]
        on_path = tid in critical and status in ("succeeded", "failed", "timed_out")
        ax.barh(y, max(end - start, span * 0.002), left=start, height=0.7,
                color=COLORS.get(status, "#000"), edgecolor="black" if on_path else "white",
                linewidth=2.0 if on_path else 0.5)
        if end - start > span * 0.06:
            ax.text(start + (end - start) / 2, y, tid, ha="center", va="center", fontsize=8,
                    color="white", clip_on=True)
    ax.set_yticks(range(len(workers)),
                  workers)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the start of the run")
    ax.set_title(f"{result.workflow}: {result.status} in {result.stats.makespan:.2f}s "
                 "(critical path outlined)")
    shown = sorted({b[3] for b in bars})
    ax.legend(handles=[Patch(color=COLORS.get(s, "#000"), label=s) for s in shown],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig
