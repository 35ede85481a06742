"""What a run leaves behind: one ``TaskRun`` per task and a ``RunResult`` with stats.

Completed results stay available whatever happened to the rest of the run: a failure, a
timeout, a cancellation or Ctrl-C only changes the status of the tasks that did not finish.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._errors import Cancelled, ParexecError, TaskTimeout, WorkflowFailed
from ._format import fmt_bytes, fmt_secs, memory_need_label, printable, worker_label
from ._graph import critical_path as longest_path
from ._status import OK, AttemptRecord, RunStatus, TaskStatus

if TYPE_CHECKING:
    from ._graph import Graph
    from ._task import TaskRef

__all__ = ["RunResult", "RunStats", "RunStatus", "TaskRun", "TaskStatus", "build_stats",
           "memory_need_label", "printable", "worker_label"]


class TaskRun:
    """The record of one task in one run.

    Attributes:
        id: The task id.
        status: A ``TaskStatus`` (it equals its text): ``"succeeded"``, ``"failed"``,
            ``"skipped"``, ``"cancelled"``, ``"timed_out"`` or ``"cached"`` (``"pending"``
            only while the run is going on).
        value: The return value (succeeded or cached tasks), else None.
        error: The exception of the final failed attempt, else None.
        traceback: That exception's traceback as text (worker-side frames included).
        attempts: How many attempts started.
        queued_at: When all dependencies were done (epoch seconds), or None.
        started_at: When the last attempt started, or None.
        finished_at: When the task reached its final status, or None.
        worker: Pid of the process (process tasks) or name of the thread (thread tasks)
            that ran the last attempt (also when it was stopped); summaries show it as
            ``process 20596`` or ``thread 2``.
        peak_memory: Highest memory measured while it ran, in bytes, when measured: for a
            process task its worker's resident memory (children included, interpreter too);
            for a thread task the driver process's, which its neighbours share.
        first_started_at: When the first attempt started, or None.
        result_bytes: Size of the task's result in bytes as it left its worker (process
            tasks: pickle plus out-of-band buffers), else None.
        shm_bytes: Bytes its attempts moved through shared memory (arguments and result).
        pipe_bytes: Bytes its attempts moved through worker pipes.
        level: The dependency level (the "parallel group") it belongs to: 0 for tasks with
            no dependencies, else one more than its deepest dependency (``wf.levels()``).
        released: True when the task succeeded but its value was released once every
            consumer finished (``run(keep=...)`` other than ``"all"``); ``value`` is None.
        memory_need: Bytes of memory the task was admitted with (its last attempt), when
            its memory was declared, computed from its inputs or learned; else None.
        memory_source: Where ``memory_need`` came from: ``"declared"`` (``memory=``),
            ``"inputs"`` (a ``memory=`` callable of the task's arguments), ``"learned"``
            (the peak of its last success in the run's store), or None.
        history: The attempts before the last one, oldest first, as ``AttemptRecord``
            named tuples ``(number, started_at, finished_at, worker, outcome)``
            (``outcome`` is ``"failed"`` or ``"timed_out"``); None when the task ran once.
            ``duration`` covers only the last attempt; ``elapsed`` covers them all.
    """

    __slots__ = ("id", "status", "value", "error", "traceback", "attempts", "queued_at",
                 "started_at", "finished_at", "worker", "peak_memory", "first_started_at",
                 "history", "released", "level", "result_bytes", "shm_bytes", "pipe_bytes",
                 "memory_need", "memory_source")

    def __init__(self, id: str) -> None:
        self.id = id
        # The scheduler may still assign the plain text ("succeeded"); a TaskStatus compares
        # equal to it, so readers need not care which one they get.
        self.status: TaskStatus = TaskStatus.PENDING
        self.value: Any = None
        self.error: BaseException | None = None
        self.traceback: str | None = None
        self.attempts = 0
        self.queued_at: float | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.worker: int | str | None = None
        self.peak_memory: int | None = None
        self.first_started_at: float | None = None
        # Earlier attempts, (number, started_at, finished_at, worker, outcome); None until a
        # retry happens (most tasks never retry, and an empty list per task costs 56 bytes).
        self.history: list[AttemptRecord] | None = None
        self.released = False  # its value was dropped once consumed (run(keep=...))
        self.level: int | None = None  # its dependency level (parallel group), 0 = no deps
        self.result_bytes: int | None = None  # size of its pickled result (process tasks)
        self.shm_bytes = 0  # bytes its attempts moved through shared memory (both directions)
        self.pipe_bytes = 0  # ... and through worker pipes
        self.memory_need: int | None = None  # bytes admission counted for it
        self.memory_source: Literal["declared", "inputs", "learned"] | None = None

    @property
    def duration(self) -> float | None:
        """Seconds the last attempt ran (None if it never started)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    @property
    def elapsed(self) -> float | None:
        """Seconds from the first attempt's start to the final end (None if never started).

        Every attempt and every wait between retries counts.
        """
        if self.first_started_at is None or self.finished_at is None:
            return self.duration
        return self.finished_at - self.first_started_at

    @property
    def wait_time(self) -> float | None:
        """Seconds between being ready (queued) and the first start."""
        if self.queued_at is None or self.first_started_at is None:
            return None
        return max(0.0, self.first_started_at - self.queued_at)

    @property
    def ok(self) -> bool:
        """Whether the task produced its value (succeeded or cached)."""
        return self.status in OK

    def __repr__(self) -> str:
        d = self.duration
        took = f" {d:.3f}s" if d is not None else ""
        return f"<TaskRun {self.id!r} {self.status}{took} attempts={self.attempts}>"


@dataclass
class RunStats:
    """Figures of one run.

    Attributes:
        makespan: Seconds from the run's start to its end.
        total_task_time: Seconds of task execution, all attempts summed.
        speedup: ``total_task_time / makespan``.
        max_concurrency: Most attempts running at once.
        mean_concurrency: Time-averaged number of attempts running.
        pool_utilization: Per named pool, time-weighted units in use / capacity (0..1).
        peak_memory: Highest single resident-memory reading of the run, in bytes, when
            measured: the driver process or one process task's worker (children included),
            whichever was higher at its sample. It is not a sum over workers running at once.
        critical_path: Ids along the longest path, weighted by each task's ``elapsed`` time
            (every attempt, retries included).
        scheduler_overhead: CPU seconds the scheduler thread used.
        cpu_utilization: System CPU use during the run, in percent of all cores, if measured.
        parallel_groups: Dependency levels in which more than one task ran at the same time.
        shm_bytes: Bytes moved between the driver and process workers through shared memory.
        pipe_bytes: Bytes moved between the driver and process workers through pipes.
        maps: Per process map whose items went in batches (``template.map(batch=...)``),
            by the map's id: ``items`` sent, ``batches`` (batch size -> how many batches of
            that size), ``mean_item_time`` (seconds one item ran in its worker).
    """

    makespan: float = 0.0
    total_task_time: float = 0.0
    speedup: float = 0.0
    max_concurrency: int = 0
    mean_concurrency: float = 0.0
    pool_utilization: dict[str, float] = field(default_factory=dict)
    peak_memory: int | None = None
    critical_path: list[str] = field(default_factory=list)
    scheduler_overhead: float = 0.0
    cpu_utilization: float | None = None
    parallel_groups: int = 0
    shm_bytes: int = 0
    pipe_bytes: int = 0
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:  # stats["makespan"] reads like the API table
        return getattr(self, key)


def build_stats(tasks: Sequence[TaskRun], is_group: Sequence[bool], *, makespan: float,
                pool_utilization: Mapping[str, float] | None = None,
                critical_path: list[str] | None = None, scheduler_overhead: float = 0.0,
                graph: Graph | None = None, pools: Iterable[str] = (),
                cpu_utilization: float | None = None,
                driver_peak: int | None = None) -> RunStats:
    """The figures of a run, from its task records (groups are their members' work).

    Everything that can be read off the records is derived here: task time, concurrency,
    parallel groups, bytes moved, the critical path (from each task's ``elapsed``) and the
    peak memory. The caller gives what only the run knows.

    Args:
        tasks: The run's ``TaskRun`` records, in graph index order.
        is_group: Per record, whether it is a group or map (its members did the work).
        makespan: Seconds from the run's start to its end.
        pool_utilization: Per named pool, the time-weighted share of its units in use.
        critical_path: The critical path, if the caller computed it (older callers); by
            default it is computed from ``graph`` and the records' ``elapsed`` times.
        scheduler_overhead: CPU seconds the scheduler thread used.
        graph: The run's compiled graph, for the critical path (none without it, unless
            ``critical_path`` is given).
        pools: Names of the workflow's pools: each appears in ``pool_utilization``, at 0.0
            when no figure was given for it.
        cpu_utilization: System CPU use measured during the run, in percent, or None.
        driver_peak: The peak resident memory the run's monitor measured in the driver, or
            None when nothing was monitored: then ``peak_memory`` stays None; else it is the
            highest of it and the tasks' ``peak_memory``.

    Returns:
        The run's ``RunStats``.
    """
    # One pass over the records (a run may have 100,000): spans of every attempt, by level.
    spans: list[tuple[float, float]] = []
    by_level: dict[int, list[tuple[float, float]]] = {}
    total = 0.0
    for tr, group in zip(tasks, is_group, strict=True):
        if group:
            continue
        s, f, level = tr.started_at, tr.finished_at, tr.level
        if tr.history is None:  # ran once (or never): the common case
            if s is None or f is None:
                continue
            total += f - s
            span = (s, f)
            spans.append(span)
            if level is not None:
                same = by_level.get(level)
                if same is None:
                    by_level[level] = [span]
                else:
                    same.append(span)
            continue
        mine = [(s0, f0) for _, s0, f0, _, _ in tr.history]
        if s is not None and f is not None:
            mine.append((s, f))
        total += sum([f0 - s0 for s0, f0 in mine])
        spans.extend(mine)
        if level is not None:
            by_level.setdefault(level, []).extend(mine)
    utilization = dict(pool_utilization or {})
    for pool in pools:
        utilization.setdefault(pool, 0.0)
    if critical_path is None:
        critical_path = [] if graph is None or not tasks else longest_path(
            graph, [_elapsed(tr) for tr in tasks])  # every attempt counts
    peak = None
    if driver_peak is not None:
        peak = max([driver_peak, *(tr.peak_memory for tr in tasks if tr.peak_memory)]) or None
    peak_overlap = _peak_overlap(spans)
    levels = list(by_level.values())
    if len(levels) == 1 and len(levels[0]) == len(spans):  # one level holds every span
        parallel_groups = int(peak_overlap > 1)
    else:
        parallel_groups = sum(1 for level in levels if _peak_overlap(level, 1) > 1)
    return RunStats(
        makespan=makespan, total_task_time=total,
        speedup=total / makespan if makespan > 0 else 0.0,
        max_concurrency=peak_overlap,
        mean_concurrency=total / makespan if makespan > 0 else 0.0,
        pool_utilization=utilization, critical_path=critical_path,
        scheduler_overhead=scheduler_overhead, peak_memory=peak,
        cpu_utilization=cpu_utilization,
        parallel_groups=parallel_groups,
        shm_bytes=sum([tr.shm_bytes for tr in tasks]),
        pipe_bytes=sum([tr.pipe_bytes for tr in tasks]))


def _elapsed(tr: TaskRun) -> float:
    """``tr.elapsed or 0.0``, without the property calls (once per task of a run)."""
    f = tr.finished_at
    if f is None:
        return 0.0
    s = tr.first_started_at
    if s is None:
        s = tr.started_at
        if s is None:
            return 0.0
    return f - s


def _peak_overlap(spans: Sequence[tuple[float, float]], beyond: int | None = None) -> int:
    """Most intervals open at once (an interval ending when another starts does not count).

    Two sorted lists of floats and one merge: a run of 100,000 tasks takes milliseconds.
    With ``beyond``, it stops as soon as the count exceeds it (whether a level overlaps).
    """
    starts = sorted([s for s, _ in spans])
    ends = sorted([f for _, f in spans])
    peak = cur = k = 0
    nends = len(ends)
    for s in starts:
        while k < nends and ends[k] <= s:  # ends first at a tie: touching is not overlapping
            k += 1
            cur -= 1
        cur += 1
        if cur > peak:
            peak = cur
            if beyond is not None and peak > beyond:
                break
    return peak


class RunResult:
    """The outcome of a run.

    Usage::

        result = px.run(wf)
        result.status                # "succeeded", "partial", "failed", ...
        result[merged]               # a task's value (or raises its error)
        result.tasks["load"].duration
        print(result.summary())

    Attributes:
        workflow: The workflow's name.
        status: A ``RunStatus`` (it equals its text; a plain string given to the
            constructor is converted): ``"succeeded"``, ``"partial"`` (some tasks failed or
            were skipped under ``on_error="skip"``/``"ignore"``), ``"failed"``,
            ``"cancelled"`` or ``"timed_out"``.
        tasks: Task id → ``TaskRun``, in creation order.
        keep: The run's ``keep=`` setting: which values stayed in the result.
        stats: ``RunStats``.
        started_at: Epoch seconds.
        finished_at: Epoch seconds.
    """

    def __init__(self, workflow: str, status: RunStatus | str, tasks: Mapping[str, TaskRun],
                 stats: RunStats, started_at: float, finished_at: float,
                 keep: Any = "all") -> None:
        self.workflow = workflow
        self.keep = keep
        try:
            self.status = RunStatus(status)
        except ValueError:
            raise ValueError(f"run of {workflow!r}: status {status!r} is not a run status; "
                             f"give one of {', '.join(repr(str(s)) for s in RunStatus)}") \
                from None
        self.tasks = dict(tasks)
        self.stats = stats
        self.started_at = started_at
        self.finished_at = finished_at

    @property
    def ok(self) -> bool:
        """Whether the run succeeded (every task succeeded or was cached)."""
        return self.status == "succeeded"

    @property
    def results(self) -> dict[str, Any]:
        """Task id → value, for every task that succeeded or was cached.

        Values released under ``run(keep=...)`` are left out.
        """
        return {tid: tr.value for tid, tr in self.tasks.items() if tr.ok and not tr.released}

    @property
    def errors(self) -> dict[str, BaseException]:
        """Task id → exception, for every task that failed or timed out."""
        return {tid: tr.error for tid, tr in self.tasks.items()
                if tr.status in ("failed", "timed_out") and tr.error is not None}

    def __getitem__(self, ref: str | TaskRef) -> Any:
        """The value of a task, or raise its error (``Cancelled`` if it never finished)."""
        tid = ref if isinstance(ref, str) else ref.id
        try:
            tr = self.tasks[tid]
        except KeyError:
            raise KeyError(f"run of {self.workflow!r} has no task {tid!r}") from None
        if tr.ok:
            if tr.released:
                raise KeyError(
                    f"task {tid!r} succeeded, but its value was released once its consumers "
                    f"finished (keep={self.keep!r}); run with keep='all', or name it in keep=[...]")
            return tr.value
        if tr.error is not None:
            raise tr.error
        raise Cancelled(f"task {tid!r} has no value: it was {tr.status}"
                        + (" because an upstream task failed" if tr.status == "skipped" else ""))

    def __contains__(self, ref: object) -> bool:
        tid = ref if isinstance(ref, str) else getattr(ref, "id", None)
        return tid in self.tasks

    def __len__(self) -> int:
        return len(self.tasks)

    def counts(self) -> dict[str, int]:
        """Number of tasks per status."""
        out: dict[str, int] = {}
        for tr in self.tasks.values():
            out[tr.status] = out.get(tr.status, 0) + 1
        return out

    def raise_on_error(self) -> RunResult:
        """Raise ``WorkflowFailed`` if any task failed or the run did not succeed.

        Returns:
            This result, when there is nothing to raise.
        """
        errors = self.errors
        if errors or self.status in ("failed", "timed_out", "cancelled"):
            raise self._failure(errors)
        return self

    def _failure(self, errors: Mapping[str, BaseException] | None = None) -> WorkflowFailed:
        errors = self.errors if errors is None else errors
        excs: list[Exception] = []
        for tid, err in errors.items():
            if isinstance(err, Exception):
                excs.append(err)
            else:  # SystemExit, KeyboardInterrupt raised by a task: an ExceptionGroup holds
                wrapped = ParexecError(  # only Exceptions, so say what it was
                    f"task {tid!r} raised {type(err).__name__}"
                    + (f"({', '.join(map(repr, err.args))})" if err.args else "")
                    + "; a task that calls sys.exit() fails like one that raises")
                wrapped.__cause__ = err
                excs.append(wrapped)
        if self.status == "timed_out":  # so that `except* TimeoutError` catches a run timeout
            excs.append(TaskTimeout(f"run of {self.workflow!r} was stopped at its timeout "
                                    f"after {self.stats.makespan:.3g}s"))
        if not excs:
            excs = [Cancelled(f"run of {self.workflow!r} ended with status {str(self.status)!r}")]
        names = ", ".join(list(errors)[:5]) + ("…" if len(errors) > 5 else "")
        what = f"; failed: {names}" if errors else ""
        return WorkflowFailed(f"workflow {self.workflow!r} {self.status}{what}", excs, self)

    def summary(self) -> str:
        """An aligned text table: one row per task, then the run's figures.

        ``level`` is the task's dependency level (its parallel group); ``duration`` is the
        last attempt's; ``total`` runs from the first attempt's start to
        the final end (every attempt and retry wait); ``wait`` is the time from ready to the
        first start. Ids are printed with control characters escaped.
        """
        head: tuple[str, ...] = ("task", "status", "attempts", "level", "duration", "total",
                                 "wait", "worker", "peak mem")
        needs = any(tr.memory_source for tr in self.tasks.values())
        if needs:  # what admission counted, and where it came from
            head += ("mem need",)
        rows = [head]
        for tr in self.tasks.values():
            row: tuple[str, ...] = (
                printable(tr.id), tr.status, str(tr.attempts),
                "" if tr.level is None else str(tr.level), fmt_secs(tr.duration),
                fmt_secs(tr.elapsed), fmt_secs(tr.wait_time), worker_label(tr.worker),
                fmt_bytes(tr.peak_memory))
            if needs:
                row += (memory_need_label(tr),)
            rows.append(row)
        widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
        right = {2, 3, 4, 5, 6, 8}
        lines = []
        for n, row in enumerate(rows):
            cells = [c.rjust(w) if k in right else c.ljust(w)
                     for k, (c, w) in enumerate(zip(row, widths, strict=True))]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        s = self.stats
        counts = ", ".join(f"{v} {k}" for k, v in self.counts().items())
        lines.append("")
        lines.append(f"{printable(self.workflow)}: {self.status} ({counts}) in {s.makespan:.3f}s; "
                     f"task time {s.total_task_time:.3f}s, speedup {s.speedup:.2f}, "
                     f"max concurrency {s.max_concurrency}, "
                     f"{s.parallel_groups} parallel group(s)"
                     + "".join(f", pool {printable(k)} {v:.0%} used"
                               for k, v in s.pool_utilization.items())
                     + (f"; moved {fmt_bytes(s.shm_bytes)} through shared memory, "
                        f"{fmt_bytes(s.pipe_bytes)} through pipes"
                        if s.shm_bytes or s.pipe_bytes else ""))
        for name, m in getattr(s, "maps", {}).items():  # batched maps (issue 16)
            sizes = m["batches"]
            mean = m["mean_item_time"]
            lines.append(f"map {printable(name)}: {m['items']} item(s) in "
                         f"{sum(sizes.values())} batch(es) of {min(sizes)}-{max(sizes)}"
                         + ("" if mean is None else f", {mean * 1e6:.1f}us per item"
                            if mean < 0.001 else f", {fmt_secs(mean)} per item"))
        return "\n".join(lines)

    def to_chrome_trace(self, path: str | os.PathLike[str]) -> None:
        """Write the run as Chrome/Perfetto trace JSON (open it in ui.perfetto.dev).

        One complete event per attempt, one row per worker (thread or process), with the
        task id, status, attempt and error in each event's ``args``.
        """
        rows: dict[str, int] = {}
        events: list[dict[str, Any]] = []
        t0 = self.started_at

        def row(worker: Any) -> int:
            key = worker_label(worker) or "driver"
            if key not in rows:
                rows[key] = len(rows) + 1
            return rows[key]

        def add(tid: str, start: float, end: float, worker: Any, status: str,
                attempt: int, error: BaseException | None) -> None:
            args: dict[str, Any] = {"task": tid, "status": status, "attempt": attempt}
            if error is not None:
                args["error"] = f"{type(error).__name__}: {error}"
            events.append({"name": tid, "cat": status, "ph": "X", "pid": 1,
                           "tid": row(worker), "ts": (start - t0) * 1e6,
                           "dur": max(0.0, end - start) * 1e6, "args": args})

        for tid, tr in self.tasks.items():
            for number, start, end, worker, outcome in tr.history or ():
                add(tid, start, end, worker, outcome, number, None)
            if tr.started_at is not None and tr.finished_at is not None and tr.attempts:
                add(tid, tr.started_at, tr.finished_at, tr.worker, tr.status, tr.attempts,
                    tr.error)
        meta = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0,
                 "args": {"name": f"parexec: {self.workflow} ({self.status})"}}]
        for name, number in rows.items():
            meta.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": number,
                         "args": {"name": name}})
        with open(path, "w") as f:
            json.dump({"traceEvents": meta + events, "displayTimeUnit": "ms",
                       "otherData": {"workflow": self.workflow, "status": self.status,
                                     "makespan": self.stats.makespan}}, f)

    def plot(self, ax: Any = None) -> Any:
        """A Gantt chart of the run.

        One row per worker (thread or process), one bar per attempt coloured by outcome,
        the critical path outlined.

        Args:
            ax: A matplotlib Axes to draw into (default: a new Figure).

        Returns:
            The matplotlib ``Figure`` (save it with ``fig.savefig("run.png")``).

        Raises:
            ImportError: matplotlib is not installed (``pip install 'parexec[plot]'``).
        """
        from ._display import result_plot
        return result_plot(self, ax)

    def _repr_html_(self) -> str:
        from ._display import result_html
        return result_html(self)

    def __repr__(self) -> str:
        return (f"<RunResult {self.workflow!r} {self.status} tasks={len(self.tasks)} "
                f"makespan={self.stats.makespan:.3f}s>")
