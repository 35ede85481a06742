"""The writer of a ``Store``: two threads that commit records and pickle values.

``Store.record`` (in ``_store``) only enqueues a ``_Record`` on its ``_Writer``. The writer
thread commits whatever is queued in one transaction (through ``_store_file``'s ``_begin``
and ``_insert``), with the values that are cheap to pickle (``_cheap_size``); the pickler
thread pickles the others and sends them back as ``_Value``s. A forked child forgets the
parent's writers (``_forget_writers_in_child``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import warnings
import weakref
from collections import deque
from queue import Empty, SimpleQueue
from typing import Any

from ._errors import StoreError
from ._store_file import _advice, _begin, _insert, _Record

logger = logging.getLogger("parexec")

_INLINE = 256 * 1024  # values estimated below this are pickled and committed with their record
_BATCH = 4 * 1024 * 1024  # bytes of values per transaction (one larger value goes alone)
_EXIT_FLUSH = 120.0  # seconds the interpreter's exit waits for a store's queued records


class _Value:
    """A value pickled off the commit path, for a record already committed as ``rid``."""

    __slots__ = ("rid", "blob")

    def __init__(self, rid: int, blob: bytes) -> None:
        self.rid, self.blob = rid, blob


class _Writer:
    """The two threads that write one store, and what they count.

    Data flow::

        Store.record ──► queue ──► writer thread: commit records (+ small values) ──► file
                                     │ other values                     ▲
                                     ▼                                  │ queue (_Value)
                                   to_pickle ──► pickler thread ────────┘

    ``nqueued`` counts records put, ``ndone`` records committed with their value or given
    up (``lost``); ``flush`` waits for ``ndone`` to reach ``nqueued``. It holds no reference
    to the ``Store``, so a store nobody refers to is closed by its finalizer.
    """

    def __init__(self, path: str, db: sqlite3.Connection, timeout: float) -> None:
        self.path, self.db, self.timeout = path, db, timeout
        self.queue: SimpleQueue[_Record | _Value | None] = SimpleQueue()
        self.to_pickle: SimpleQueue[tuple[int, _Record] | None] = SimpleQueue()
        self.slots = threading.Semaphore(2)  # pickled values waiting for the writer, at most
        self.cond = threading.Condition()
        self.nqueued = self.ndone = self.lost = 0
        self.error: BaseException | None = None
        self.threads: list[threading.Thread] = []
        self.closed = False
        self.child = False  # set in a forked child
        _writers.add(self)

    def forked(self) -> None:
        """Make this writer inert in a child made by ``os.fork``.

        The threads and the file are the parent's: the child's writer counts what it is
        given as lost, and closing it does nothing.
        """
        self.cond = threading.Condition()  # its lock may have been held at the fork
        self.threads = []
        self.closed = self.child = True
        self.ndone = self.nqueued

    def put(self, rec: _Record) -> None:
        with self.cond:
            self.nqueued += 1
            if self.closed:
                self._count(1, lost=True, error=StoreError(
                    f"store {self.path!r} was closed before task {rec.task_id!r} was recorded"))
                return
            if not self.threads:
                for target, name in ((self._write_loop, "parexec-store"),
                                     (self._pickle_loop, "parexec-store-pickle")):
                    t = threading.Thread(target=target, name=name, daemon=True)
                    t.start()
                    self.threads.append(t)
        self.queue.put(rec)

    def flush(self, timeout: float | None = None) -> bool:
        with self.cond:
            target = self.nqueued
            return self.cond.wait_for(lambda: self.ndone >= target, timeout)

    def close(self) -> None:
        """Flush (bounded, as this also runs at interpreter exit), stop the threads, close."""
        if not self.flush(_EXIT_FLUSH):
            logger.error("store %r: %d record(s) still not written after %gs; closing without "
                         "them", self.path, self.nqueued - self.ndone, _EXIT_FLUSH)
        with self.cond:
            self.closed = True
            threads, self.threads = self.threads, []
        if threads:
            self.queue.put(None)
            self.to_pickle.put(None)
            for t in threads:
                t.join(_EXIT_FLUSH)
        self.db.close()

    def _count(self, n: int, lost: bool = False, error: BaseException | None = None) -> None:
        """``n`` records are done; call with ``cond`` held."""
        self.ndone += n
        if lost:
            self.lost += n
            self.error = error
        self.cond.notify_all()

    def _done(self, n: int, lost: bool = False, error: BaseException | None = None) -> None:
        with self.cond:
            self._count(n, lost, error)

    # The writer thread ------------------------------------------------------------------

    def _write_loop(self) -> None:
        ready: deque[_Value] = deque()
        stopping = False
        try:
            while True:
                items: list[_Record | _Value | None] = [] if ready or stopping \
                    else [self.queue.get()]
                try:
                    while True:
                        items.append(self.queue.get_nowait())
                except Empty:
                    pass
                stopping = stopping or any(it is None for it in items)
                records = [it for it in items if isinstance(it, _Record)]
                ready.extend(it for it in items if isinstance(it, _Value))
                if records:
                    self._write_records(records)
                if ready:
                    self._write_values(ready)  # a batch, then new records go first again
                elif stopping:
                    return
        except BaseException as exc:  # noqa: BLE001 - never leave flush() waiting
            logger.exception("store %r: the writer failed", self.path)
            with self.cond:
                self.closed = True
                self._count(self.nqueued - self.ndone, lost=True, error=exc)

    def _write_records(self, records: list[_Record]) -> None:
        blobs: list[bytes | None] = []
        for rec in records:
            blob = None
            if rec.ok and _cheap_size(rec.value) is not None:
                blob = _dumps(rec)
                rec.value = None
            blobs.append(blob)
        try:
            _begin(self.db, self.timeout)
            try:
                rids = [_insert(self.db, rec, blob)
                        for rec, blob in zip(records, blobs, strict=True)]
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            error = StoreError(_advice(self.path, exc))
            logger.error("store %r: could not record %d task(s): %s", self.path, len(records),
                         error)
            self._done(len(records), lost=True, error=error)
            return
        ndone = 0
        for rid, rec in zip(rids, records, strict=True):
            if rec.value is not None:
                self.to_pickle.put((rid, rec))  # committed without its value, for now
            else:
                ndone += 1
        if ndone:
            self._done(ndone)

    def _write_values(self, ready: deque[_Value]) -> None:
        batch = [ready.popleft()]
        size = len(batch[0].blob)
        while ready and size + len(ready[0].blob) <= _BATCH:
            size += len(ready[0].blob)
            batch.append(ready.popleft())
        try:
            _begin(self.db, self.timeout)
            try:
                for v in batch:
                    if self.db.execute("UPDATE records SET has_value = 1 WHERE id = ?",
                                       (v.rid,)).rowcount:  # else replaced meanwhile
                        self.db.execute("INSERT OR REPLACE INTO vals (record, value) "
                                        "VALUES (?, ?)", (v.rid, v.blob))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self._done(len(batch))
        except sqlite3.Error as exc:
            error = StoreError(_advice(self.path, exc))
            logger.error("store %r: could not record the value of %d task(s): %s", self.path,
                         len(batch), error)
            self._done(len(batch), lost=True, error=error)
        finally:
            for _ in batch:
                self.slots.release()

    # The pickler thread -----------------------------------------------------------------

    def _pickle_loop(self) -> None:
        while True:
            item = self.to_pickle.get()
            if item is None:
                return
            rid, rec = item
            self.slots.acquire()
            try:
                blob = _dumps(rec)
            except BaseException:  # noqa: BLE001 - _dumps catches Exception; count the rest
                blob = None
            rec.value = None
            if blob is None:
                self.slots.release()
                self._done(1)  # recorded without its value, as _dumps warned
            else:
                self.queue.put(_Value(rid, blob))


_writers: weakref.WeakSet[_Writer] = weakref.WeakSet()


def _forget_writers_in_child() -> None:
    for writer in list(_writers):
        writer.forked()


os.register_at_fork(after_in_child=_forget_writers_in_child)


def _dumps(rec: _Record) -> bytes | None:
    """``rec.value`` pickled with cloudpickle, or None (with a warning) if it cannot be."""
    try:
        import cloudpickle
        blob: bytes = cloudpickle.dumps(rec.value)
        return blob
    except Exception as exc:  # noqa: BLE001
        msg = (f"task {rec.task_id!r}: its value ({type(rec.value).__name__}) cannot be "
               "pickled, so the store records it without a value and resume will run it "
               f"again ({exc})")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=1)
        return None


_SCALARS = (type(None), bool, int, float, complex)


def _cheap_size(value: Any, limit: int = _INLINE, nodes: int = 10_000) -> int | None:
    """Roughly how many bytes ``value`` pickles to, if that is cheap to know.

    Only plain builtin data found in a bounded walk and below ``limit`` has a size; None
    otherwise (so no user code runs here).
    """
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        nodes -= 1
        t = type(v)
        if t in _SCALARS:
            total += 16
        elif t is str or t is bytes or t is bytearray:
            total += len(v) + 8
        elif t is list or t is tuple or t is set or t is frozenset:
            total += 8
            if len(v) > nodes:
                return None
            stack.extend(v)
        elif t is dict:
            total += 8
            if 2 * len(v) > nodes:
                return None
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            return None
        if total > limit or nodes < 0:
            return None
    return total
