"""The process pool: loky-spawned workers, one pipe each, and one reader thread.

``ProcessPool`` (re-exported by ``_pools``, whose docstring draws its data flow) sends each
attempt's payload (pickled by ``_payload.dumps_payload``, large buffers through ``_shm``) to
an idle ``_Worker``; its reader thread (``_reader.Reader``, its base class) reads the
replies and reaps dead workers, and reports ``Done`` onto the run's queue.
``memory_limit_error`` is the error of a worker stopped for its memory. The pool shared by
the runs of an interpreter is made by ``_pools.process_pool``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import _shm
from ._errors import MemoryLimitExceeded, PicklingError
from ._messages import Done
from ._payload import dumps_payload
from ._proctree import kill_tree
from ._reader import Reader, _crashed, _Send, _Worker
from ._worker import AHEAD, worker_main

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
# Largest payload written ahead (the prefix costs a copy of it); larger ones are sent by the
# reader when the leader's reply is in, as are those with buffers in shared memory.
AHEAD_MAX = 1 << 16
_AFTER = object()  # _queue_behind: queued, the reader (or _hand) sends it


def _may_ahead(worker: _Worker, send: _Send) -> bool:
    """Whether ``send``, queued behind ``worker``'s attempt, may be written to it now.

    Not while another thread writes to the pipe, nor while a withdrawn copy is still in it
    (its token would be taken by the wrong payload), nor when the worker retires after its
    attempt (it would run it before it reads EOF).
    """
    return not worker.writing and not worker.skips and send.pins is None \
        and len(send.parts) == 1 and len(send.parts[0]) <= AHEAD_MAX \
        and (worker.max_tasks is None or worker.ntasks < worker.max_tasks)


class ProcessPool(Reader):
    """Process workers shared by every run of this interpreter (see the module docstring).

    Recycling (``max_tasks_per_worker``, issue 16 item 3): a worker that has run its limit of
    attempts is retired when its last reply has been read: it is not given another task and
    leaves on EOF (a native library's leaks go with it); the next submit starts a fresh
    worker if none is idle. A worker is never killed mid-task for this. The limit travels
    with each ``submit`` (the pool is shared by every run of the interpreter, and runs may
    differ); ``process_pool(max_tasks_per_worker=N)`` gives a view that passes it.

    Pipelining. An attempt whose ``leader`` is set (the scheduler's choice: a running
    attempt of the same run, see ``_dispatch.PIPELINE_BELOW``) is queued behind it on the
    leader's worker (``_Worker.next``), as ``ProcessPoolExecutor`` keeps its call queue one
    task ahead of its workers: it is written to the worker's pipe at once (``AHEAD``, with a
    token in the semaphore the worker shares with the pool), so the worker goes from the
    leader to it without waiting for the driver. To withdraw it (``kill``, ``restart``, a
    grace signal for the leader) the pool takes the token back: then the worker skips it; if
    the worker took the token first, it runs (its leader returned, the reply unread). A
    payload too large to copy, or one queued while another thread writes to the pipe, waits
    in the driver instead: the reader sends it the moment it has read the leader's reply,
    before it decodes that reply. It runs on no other worker while the leader runs (the
    run's ``max_workers`` holds: the scheduler hands it the leader's slot when the leader
    ends). If the leader's reply was already read when it is submitted, it starts like any
    other attempt; if the leader's worker dies, is killed or retires first, the queued
    attempt moves to an idle or new worker (``_start``), no attempt counted; ``kill`` of an
    attempt not yet sent withdraws it.
    """

    def __init__(self) -> None:
        from loky.backend.context import get_context
        self._ctx = get_context("loky")
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._workers: dict[Any, _Worker] = {}  # conn -> worker, every live worker
        # Sentinel -> worker retired after its last task, until the reader sees it exit.
        self._retired: dict[Any, _Worker] = {}
        # Queued attempts moving to another worker (their own went away), by the reader.
        self._moving: dict[Any, _Send] = {}
        # Leader not on a worker yet -> the attempt queued behind it (see _queue_behind).
        self._after: dict[Any, _Send] = {}
        self._version = 0  # bumped whenever the descriptors the reader polls change
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
        send = _Send(attempt, parts, pins, max_tasks_per_worker)
        leader = attempt.leader
        if leader is not None:
            with self._lock:
                queued = self._queue_behind(leader, send)
            if queued is not None:
                if queued is not _AFTER:
                    self._write_ahead(queued, send)
                return
        self._start(send, moving=False)

    def _queue_behind(self, leader: Any, send: _Send) -> Any:
        """Queue ``send`` to run after ``leader`` on its worker; None if ``leader`` ended.

        Called under the lock. Returns the worker when the caller is to write ``send`` to
        it ahead (``_write_ahead``; ``writing`` is set), else ``_AFTER``. A leader not on a
        worker yet (queued itself, or moving to a new worker) takes its follower along:
        ``_after`` until ``_hand``.
        """
        worker = leader.handle
        if worker is not None and worker.attempt is leader:
            if worker.killed or worker.conn not in self._workers:
                return None  # stopped: it runs no more
            if worker.next is not None:  # written ahead, and started (restart found it so):
                return None  # the leader ended; its reply is not read yet
            worker.next = send  # else the reader sends it once the leader's reply is in
            send.attempt.handle = worker
            send.attempt.worker = worker.pid
            if _may_ahead(worker, send):
                worker.ahead = True
                worker.writing = send
                return worker
            return _AFTER
        if leader in self._moving or (
                worker is not None and worker.next is not None
                and worker.next.attempt is leader) or any(
                send.attempt is leader for send in self._after.values()):
            self._after[leader] = send
            return _AFTER
        return None  # its reply was read (or it crashed): it no longer runs

    def _write_ahead(self, worker: _Worker, send: _Send) -> None:
        """Write ``send`` behind the payload ``worker`` runs, with its token (``AHEAD``).

        The caller set ``writing`` to ``send`` (no other thread writes to the pipe
        meanwhile).
        """
        tokens = worker.tokens
        try:
            if tokens is not None:  # (None: reaped meanwhile; the reader moves it)
                tokens.release()
                worker.conn.send_bytes(AHEAD + send.parts[0])
        except OSError:
            pass  # the worker died: the reader moves it to another (_reap)
        self._written(worker, send)

    def _written(self, worker: _Worker, send: _Send) -> None:
        """``send`` is written: the pipe is free for the next writer, if still ours to free.

        Under the lock and only by the writer that set it, so a writer that finished late
        cannot free the pipe while another thread writes to it.
        """
        with self._lock:
            if worker.writing is send:
                worker.writing = None

    def _start(self, send: _Send, moving: bool) -> None:
        """Send ``send`` to an idle worker, or to a new one.

        ``moving``: a queued attempt whose worker went away (or whose leader never ran),
        which the caller listed in ``_moving`` under the lock it took it out with, so that
        ``kill`` can withdraw it until it is on its new worker.
        """
        attempt = send.attempt
        with self._lock:
            closed = self._closed
            if moving and attempt not in self._moving:
                return  # withdrawn already: no worker for it
            worker = self._idle.pop() if self._idle and not closed else None
        if moving and closed:  # shut down: nothing will run it (shutdown reports it)
            return
        if worker is None:
            worker = self._spawn()
        # Hand the attempt over under the lock, and check the worker is still alive there:
        # the reader reaps a worker that died while idle under the same lock, so exactly one
        # of us reports the crash (it if it saw the attempt, we if it reaped first).
        with self._lock:
            if moving and self._moving.pop(attempt, None) is None:  # withdrawn meanwhile
                if worker.conn in self._workers and not self._closed:
                    self._idle.append(worker)
                return
            alive = worker.conn in self._workers
            if alive:
                self._hand(worker, send, write=True)
            else:
                then = self._after.pop(attempt, None)
        if not alive:  # its pins go with this frame: segments nothing else holds unlink
            _crashed(attempt, worker)
            if then is not None:  # its follower no longer waits for it
                self._move(then)
            return
        self._send(worker, send)

    def _move(self, send: _Send) -> None:
        """Start ``send``, queued behind an attempt that will not run: elsewhere."""
        with self._lock:
            self._moving[send.attempt] = send
        self._start(send, moving=True)

    def _hand(self, worker: _Worker, send: _Send, write: bool) -> None:
        """Make ``send`` the attempt ``worker`` runs (its follower queued). Under the lock.

        ``write``: the caller writes its payload next (``_send``); False for one that was
        written ahead.
        """
        attempt = send.attempt
        if write:
            worker.writing = send
        worker.attempt = attempt
        worker.pins = send.pins
        worker.ntasks += 1
        worker.max_tasks = send.max_tasks
        attempt.handle = worker
        attempt.worker = worker.pid
        if self._after:
            then = self._after.pop(attempt, None)
            if then is not None:
                worker.next = then
                then.attempt.handle = worker
                then.attempt.worker = worker.pid

    def _send(self, worker: _Worker, send: _Send) -> None:
        """Write the payload handed to ``worker`` (after ``_hand``, outside the lock)."""
        attempt = send.attempt
        if attempt.monitor is not None:
            attempt.monitor.watch(attempt, worker.pid)
        try:
            for part in send.parts:
                worker.conn.send_bytes(part)
        except OSError:
            # The worker died (or was killed); the reader reports the crash for this attempt.
            pass
        self._written(worker, send)  # a follower queued from now on may be written ahead

    def kill(self, attempt: Any) -> bool:
        """Kill the worker running ``attempt`` (and its children); other workers go on.

        An attempt still queued (behind a leader, or moving to a new worker) is withdrawn;
        one queued behind it starts elsewhere (the scheduler gave it the slot). One written
        ahead that its worker started already (its leader's reply not read yet) is killed
        with its worker, whose last reply, the leader's, still counts (``doomed``). And a
        leader whose worker started what was written ahead has returned: its worker is
        kept, its reply dropped (``drop_reply``), the other attempt runs on.
        """
        # Under the lock, so the reader either sees ``killed`` (and drops the result and the
        # worker) or has already taken the result (and there is nothing left to kill).
        with self._lock:
            worker = attempt.handle
            running = worker is not None and worker.attempt is attempt
            if running and worker.started_ahead():
                worker.drop_reply = True
                return True
            if running:
                worker.killed = True
            elif worker is not None and worker.next is not None \
                    and worker.next.attempt is attempt and worker.started_ahead():
                worker.next, worker.ahead, worker.doomed = None, False, True
                running = True
            elif not self._withdraw(attempt):
                return True  # it ended
            then = self._after.pop(attempt, None) if worker is None or \
                worker.attempt is not attempt else None
            if then is not None:
                self._moving[then.attempt] = then
        if running:
            kill_tree(worker.pid)
        if then is not None:
            self._start(then, moving=True)
        return True

    def _withdraw(self, attempt: Any) -> bool:
        """Take ``attempt`` out of the queues if it waits in one. Called under the lock."""
        worker = attempt.handle
        if worker is not None and worker.next is not None and worker.next.attempt is attempt:
            assert not worker.ahead  # the caller withdrew it (started_ahead)
            worker.next = None  # its pins go with it
            return True
        if self._moving.pop(attempt, None) is not None:
            return True
        for leader, send in self._after.items():
            if send.attempt is attempt:
                del self._after[leader]
                return True
        return False

    def restart(self, attempt: Any) -> None:
        """Start ``attempt``, queued behind a running one (``submit``), on a free worker now.

        The scheduler gave it a slot of its own: its leader runs long, and another worker
        is free. One that was sent already (its leader ended meanwhile), or that waits for
        a leader not on a worker yet, stays as it is.
        """
        with self._lock:
            worker = attempt.handle
            if worker is None or worker.next is None or worker.next.attempt is not attempt:
                return
            if worker.started_ahead():
                return  # its worker started it: it runs there
            send, worker.next = worker.next, None
            self._moving[attempt] = send  # withdrawable by kill until it is handed over
        self._start(send, moving=True)

    def runs(self, attempt: Any) -> bool:
        """Whether ``attempt`` is on a worker now (sent, reply not read)."""
        with self._lock:
            worker = attempt.handle
            return worker is not None and worker.attempt is attempt and not worker.killed

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
        with self._lock:
            worker = attempt.handle
            if worker is None or worker.attempt is not attempt or worker.killed:
                return False
            # What was written ahead must not be started meanwhile, to be signalled in its
            # place: the reader sends it again once the reply is in. If it started, this
            # attempt had returned.
            if worker.started_ahead():
                return False
            try:
                os.kill(worker.pid, SIG_CANCEL if cancel else SIG_TIMEOUT)
            except ProcessLookupError:
                return False  # it died: the reader reports the crash
        return True

    def kill_for_memory(self, attempt: Any, used: int, limit: int) -> None:
        """Called by the monitor: the attempt's worker uses more memory than declared."""
        with self._lock:
            worker = attempt.handle
            if worker is None or worker.attempt is not attempt:
                return
            if worker.started_ahead():
                return  # it returned, and what was written ahead runs: not its memory
            worker.killed = True
        kill_tree(worker.pid)
        peak = attempt.monitor.unwatch(attempt) if attempt.monitor is not None else None
        attempt.queue.put(Done(attempt, False, memory_limit_error(attempt.task_id, used, limit),
                               worker.pid, peak_memory=peak))

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        tokens = self._ctx.Semaphore(0)
        process = self._ctx.Process(target=worker_main,
                                    args=(child_conn, os.getpid(), tokens),
                                    name=_WORKER_NAME)
        process.daemon = True
        process.start()
        child_conn.close()
        worker = _Worker(process, parent_conn, tokens)
        with self._lock:
            self._workers[parent_conn] = worker
            self._version += 1
        os.write(self._wake_w, b"x")
        return worker

    def shutdown(self) -> None:
        """Stop every worker (idle ones exit on EOF; busy ones are killed)."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
            self._idle.clear()
            for w in workers:
                w.started_ahead()  # else it would run what was sent ahead before EOF
                w.ahead = False
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
            w.close()
        never: list[_Send] = []
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
                _crashed(attempt, w)
            if w.next is not None:  # queued behind it: it never started
                never.append(w.next)
                w.next = None
        with self._lock:  # and those moving to a worker, or waiting for their leader
            never += [*self._moving.values(), *self._after.values()]
            self._moving.clear()
            self._after.clear()
        for send in never:
            _crashed(send.attempt)
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
            w.close()  # our copies only: the parent's ends stay open
        self._workers.clear()
        self._idle.clear()
        self._retired.clear()  # the parent's: it reaps them
        self._moving.clear()
        self._after.clear()
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


def _moved(attempt: Any, shm: int, pipe: int) -> None:
    """Count the bytes ``attempt``'s arguments moved (on the submitting thread).

    The reader adds its result's and reports the totals in its ``Done``. Attempts of other
    callers may start at None.
    """
    attempt.shm_bytes = (attempt.shm_bytes or 0) + shm
    attempt.pipe_bytes = (attempt.pipe_bytes or 0) + pipe
