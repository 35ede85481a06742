"""What runs inside a worker: the task context, and the process worker's main loop.

A process worker is a loky-spawned process holding one end of a duplex pipe. It reads one
pickled payload at a time, runs it, and writes back one pickled outcome::

    parent (scheduler thread)                     worker process
      cloudpickle((task_id, attempt, cpus, fn, args, kwargs)) ──► run_payload()
      reader thread ◄── pickle((ok, value | error bytes, traceback text, type name, peak))

Everything a task needs travels in that one payload. Its buffers of 1 MiB or more, and those
of the outcome, travel through shared-memory segments named in the message (``_shm``).

The worker ignores SIGINT (a notebook's interrupt button signals the whole process group;
the scheduler alone decides what to stop) and exits as soon as its parent process is gone,
even in the middle of a task. ``SIG_TIMEOUT`` and ``SIG_CANCEL`` (SIGUSR1, SIGUSR2) are the
driver's graceful stop (``grace=``): they raise ``px.TaskTimeout`` or ``px.Cancelled`` in the
task, and only while its function runs (``_interruptible``), never in the worker's loop.

What a worker's tasks start never outlives it: the worker is the child subreaper of its
descendants (a double-forked daemon stays in its tree), kills them all when its parent dies
or its pipe closes, and reaps adopted orphans between tasks. It may have children of its
own, a nested run's process workers included. An ``async def`` task's coroutine runs to
completion on an event loop in the worker (``run_coroutine``).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import traceback
from inspect import iscoroutine
from time import monotonic
from types import TracebackType
from typing import Any

from . import _shm
from ._errors import Cancelled, ParexecError, TaskTimeout

__all__ = ["TaskContext", "current"]

# Graceful stop of a process task (grace=): the driver signals the worker; the handler raises
# inside the task. SIGINT is ignored in workers (a notebook interrupt hits the whole process
# group), so two other signals say which exception to raise.
SIG_TIMEOUT = signal.SIGUSR1
SIG_CANCEL = signal.SIGUSR2
# (task id, attempt) while the task's function runs in this process's main thread, else None:
# a signal arriving outside that window (unpickling, replying, idle) is ignored.
_interruptible: tuple[str, int] | None = None


def _on_stop_signal(signum: int, frame: Any) -> None:
    """Raise the graceful stop's exception in the running task; ignore it between tasks."""
    running = _interruptible
    if running is None:
        return
    task_id, attempt = running
    if signum == SIG_TIMEOUT:
        raise TaskTimeout(f"task {task_id!r} attempt {attempt} exceeded its timeout; "
                          "interrupted for its grace period")
    raise Cancelled(f"task {task_id!r} (attempt {attempt}) was cancelled; interrupted for "
                    "its grace period")


class TaskContext:
    """What a running task knows about itself; returned by ``px.current()``.

    Attributes:
        task_id: The id of the running task.
        attempt: The attempt number, 1 for the first try.
    """

    __slots__ = ("task_id", "attempt", "_flag")

    def __init__(self, task_id: str, attempt: int, flag: Any = None) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self._flag = flag  # an object whose ``cancel_requested`` the scheduler sets

    def cancelled(self) -> bool:
        """Whether the run asked this task to stop (cancellation, timeout, a failed run).

        A thread task cannot be interrupted: it should call this (or ``check()``) between
        steps of long work and return early (with ``grace=``, ``px.TaskTimeout`` or
        ``px.Cancelled`` is also raised in its Python code). A process task is killed
        instead (with ``grace=``, first interrupted by the same exception), so in a process
        this is always False.
        """
        flag = self._flag
        return flag is not None and flag.cancel_requested

    def check(self) -> None:
        """Raise ``px.Cancelled`` if this task was asked to stop."""
        if self.cancelled():
            raise Cancelled(f"task {self.task_id!r} (attempt {self.attempt}) was cancelled")

    def __repr__(self) -> str:
        return f"<TaskContext {self.task_id!r} attempt={self.attempt}>"


# The running task of this thread: thread workers set ``attempt`` (the scheduler's attempt
# record, which has task_id / number / cancel_requested); process workers set ``context``.
_local = threading.local()


def current() -> TaskContext:
    """The context of the task running in this thread.

    Raises:
        ParexecError: Called outside a running task.
    """
    ctx = getattr(_local, "context", None)
    if ctx is not None:
        return ctx  # type: ignore[no-any-return]
    attempt = getattr(_local, "attempt", None)
    if attempt is None:
        raise ParexecError("px.current() can only be called inside a running task")
    return TaskContext(attempt.task_id, attempt.number, attempt)


def run_coroutine(coro: Any, attempt: Any = None) -> Any:
    """Run an ``async def`` task's coroutine to completion on a new event loop; return its result.

    In a thread worker, ``attempt`` is the scheduler's attempt record: a timeout or cancel
    (``attempt.request_cancel()``) cancels the coroutine's task from the scheduler thread, so
    an awaiting task really stops and frees its slot, unlike a plain thread task. It then
    raises ``px.Cancelled`` (never ``asyncio.CancelledError``, which would look like a
    cancellation of the worker itself). A process worker passes no attempt: it is killed.
    """
    import asyncio
    task_id = getattr(attempt, "task_id", "?")

    async def main() -> Any:
        if attempt is not None:
            task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            assert task is not None
            attempt.on_cancel = lambda: loop.call_soon_threadsafe(task.cancel)
            if attempt.cancel_requested:  # asked before the hook was in place
                coro.close()
                raise Cancelled(f"task {task_id!r} was cancelled before it started")
        return await coro

    try:
        with asyncio.Runner() as runner:
            return runner.run(main())
    except asyncio.CancelledError:
        if attempt is None or not attempt.cancel_requested:
            raise  # cancelled by the task's own code: its error, as it raised it
        raise Cancelled(f"task {task_id!r} (attempt {attempt.number}) was cancelled while "
                        "awaiting") from None
    finally:
        if attempt is not None:
            attempt.on_cancel = None


def user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The frames of ``tb`` below the worker's: from the task's function down.

    ``tb`` starts at the worker frame that caught the error; for an ``async def`` task the
    frames of ``run_coroutine`` and asyncio's loop come next, down to the coroutine.
    """
    user = tb.tb_next if tb is not None else None
    if user is not None and user.tb_frame.f_code is run_coroutine.__code__:
        inner: TracebackType | None = user
        while inner is not None and not _is_coroutine_main(inner):
            inner = inner.tb_next
        if inner is not None:
            user = inner.tb_next
    return user


def _is_coroutine_main(tb: TracebackType) -> bool:
    """Whether ``tb`` is the frame of ``main`` inside ``run_coroutine``."""
    frame = tb.tb_frame
    return frame.f_code.co_name == "main" and frame.f_globals is globals()


class _SavedLimits:
    """What the first cap of this interpreter found, shared by every ``BlasCap``.

    Overlapping runs each have a ``BlasCap`` (one per thread pool); saving and restoring per
    run interleaves, and the run that saved second would put back the first one's cap for
    good (issue 12 item 9). So the state is saved once, counted, and restored by the last
    user to leave. Guarded by ``lock``.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nusers = 0
        self.env: dict[str, str | None] = {}
        self.first: Any = None  # the threadpoolctl limiter holding the original limits
        self.known: set[str] | None = None  # libraries loaded before the first cap
        self.nmodules = 0  # len(sys.modules) at the first cap

    def join(self, env_names: tuple[str, ...]) -> None:
        with self.lock:
            if self.nusers == 0:
                self.env = {k: os.environ.get(k) for k in env_names}
                self.nmodules = len(sys.modules)
                self.first = None
                self.known = None
            self.nusers += 1

    def leave(self) -> None:
        with self.lock:
            self.nusers -= 1
            if self.nusers == 0:
                self._restore()

    def _restore(self) -> None:
        if self.first is not None:
            try:
                self.first.restore_original_limits()
            except Exception:  # noqa: BLE001
                pass
            self.first = None
        if len(sys.modules) != self.nmodules:
            saved = self.env.get("OPENBLAS_NUM_THREADS") or self.env.get("OMP_NUM_THREADS")
            default = int(saved) if saved and saved.isdigit() else len(os.sched_getaffinity(0))
            try:
                from threadpoolctl import ThreadpoolController
                known = self.known or set()
                for lib in ThreadpoolController().lib_controllers:
                    if lib.filepath not in known:
                        lib.set_num_threads(default)
            except Exception:  # noqa: BLE001
                pass
        self.known = None
        for k, v in self.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.env = {}


_saved_limits = _SavedLimits()


def _reset_limits_after_fork() -> None:
    """In a forked child: the parent's runs (the users of the saved limits) are not here.

    The lock may have been held by a parent thread at the fork, and a count left above zero
    would keep the child's environment capped for good: give the child the variables found
    before the parent's first cap, and a fresh count.
    """
    saved = _saved_limits
    saved.lock = threading.Lock()
    if saved.nusers:
        for k, v in saved.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    saved.nusers = 0
    saved.env = {}
    saved.first = None
    saved.known = None


os.register_at_fork(after_in_child=_reset_limits_after_fork)


class BlasCap:
    """Cap BLAS/OpenMP thread pools (threadpoolctl) at a task's ``cpus``.

    Libraries loaded during the task (its first ``import numpy``) read their thread count
    from the environment, so the variables of ``ENV`` are set too; libraries already loaded
    are capped through threadpoolctl. That costs milliseconds (it scans the loaded
    libraries), so it is re-applied only when the wanted count changes or modules were
    imported since. BLAS pools are process-wide: in a process worker the cap is exactly the
    task's; thread tasks share the driver's pools, so concurrent thread tasks with different
    ``cpus`` get the cap of the one that started last. ``restore()`` gives up this cap; once
    every ``BlasCap`` of the interpreter has (overlapping runs), the limits and variables
    found before the first cap are put back.
    """

    ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
           "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

    def __init__(self) -> None:
        self.current = 0
        self._nmodules = -1
        self._joined = False
        self._lock = threading.Lock()  # thread workers of one pool apply concurrently

    def apply(self, cpus: float) -> None:
        """Cap the thread pools at ``max(1, int(cpus))`` threads."""
        want = max(1, int(cpus))
        nmodules = len(sys.modules)
        if want == self.current and nmodules == self._nmodules:
            return
        saved = _saved_limits
        with self._lock:
            if not self._joined:
                self._joined = True
                saved.join(self.ENV)
        if want != self.current:
            for k in self.ENV:
                os.environ[k] = str(want)
        self.current, self._nmodules = want, nmodules
        try:
            from threadpoolctl import ThreadpoolController
            controller = ThreadpoolController()
            with saved.lock:
                if saved.known is None:
                    saved.known = {c.filepath for c in controller.lib_controllers}
            if controller.lib_controllers:
                limiter = controller.limit(limits=want)
                with saved.lock:
                    if saved.first is None:
                        saved.first = limiter
        except Exception:  # noqa: BLE001 - a missing or odd library must not fail the task
            pass
        self._nmodules = len(sys.modules)  # threadpoolctl's own imports do not count

    def restore(self) -> None:
        """Give up this cap; the last cap of the interpreter to go puts back the limits.

        Libraries loaded since the first cap get the thread count they would have chosen
        themselves.
        """
        with self._lock:
            joined, self._joined = self._joined, False
        if joined:
            _saved_limits.leave()
        self.current = 0


class PeakMeter:
    """The exact peak RSS of this process during one task (Linux: VmHWM, reset per task).

    Writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark, so a reused worker
    reports each task's own peak. Costs about 12 us per task; elsewhere it reports None.
    """

    def __init__(self) -> None:
        try:
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
            self._status = os.open("/proc/self/status", os.O_RDONLY)
        except OSError:
            self._clear = self._status = -1

    def reset(self) -> None:
        """Start measuring a new task."""
        if self._clear >= 0:
            try:
                os.write(self._clear, b"5")
            except OSError:
                self._clear = -1

    def peak(self) -> int | None:
        """Peak RSS in bytes since the last ``reset()``."""
        if self._status < 0:
            return None
        try:
            data = os.pread(self._status, 4096, 0)
            i = data.index(b"VmHWM:")
            return int(data[i + 6:data.index(b"kB", i)]) * 1024
        except (OSError, ValueError):
            return None


# Process workers ------------------------------------------------------------------------

# Set by worker_main: only a process worker caps BLAS for the whole process and keeps the cap
# (run_payload called elsewhere, as tests do, leaves the caller's environment alone).
_cap: BlasCap | None = None
_meter: PeakMeter | None = None


def worker_main(conn: Any, driver_pid: int | None = None) -> None:
    """Entry point of a process worker: serve payloads from ``conn`` until it closes.

    ``driver_pid`` names the segments the worker writes its large results into (see
    ``_shm``). At EOF (pool shutdown, the driver's normal exit) the worker kills every
    process its tasks started and left running (a background ``Popen``, a daemon that
    double-forked) before it exits: nothing a task started outlives the worker. See issue 12
    item 2.
    """
    global _meter, _cap
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(SIG_TIMEOUT, _on_stop_signal)
    signal.signal(SIG_CANCEL, _on_stop_signal)
    _cap = BlasCap()
    _become_subreaper()
    _allow_children()
    _meter = PeakMeter()
    _watch_parent()
    recv, send, recv_into = conn.recv_bytes, conn.send_bytes, conn.recv_bytes_into
    driver = driver_pid or os.getppid()
    while True:
        try:
            data = recv()
            descs, body = _shm.split(data)
            piped = _shm.receive_parts(descs, recv_into) if descs else []
        except (EOFError, OSError):
            kill_tree(os.getpid(), include_root=False)
            return
        parts = _run(body, descs, piped, driver)
        del data, body, piped
        for part in parts:
            send(part)
        del parts
        _reaper.reap()


class _OrphanReaper:
    """Reap, between tasks, the adopted orphans that exited.

    A subreaper must, or zombies pile up in a long-lived worker whose tasks start daemons.

    Only zombies that no ``subprocess.Popen`` or multiprocessing process of this worker owns
    are reaped: reaping an owned one would make its ``wait()`` report 0 instead of the real
    exit status. The common case (no zombie child at all) costs one ``waitid`` call.
    """

    def __init__(self) -> None:
        self.owned_zombies: set[int] = set()  # zombies left to their owners, not rescanned

    def reap(self) -> None:
        try:
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except (ChildProcessError, AttributeError, OSError):
            return
        if found is None:  # no child has exited: the common case
            self.owned_zombies.clear()
            return
        children = _child_pids()
        self.owned_zombies.intersection_update(children)  # owners reaped the others
        zombies = [pid for pid in children if pid not in self.owned_zombies
                   and _is_zombie(pid)]
        if not zombies:
            return
        owned = _owned_pids()
        for pid in zombies:
            if pid in owned:
                self.owned_zombies.add(pid)
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


_reaper = _OrphanReaper()


def _child_pids() -> list[int]:
    """Pids of this process's children (Linux /proc; empty elsewhere)."""
    pids: list[int] = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            pass
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] == b"Z"
    except (OSError, ValueError):
        return False


def _owned_pids() -> set[int]:
    """Pids that a live ``subprocess.Popen`` or multiprocessing process of ours will wait for."""
    import gc
    import multiprocessing.process as mp_process
    import subprocess
    owned = {p.pid for p in gc.get_objects()
             if isinstance(p, subprocess.Popen) and p.returncode is None}
    owned.update(p.pid for p in getattr(subprocess, "_active", None) or ())
    for p in getattr(mp_process, "_children", ()):
        popen = getattr(p, "_popen", None)
        if popen is not None:
            owned.add(popen.pid)
    return owned


def _allow_children() -> None:
    """Let tasks start processes of their own, a nested run's process workers included.

    multiprocessing refuses children to a daemonic process (its atexit hook would orphan
    them); a worker is started daemonic so the driver never waits for it at exit. Inside the
    worker the flag is cleared: what the worker starts is killed with it anyway (see
    ``kill_tree``), and a nested pool's workers watch the worker as their parent. See issue
    12 item 15.
    """
    import multiprocessing
    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def _become_subreaper() -> None:
    """Make this worker the reaper of its orphaned descendants (Linux).

    Without it, a process a task started that double-forks (a daemon, ``sh -c 'x &'``) is
    re-parented to init at once and escapes every kill of this worker's tree; with it, the
    orphan becomes this worker's child and ``kill_tree`` finds it. Elsewhere this does
    nothing: such daemons can escape there.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl: keep the plain behaviour
        pass


# How many times kill_tree looks again for processes forked while it was stopping the tree.
# Each pass is one /proc scan; a tree that keeps forking faster than that is still killed,
# except for what it forked during the last pass.
_KILL_PASSES = 8


def kill_tree(pid: int, include_root: bool = True) -> None:
    """SIGKILL process ``pid`` (unless ``include_root`` is False) and all its descendants.

    The tree is frozen first (SIGSTOP, root included) and looked at again until no new
    process appears, so a process forked while the tree was being killed is not missed; a
    stopped process cannot fork. Orphans of a worker are its children (see
    ``_become_subreaper``), so the frozen root still holds them.
    """
    try:
        import psutil
        root = psutil.Process(pid)
    except Exception:  # noqa: BLE001 - gone already, or psutil cannot see it (yet)
        if include_root and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)  # whatever psutil says, the root must die
            except OSError:
                pass
        return
    me = os.getpid()
    stopped: dict[int, Any] = {}
    if include_root and pid != me:
        _signal(root, signal.SIGSTOP)
    for _ in range(_KILL_PASSES):
        try:
            found = [p for p in root.children(recursive=True)
                     if p.pid not in stopped and p.pid != me]
        except Exception:  # noqa: BLE001 - the root is gone
            found = []
        if not found:
            break
        for p in found:
            _signal(p, signal.SIGSTOP)
            stopped[p.pid] = p
    for p in stopped.values():
        _signal(p, signal.SIGKILL)
    if include_root and pid != me:
        _signal(root, signal.SIGKILL)
        if root.is_running():  # psutil refused (e.g. it judged the pid reused): be plain
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _signal(process: Any, signum: int) -> None:
    try:
        process.send_signal(signum)  # psutil checks the pid was not reused
    except Exception:  # noqa: BLE001 - already gone
        pass


def _watch_parent() -> None:
    """Exit this process as soon as the parent dies, even while a task runs.

    Every process its tasks started dies with it.

    A pidfd becomes readable when the process exits (Linux >= 5.3); elsewhere the watcher
    falls back to noticing that it was re-parented.
    """
    parent = os.getppid()

    def watch() -> None:
        try:
            import select
            fd = os.pidfd_open(parent)
            select.select([fd], [], [])
        except (AttributeError, OSError):
            import time
            # No pidfd: re-parenting is the only signal left. Checked once a second in this
            # worker's own thread; the scheduler never polls.
            while os.getppid() == parent:
                time.sleep(1.0)
        kill_tree(os.getpid(), include_root=False)  # what our tasks started dies with us
        os._exit(70)

    threading.Thread(target=watch, name="parexec-parent-watch", daemon=True).start()


def run_payload(data: bytes) -> bytes:
    """Run one pickled task call and return its pickled outcome (never raises)."""
    return _run(data, [], [], os.getpid())[0]  # type: ignore[no-any-return]


def _run(data: Any, descs: list[Any], piped: list[bytearray], driver_pid: int) -> Any:
    """Run one payload (its large buffers in ``descs``/``piped``); the messages to send.

    The payload is ``(task_id, attempt, cpus, fn, args, kwargs[, segment directory])``;
    with a directory, the result's large buffers go into segments there (``_shm.place``),
    those still in the payload's own unwritten segments by name, without a copy.
    """
    global _interruptible
    task_id = "?"
    try:
        bufs = _shm.buffers(descs, piped, owner=False) if descs else None
        task_id, attempt, cpus, fn, args, kwargs, *rest = pickle.loads(data, buffers=bufs)
        del bufs
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, not raised
        return (_error_outcome(task_id, exc, "could not unpickle the task in the worker: "),)
    where = rest[0] if rest else None
    _local.context = TaskContext(task_id, attempt)
    if _cap is not None:
        _cap.apply(cpus)
    meter = _meter
    if meter is not None:
        meter.reset()
    t0 = monotonic()  # CLOCK_MONOTONIC is system-wide: the parent can use these readings
    try:
        # A stop signal (grace=) may raise from here until the flag is cleared; if it lands
        # in the finally before the clearing, the outer except still catches it.
        _interruptible = (task_id, attempt)
        try:
            value = fn(*args, **kwargs)
            if iscoroutine(value):  # an async def task: its value is the coroutine's result
                value = run_coroutine(value)
        finally:
            _interruptible = None
    except BaseException as exc:  # noqa: BLE001
        _interruptible = None
        t1 = monotonic()
        exc.__traceback__ = user_frames(exc.__traceback__)
        return (_error_outcome(task_id, exc, meta=(meter.peak() if meter else None, t0, t1)),)
    finally:
        _local.context = None
    meta = (meter.peak() if meter is not None else None, t0, monotonic())
    outcome = (True, _shm.wrap(value), None, meta)
    big = _shm.Collector() if where is not None else None
    dumps: Any = pickle.dumps
    try:
        try:
            data = dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=big)
        except Exception:  # noqa: BLE001 - try harder
            import cloudpickle
            dumps = cloudpickle.dumps
            if big is not None:
                big.clear()
            data = dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=big)
    except Exception as exc:  # noqa: BLE001
        from ._errors import PicklingError
        err = PicklingError(
            f"task {task_id!r} returned a value of type {type(value).__qualname__} that cannot "
            f"be pickled ({type(exc).__name__}: {exc}); return plain data, or run the task "
            "with isolation='thread'")
        return (_error_outcome(task_id, err, meta=meta),)
    if not big:
        return (data,)
    assert where is not None
    try:
        return _shm.place(data, big, where=where, driver_pid=driver_pid, owner=False,
                          reusable={d[0] for d in descs if d[0] is not None}).parts
    except Exception:  # noqa: BLE001 - shared memory failed oddly: everything in the pickle
        _shm.logger.debug("parexec: shared memory failed for %r", task_id, exc_info=True)
        del big
        return (dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL),)


Meta = tuple[int | None, float | None, float | None]  # peak bytes, start, end (monotonic)


def run_batch(fn: Any, items: list[tuple[str, int, tuple[Any, ...]]],
              kwargs: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Run the items of a batched map one after the other, in this worker; never raises.

    ``items`` are ``(task id, attempt, args)``. Returns one outcome per item, in order:
    ``(True, value, t0, t1)`` or ``(False, error bytes, t0, t1)`` (``_error_outcome``, which
    keeps the type and the worker-side traceback; the driver decodes it with
    ``decode_outcome``). Each item has its own ``px.current()`` and its own clock readings.
    """
    out: list[tuple[Any, ...]] = []
    context = _local.context
    try:
        for task_id, attempt, args in items:
            _local.context = TaskContext(task_id, attempt)
            t0 = monotonic()
            try:
                value = fn(*args, **kwargs)
                if iscoroutine(value):
                    value = run_coroutine(value)
            except BaseException as exc:  # noqa: BLE001 - this item's outcome; the batch goes on
                t1 = monotonic()
                exc.__traceback__ = user_frames(exc.__traceback__)
                out.append((False, _error_outcome(task_id, exc), t0, t1))
                del exc
                continue
            out.append((True, value, t0, monotonic()))
    finally:
        _local.context = context
    return out



def _error_outcome(task_id: str, exc: BaseException, prefix: str = "",
                   meta: Meta = (None, None, None)) -> bytes:
    """Pickle an error with its traceback (tblib), keeping its text as a fallback.

    The outcome is ``(False, error bytes, traceback text, (type name, meta))``.
    """
    tb_text = "".join(traceback.format_exception(exc))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if prefix:
        err: BaseException = ParexecError(f"task {task_id!r}: {prefix}{type(exc).__name__}: {exc}")
        return pickle.dumps((False, pickle.dumps(err), tb_text, (type_name, meta)))
    blob = None
    try:
        import cloudpickle
        from tblib import pickling_support
        pickling_support.install(exc)
        blob = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # noqa: BLE001 - try again without the frames
        # A traceback can be too deep to pickle (a RecursionError's thousand frames) or hold
        # something unpicklable: send the exception without frames, so it keeps its type,
        # and the text above keeps the traceback (issue 12 item 19). Failing that as well,
        # the parent rebuilds a RemoteError from the text.
        for keep_chain in (True, False):
            try:
                import cloudpickle
                blob = cloudpickle.dumps(_without_frames(exc, keep_chain),
                                         protocol=pickle.HIGHEST_PROTOCOL)
                break
            except BaseException:  # noqa: BLE001
                blob = None
    return pickle.dumps((False, blob, tb_text, (type_name, meta)),
                        protocol=pickle.HIGHEST_PROTOCOL)


# At most this many chained exceptions are kept when an error travels without its frames.
_MAX_CHAIN = 100


def _without_frames(exc: BaseException, keep_chain: bool) -> BaseException:
    """Drop the tracebacks of ``exc`` and of its chain (or the chain itself), in place."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < _MAX_CHAIN:  # iterative: a chain can be long or cyclic
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        if not keep_chain:
            e.__cause__ = e.__context__ = None
        else:
            todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    if keep_chain and todo:  # too long a chain: cut it
        exc.__cause__ = exc.__context__ = None
    return exc


def _restore_fields(err: BaseException) -> BaseException:
    """Put back the fields that builtin exceptions set in ``__init__`` only.

    tblib rebuilds exceptions with a custom ``__init__`` without calling it, so a
    ``SystemExit(3)`` would arrive with ``code`` None.
    """
    if isinstance(err, SystemExit) and err.code is None and len(err.args) == 1:
        err.code = err.args[0]
    elif isinstance(err, StopIteration) and err.value is None and err.args:
        err.value = err.args[0]
    return err


def decode_outcome(task_id: str, data: Any, descs: Any = (),
                   piped: Any = ()) -> tuple[bool, Any, str | None, Meta]:
    """Parent side of ``run_payload``: ``(ok, value or error, traceback text, meta)``.

    ``meta`` is ``(peak bytes, start, end)`` as measured in the worker (None where unknown).
    ``descs`` and ``piped`` are the result's large buffers (see ``_shm``): segments are
    mapped copy-on-write, and become the driver's, unlinked once the value is dropped.
    """
    unknown: Meta = (None, None, None)
    from ._errors import RemoteError
    try:
        bufs = None
        if descs:
            bufs = _shm.buffers(list(descs), list(piped), owner=True)
        ok, payload, tb_text, extra = pickle.loads(data, buffers=bufs)
        del bufs
    except BaseException as exc:  # noqa: BLE001
        if descs:
            _shm.discard(list(descs))
        return False, RemoteError(
            f"task {task_id!r}: its result could not be unpickled in the parent "
            f"({type(exc).__name__}: {exc}); make sure the modules it uses are importable "
            "in the parent process"), None, unknown
    if ok:
        return True, payload, None, extra
    type_name, meta = extra
    if payload is not None:
        try:
            return False, _restore_fields(pickle.loads(payload)), tb_text, meta
        except BaseException as exc:  # noqa: BLE001
            reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = "it could not be pickled in the worker"
    return False, RemoteError(
        f"task {task_id!r} raised {type_name}, which could not be sent back as itself "
        f"({reason}); its worker traceback follows", type_name or "", tb_text or ""), \
        tb_text, meta
