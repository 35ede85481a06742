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
                          run queue ◄── reader thread (connection.wait on pipes + sentinels)

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
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import threading
from inspect import iscoroutine
from queue import SimpleQueue
from typing import Any

from . import _shm
from ._context import _local, run_coroutine, user_frames
from ._errors import MemoryLimitExceeded, PicklingError, WorkerCrashed
from ._limits import BlasCap
from ._messages import Done, Started
from ._proctree import kill_tree
from ._worker import decode_outcome, worker_main

__all__ = ["ProcessPool", "ThreadPool", "process_pool", "shutdown", "shutdown_process_pool"]


class ThreadPool:
    """Daemon worker threads for one run. Only the scheduler thread calls its methods.

    Prefetched attempts (queued beyond the slots, see ``_scheduler.PREFETCH_BELOW``) report
    ``Started`` when a thread takes them.

    Args:
        name: Prefix of the threads' names.
        max_threads: Most threads started; tasks handed over beyond that wait in the queue.
    """

    def __init__(self, name: str = "parexec", max_threads: int = 1 << 30) -> None:
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._name = name
        self.max_threads = max_threads
        self._nthreads = 0
        self.nbusy = 0  # attempts handed out and not yet reported back (scheduler-owned)
        self._counter = itertools.count(1)
        self.cap = BlasCap()

    def submit(self, attempt: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run ``fn(*args, **kwargs)`` on a worker thread; report on ``attempt.queue``.

        The scheduler decrements ``nbusy`` when it handles the report, so a new thread is
        started only when every thread is (or may still be) busy.
        """
        self.nbusy += 1
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


class _Worker:
    __slots__ = ("process", "conn", "pid", "attempt", "killed", "pins", "ntasks", "max_tasks")

    def __init__(self, process: Any, conn: Any) -> None:
        self.process = process
        self.conn = conn
        self.pid: int = process.pid
        self.attempt: Any = None
        self.killed = False
        # Segments the running attempt's payload names: kept (linked) until its reply was
        # read, even if the driver's values using them are released meanwhile.
        self.pins: list[_shm.Segment] | None = None
        self.ntasks = 0  # attempts handed to it
        # The max_tasks_per_worker of its current attempt's submit (None: no limit).
        self.max_tasks: int | None = None


# Resident memory of a worker (Python 3.11, Linux), measured as the peak_memory of one task
# in a fresh worker: 24.5 MiB for a no-op, 33 MiB for a task that imports numpy (psutil's
# memory_info().rss of the idle worker agrees).
BARE_WORKER_MIB = 25
NUMPY_WORKER_MIB = 33


def binary_size(n: float) -> str:
    """A byte count in binary units: ``"312 MiB"``, ``"1.50 GiB"``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 100 or value == int(value) \
                else f"{value:.2f} {unit}"
    return f"{int(n)} B"


def memory_limit_error(task_id: str, used: int, limit: int) -> MemoryLimitExceeded:
    """The error of a process task stopped for using more memory than its ``memory=``.

    It says what the limit covers (issue 22 item 6): the worker's whole resident memory,
    which is more than the task's data.
    """
    return MemoryLimitExceeded(
        f"task {task_id!r} used {binary_size(used)}, above its declared "
        f"memory={binary_size(limit)}, so its worker was stopped. The limit bounds the "
        "worker process's whole resident memory, the Python interpreter and the modules "
        f"it imported included (about {BARE_WORKER_MIB} MiB for a bare worker, "
        f"{NUMPY_WORKER_MIB} MiB once numpy is imported), not only the task's data. Raise "
        "memory= to the "
        "task's peak plus that overhead, or make the task use less")


_WORKER_NAME = "parexec-worker"


class ProcessPool:
    """Process workers shared by every run of this interpreter (see the module docstring).

    Recycling (``max_tasks_per_worker``, issue 16 item 3): a worker that has run its limit of
    attempts is retired when its last reply has been read: it is not given another task and
    leaves on EOF (a native library's leaks go with it); the next submit starts a fresh
    worker if none is idle. A worker is never killed mid-task for this. The limit travels
    with each ``submit`` (the pool is shared by every run of the interpreter, and runs may
    differ); ``process_pool(max_tasks_per_worker=N)`` gives a view that passes it.
    """

    def __init__(self) -> None:
        from loky.backend.context import get_context
        self._ctx = get_context("loky")
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._workers: dict[Any, _Worker] = {}  # conn -> worker, every live worker
        # Sentinel -> worker retired after its last task, until the reader sees it exit.
        self._retired: dict[Any, _Worker] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="parexec-process-reader",
                                        daemon=True)
        self._reader.start()

    # Scheduler side -----------------------------------------------------------------

    def submit(self, attempt: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               max_tasks_per_worker: int | None = None) -> None:
        """Pickle the call (raising ``PicklingError`` naming the task) and send it to a worker.

        Buffers of 1 MiB or more in the arguments go through shared memory (``_shm``): a
        buffer that already lies in a segment (a value another process task returned) is
        named, not copied; the others are written into new segments; when shared memory is
        short they follow the pickle through the pipe.

        Args:
            attempt: The attempt to run; its outcome is reported on ``attempt.queue``.
            fn: The function.
            args: Its positional arguments.
            kwargs: Its keyword arguments.
            max_tasks_per_worker: Retire the worker once it has run this many attempts
                (this one included), after this attempt's reply; None: no limit.
        """
        where = _shm.segment_dir()
        payload = (attempt.task_id, attempt.number, attempt.cpus, fn,
                   tuple(map(_shm.wrap, args)) if args else args,
                   {k: _shm.wrap(v) for k, v in kwargs.items()} if kwargs else kwargs, where)
        big = _shm.Collector()
        try:
            data = dumps_payload(payload, big)
            if big:
                enc = _shm.place(data, big, where=where, driver_pid=os.getpid(), owner=True)
                parts: Any = enc.parts
                pins = enc.segments or None
                _moved(attempt, enc.shm_bytes, enc.pipe_bytes)
            else:
                parts, pins = (data,), None
                _moved(attempt, 0, len(data))
        except Exception as exc:  # noqa: BLE001
            raise PicklingError(
                f"task {attempt.task_id!r} runs in a process, but its function or arguments "
                f"cannot be pickled ({type(exc).__name__}: {exc}); pass picklable data, or "
                "use isolation='thread'") from exc
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = self._spawn()
        # Hand the attempt over under the lock, and check the worker is still alive there:
        # the reader reaps a worker that died while idle under the same lock, so exactly one
        # of us reports the crash (it if it saw the attempt, we if it reaped first).
        with self._lock:
            alive = worker.conn in self._workers
            if alive:
                worker.attempt = attempt
                worker.pins = pins
                worker.ntasks += 1
                worker.max_tasks = max_tasks_per_worker
        if not alive:  # its pins go with this frame: segments nothing else holds unlink
            attempt.queue.put(Done(attempt, False, WorkerCrashed(attempt.task_id,
                                                                 worker.process.exitcode),
                                   worker.pid))
            return
        attempt.handle = worker
        attempt.worker = worker.pid
        if attempt.monitor is not None:
            attempt.monitor.watch(attempt, worker.pid)
        try:
            for part in parts:
                worker.conn.send_bytes(part)
        except OSError:
            # The worker died while idle; the reader reports the crash for this attempt.
            pass

    def kill(self, attempt: Any) -> bool:
        """Kill the worker running ``attempt`` (and its children); other workers go on."""
        worker = attempt.handle
        # Under the lock, so the reader either sees ``killed`` (and drops the result and the
        # worker) or has already taken the result (and there is nothing left to kill).
        with self._lock:
            if worker is None or worker.attempt is not attempt:
                return True
            worker.killed = True
        kill_tree(worker.pid)
        return True

    def interrupt(self, attempt: Any, cancel: bool) -> bool:
        """Signal ``attempt``'s worker to raise ``px.Cancelled`` or ``px.TaskTimeout`` in it.

        ``px.Cancelled`` when ``cancel``. This is the graceful stop of ``grace=``; the
        caller kills the worker later if the attempt goes on. Returns False when the
        attempt is no longer on its worker (its reply was read). Sent under the lock, so
        the worker cannot have been given another task meanwhile: a signal that arrives
        after the attempt returned finds no task running and is ignored (see
        ``_worker._on_stop_signal``).
        """
        from ._worker import SIG_CANCEL, SIG_TIMEOUT
        worker = attempt.handle
        with self._lock:
            if worker is None or worker.attempt is not attempt or worker.killed:
                return False
            try:
                os.kill(worker.pid, SIG_CANCEL if cancel else SIG_TIMEOUT)
            except ProcessLookupError:
                return False  # it died: the reader reports the crash
        return True

    def kill_for_memory(self, attempt: Any, used: int, limit: int) -> None:
        """Called by the monitor: the attempt's worker uses more memory than declared."""
        worker = attempt.handle
        with self._lock:
            if worker is None or worker.attempt is not attempt:
                return
            worker.killed = True
        kill_tree(worker.pid)
        peak = attempt.monitor.unwatch(attempt) if attempt.monitor is not None else None
        attempt.queue.put(Done(attempt, False, memory_limit_error(attempt.task_id, used, limit),
                               worker.pid, peak_memory=peak))

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=worker_main, args=(child_conn, os.getpid()),
                                    name=_WORKER_NAME)
        process.daemon = True
        process.start()
        child_conn.close()
        worker = _Worker(process, parent_conn)
        with self._lock:
            self._workers[parent_conn] = worker
        os.write(self._wake_w, b"x")
        return worker

    def shutdown(self) -> None:
        """Stop every worker (idle ones exit on EOF; busy ones are killed)."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
            self._idle.clear()
        # The reader must leave poll() first: the kernel keeps every polled socket open for
        # the duration of the call, so closing our ends would not give the workers EOF.
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=2)
        with self._lock:
            workers += self._retired.values()  # leaving on EOF already: joined below
            self._retired.clear()
        for w in workers:
            w.killed = True
            try:
                w.conn.close()
            except OSError:
                pass
        for w in workers:
            w.process.join(timeout=0.5 if w.attempt is None else 0)
            if w.process.exitcode is None:
                kill_tree(w.pid)
                w.process.join(timeout=2)
            # The reader has stopped: a run still waiting on this worker hears it from us.
            attempt, w.attempt = w.attempt, None
            if attempt is not None:
                if attempt.monitor is not None:
                    attempt.monitor.unwatch(attempt)
                attempt.queue.put(Done(attempt, False, WorkerCrashed(attempt.task_id,
                                                                     w.process.exitcode),
                                       w.pid))
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _forget(self) -> None:
        """Drop everything inherited from the parent, whose workers these are.

        Called in a forked child (see ``_forget_pool_after_fork``).
        """
        import multiprocessing.process as mp_process
        self._lock = threading.Lock()  # the parent's may have been held at the fork
        self._closed = True
        children = getattr(mp_process, "_children", None)
        if isinstance(children, set):  # a worker being spawned at the fork is not listed yet
            for p in list(children):
                if getattr(p, "name", None) == _WORKER_NAME:
                    children.discard(p)
        for w in self._workers.values():
            try:
                w.conn.close()  # our copy only: the parent's end stays open
            except OSError:
                pass
        self._workers.clear()
        self._idle.clear()
        self._retired.clear()  # the parent's: it reaps them
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    @property
    def pids(self) -> list[int]:
        """Pids of the live workers."""
        with self._lock:
            return [w.pid for w in self._workers.values()]

    # Reader thread --------------------------------------------------------------------

    def _read_loop(self) -> None:
        from multiprocessing.connection import wait
        while True:
            with self._lock:
                if self._closed:
                    return
                conns = list(self._workers)
                sentinels = {w.process.sentinel: w for w in self._workers.values()}
                retired = list(self._retired)
            try:
                ready = wait([self._wake_r, *conns, *sentinels, *retired])
            except OSError:
                continue  # a connection closed under us; rebuild the list
            for obj in ready:
                if obj == self._wake_r:
                    os.read(self._wake_r, 4096)
                elif obj in sentinels:
                    self._reap(sentinels[obj])
                elif obj in retired:
                    self._reap_retired(obj)
                else:
                    self._receive(obj)

    def _receive(self, conn: Any) -> None:
        worker = self._workers.get(conn)
        if worker is None:
            return
        try:
            data = conn.recv_bytes()
            descs, body = _shm.split(data)
            piped = _shm.receive_parts(descs, conn.recv_bytes_into) if descs else []
        except (EOFError, OSError):
            self._reap(worker)
            return
        with self._lock:
            attempt, worker.attempt = worker.attempt, None
            pins, worker.pins = worker.pins, None  # released once the result is mapped
            if worker.killed or attempt is None:
                _shm.discard(descs)
                return  # the scheduler already decided this attempt's outcome
            retire = worker.max_tasks is not None and worker.ntasks >= worker.max_tasks
            if retire:
                self._retire(worker)
            elif not self._closed:
                self._idle.append(worker)
        ok, value, tb_text, (peak, t0, t1) = decode_outcome(attempt.task_id, body, descs,
                                                            piped)
        del pins
        # What it moved: its arguments (counted by submit), then its result.
        sent_shm, sent_pipe = attempt.shm_bytes or 0, attempt.pipe_bytes or 0
        if descs:
            result_bytes = len(body) + sum(d[2] for d in descs)
            shm = sent_shm + sum(d[2] for d in descs if d[0] is not None)
            pipe = sent_pipe + len(data) + sum(len(b) for b in piped)
        else:
            result_bytes = len(data)
            shm, pipe = sent_shm, sent_pipe + result_bytes
        del data, body, piped
        if attempt.monitor is not None:
            sampled = attempt.monitor.unwatch(attempt)
            if sampled is not None and (peak is None or sampled > peak):
                peak = sampled  # the larger of the worker's own and the monitor's
        attempt.queue.put(Done(attempt, ok, value, worker.pid, tb_text, t0 or 0.0, t1 or 0.0,
                               peak, result_bytes, shm, pipe))

    def _retire(self, worker: _Worker) -> None:
        """Take ``worker`` out of service; it exits on EOF. Called under the lock.

        Its conn is closed here, in the reader thread (the only one that polls it), and its
        sentinel is watched until the process has exited, so it is joined, not left as a
        zombie, and what it was writing for us is swept.
        """
        self._workers.pop(worker.conn, None)
        self._retired[worker.process.sentinel] = worker
        try:
            worker.conn.close()
        except OSError:
            pass

    def _reap_retired(self, sentinel: Any) -> None:
        with self._lock:
            worker = self._retired.pop(sentinel, None)
        if worker is None:
            return
        worker.process.join(timeout=1)
        if worker.process.exitcode is not None:
            _shm.sweep_writer(worker.pid)

    def _reap(self, worker: _Worker) -> None:
        with self._lock:
            if self._workers.pop(worker.conn, None) is None:
                return
            if worker in self._idle:
                self._idle.remove(worker)
            attempt, worker.attempt = worker.attempt, None
            worker.pins = None
        worker.process.join(timeout=1)
        if worker.process.exitcode is not None:  # what it was writing for us, if anything
            _shm.sweep_writer(worker.pid)
        try:
            worker.conn.close()
        except OSError:
            pass
        if attempt is not None and attempt.monitor is not None:
            attempt.monitor.unwatch(attempt)
        if attempt is not None and not worker.killed:
            attempt.queue.put(Done(attempt, False, WorkerCrashed(attempt.task_id,
                                                                 worker.process.exitcode),
                                   worker.pid))


def _moved(attempt: Any, shm: int, pipe: int) -> None:
    """Count the bytes ``attempt``'s arguments moved (on the submitting thread).

    The reader adds its result's and reports the totals in its ``Done``. Attempts of other
    callers may start at None.
    """
    attempt.shm_bytes = (attempt.shm_bytes or 0) + shm
    attempt.pipe_bytes = (attempt.pipe_bytes or 0) + pipe


_pickler_class: Any = None


def dumps_payload(obj: Any, buffer_callback: Any = None) -> bytes:
    """Pickle ``obj`` with cloudpickle, keeping the file names of functions pickled by value.

    ``buffer_callback`` receives the out-of-band buffers (pickle protocol 5).

    cloudpickle writes ``co_filename = "<dynamic-code>"`` for every function it pickles by
    value (those of ``__main__`` and notebooks), to make its output deterministic; worker
    tracebacks then say ``File "<dynamic-code>"`` and show no source line (issue 22 item
    10). A payload only needs to be faithful, so the real file name is kept.
    """
    global _pickler_class
    import io
    if _pickler_class is None:
        import types
        from collections import ChainMap

        import cloudpickle
        base = cloudpickle.Pickler
        code_reduce = base.dispatch_table[types.CodeType]

        def reduce_code(code: types.CodeType) -> Any:
            rebuild, args = code_reduce(code)
            return rebuild, tuple(code.co_filename if a == "<dynamic-code>" else a
                                  for a in args)

        _pickler_class = type("_PayloadPickler", (base,), {
            "dispatch_table": ChainMap({types.CodeType: reduce_code}, base.dispatch_table)})
    buf = io.BytesIO()
    _pickler_class(buf, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buf.getvalue()


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
