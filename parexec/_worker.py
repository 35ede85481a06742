"""The process worker's main loop, and the outcome of a task call in bytes.

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

The task context (``px.current()``, ``run_coroutine``) is in ``_context``; the BLAS caps and
the peak memory meter in ``_limits``; process-tree management (subreaper, ``kill_tree``,
orphan reaping, the parent watch) in ``_proctree``. This module holds the loop
(``worker_main``, ``run_payload``, ``run_batch``) and the encoding of outcomes
(``_error_outcome``, ``decode_outcome``).
"""

from __future__ import annotations

import os
import pickle
import signal
import traceback
from inspect import iscoroutine
from time import monotonic
from typing import Any

from . import _shm
from ._context import TaskContext, _local, run_coroutine, user_frames
from ._errors import Cancelled, ParexecError, RemoteError, TaskTimeout
from ._limits import BlasCap, PeakMeter
from ._proctree import _allow_children, _become_subreaper, _reaper, _watch_parent, kill_tree

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


# Process workers ------------------------------------------------------------------------

# Set by worker_main: only a process worker caps BLAS for the whole process and keeps the cap
# (run_payload called elsewhere, as tests do, leaves the caller's environment alone).
_cap: BlasCap | None = None
_meter: PeakMeter | None = None
# Set by worker_main: writes one message to the driver. A streamed batch (``run_batch``)
# sends each item's outcome through it before the next item starts.
_progress: Any = None
STREAMED = b"P"  # first byte of such a message (a reply starts with a pickle or b"S")
# Pipelining (``ProcessPool``, "Pipelining"): a payload that starts with AHEAD was written
# while the task before it still ran, so that the worker goes from one to the next without
# waiting for the driver. It runs only if the worker takes its token from a semaphore the
# driver shares with it (the driver puts one in per payload sent ahead): the driver
# withdraws such a payload by taking the token first, and then the worker answers SKIPPED
# instead of running it. The semaphore decides, atomically, which of the two has it, in
# user space (no system call, and no release of the driver's GIL, unless one waits).
AHEAD = b"A"
SKIPPED = b"K"


def worker_main(conn: Any, driver_pid: int | None = None, token: Any = None) -> None:
    """Entry point of a process worker: serve payloads from ``conn`` until it closes.

    ``driver_pid`` names the segments the worker writes its large results into (see
    ``_shm``). ``token`` is the semaphore of the payloads sent ahead (see ``AHEAD``);
    without it, every payload sent ahead is skipped. At EOF (pool shutdown, the driver's
    normal exit) the worker kills every process its tasks started and left running (a
    background ``Popen``, a daemon that double-forked) before it exits: nothing a task
    started outlives the worker. See issue 12 item 2.
    """
    global _meter, _cap, _progress
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(SIG_TIMEOUT, _on_stop_signal)
    signal.signal(SIG_CANCEL, _on_stop_signal)
    _cap = BlasCap()
    _become_subreaper()
    _allow_children()
    _meter = PeakMeter()
    _watch_parent()
    recv, send, recv_into = conn.recv_bytes, conn.send_bytes, conn.recv_bytes_into
    _progress = send
    driver = driver_pid or os.getppid()
    take = token.acquire if token is not None else _no_token
    while True:
        try:
            data = recv()
            if data[:1] == AHEAD:
                if not take(False):  # withdrawn by the driver
                    send(SKIPPED)
                    continue
                data = memoryview(data)[1:]
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


def _no_token(block: bool) -> bool:
    return False


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
        return (_error_outcome(task_id, exc,
                               meta=(meter.peak(t1 - t0) if meter else None, t0, t1)),)
    finally:
        _local.context = None
    t1 = monotonic()
    meta = (meter.peak(t1 - t0) if meter is not None else None, t0, t1)
    outcome = (True, _shm.wrap(value), None, meta)
    big = _shm.Collector() if where is not None else None
    dumps: Any = pickle.dumps
    # A value's __reduce__ may raise anything (SystemExit included): never the worker's end.
    try:
        try:
            data = dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=big)
        except BaseException:  # noqa: BLE001 - try harder
            import cloudpickle
            dumps = cloudpickle.dumps
            if big is not None:
                big.clear()
            data = dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=big)
    except BaseException as exc:  # noqa: BLE001
        if fn is run_batch and type(value) is list:  # the items that can go, go
            try:
                outcome = (True, _sendable(value, args[1]), None, meta)
                return (pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL),)
            except BaseException:  # noqa: BLE001 - then the batch fails as a whole
                pass
        return (_error_outcome(task_id, _unpicklable(task_id, value, exc), meta=meta),)
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
              kwargs: dict[str, Any], stream: bool = False) -> list[tuple[Any, ...]]:
    """Run the items of a batched map one after the other, in this worker; never raises.

    ``items`` are ``(task id, attempt, args)``. Returns one outcome per item, in order:
    ``(True, value, t0, t1)`` or ``(False, error bytes, t0, t1)`` (``_error_outcome``, which
    keeps the type and the worker-side traceback; the driver decodes it with
    ``decode_outcome``). Each item has its own ``px.current()`` and its own clock readings.

    ``stream`` (items with a ``timeout``, in a process worker): each item's outcome is sent
    to the driver (``_stream``) before the next item starts, so the driver knows which item
    runs since when, and a worker killed for an overrun loses no finished item. The
    returned list then holds only the last item's outcome.
    """
    out: list[tuple[Any, ...]] = []
    context = _local.context
    send = _progress if stream else None
    try:
        for k, (task_id, attempt, args) in enumerate(items):
            if send is not None and out:
                _stream(send, k - 1, items[k - 1][0], out.pop())
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


def _unpicklable(task_id: str, value: Any, exc: BaseException) -> BaseException:
    """The ``PicklingError`` of a task whose value cannot be pickled (never raises)."""
    from ._errors import PicklingError
    try:
        reason = f" ({type(exc).__name__}: {exc})"
    except BaseException:  # noqa: BLE001 - an error whose str() raises
        reason = ""
    return PicklingError(
        f"task {task_id!r} returned a value of type {type(value).__qualname__} that cannot "
        f"be pickled{reason}; return plain data, or run the task with isolation='thread'")


def _portable(task_id: str, value: Any) -> tuple[bool, Any]:
    """How one item's value can travel: as itself, as ``_Pickled``, or as its error.

    ``(True, value)`` if pickle takes it, ``(True, _Pickled)`` if only cloudpickle does,
    else ``(False, error outcome)``. Whatever pickling raises (a ``__reduce__`` may raise
    anything, ``SystemExit`` included) fails this value alone.
    """
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return True, value
    except BaseException:  # noqa: BLE001 - try harder
        pass
    try:
        import cloudpickle
        return True, _Pickled(cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException as exc:  # noqa: BLE001
        return False, _error_outcome(task_id, _unpicklable(task_id, value, exc))


def _sendable(outcomes: list[tuple[Any, ...]], items: list[Any]) -> list[tuple[Any, ...]]:
    """A batch's outcomes, each value that cannot be pickled replaced by that item's error.

    Only when the batch's reply could not be pickled: one item's value fails that item,
    not the whole batch. Values that need cloudpickle are sent pickled by it.
    """
    out = []
    for (ok, value, t0, t1), (task_id, _, _) in zip(outcomes, items[-len(outcomes):],
                                                     strict=True):
        if ok:
            ok, value = _portable(task_id, value)
        out.append((ok, value, t0, t1))
    return out


class _Pickled:
    """A value pickled by cloudpickle inside a plain pickle: loaded back as the value."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return pickle.loads, (self.data,)


def _stream(send: Any, k: int, task_id: str, outcome: tuple[Any, ...]) -> None:
    """Send item ``k``'s outcome ahead of its batch's reply (see ``run_batch``).

    The worker's peak memory so far in the batch rides along (the item's measurement).
    """
    ok, value, t0, t1 = outcome
    peak = _meter.peak() if _meter is not None else None
    try:
        data = pickle.dumps((ok, value, t0, t1, peak), protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # noqa: BLE001 - this item's value alone; the batch goes on
        if ok:
            ok, value = _portable(task_id, value)
        data = pickle.dumps((ok, value, t0, t1, peak), protocol=pickle.HIGHEST_PROTOCOL)
    send(STREAMED + k.to_bytes(8, "little") + data)


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
