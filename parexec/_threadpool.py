"""The thread pool: daemon threads that run thread tasks and report to the scheduler.

``ThreadPool`` (re-exported by ``_pools``, whose docstring describes both pools) starts its
threads on demand; each runs ``_thread_worker``, which reports ``Started`` and ``Done`` onto
the run's queue. ``_Guard`` lets ``interrupt`` raise a graceful stop (``_stop_exception``)
in a running attempt's Python code only.
"""

from __future__ import annotations

import itertools
import threading
from inspect import iscoroutine
from queue import SimpleQueue
from typing import Any

from ._context import _local, run_coroutine, user_frames
from ._limits import BlasCap
from ._messages import Done, Started

# Prefetch, this pool's policy for short tasks. Handing a task to an idle thread and hearing
# back costs a thread round trip (measured 66-75 us on the 2-core test machine), during
# which that thread idles: with 2 slots, no-op tasks ran at 1.5x a raw ThreadPoolExecutor,
# which keeps its queue full. While the run's thread tasks take under PREFETCH_BELOW seconds
# on average, the pool accepts one attempt per thread beyond the slots (``may_prefetch``),
# so a thread finds its next task waiting. The scheduler hands over only plain tasks (no
# timeout, pools or memory: nothing scarce is held while queued), and the threads stay
# capped at max_workers, so no more tasks run at once than allowed. Its cost: a prefetched
# task is committed to its thread, so a higher-priority task that becomes ready a moment
# later starts after it.
PREFETCH_BELOW = 0.002


class ThreadPool:
    """Daemon worker threads for one run. Only the scheduler thread calls its methods.

    Prefetched attempts (``attempt.prefetched``: handed over beyond the slots while
    ``may_prefetch()``, see ``PREFETCH_BELOW``) report ``Started`` when a thread takes them.

    Args:
        name: Prefix of the threads' names.
        max_threads: Most threads started; tasks handed over beyond that wait in the queue.
        prefetch: Whether the pool may take attempts beyond its slots at all. A run whose
            process tasks hold slots turns it off: its threads idle while processes run, so
            a prefetched task would run beyond max_workers (found by the property suite).
    """

    def __init__(self, name: str = "parexec", max_threads: int = 1 << 30,
                 prefetch: bool = False) -> None:
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._name = name
        self.max_threads = max_threads
        self._nthreads = 0
        self.nbusy = 0  # attempts handed out and not yet reported back (scheduler-owned)
        self.prefetch = prefetch
        self.nprefetched = 0  # prefetched attempts not yet reported back
        self.mean_duration = 1.0  # running average of the tasks' durations; starts "slow"
        self._counter = itertools.count(1)
        self.cap = BlasCap()

    def may_prefetch(self) -> bool:
        """Whether one more attempt may be handed over beyond the slots (``PREFETCH_BELOW``)."""
        return self.prefetch and self.nprefetched < self.max_threads \
            and self.mean_duration < PREFETCH_BELOW

    def reported(self, attempt: Any, t_start: float | None, t_end: float | None) -> None:
        """The scheduler handles ``attempt``'s ``Done``, which ran from ``t_start`` to ``t_end``."""
        self.nbusy -= 1
        if attempt.prefetched:
            self.nprefetched -= 1
        if t_start and t_end:
            avg = self.mean_duration
            self.mean_duration = avg + 0.2 * (t_end - t_start - avg)

    def submit(self, attempt: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run ``fn(*args, **kwargs)`` on a worker thread; report on ``attempt.queue``.

        The scheduler decrements ``nbusy`` when it handles the report, so a new thread is
        started only when every thread is (or may still be) busy.
        """
        self.nbusy += 1
        if attempt.prefetched:
            self.nprefetched += 1
        if self.nbusy > self._nthreads and self._nthreads < self.max_threads:
            self._nthreads += 1
            t = threading.Thread(target=_thread_worker, args=(self._queue, self.cap), daemon=True,
                                 name=f"{self._name}-{next(self._counter)}")
            t.start()
        self._queue.put((attempt, fn, args, kwargs))

    def kill(self, attempt: Any) -> bool:
        """Threads cannot be killed: return False (the caller sets the cancel flag)."""
        return False

    def interrupt(self, attempt: Any, cancel: bool) -> bool:
        """Raise ``px.Cancelled`` (``cancel``) or ``px.TaskTimeout`` in ``attempt``'s thread.

        Only while the attempt's function runs (see ``_Guard``); it interrupts Python code,
        not a blocking C call. Returns whether the exception was set.
        """
        guard = attempt.handle
        return isinstance(guard, _Guard) and guard.interrupt(attempt, cancel)

    def shutdown(self) -> None:
        """Let idle threads exit; busy ones exit when their task returns."""
        for _ in range(self._nthreads):
            self._queue.put(None)
        self._nthreads = 0
        self.cap.restore()


class _Guard:
    """Makes a graceful stop (``grace=``) land only in the attempt it is meant for.

    ``PyThreadState_SetAsyncExc`` raises in whatever the thread runs next, so the scheduler
    sets it only under ``lock`` while ``attempt`` is armed, and the worker disarms under the
    same lock right after the call, clearing an exception still pending: it can never reach
    the worker's loop or the next task on this thread.
    """

    __slots__ = ("tid", "lock", "attempt", "sent")

    def __init__(self) -> None:
        self.tid = threading.get_ident()
        self.lock = threading.Lock()
        self.attempt: Any = None  # the attempt whose function runs now, else None
        self.sent = False  # an exception was set and may still be pending

    def interrupt(self, attempt: Any, cancel: bool) -> bool:
        """Set the stop exception in this thread if ``attempt`` runs there now."""
        import ctypes
        exc_type = _stop_exception(attempt, cancel)
        with self.lock:
            if self.attempt is not attempt:
                return False
            self.attempt = None  # one exception per attempt
            self.sent = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.tid),
                                                       ctypes.py_object(exc_type))
        return True

    def disarm(self) -> None:
        """No exception can be set from now on; one still pending is cleared."""
        with self.lock:  # an uncontended lock: the only cost on a task's hot path
            self.attempt = None
            if self.sent:
                import ctypes
                self.sent = False
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.tid), None)


def _stop_exception(attempt: Any, cancel: bool) -> type[BaseException]:
    """A subclass of ``px.Cancelled`` or ``px.TaskTimeout`` whose message names the task.

    ``PyThreadState_SetAsyncExc`` takes a class and raises it without arguments.
    """
    from ._errors import Cancelled, TaskTimeout
    base: type[BaseException] = Cancelled if cancel else TaskTimeout
    message = (f"task {attempt.task_id!r} (attempt {attempt.number}) was cancelled" if cancel
               else f"task {attempt.task_id!r} attempt {attempt.number} exceeded its timeout")
    message += "; interrupted for its grace period"

    def __init__(self: BaseException, *args: Any) -> None:
        base.__init__(self, *(args or (message,)))

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__,
                                         "__qualname__": base.__qualname__})


def _thread_worker(inbox: SimpleQueue[Any], cap: BlasCap) -> None:
    from time import monotonic
    name = threading.current_thread().name
    local = _local
    get = inbox.get
    guard = _Guard()
    while True:
        item = get()
        if item is None:
            return
        attempt, fn, args, kwargs = item
        del item
        if attempt.cancel_requested:  # cancelled while it waited in the queue: never starts
            from ._errors import Cancelled
            attempt.queue.put(Done(attempt, False, Cancelled(
                f"task {attempt.task_id!r} was cancelled before it started"), name))
            del attempt, fn, args, kwargs
            continue
        local.attempt = attempt
        attempt.worker = name  # the pool's hand-off fields (see _state.Attempt)
        attempt.handle = guard
        cap.apply(attempt.cpus)
        t_start = monotonic()
        if attempt.prefetched:  # it waited in the queue: say when it really starts
            attempt.queue.put(Started(attempt, t_start, name))
        try:
            # A graceful stop may land from arming until disarm() holds the lock; landing in
            # the finally before that, it is caught below like the task's own error.
            guard.attempt = attempt
            try:
                value = fn(*args, **kwargs)
                if iscoroutine(value):  # an async def task: cancellable while it awaits
                    value = run_coroutine(value, attempt)
            finally:
                guard.disarm()
        except BaseException as exc:  # noqa: BLE001 - every outcome is reported
            guard.disarm()
            t_end = monotonic()
            exc.__traceback__ = user_frames(exc.__traceback__)  # as in processes
            sampler = attempt.sampler  # a script step's processes: their peak memory
            attempt.queue.put(Done(attempt, False, exc, name, None, t_start, t_end,
                                   sampler.unwatch(attempt) if sampler is not None else None))
            del exc
        else:
            t_end = monotonic()
            sampler = attempt.sampler
            attempt.queue.put(Done(attempt, True, value, name, None, t_start, t_end,
                                   sampler.unwatch(attempt) if sampler is not None else None))
            del value
        local.attempt = None
        del attempt, fn, args, kwargs
