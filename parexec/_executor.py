"""``px.Executor``: parexec's engine behind the ``concurrent.futures.Executor`` interface.

Issue 20. One executor is one long-lived run (``_submit.ExecutorScheduler``) over an empty
workflow, started on the first ``submit`` in its own thread, as ``px.start`` starts a run.
This module is the caller's side: it builds each task's spec, puts a message on the run's
queue and hands back a future, which the scheduler thread settles::

    caller thread                         scheduler thread (one per executor)
    ex.submit(fn, *args) ── Submit ──►   add the task; futures in args = dependencies
    future.cancel()      ── CancelTask ► kill its worker (process) / set its flag (thread)
    ex.shutdown()        ── Close ────►  end once every task is final
    future.result()  ◄── set_result / set_exception (on the scheduler thread)

Done-callbacks (``future.add_done_callback``) run on the executor's scheduler thread (or on
the thread that called ``cancel()``): keep them short, since no task starts meanwhile.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures._base import (  # the states every Future shares (stdlib internals)
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ._errors import ResourceError, TaskOptionError
from ._executor_map import Feeder, one_by_one
from ._messages import Submit
from ._options import (
    check_capacities,
    check_cpu_budget,
    check_grace,
    check_isolation,
    check_max_tasks_per_worker,
    check_max_workers,
    check_memory,
)
from ._task import TaskRef, TaskSpec, TaskTemplate, _fn_name, check_callable, find_refs

if TYPE_CHECKING:
    from ._events import Event
    from ._submit import ExecutorScheduler

__all__ = ["Executor", "Future"]

P = ParamSpec("P")
T = TypeVar("T")

# A map's automatic chunks aim at this many seconds of work each: long enough that a
# chunk's round trip (about 0.1 ms to a process worker) is noise, short enough that results
# stream and a cancel or Ctrl-C stops little work (joblib aims at 0.2-2 s; the batching of
# template.map at tens of milliseconds, as here).
GRACE_AT_INTERRUPT = 7.0  # seconds Ctrl-C waits for the cancelled tasks' cleanup

_live: weakref.WeakSet[Executor] = weakref.WeakSet()
_atexit_registered = False


class Future(concurrent.futures.Future[T], TaskRef):
    """The future of a ``px.Executor`` submission: a ``concurrent.futures.Future``.

    Beyond the standard future, ``cancel()`` also stops a running task, and the future may
    be passed as an argument of another ``submit`` (also inside lists, tuples and dicts):
    that submission waits for it and receives its value. Being a ``TaskRef`` is what makes
    it an argument the engine resolves; its ``id`` names the task in events.
    """

    def __init__(self, executor: Executor, tid: str) -> None:
        concurrent.futures.Future.__init__(self)
        self.workflow = executor._wf
        self.id = tid
        self.index = -1  # set by the scheduler thread when it adds the task
        self._executor = executor

    def __repr__(self) -> str:
        return f"<px.Executor future {self.id!r} state={self._state.lower()}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"{self!r} cannot be pickled; pass it to ex.submit() as an argument "
                        "(its value is passed), or pass future.result()")

    def cancel(self) -> bool:
        """Cancel the task, and stop it if it is running.

        A process task's worker is killed (other workers are untouched); a thread task gets
        its cancel flag (``px.current().cancelled()``) and, with ``grace``, ``px.Cancelled``
        raised inside it. Submissions that take this future fail with ``px.Cancelled``.

        Returns:
            False if the future had already finished, else True (it is now cancelled).
        """
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._notify_cancelled()
        self._executor._task_cancelled(self)
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def result(self, timeout: float | None = None) -> T:
        """The task's value; see ``concurrent.futures.Future.result``.

        Raises:
            CancelledError: The future was cancelled.
            TimeoutError: Not done within ``timeout`` (``px.TaskTimeout``, also a
                ``TimeoutError``, when the task itself overran its own timeout).
            KeyboardInterrupt: Ctrl-C while waiting: the executor's unfinished tasks were
                cancelled first (running process tasks stopped).
        """
        try:
            return super().result(timeout)
        except KeyboardInterrupt:
            self._executor._interrupted()
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's exception, or None; see ``concurrent.futures.Future.exception``."""
        try:
            return super().exception(timeout)
        except KeyboardInterrupt:
            self._executor._interrupted()
            raise

    # Called with the condition held, or by the scheduler thread -----------------------

    def _notify_cancelled(self) -> None:
        # Cancelled and notified at once: no executor thread will call
        # set_running_or_notify_cancel() for it, so wait() and as_completed() hear now.
        self._state = CANCELLED_AND_NOTIFIED
        for waiter in self._waiters:
            waiter.add_cancelled(self)
        self._condition.notify_all()

    def _mark_running(self) -> None:
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING

    def _settle(self, ok: bool, value: Any) -> None:
        """The task is final (scheduler thread): set the outcome unless cancelled."""
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                return
            if ok:
                self._result = value
            else:
                self._exception = value
            self._state = FINISHED
            for waiter in self._waiters:
                if ok:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            self._condition.notify_all()
        self._executor._futures.discard(self)
        self._invoke_callbacks()  # type: ignore[attr-defined]

    def _settle_cancelled(self) -> None:
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                return
            self._notify_cancelled()
        self._executor._futures.discard(self)
        self._invoke_callbacks()  # type: ignore[attr-defined]


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` that runs on parexec's engine.

    Usage::

        with px.Executor(max_workers=4) as ex:           # process workers by default
            f = ex.submit(fit, frame, alpha=0.1)
            g = ex.submit(fit.options(timeout=60, memory="2GB", retry=2), frame)
            h = ex.submit(score, f)                        # waits for f, receives its value
            for y in ex.map(transform, items):             # in order, in batches
                ...
            g.cancel()                                     # stops it even while it runs

    Submitted work gets what a run gives its tasks: slots, ``cpus`` within ``cpu_budget``,
    declared and measured memory within ``memory_budget``, named ``pools``, priorities
    (higher first among waiting submissions), retries, memory limits, timeouts that kill
    one worker, ``grace`` and worker recycling. Options come from a ``px.task`` template
    passed as the function; a plain function gets the executor's defaults.

    A future's done-callbacks run on the executor's scheduler thread (or, for ``cancel()``,
    on the thread that called it): keep them short, since no task starts meanwhile, and do
    not wait on other futures there. ``ex.on`` callbacks run on the run's event thread.

    Args:
        max_workers: Task slots (default: the CPU count).
        isolation: Where plain functions run: ``"process"`` (default) or ``"thread"``.
        cpu_budget: Cores the running tasks' ``cpus`` may add up to (default: max_workers).
        memory_budget: Bytes (or ``"16GB"``) the running tasks' ``memory`` may add up to
            (default: 90% of the memory available when the executor starts).
        pools: Named resource pools, ``{"database": 2}``, that templates draw units from.
        max_tasks_per_worker: Replace a process worker after it ran this many tasks.
        progress: Show a progress bar of the submissions (True, False or ``"auto"``).
        grace: Default ``grace`` (seconds) of the tasks that set none; see ``px.task``.
        name: The name its events carry as ``Event.workflow``.
    """

    def __init__(self, max_workers: int | None = None, isolation: str = "process",
                 cpu_budget: float | None = None, memory_budget: int | str | None = None,
                 pools: dict[str, int] | None = None, max_tasks_per_worker: int | None = None,
                 progress: bool | str = False, *, grace: float | None = None,
                 name: str = "executor") -> None:
        from ._events import want_progress
        from ._run import _cpu_count
        from ._workflow import Workflow
        where = "px.Executor"
        self._max_workers = check_max_workers(max_workers, where) or _cpu_count()
        self._isolation = check_isolation(isolation, where)
        if self._isolation == "cluster":
            raise TaskOptionError("px.Executor: isolation='cluster' is not supported; use "
                                  "'process' or 'thread' (or dask's own Client as executor)")
        budget = check_cpu_budget(cpu_budget, where)
        self._cpu_budget = budget or float(self._max_workers)
        self._force_cpu = budget is not None
        self._memory_budget = check_memory(memory_budget, where, "memory_budget")
        self._pools = check_capacities(pools or {}, where)
        self._recycle = check_max_tasks_per_worker(max_tasks_per_worker, where)
        self._grace = check_grace(grace, where)
        self._progress = want_progress(progress)
        self._wf = Workflow(name, isolation=self._isolation, pools=self._pools)
        self._subscribers: list[tuple[str, Callable[[Event], Any]]] = []
        self._lock = threading.RLock()
        self._scheduler: ExecutorScheduler | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ended = False  # the scheduler thread has returned
        self._close_sent = False
        self._nfeeders = 0  # maps still submitting chunks (shutdown waits for them)
        self._feeders: weakref.WeakSet[Feeder] = weakref.WeakSet()
        self._futures: set[Future[Any]] = set()  # unsettled futures (cancel_futures, Ctrl-C)
        self._names: dict[str, int] = {}
        self._checked: Any = None  # the last plain function check_callable accepted
        self._seq = itertools.count(1)

    # Subscribing ----------------------------------------------------------------------

    def on(self, kind: str, callback: Callable[[Event], Any]) -> Executor:
        """Call ``callback(event)`` for every event of ``kind`` (``"*"``: all); see §6.

        Events are those of a run (``task:started``, ``task:completed``, ...), with the
        submission's id as ``task_id``. Callbacks run on the run's event thread. Subscribe
        before the first ``submit``.

        Raises:
            RuntimeError: The executor has already started.
        """
        from ._events import EVENT_KINDS
        if kind != "*" and kind not in EVENT_KINDS:
            raise TaskOptionError(f"px.Executor.on: unknown event kind {kind!r}; use one of "
                                  f"{', '.join(sorted(EVENT_KINDS))} or '*'")
        with self._lock:
            if self._scheduler is not None:
                raise RuntimeError("px.Executor.on() must be called before the first "
                                   "submit(): the executor's run has already started")
            self._subscribers.append((kind, callback))
        return self

    # Submitting -----------------------------------------------------------------------

    def submit(self, fn: Callable[P, T], /, *args: P.args,
               **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; return its future.

        ``fn`` may be a ``px.task`` template, whose options apply (``timeout``, ``memory``,
        ``retry``, ``isolation``, ``priority``, ``pools``, ``grace``...). Futures of this
        executor among the arguments, also nested in lists, tuples, dicts and sets, are
        dependencies: the task runs once they succeeded, with their values in their place.

        Raises:
            RuntimeError: The executor was shut down.
            ResourceError: The task needs more ``memory``, ``cpus`` or pool units than the
                executor has (it could never start).
            TaskOptionError: ``fn`` is not callable, or an option cannot apply here.
        """
        return self._submit(fn, args, kwargs, internal=False)

    def _submit(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                internal: bool) -> Future[Any]:
        if isinstance(fn, TaskTemplate):
            options = fn._options
            fn = fn.fn
        else:
            if fn is not self._checked:  # the same function submitted again: checked once
                check_callable(fn)
                self._checked = fn
            options = {}
        refs: list[TaskRef] = []
        if args:
            find_refs(args, refs)
        if kwargs:
            find_refs(kwargs, refs)
        deps: dict[int, Any] = {}
        for ref in refs:
            if ref.workflow is not self._wf:
                raise TaskOptionError(
                    f"{ref!r} passed to px.Executor.submit belongs to another workflow or "
                    "executor; pass its result() instead")
            deps[id(ref)] = ref
        with self._lock:
            if self._closed and not internal:
                raise RuntimeError("cannot submit to a px.Executor after shutdown()")
            if self._ended:
                raise RuntimeError("this px.Executor's scheduler has stopped (see the "
                                   "'parexec' log for why); create a new executor")
            if self._scheduler is None:
                self._start()
            name = options.get("id") or _fn_name(fn)
            k = self._names[name] = self._names.get(name, 0) + 1
            tid = name if k == 1 else f"{name}-{k}"
            if options:
                self._check_needs(tid, options)
                if options.get("after"):
                    raise TaskOptionError(
                        f"task {tid!r}: after= does not apply to px.Executor.submit; pass the "
                        "futures it must wait for as arguments")
                if options.get("isolation") == "cluster":
                    raise TaskOptionError(
                        f"task {tid!r}: isolation='cluster' does not apply to px.Executor; "
                        "use 'process' or 'thread', or pass dask's Client as the executor")
            spec = TaskSpec(tid, fn, args, kwargs, (), bool(refs), options)
            future: Future[Any] = Future(self, tid)
            self._futures.add(future)
            assert self._scheduler is not None
            self._scheduler.queue.put(Submit(future, spec, list(deps.values())))
        return future

    def _check_needs(self, tid: str, options: dict[str, Any]) -> None:
        """Refuse a submission that no gate could ever admit (it would wait forever)."""
        memory, cpus, pools = options.get("memory"), options.get("cpus", 1), \
            options.get("pools") or {}
        assert self._scheduler is not None
        budget = self._scheduler.memory_budget
        if isinstance(memory, int) and memory > budget:
            raise ResourceError(tid, "memory", memory, budget,
                                "the capacity is px.Executor's memory_budget")
        if isinstance(cpus, (int, float)) and cpus > self._cpu_budget:
            raise ResourceError(tid, "cpus", cpus, self._cpu_budget,
                                "the capacity is px.Executor's cpu_budget")
        for pool, units in pools.items():
            capacity = self._pools.get(pool)
            if capacity is None or units > capacity:
                raise ResourceError(tid, pool, units, capacity,
                                    f"pools are declared by px.Executor(pools={{{pool!r}: N}})")

    def _start(self) -> None:
        """Build the run and start its scheduler thread (under the lock, once)."""
        global _atexit_registered
        from ._events import ProgressBar
        from ._submit import ExecutorScheduler
        mem_budget = self._memory_budget
        if mem_budget is None:
            import psutil
            mem_budget = int(psutil.virtual_memory().available * 0.9)
        subscribers = list(self._subscribers)
        if self._progress:
            subscribers.append(("*", ProgressBar(0, self._wf.name)))
        if not _atexit_registered:
            _atexit_registered = True
            # As concurrent.futures does: at exit, before threads are joined, while modules
            # may still be imported and pools started (atexit would be too late for that).
            register = getattr(threading, "_register_atexit", atexit.register)
            register(_shutdown_all)
        if self._isolation == "process":
            # Its import registers an exit hook, refused once the interpreter is exiting:
            # import it now, not when the first process task comes (maybe at exit).
            import loky.backend.context  # noqa: F401
        scheduler = ExecutorScheduler(
            self._wf, max_workers=self._max_workers, cpu_budget=self._cpu_budget,
            memory_budget=mem_budget, explicit_memory=self._memory_budget is not None,
            timeout=None, subscribers=subscribers, force_cpu_gate=True, grace=self._grace,
            max_tasks_per_worker=self._recycle)
        self._scheduler = scheduler
        self._thread = threading.Thread(target=self._main, name=f"parexec-{self._wf.name}",
                                        daemon=True)
        _live.add(self)
        self._thread.start()

    def _main(self) -> None:
        scheduler = self._scheduler
        assert scheduler is not None
        crash: BaseException | None = None
        try:
            scheduler.main()
        except BaseException as exc:  # noqa: BLE001 - handed to the futures left
            crash = exc
        finally:
            # Only after an internal error can futures be left: they get that error.
            error = scheduler.crash or crash or RuntimeError("the px.Executor's run ended")
            with self._lock:
                self._closed = self._ended = True  # nothing runs submissions any more
            for future in list(scheduler.futures.values()) + list(self._futures.copy()):
                future._settle(False, error)

    # Maps -----------------------------------------------------------------------------

    def map(self, fn: Callable[..., T], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int | None = None) -> Iterator[T]:
        """Like ``concurrent.futures.Executor.map``: ``fn`` over the items, results in order.

        Items run in chunks, one task each (``chunksize`` items, or by default chunks sized
        as the map runs so that one takes about ``CHUNK_SECONDS``). An item's exception is
        raised when its result is reached; leaving the loop early cancels what is left.
        A template with a ``timeout`` or ``retry`` runs one item per task, so those options
        apply to each item.

        Raises:
            TimeoutError: A result was not ready ``timeout`` seconds after the call.
        """
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise TaskOptionError(f"px.Executor.map: chunksize={chunksize!r} must be an int "
                                  ">= 1, or None for chunks sized as the map runs")
        items = list(zip(*iterables, strict=False))
        end = None if timeout is None else time.monotonic() + timeout
        options = fn._options if isinstance(fn, TaskTemplate) else {}
        if options.get("timeout") is not None or options.get("retry") is not None:
            chunksize = 1
        if chunksize == 1:
            futures = [self._submit(fn, args, {}, internal=False) for args in items]
            return one_by_one(futures, end)
        feeder = Feeder(self, fn, items, chunksize)
        return feeder.results(end)

    # Shutting down ----------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse further submissions; with ``wait``, return once every task is final.

        Args:
            wait: Block until the tasks finished and the scheduler thread ended.
            cancel_futures: Cancel every unfinished future, running ones included (their
                tasks stopped as by ``future.cancel()``).
        """
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        if cancel_futures:
            self._cancel_all()
        self._maybe_close()
        if wait and thread is not threading.current_thread():
            try:
                thread.join()
            except KeyboardInterrupt:
                self._interrupted()
                raise
            scheduler = self._scheduler
            if scheduler is not None:  # events still on their way to callbacks (and a bar)
                scheduler.emitter.drain()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Wait for the submissions, or cancel them after Ctrl-C in the block."""
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._interrupted()
            self.shutdown(wait=True, cancel_futures=True)
            return
        self.shutdown(wait=True)

    def _cancel_all(self, done: threading.Event | None = None) -> None:
        with self._lock:
            feeders = list(self._feeders)
            scheduler = self._scheduler
        for feeder in feeders:
            feeder.stop()
        for future in self._futures.copy():
            with future._condition:
                if future._state not in (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED):
                    future._notify_cancelled()
                else:
                    continue
            self._futures.discard(future)
            future._invoke_callbacks()  # type: ignore[attr-defined]
        if scheduler is not None:
            from ._messages import CancelAll
            scheduler.queue.put(CancelAll(done))
        elif done is not None:
            done.set()

    def _interrupted(self) -> None:
        """Ctrl-C while the caller waited: cancel what is unfinished, wait for the kills.

        The executor stays open. The wait is bounded and a second Ctrl-C during it does not
        cut it short (the kills must happen before the interpreter may exit).
        """
        done = threading.Event()
        self._cancel_all(done)
        deadline = time.monotonic() + GRACE_AT_INTERRUPT
        while True:
            try:
                done.wait(max(0.0, deadline - time.monotonic()))
                break
            except KeyboardInterrupt:
                if time.monotonic() >= deadline:
                    break

    def _maybe_close(self) -> None:
        with self._lock:
            if not self._closed or self._nfeeders or self._close_sent:
                return
            self._close_sent = True
            scheduler = self._scheduler
        if scheduler is not None:
            from ._messages import Close
            scheduler.queue.put(Close())

    def _task_cancelled(self, future: Future[Any]) -> None:
        self._futures.discard(future)
        scheduler = self._scheduler
        if scheduler is not None:
            from ._messages import CancelTask
            scheduler.queue.put(CancelTask(future))


def _shutdown_all() -> None:
    """At interpreter exit: every open executor finishes its work, as the stdlib's do."""
    for executor in list(_live):
        try:
            executor.shutdown(wait=True)
        except KeyboardInterrupt:
            executor.shutdown(wait=True, cancel_futures=True)
