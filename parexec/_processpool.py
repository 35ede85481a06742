"""The process pool: loky-spawned workers, one pipe each, and one reader thread.

``ProcessPool`` (re-exported by ``_pools``, whose docstring draws its data flow) sends each
attempt's payload (pickled by ``_payload.dumps_payload``, large buffers through ``_shm``) to
an idle ``_Worker``; its reader thread reads the replies and reaps dead workers, and reports
``Started`` and ``Done`` onto the run's queue. ``memory_limit_error`` is the error of a
worker stopped for its memory. The pool shared by the runs of an interpreter is made by
``_pools.process_pool``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import _shm
from ._errors import MemoryLimitExceeded, PicklingError, WorkerCrashed
from ._messages import Done
from ._payload import dumps_payload
from ._proctree import kill_tree
from ._worker import decode_outcome, worker_main


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
