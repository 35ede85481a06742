"""Where tasks run: a thread pool and a process pool behind one small interface.

Every pool has ``submit(attempt, fn, args, kwargs)``, ``kill(attempt) -> bool`` and
``shutdown()``. A pool reports each finished attempt by putting one message on the run's
queue (``attempt.queue``)::

    (attempt, ok, value_or_error, worker, traceback_text)

Why not ``concurrent.futures``: a ``Future`` carries a ``Condition`` and its done-callbacks
run under it. Measured here on 100,000 no-op tasks, the Future and work-item bookkeeping of
``ThreadPoolExecutor`` cost more than the whole of parexec's scheduling, and a loky executor
per process slot (the only way to kill one loky worker without breaking the others) cost
320 us per task against 73 us for the pipe-per-worker design below (loky's own pipelined
executor: 158 us). Reporting straight onto the scheduler's queue keeps the contract of
ARCHITECTURE.md (one owner of state; workers only enqueue) without that cost.

Threads
    Daemon threads, started on demand, one run each. A thread task that ignores its cancel
    flag keeps its thread but never blocks interpreter exit. An ``async def`` task runs on an
    event loop of its own in its thread; a timeout or cancel cancels its coroutine (see
    ``_context.run_coroutine``), so it does stop.

Processes
    One pool per interpreter, reused across runs. Each worker is a process started by loky's
    process backend (fork + exec, so no state is inherited and ``__main__`` is not re-run),
    with one duplex pipe; one reader thread waits on every pipe and every process sentinel::

        scheduler thread ──send_bytes──► worker 1 ──send_bytes──┐
                         ──send_bytes──► worker 2 ──send_bytes──┤
                                                                ▼
                          run queue ◄── reader thread (one poll on pipes + sentinels)

    A run whose process tasks are short keeps one task queued behind each running one
    (pipelining, see ``_dispatch.PIPELINE_BELOW``): it is written to that worker's pipe
    behind the running one, as ``ProcessPoolExecutor``'s call queue keeps its workers busy,
    so a worker does not idle for a round trip through the scheduler; the driver can still
    take it back until the worker starts it (``_worker.AHEAD``).

    Killing one worker (timeout, memory limit, cancellation) affects no other task: the
    reader sees its sentinel, drops it, and a fresh worker is started on the next submit.
    Workers exit when their parent does (see ``_proctree._watch_parent``) and at interpreter
    exit (``atexit``). Whatever a task started goes with its worker: a worker is the child
    subreaper of its descendants (so double-forked daemons stay in its tree), kills them when
    its parent dies or its pipe closes, and the driver's kill of one worker freezes and kills
    its whole tree (``_proctree.kill_tree``). See issue 12 item 2.

    Buffers of 1 MiB or more (arguments and results) do not cross the pipe: they go through
    shared-memory segments mapped copy-on-write (``_shm``). A worker's payload pins the
    segments it names (``_Worker.pins``) until its reply was read, so a value released by
    ``keep=`` meanwhile cannot take its segment away from the consumer; a reply the driver
    drops (a killed attempt) has its segments unlinked, and a worker that dies has what it
    was writing removed when it is reaped.

The code: ``ThreadPool`` is in ``_threadpool``, ``ProcessPool`` in ``_processpool``, its
reader thread in ``_reader`` and payload pickling in ``_payload``; this module re-exports
both pools and holds the process pool shared by the runs of an interpreter
(``process_pool``, the ``RecyclingPool`` view, ``shutdown``).
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from . import _shm
from ._processpool import ProcessPool
from ._threadpool import ThreadPool

__all__ = ["ProcessPool", "ThreadPool", "process_pool", "shutdown", "shutdown_process_pool"]


_process_pool: ProcessPool | None = None
_process_pool_lock = threading.Lock()
_atexit_registered = False


class RecyclingPool(ProcessPool):
    """The shared process pool as one run sees it: every submit carries the run's limit.

    It holds no worker of its own; every method goes to the shared pool. Made by
    ``process_pool(max_tasks_per_worker=N)``.
    """

    def __init__(self, pool: ProcessPool, max_tasks_per_worker: int) -> None:  # noqa: D107
        # No ProcessPool.__init__: this is a view, with no reader, pipes or workers.
        self.pool = pool
        self.max_tasks_per_worker = max_tasks_per_worker

    def submit(self, attempt: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               max_tasks_per_worker: int | None = None) -> None:
        """Submit to the shared pool with this view's limit (or ``max_tasks_per_worker``)."""
        self.pool.submit(attempt, fn, args, kwargs,
                         max_tasks_per_worker or self.max_tasks_per_worker)

    def kill(self, attempt: Any) -> bool:
        """See ``ProcessPool.kill``."""
        return self.pool.kill(attempt)

    def restart(self, attempt: Any) -> None:
        """See ``ProcessPool.restart``."""
        self.pool.restart(attempt)

    def runs(self, attempt: Any) -> bool:
        """See ``ProcessPool.runs``."""
        return self.pool.runs(attempt)

    def interrupt(self, attempt: Any, cancel: bool) -> bool:
        """See ``ProcessPool.interrupt``."""
        return self.pool.interrupt(attempt, cancel)

    def kill_for_memory(self, attempt: Any, used: int, limit: int) -> None:
        """See ``ProcessPool.kill_for_memory``."""
        self.pool.kill_for_memory(attempt, used, limit)

    def shutdown(self) -> None:
        """Stop the shared pool's workers (as ``px.shutdown()``)."""
        self.pool.shutdown()

    @property
    def pids(self) -> list[int]:
        """Pids of the shared pool's live workers."""
        return self.pool.pids


def process_pool(sweep: bool = False, max_tasks_per_worker: int | None = None) -> ProcessPool:
    """The interpreter's process pool, created on first use.

    Args:
        sweep: First remove the shared-memory segments of drivers that died
            (``_shm.sweep_dead_drivers``, a listing of the segment folder): once per run,
            never per task.
        max_tasks_per_worker: Replace a worker after it ran this many tasks (a run's
            option). Given, the result is a ``RecyclingPool`` view of the shared pool that
            passes the limit with every submit; None: the shared pool itself.

    Raises:
        TaskOptionError: ``max_tasks_per_worker`` is not a positive int.
    """
    global _process_pool, _atexit_registered
    if max_tasks_per_worker is not None:
        from ._options import check_max_tasks_per_worker
        check_max_tasks_per_worker(max_tasks_per_worker, "process_pool")
    if sweep:
        _shm.sweep_dead_drivers()
    with _process_pool_lock:
        if _process_pool is None:
            _process_pool = ProcessPool()
            if not _atexit_registered:
                _atexit_registered = True
                atexit.register(shutdown_process_pool)
        pool = _process_pool
    return pool if max_tasks_per_worker is None else RecyclingPool(pool, max_tasks_per_worker)




def shutdown_process_pool() -> None:
    """Stop every process worker of this interpreter (a later run starts new ones)."""
    global _process_pool
    with _process_pool_lock:
        pool, _process_pool = _process_pool, None
    if pool is not None:
        pool.shutdown()


def shutdown() -> None:
    """Stop the reusable process workers of this interpreter.

    Process workers are kept between runs (a second run starts faster, and values of
    ``px.worker_cache`` stay); this stops them now instead of at interpreter exit: idle
    workers exit, and a worker still running a task (of a run in another thread) is
    killed, failing that task with ``px.WorkerCrashed``. Their ``px.worker_cache`` values
    go with them. The next process task starts fresh workers. Safe to call at any time,
    twice, or when no process worker was ever started. Thread tasks are not affected.

    Usage::

        result = px.run(wf)
        px.shutdown()      # free the workers' memory now
    """
    shutdown_process_pool()


def _forget_pool_after_fork() -> None:
    """In a forked child: start with no pool, and never touch the parent's.

    The child inherits the parent's pool object, pipes and worker records, but not its reader
    thread; a lock may have been held by a parent thread at the fork. Using any of it would
    steal the parent's results or kill its workers (issue 12 item 5), so the child closes its
    copies of the pipes, takes the workers out of multiprocessing's children (whose atexit
    hook would SIGTERM them), and its first process task starts a pool of its own.
    """
    global _process_pool, _process_pool_lock
    pool, _process_pool = _process_pool, None
    _process_pool_lock = threading.Lock()
    if pool is not None:
        pool._forget()


os.register_at_fork(after_in_child=_forget_pool_after_fork)
