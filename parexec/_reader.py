"""The process pool's reader thread, and the worker records it shares with the pool.

``ProcessPool`` (``_processpool``) sends payloads; ``Reader``, its base class, holds the
loop of the thread that reads the replies: one ``poll`` over every worker's pipe and exit
sentinel and a wake-up pipe. For each reply it hands the worker its queued attempt (if
any), decodes the outcome and puts a ``Done`` (or, for an item of a streamed batch, an
``ItemDone``) on the attempt's run queue; for each exit it reads what the worker wrote
before dying, then reports the attempt it was running as ``WorkerCrashed`` and moves its
queued one elsewhere. The shared fields are the pool's, set up by ``ProcessPool`` and read
and written under its ``_lock``.
"""

from __future__ import annotations

import operator
import os
import pickle
import select
import threading
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _shm
from ._errors import RemoteError, WorkerCrashed
from ._messages import Done, ItemDone
from ._worker import SKIPPED, STREAMED, decode_outcome

__all__ = ["Reader"]


class _Worker:
    __slots__ = ("process", "conn", "pid", "attempt", "killed", "pins", "ntasks", "max_tasks",
                 "next", "tokens", "writing", "ahead", "skips", "doomed", "drop_reply")

    def __init__(self, process: Any, conn: Any, tokens: Any = None) -> None:
        self.process = process
        self.conn = conn
        # The semaphore it shares with the worker: a token per payload sent ahead
        # (``_worker.AHEAD``).
        self.tokens = tokens
        # The payload a thread writes to conn now, if any (set under the lock).
        self.writing: _Send | None = None
        self.ahead = False  # ``next`` was written to the pipe already, with its token
        self.skips = 0  # payloads withdrawn from its pipe whose SKIPPED is still to come
        self.doomed = False  # killed under a payload sent ahead: it exits after this reply
        # Its attempt was killed after it returned (the payload written ahead had started):
        # its reply is dropped, the worker goes on.
        self.drop_reply = False
        self.pid: int = process.pid
        self.attempt: Any = None
        self.killed = False
        # Segments the running attempt's payload names: kept (linked) until its reply was
        # read, even if the driver's values using them are released meanwhile.
        self.pins: list[_shm.Segment] | None = None
        self.ntasks = 0  # attempts handed to it
        # The max_tasks_per_worker of its current attempt's submit (None: no limit).
        self.max_tasks: int | None = None
        # The attempt queued behind the running one (see "Pipelining" in ProcessPool), with
        # what starts it: written to the pipe already (``ahead``), or sent by the reader as
        # soon as the running attempt's reply is read.
        self.next: _Send | None = None

    def started_ahead(self) -> bool:
        """Whether the payload written ahead (``next``) has started, its token taken.

        If one was written ahead and has not started, it is withdrawn: its token is taken
        back, so the worker skips the copy in its pipe and answers ``SKIPPED``. Called
        under the pool's lock.
        """
        if not self.ahead:
            return False
        if self.tokens is None or not self.tokens.acquire(False):
            return True  # the worker took it
        self.ahead = False
        self.skips += 1
        return False

    def close(self) -> None:
        """Close the driver's end of the worker's pipe."""
        try:
            self.conn.close()
        except OSError:
            pass


class _Send(NamedTuple):
    """An attempt ready to go to a worker: its payload's parts and what they pin."""

    attempt: Any
    parts: Any
    pins: list[_shm.Segment] | None
    max_tasks: int | None


# What a descriptor the reader polls is, in the order it handles them.
_REPLY, _WAKE, _EXIT, _RETIRED = range(4)
_kind = operator.itemgetter(0)


class Reader:
    """The reader thread's side of ``ProcessPool``: its loop and what it does per event."""

    # Set up by ProcessPool.__init__; read and written under _lock (see its docstring).
    _lock: threading.Lock
    _idle: list[_Worker]
    _workers: dict[Any, _Worker]
    _retired: dict[Any, _Worker]
    _moving: dict[Any, _Send]
    _after: dict[Any, _Send]
    _version: int
    _wake_r: int
    _closed: bool

    if TYPE_CHECKING:  # the scheduler side, in ProcessPool
        def _hand(self, worker: _Worker, send: _Send, write: bool) -> None: ...
        def _send(self, worker: _Worker, send: _Send) -> None: ...
        def _start(self, send: _Send, moving: bool) -> None: ...

    def _read_loop(self) -> None:
        """Wait on every worker's pipe and sentinel, and on the wake pipe; act on each.

        One ``poll`` object lives as long as the reader; its descriptors are registered
        again only when the set of workers changed (``_version``), not on every wake-up
        (``multiprocessing.connection.wait`` builds a selector per call: about 12 us of
        this thread's time per reply, measured on 20,000 no-op tasks). Replies are read
        before deaths are reaped, so a worker's last reply is never lost to its exit.
        """
        poller = select.poll()
        seen = -1
        fds: dict[int, tuple[int, Any]] = {}
        while True:
            with self._lock:
                if self._closed:
                    return
                if self._version != seen:
                    seen = self._version
                    for fd in fds:
                        poller.unregister(fd)
                    fds = {self._wake_r: (_WAKE, None)}
                    for conn, w in self._workers.items():
                        fds[conn.fileno()] = (_REPLY, conn)
                        fds[w.process.sentinel] = (_EXIT, w)
                    for sentinel in self._retired:
                        fds[sentinel] = (_RETIRED, sentinel)
                    for fd in fds:
                        poller.register(fd, select.POLLIN)
            try:
                events = poller.poll()
            except OSError:
                seen = -1
                continue
            ready = [fds[fd] for fd, _ in events if fd in fds]
            if len(ready) > 1:
                ready.sort(key=_kind)
            for kind, obj in ready:
                if kind == _REPLY:
                    self._receive(obj)
                elif kind == _WAKE:
                    os.read(self._wake_r, 4096)
                elif kind == _EXIT:
                    self._drain(obj)
                    self._reap(obj)
                else:
                    self._reap_retired(obj)
            if any(mask & select.POLLNVAL for _, mask in events):
                seen = -1  # a descriptor closed under us: register the current ones

    def _receive(self, conn: Any) -> None:
        worker = self._workers.get(conn)
        if worker is None:
            return
        try:
            data = conn.recv_bytes()
            kind = data[:1]
            if kind == STREAMED:  # an item of a streamed batch; the batch goes on
                self._streamed(worker, data)
                return
            if kind == SKIPPED:  # a payload sent ahead, then withdrawn (started_ahead)
                with self._lock:
                    worker.skips -= 1
                return
            descs, body = _shm.split(data)
            piped = _shm.receive_parts(descs, conn.recv_bytes_into) if descs else []
        except (EOFError, OSError):
            self._reap(worker)
            return
        with self._lock:
            attempt, worker.attempt = worker.attempt, None
            pins, worker.pins = worker.pins, None  # released once the result is mapped
            queued, worker.next = worker.next, None
            ahead, worker.ahead = worker.ahead, False
            # The scheduler decided its outcome (and maybe the worker's):
            going_on = not worker.killed and attempt is not None
            dropped = not going_on or worker.drop_reply
            worker.drop_reply = False
            here = False
            if going_on:
                if worker.doomed:  # killed under the payload it ran next (kill): exiting
                    worker.killed = True
                elif worker.max_tasks is not None and worker.ntasks >= worker.max_tasks:
                    self._retire(worker)  # (then nothing was sent ahead: _may_ahead)
                elif queued is not None:
                    self._hand(worker, queued, write=not ahead)
                    here = True
                elif not self._closed:
                    self._idle.append(worker)
            if queued is not None and not here:  # (a copy sent ahead dies with the worker)
                self._moving[queued.attempt] = queued
        sampled = attempt.monitor.unwatch(attempt) \
            if attempt is not None and attempt.monitor is not None else None
        if queued is not None:  # the next attempt first: the worker runs while we decode
            if not here:
                self._start(queued, moving=True)
            elif ahead:  # running already
                if queued.attempt.monitor is not None:
                    queued.attempt.monitor.watch(queued.attempt, worker.pid)
            else:
                self._send(worker, queued)
        if dropped:
            _shm.discard(descs)
            return
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
        if sampled is not None and (peak is None or sampled > peak):
            peak = sampled  # the larger of the worker's own and the monitor's
        attempt.queue.put(Done(attempt, ok, value, worker.pid, tb_text, t0 or 0.0, t1 or 0.0,
                               peak, result_bytes, shm, pipe))

    def _streamed(self, worker: _Worker, data: bytes) -> None:
        """Pass an item's outcome from a streamed batch (``run_batch``) to its run."""
        attempt = worker.attempt
        if attempt is None or worker.killed:
            return
        k = int.from_bytes(data[1:9], "little")
        try:
            *outcome, peak = pickle.loads(memoryview(data)[9:])
        except BaseException as exc:  # noqa: BLE001
            outcome, peak = [False, RemoteError(
                f"item {k} of {attempt.task_id}: its result could not be unpickled in the "
                f"parent ({type(exc).__name__}: {exc}); make sure the modules it uses are "
                "importable in the parent process"), 0.0, 0.0], None
        attempt.queue.put(ItemDone(attempt, k, tuple(outcome), peak))

    def _retire(self, worker: _Worker) -> None:
        """Take ``worker`` out of service; it exits on EOF. Called under the lock.

        Its conn is closed here, in the reader thread (the only one that polls it), and its
        sentinel is watched until the process has exited, so it is joined, not left as a
        zombie, and what it was writing for us is swept.
        """
        self._workers.pop(worker.conn, None)
        self._retired[worker.process.sentinel] = worker
        self._version += 1
        worker.close()

    def _reap_retired(self, sentinel: Any) -> None:
        with self._lock:
            worker = self._retired.pop(sentinel, None)
            self._version += 1
        if worker is None:
            return
        worker.tokens = None  # its semaphore goes now, not with the last attempt naming it
        worker.process.join(timeout=1)
        if worker.process.exitcode is not None:
            _shm.sweep_writer(worker.pid)

    def _drain(self, worker: _Worker) -> None:
        """Read what an exited worker wrote before it died.

        A streamed batch's items each come in their own message, and the reader reads one
        per wake-up: those still in the pipe are finished items, not lost work.
        """
        conn = worker.conn
        while self._workers.get(conn) is worker:
            try:
                if not conn.poll(0):
                    return
            except (OSError, EOFError):
                return
            self._receive(conn)  # at the end of the pipe, it reaps the worker

    def _reap(self, worker: _Worker) -> None:
        with self._lock:
            if self._workers.pop(worker.conn, None) is None:
                return
            self._version += 1
            if worker in self._idle:
                self._idle.remove(worker)
            attempt, worker.attempt = worker.attempt, None
            worker.pins = None
            queued, worker.next = worker.next, None
            worker.ahead = False  # a copy written ahead died with it
            worker.tokens = None  # its semaphore goes now, not with the last attempt naming it
            if queued is not None:
                self._moving[queued.attempt] = queued
        worker.process.join(timeout=1)
        if worker.process.exitcode is not None:  # what it was writing for us, if anything
            _shm.sweep_writer(worker.pid)
        worker.close()
        if attempt is not None and attempt.monitor is not None:
            attempt.monitor.unwatch(attempt)
        if attempt is not None and not worker.killed:
            _crashed(attempt, worker)
        if queued is not None:  # it never started here: it goes to another worker
            self._start(queued, moving=True)


def _crashed(attempt: Any, worker: _Worker | None = None) -> None:
    """Report ``attempt`` failed with ``WorkerCrashed`` (its worker's exit, if it had one)."""
    attempt.queue.put(Done(attempt, False, WorkerCrashed(
        attempt.task_id, worker.process.exitcode if worker is not None else None),
        worker.pid if worker is not None else None))
