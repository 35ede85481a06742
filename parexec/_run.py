"""Running a workflow: ``px.run``, ``px.start`` and the ``Run`` handle.

``start`` validates the run's settings and the workflow (nothing runs when that fails), builds
a ``Scheduler`` and starts its thread; ``Run`` is the caller's side of it: pause, resume,
cancel (from any thread), wait, and what must be reported once the run ended.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from ._errors import PicklingError, TaskOptionError, WaitTimeout, WorkflowError, user_stacklevel
from ._events import DRAIN_TIMEOUT, Event, ProgressBar, want_progress
from ._gates import check_resources
from ._messages import Control
from ._options import (
    check_cpu_budget,
    check_grace,
    check_keep,
    check_max_tasks_per_worker,
    check_max_workers,
    check_memory,
    check_on_event,
    check_parallel,
    check_resume,
    check_timeout,
)
from ._results import RunResult
from ._scheduler import GRACE, Scheduler
from ._task import TaskRef
from ._workflow import Workflow

__all__ = ["Run", "last_result", "run", "start"]

_last_result: RunResult | None = None


def last_result() -> RunResult | None:
    """The ``RunResult`` of the most recent run that finished in this interpreter.

    After Ctrl-C (or a notebook's interrupt button) it holds the partial result: every task
    that completed before the interrupt, with its value.
    """
    return _last_result


class Run:
    """A run in progress, returned by ``px.start``.

    Usage::

        run = px.start(wf)
        ...                      # the caller is free meanwhile
        run.pause(); run.resume()
        result = run.wait()      # or run.cancel()
    """

    def __init__(self, scheduler: Scheduler, check: bool) -> None:
        self._scheduler = scheduler
        self._check = check
        self._on_done: Callable[[Run], Any] | None = None
        self._waited = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"parexec-run-{scheduler.name}",
                                        daemon=True)
        self._thread.start()

    def _main(self) -> None:
        global _last_result
        try:
            self._scheduler.main()
            _last_result = self._scheduler.result
        finally:
            if self._on_done is not None:
                self._on_done(self)
            self._done.set()

    @property
    def workflow(self) -> str:
        """The workflow's name."""
        return self._scheduler.name

    def pause(self) -> None:
        """Start no new task until ``resume()``; running tasks go on."""
        self._scheduler.queue.put(Control("pause"))

    def resume(self) -> None:
        """Start tasks again after ``pause()``."""
        self._scheduler.queue.put(Control("resume"))

    def cancel(self) -> None:
        """Stop the run.

        Pending tasks are cancelled, process tasks are stopped at once, thread tasks get
        their cancel flag.

        Safe to call from any thread (an event callback, a signal handler, a task) and more
        than once; it returns at once. ``wait()`` then returns the result with status
        ``"cancelled"`` (it does not raise for a cancelled run).
        """
        self._scheduler.queue.put(Control("cancel"))

    def done(self) -> bool:
        """Whether the run has finished."""
        return self._done.is_set()

    @property
    def result(self) -> RunResult | None:
        """The ``RunResult`` once the run finished, else None."""
        return self._scheduler.result if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until the run finishes and return its ``RunResult``.

        Args:
            timeout: Seconds to wait at most (None: no limit).

        A cancelled or partial run returns its result; only a ``"failed"`` or
        ``"timed_out"`` run raises (with ``check=True``). Completed tasks keep their values
        whatever the status.

        Raises:
            WaitTimeout: The run did not finish within ``timeout`` (it goes on).
            WorkflowFailed: ``check=True`` and the run failed or timed out.
            StoreError: Records could not be written to the run's store (unless the store
                was opened with ``on_write_error="warn"``).
        """
        if not self._done.wait(timeout):
            raise WaitTimeout(f"run of {self.workflow!r} still going after {timeout}s")
        s = self._scheduler
        if not self._waited:
            self._waited = True
            self._report(s)
        if s.crash is not None:
            raise s.crash
        assert s.result is not None
        if self._check and s.result.status in ("failed", "timed_out"):
            raise s.result._failure()
        return s.result

    def _report(self, s: Scheduler) -> None:
        """What the caller must hear once the run ended.

        Events still being delivered, thread tasks that ignored their cancel flag, records
        the store could not write.
        """
        level = user_stacklevel()
        if not s.emitter.drain():
            warnings.warn(f"run of {self.workflow!r} finished, but event callback "
                          f"{s.emitter.current!r} is still running {DRAIN_TIMEOUT:g}s later; "
                          "later events will be delivered in the background", RuntimeWarning,
                          stacklevel=level)
        if s.late_warning:
            warnings.warn(s.late_warning, RuntimeWarning, stacklevel=level)
        store = s.store
        lost = getattr(store, "lost", 0) - s.store_lost0 if store is not None else 0
        if lost and s.crash is None and store is not None:
            from ._errors import StoreError
            msg = (f"store {store.path!r}: {lost} record(s) of run {self.workflow!r} could not "
                   f"be written ({store.write_error}); a resume will run those tasks again")
            warnings.warn(msg, RuntimeWarning, stacklevel=level)
            if getattr(store, "on_write_error", "raise") == "raise":
                s.crash = StoreError(msg + ". Pass store=px.Store(path, on_write_error='warn') "
                                     "to accept lost records")

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<Run {self.workflow!r} {state}>"


def start(wf: Workflow, *, max_workers: int | None = None, parallel: bool = True,
          cpu_budget: float | None = None, memory_budget: int | str | None = None,
          timeout: float | None = None, progress: bool | str = "auto",
          on_event: Callable[[Event], Any] | None = None, store: Any = None,
          resume: bool = False, cluster: Any = None, check: bool = True,
          keep: str | Iterable[Any] = "all", grace: float | None = None,
          max_tasks_per_worker: int | None = None) -> Run:
    """Validate ``wf`` and start running it on a scheduler thread; return a ``Run`` handle.

    Takes the same arguments as ``run``. Nothing runs if validation fails.
    """
    if not isinstance(wf, Workflow):
        raise TaskOptionError(f"px.run/px.start need a px.Workflow, got {type(wf).__name__}")
    check_parallel(parallel)
    keep = check_keep(keep, wf.tasks, wf.name, TaskRef)
    max_workers = check_max_workers(max_workers, "run") or wf.max_workers or _cpu_count()
    if not parallel:
        max_workers = 1
    explicit_cpu = check_cpu_budget(cpu_budget, "run") or wf.cpu_budget
    cpus = explicit_cpu or float(max_workers)
    timeout = check_timeout(timeout, "run") or wf.timeout
    grace = check_grace(grace, "run")
    recycle = check_max_tasks_per_worker(max_tasks_per_worker, "run") or \
        wf.max_tasks_per_worker
    mem_budget = check_memory(memory_budget, "run", "memory_budget") or wf.memory_budget
    check_resume(resume, store)
    check_on_event(on_event)
    graph = wf.graph()
    specs = list(wf.tasks.values())
    if not specs:
        warnings.warn(f"workflow {wf.name!r} has no tasks, so the run does nothing. Templates "
                      "add tasks only when called inside `with px.Workflow(...) as wf:` (or "
                      "through wf.add); called elsewhere they run at once", UserWarning,
                      stacklevel=user_stacklevel())
    explicit_memory = mem_budget is not None
    if mem_budget is None:
        import psutil
        mem_budget = int(psutil.virtual_memory().available * 0.9)
    check_resources(wf, graph, cpu_budget=cpus, memory_budget=mem_budget, specs=specs)
    if cluster is None:
        for s in specs:
            if wf.isolation_of(s) == "cluster":
                what = "task" if s.group is None else "map"
                raise WorkflowError(
                    f"{what} {s.id!r} has isolation='cluster' but no cluster was given: pass "
                    "cluster=distributed.Client(...) or a scheduler address to px.run")
    _check_picklable(wf, specs)
    opened = None
    if store is not None:
        from ._store import Store
        opened = store if isinstance(store, Store) else Store(store)
    subscribers = list(wf._listeners)
    if on_event is not None:
        subscribers.append(("*", on_event))
    if want_progress(progress) and len(specs):
        subscribers.append(("*", ProgressBar(len(specs), wf.name)))
    scheduler = Scheduler(wf, max_workers=max_workers, cpu_budget=cpus,
                           memory_budget=mem_budget or 0, explicit_memory=explicit_memory,
                           timeout=timeout,
                           subscribers=subscribers, force_cpu_gate=explicit_cpu is not None,
                           store=opened, resume=resume, cluster=cluster,
                           own_store=opened is not store, keep=keep, grace=grace,
                           max_tasks_per_worker=recycle)
    handle = Run(scheduler, check)
    _link_to_enclosing_task(handle)
    return handle


def run(wf: Workflow, *, max_workers: int | None = None, parallel: bool = True,
        cpu_budget: float | None = None, memory_budget: int | str | None = None,
        timeout: float | None = None, progress: bool | str = "auto",
        on_event: Callable[[Event], Any] | None = None, store: Any = None,
        resume: bool = False, cluster: Any = None, check: bool = True,
        keep: str | Iterable[Any] = "all", grace: float | None = None,
        max_tasks_per_worker: int | None = None) -> RunResult:
    """Run a workflow to the end and return its ``RunResult``.

    Usage::

        result = px.run(wf, max_workers=4, timeout=600)
        print(result.summary())

    Args:
        wf: The workflow.
        max_workers: Task slots (default: the workflow's, else ``loky.cpu_count()``).
        parallel: False runs one task at a time in a deterministic topological order.
        cpu_budget: Cores the running tasks' ``cpus`` may add up to (default: max_workers).
        memory_budget: Bytes (or ``"16GB"``) the running tasks' ``memory`` may add up to
            (default: 90% of the memory available at the start).
        timeout: Seconds the whole run may take; then it stops with status ``"timed_out"``.
        progress: ``"auto"`` (a bar on terminals and notebooks), True or False.
        on_event: Called with every ``Event``, on the run's event thread (never the
            scheduler's: a slow callback does not hold up the run).
        store: Path of a SQLite file recording finished tasks.
        resume: Serve tasks recorded as succeeded in ``store`` instead of running them.
        cluster: A Dask ``Client`` (or scheduler address) for ``"cluster"`` tasks.
        check: Raise ``WorkflowFailed`` if the run's status is ``"failed"`` or ``"timed_out"``.
        keep: Which values stay in the result: ``"all"`` (default), ``"leaves"`` (tasks
            nothing depends on), or a list of refs or ids. Any other value is released as
            soon as every task that consumes it finished (its ``TaskRun`` keeps status, times
            and errors; ``result[ref]`` raises ``KeyError``), so a long chain of large
            intermediates holds one or two at a time. The store still records every value.
        grace: Default ``grace`` (seconds) of the tasks that set none (default: the
            workflow's, else 0); see ``px.task``.
        max_tasks_per_worker: Replace a process worker after it ran this many tasks, for
            native libraries that leak (default: the workflow's, else never). A worker is
            never stopped mid-task for this.

    Raises:
        WorkflowError: The workflow is invalid (nothing ran).
        WorkflowFailed: ``check`` is true and the run failed or timed out.
        KeyboardInterrupt: Ctrl-C; the run was cancelled and cleaned up first, and its partial
            result is at ``px.last_result()``.
    """
    handle = start(wf, max_workers=max_workers, parallel=parallel, cpu_budget=cpu_budget,
                   memory_budget=memory_budget, timeout=timeout, progress=progress,
                   on_event=on_event, store=store, resume=resume, cluster=cluster, check=check,
                   keep=keep, grace=grace, max_tasks_per_worker=max_tasks_per_worker)
    try:
        return handle.wait()
    except KeyboardInterrupt:
        # Cancel and wait for the cleanup: process workers are killed at once, script steps'
        # process groups within 0.1 s, thread tasks get at most the grace period. Further
        # Ctrl-C (or SIGTERM in the CLI) during that bounded wait do not cut it short, or the
        # interpreter could exit before the steps were killed; past the bound the
        # KeyboardInterrupt goes through whatever is still running.
        handle.cancel()
        wait = max(GRACE, handle._scheduler.longest_grace())  # process tasks' grace= too
        deadline = time.monotonic() + wait + 2.0
        while True:
            try:
                handle._done.wait(max(0.0, deadline - time.monotonic()))
                break
            except KeyboardInterrupt:
                if time.monotonic() >= deadline:
                    break
        raise


def _link_to_enclosing_task(handle: Run) -> None:
    """A run started inside a thread task stops when that task is asked to stop."""
    from ._context import _local
    attempt = getattr(_local, "attempt", None)
    if attempt is None or not hasattr(attempt, "request_cancel"):
        return
    previous = attempt.on_cancel

    def cancel_inner() -> None:
        if previous is not None:
            previous()
        handle.cancel()

    attempt.on_cancel = cancel_inner
    if attempt.cancel_requested:
        handle.cancel()

    def unlink(_: Any) -> None:
        if attempt.on_cancel is cancel_inner:
            attempt.on_cancel = previous

    handle._on_done = unlink


def _cpu_count() -> int:
    from loky.backend.context import cpu_count
    return max(1, int(cpu_count()))


_PLAIN = (int, float, str, bytes, bool, type(None))  # always pickle: not checked


def _check_picklable(wf: Workflow, specs: list[Any]) -> None:
    """Pickle what process and cluster tasks will send, before anything runs.

    Each distinct function once, and the literal arguments (refs stand in for upstream
    values). Arguments that are plain numbers, text or bytes are not checked, and the others
    go through one pickler together (per task only when that fails, to name the task), so
    a map of 10,000 items costs one pass.

    The pickler writes nowhere and takes large buffers out of band, so checking a task that
    receives a big array costs no copy of it.
    """
    import cloudpickle

    from ._task import TaskRef

    class _Checker(cloudpickle.CloudPickler):  # type: ignore[misc]
        def persistent_id(self, obj: Any) -> Any:
            return obj.index if isinstance(obj, TaskRef) else None

    class _Nowhere:
        def write(self, data: Any) -> int:
            return len(data)

    def check(what: Any) -> None:
        _Checker(_Nowhere(), protocol=5, buffer_callback=lambda _: False).dump(what)

    def fail(s: Any, exc: Exception, what: str) -> PicklingError:
        where = wf.isolation_of(s)
        if what == "function":
            return PicklingError(
                f"task {s.id!r} runs in a {where} worker, but its function cannot be pickled "
                f"({type(exc).__name__}: {exc}); define it at module level or in a notebook "
                "cell without references to locks, files or sockets, or use "
                "isolation='thread'")
        return PicklingError(
            f"task {s.id!r} runs in a {where} worker, but its arguments cannot be pickled "
            f"({type(exc).__name__}: {exc}); pass picklable data (not locks, open files, "
            "sockets or generators), create the object inside the task, or use "
            "isolation='thread'")

    seen: set[int] = set()
    pending: list[tuple[Any, Any]] = []  # (spec, its arguments) to check together
    remote, plain = ("process", "cluster"), _PLAIN
    args: tuple[Any, ...]
    for s in specs:
        if wf.isolation_of(s) not in remote:
            continue
        fn, args, kwargs = s.fn, s.args, s.kwargs
        if s.group is not None:  # a map over a task's result: its function and fixed kwargs
            fn, args, kwargs = s.group.dynamic[0], (), s.group.dynamic[2]
        if id(fn) not in seen:
            seen.add(id(fn))
            try:
                check(fn)
            except Exception as exc:  # noqa: BLE001
                raise fail(s, exc, "function") from exc
        if kwargs:
            pending.append((s, (args, kwargs)))
            continue
        for a in args:
            if type(a) not in plain:
                pending.append((s, (args, kwargs)))
                break
    if not pending:
        return
    try:
        check([what for _, what in pending])
    except Exception:  # noqa: BLE001 - find the task to name
        for s, what in pending:
            try:
                check(what)
            except Exception as exc:  # noqa: BLE001
                raise fail(s, exc, "arguments") from exc
