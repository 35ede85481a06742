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
CHUNK_SECONDS = 0.05
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
        self._feeders: weakref.WeakSet[_Feeder] = weakref.WeakSet()
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
            from ._messages import Submit
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
            return _one_by_one(futures, end)
        feeder = _Feeder(self, fn, items, chunksize)
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


def _one_by_one(futures: list[Future[Any]], end: float | None) -> Iterator[Any]:
    try:
        futures.reverse()  # pop from the end: each result is released once yielded
        while futures:
            future = futures.pop()
            try:
                value = future.result(None if end is None else end - time.monotonic())
            except BaseException:
                future.cancel()  # timed out or interrupted: as the stdlib's map does
                raise
            yield value
    finally:
        for future in futures:
            future.cancel()


def _run_chunk(fn: Callable[..., Any], items: list[tuple[Any, ...]]) -> tuple[float, list[Any]]:
    """Run a map's chunk in one task: ``(seconds, [(ok, value or pickled error), ...])``.

    An item's exception travels with its traceback (``_worker._error_outcome``) and is
    raised when the caller reaches that item; the chunk goes on.
    """
    from ._worker import _error_outcome
    out: list[Any] = []
    t0 = time.perf_counter()
    for args in items:
        try:
            out.append((True, fn(*args)))
        except Exception as exc:  # noqa: BLE001 - this item's outcome; the chunk goes on
            out.append((False, _error_outcome(_fn_name(fn), exc)))
    return time.perf_counter() - t0, out


class _Feeder:
    """A map's chunks, submitted as earlier ones return, so their size follows their cost.

    The first chunks hold one item each (one per slot, twice over); each chunk that returns
    tells the cost of an item, and the next chunks hold ``CHUNK_SECONDS`` of items, but
    never more than an even share of what is left per slot, so every worker gets work.
    ``fill`` runs on the caller's thread, then on the scheduler thread (done-callbacks).
    """

    def __init__(self, executor: Executor, fn: Any, items: list[tuple[Any, ...]],
                 chunksize: int | None) -> None:
        self.executor = executor
        self.fn = fn.fn if isinstance(fn, TaskTemplate) else fn
        # Chunks carry the function's name (events, errors) and a template's options.
        options = fn._options if isinstance(fn, TaskTemplate) else {}
        self.target = TaskTemplate(_run_chunk, {**options, "id": _fn_name(self.fn)})
        self.items = items
        self.fixed = chunksize
        self.pos = 0
        self.size = chunksize or 1
        self.slots = executor._max_workers
        self.inflight = 0
        self.stopped = False
        self.submitting = True  # until every item went out in a chunk (or stop())
        self.error: Exception | None = None
        self.chunks: list[tuple[int, Future[Any]]] = []
        self.cond = threading.Condition(threading.RLock())
        with executor._lock:
            if executor._closed:
                raise RuntimeError("cannot map on a px.Executor after shutdown()")
            executor._nfeeders += 1
            executor._feeders.add(self)
        self.fill()

    def fill(self) -> None:
        done = False
        with self.cond:
            limit = 2 * self.slots if self.fixed is None else len(self.items)
            while not self.stopped and self.pos < len(self.items) and self.inflight < limit:
                size = self.size
                if self.fixed is None and self.chunks:
                    share = -(-(len(self.items) - self.pos) // (2 * self.slots))
                    size = max(1, min(size, share))
                chunk = self.items[self.pos:self.pos + size]
                start = self.pos
                self.pos += len(chunk)
                try:
                    future = self.executor._submit(self.target, (self.fn, chunk), {},
                                                   internal=True)
                except Exception as exc:  # noqa: BLE001 - the executor's run ended
                    self.error = exc  # raised by results() after the chunks it has
                    self.stopped = True
                    break
                self.chunks.append((start, future))
                self.inflight += 1
                self.cond.notify_all()
                future.add_done_callback(self.chunk_done)  # type: ignore[arg-type]
            if (self.stopped or self.pos >= len(self.items)) and self.submitting:
                self.submitting = False
                done = True
                self.cond.notify_all()
        if done:
            with self.executor._lock:
                self.executor._nfeeders -= 1
            self.executor._maybe_close()

    def chunk_done(self, future: Future[Any]) -> None:
        with self.cond:
            self.inflight -= 1
            if self.fixed is None and not future.cancelled() and future.exception() is None:
                seconds, out = future.result()
                if out:
                    per_item = max(seconds / len(out), 1e-7)
                    self.size = max(1, int(CHUNK_SECONDS / per_item))
        self.fill()

    def stop(self) -> None:
        """Submit nothing more (shutdown with cancel_futures, Ctrl-C, an abandoned loop)."""
        with self.cond:
            self.stopped = True
        self.fill()

    def results(self, end: float | None) -> Iterator[Any]:
        from ._worker import decode_outcome
        k = 0
        future: Future[Any] | None = None
        try:
            while True:
                with self.cond:
                    while k >= len(self.chunks) and self.submitting:
                        wait = None if end is None else end - time.monotonic()
                        if wait is not None and wait <= 0:
                            raise TimeoutError("px.Executor.map: results not ready within "
                                               "its timeout")
                        self.cond.wait(wait)
                    if k >= len(self.chunks):
                        if self.error is not None:
                            raise self.error
                        return
                    _, future = self.chunks[k]
                    self.chunks[k] = (0, None)  # type: ignore[assignment] # drop it once read
                k += 1
                assert future is not None
                _, out = future.result(None if end is None else end - time.monotonic())
                future = None
                for ok, value in out:
                    if ok:
                        yield value
                    else:
                        raise decode_outcome(_fn_name(self.fn), value)[1]
        finally:
            self.stop()
            with self.cond:
                rest = [f for _, f in self.chunks[k:] if f is not None]
            if future is not None:  # its wait timed out or was interrupted
                rest.append(future)
            for f in rest:
                f.cancel()


def _shutdown_all() -> None:
    """At interpreter exit: every open executor finishes its work, as the stdlib's do."""
    for executor in list(_live):
        try:
            executor.shutdown(wait=True)
        except KeyboardInterrupt:
            executor.shutdown(wait=True, cancel_futures=True)
