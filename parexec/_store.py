"""Results that survive: a SQLite record of finished tasks, resume, learned durations.

``run(wf, store="path.db")`` records every finished task (status, attempts, timings, worker,
peak memory, the value pickled with cloudpickle, the fingerprint). ``resume=True`` serves a
task whose fingerprint matches a recorded success instead of running it (status
``"cached"``). Durations and peak memory recorded by earlier runs stand in for what tasks do
not declare, so the critical-path order improves from run to run.

The file (schema version 2)::

    records  one row per (workflow, task id, fingerprint, succeeded or not): a new record
             replaces the older one with the same key, so history grows with the number of
             distinct versions of a task, not with the number of runs
    vals     the pickled value of a succeeded record, apart, so reading records never
             reads values
    latest   the latest success of each (workflow, task id): its duration and peak memory,
             read by ``durations()`` and ``peak_memory()`` through the primary key

Writing. ``record()`` only enqueues; it runs on the scheduler thread. A writer thread commits
whatever is queued in one transaction (WAL, ``synchronous=NORMAL``), so a record is on disk
milliseconds after its task finished. Values of plain small data (found by a bounded walk
of builtin containers) are pickled and committed with their record; any other value is
pickled by a second thread after its record was committed without it, and written in a
transaction of its own, so an 80 MB result delays neither the records of other tasks nor
their small values (at most two pickled values wait in memory). ``flush()`` waits for
everything queued so far; every open store is flushed and closed at interpreter exit. A
write that meets another program's lock waits for it up to ``timeout`` seconds; a record
that still cannot be written is counted in ``lost`` (the run then raises ``StoreError``,
or warns with ``on_write_error="warn"``). Measured for 10,000 tasks: rollback journal with
``synchronous=FULL`` took 12 s, WAL with ``synchronous=NORMAL`` 2 s, and batching the
commits takes the store off the scheduler's path.

Fingerprints (what decides that a task is served) are in ``_fingerprint.py``. This module
holds the ``Store`` class (reading, the cached mapping of values, pruning); the file's
schema, opening, migration and row writes are in ``_store_file``, and the writer threads in
``_store_writer``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import sqlite3
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from ._errors import StoreError, TaskOptionError
from ._status import TaskStatus
from ._store_file import _advice, _begin, _connect, _open, _Record
from ._store_writer import _Writer

__all__ = ["Store"]

logger = logging.getLogger("parexec")


class Store:
    """A SQLite file of task records (see the module docstring).

    One ``Store`` may serve any number of runs, one after the other or at once, and several
    programs may share one file. Pass it as ``px.run(wf, store=Store(...))`` to choose its
    options; a path given as ``store=`` opens (and closes) one for that run.

    Usage::

        with px.Store("runs.db", on_write_error="warn") as store:
            px.run(wf, store=store)
            px.run(wf, store=store, resume=True)

    Args:
        path: The database file; created (owner-only) if missing.
        timeout: Seconds to wait for another program's lock on the file, when opening it
            and for each write, before giving up (a write given up counts in ``lost``).
        on_write_error: ``"raise"`` (a run whose records could not all be written raises
            ``StoreError`` when it ends) or ``"warn"`` (it only warns).

    Raises:
        TaskOptionError: ``path``, ``timeout`` or ``on_write_error`` has the wrong type or
            value.
        StoreError: The file is not a parexec store, is damaged, is locked past the timeout,
            is read-only, is a directory, or its folder is missing.

    Attributes:
        path: The file.
        on_write_error: As given.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0, *,
                 on_write_error: Literal["raise", "warn"] = "raise") -> None:
        self.path = _check_path(path)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 <= timeout < float("inf"):
            raise TaskOptionError(f"Store: timeout={timeout!r} must be a number of seconds >= 0")
        if on_write_error not in ("raise", "warn"):
            raise TaskOptionError(f"Store: on_write_error={on_write_error!r} must be 'raise' "
                                  "or 'warn'")
        self.timeout = float(timeout)
        self.on_write_error = on_write_error
        wdb = _open(self.path, self.timeout)
        try:
            rdb = _connect(self.path, self.timeout)
        except sqlite3.Error as exc:
            wdb.close()
            raise StoreError(_advice(self.path, exc)) from None
        self._rdb = rdb
        self._rlock = threading.Lock()  # the reading connection serves one thread at a time
        self._writer = _Writer(self.path, wdb, self.timeout)
        # Closes the store when it is garbage, and flushes it at interpreter exit (atexit).
        self._finalizer = weakref.finalize(self, _close, self._writer, rdb, self._rlock)

    def __repr__(self) -> str:
        state = "closed" if not self._finalizer.alive else "open"
        return f"<parexec.Store {self.path!r} {state}>"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def lost(self) -> int:
        """How many records could not be written (locked past ``timeout``, disk full, ...)."""
        return self._writer.lost

    @property
    def write_error(self) -> BaseException | None:
        """The last error that made a record be lost, or None."""
        return self._writer.error

    # Reading ----------------------------------------------------------------------------

    def durations(self, workflow: str) -> dict[str, float]:
        """The duration of the latest success of every task of ``workflow``.

        Raises:
            StoreError: The file cannot be read.
        """
        with self._reading() as db:
            rows = db.execute("SELECT task_id, duration FROM latest WHERE workflow = ? AND "
                              "duration IS NOT NULL", (workflow,)).fetchall()
        return dict(rows)

    def peak_memory(self, workflow: str) -> dict[str, int]:
        """The peak memory (bytes) of the latest success of every task of ``workflow``.

        Tasks whose latest success measured no peak are left out.

        Raises:
            StoreError: The file cannot be read.
        """
        with self._reading() as db:
            rows = db.execute("SELECT task_id, peak_memory FROM latest WHERE workflow = ? AND "
                              "peak_memory > 0", (workflow,)).fetchall()
        return dict(rows)

    def cached(self, workflow: str, wanted: Mapping[str, str]) -> Mapping[str, Any]:
        """The recorded successes whose fingerprint matches ``wanted`` (task id -> fp).

        Nothing is loaded here: the mapping finds which tasks have a matching record, and
        ``get(task_id, default)`` loads that one value when it is asked for (each time), so a
        resume holds only the values it serves. A value that cannot be loaded any more is
        ``default`` (the task runs again), with a warning.

        Raises:
            StoreError: The file cannot be read.
        """
        pairs = {tid: fp for tid, fp in wanted.items() if fp}
        if not pairs:
            return _Cached(self, {})
        # One indexed lookup per wanted task (records_key), whatever the size of history.
        with self._reading() as db:
            rows = db.execute(_CACHED_SQL, (json.dumps(pairs), workflow)).fetchall()
        return _Cached(self, {tid: (record, size) for tid, record, size in rows})

    def _load(self, record: int, size: int) -> Any:
        """Unpickle the value of ``record``.

        A large one is streamed from the file, so its pickled bytes never sit in memory
        beside the value.
        """
        with self._reading() as db:
            if size < _STREAM:
                row = db.execute("SELECT value FROM vals WHERE record = ?", (record,)).fetchone()
                if row is None:
                    raise KeyError(f"record {record} was pruned")
                return pickle.loads(row[0])
            blob = db.blobopen("vals", "value", record, readonly=True)
            try:
                return pickle.load(io.BufferedReader(_BlobReader(blob), _STREAM))
            finally:
                blob.close()

    # Writing ----------------------------------------------------------------------------

    def record(self, workflow: str, tr: Any, fingerprint: str | None) -> None:
        """Queue the record of a finished task ``tr`` (a ``TaskRun``).

        The writer commits it within milliseconds. A record that cannot be written counts
        in ``lost``; the status is stored as its text (a ``TaskStatus`` or that text).

        Raises:
            ValueError: ``tr.status`` is not a task status (a caller's bug, not a store
                problem).
        """
        status = TaskStatus(tr.status)  # the scheduler may still give the plain text
        ok = status is TaskStatus.SUCCEEDED
        self._writer.put(_Record(
            workflow, tr.id, fingerprint or "", ok, status, tr.attempts, tr.started_at,
            tr.finished_at, tr.duration, None if tr.worker is None else str(tr.worker),
            tr.peak_memory, None if tr.error is None
            else f"{type(tr.error).__name__}: {tr.error}", time.time(),
            tr.value if ok else None))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued so far is committed, or given up (``lost``).

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes (each write
                gives up after the store's ``timeout``).

        Returns:
            True when nothing queued before the call is still pending.
        """
        return self._writer.flush(timeout)

    def prune(self, workflow: str | None = None, *, keep_last: int | None = None,
              older_than: float | None = None) -> int:
        """Delete old records, and give their space back to the file system.

        With both rules, a record is deleted only when both allow it.

        Args:
            workflow: Only this workflow's records (default: every workflow).
            keep_last: Keep the newest ``keep_last`` records of each task (any fingerprint,
                any status).
            older_than: Delete records written more than this many seconds ago.

        Returns:
            How many records were deleted.

        Raises:
            TaskOptionError: Neither rule given, or a negative value.
            StoreError: The file cannot be written.
        """
        if keep_last is None and older_than is None:
            raise TaskOptionError("Store.prune: give keep_last=N and/or older_than=seconds")
        if keep_last is not None and (isinstance(keep_last, bool)
                                      or not isinstance(keep_last, int) or keep_last < 0):
            raise TaskOptionError(f"Store.prune: keep_last={keep_last!r} must be an int >= 0")
        if older_than is not None and (isinstance(older_than, bool)
                                       or not isinstance(older_than, (int, float))
                                       or not older_than >= 0):
            raise TaskOptionError(f"Store.prune: older_than={older_than!r} must be seconds >= 0")
        self.flush()
        where, params = ("WHERE workflow = ?", [workflow]) if workflow is not None else ("", [])
        if keep_last is not None:
            sql = ("DELETE FROM records WHERE id IN (SELECT id FROM (SELECT id, recorded, "
                   "row_number() OVER (PARTITION BY workflow, task_id ORDER BY recorded DESC, "
                   f"id DESC) AS n FROM records {where}) WHERE n > ?")
            args: list[Any] = [*params, keep_last]
            if older_than is not None:
                sql += " AND recorded < ?"
                args.append(time.time() - older_than)
            sql += ")"
        else:
            sql = "DELETE FROM records WHERE recorded < ?" + (" AND workflow = ?" if where else "")
            args = [time.time() - float(older_than or 0), *params]
        with self._reading() as db:
            _begin(db, self.timeout)
            try:
                n = db.execute(sql, args).rowcount
                # The latest success of a task may have gone: read it again from what is left.
                db.execute(f"DELETE FROM latest {where}", params)
                db.execute("INSERT INTO latest SELECT workflow, task_id, duration, peak_memory, "
                           f"max(recorded) FROM records {where}{' AND' if where else ' WHERE'} "
                           "ok = 1 GROUP BY workflow, task_id", params)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("PRAGMA incremental_vacuum")
        return n

    def close(self) -> None:
        """Commit everything queued and close the file. Closing again does nothing."""
        self._finalizer()

    # Internals --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The reading connection, for one thread at a time.

        sqlite3 errors become ``StoreError`` naming the file.
        """
        if self._writer.child:  # the lock and the connection are the parent's
            raise StoreError(f"store {self.path!r} was opened before this process was forked; "
                             "open a new px.Store in this process")
        with self._rlock:
            if not self._finalizer.alive:
                raise StoreError(f"store {self.path!r} is closed; open a new px.Store")
            try:
                yield self._rdb
            except sqlite3.Error as exc:
                raise StoreError(_advice(self.path, exc)) from exc


# CROSS JOIN fixes the loop order: one records_key lookup per wanted task. Left to itself,
# the planner may scan the workflow's whole history and parse the JSON once per record
# (5.3 s instead of 0.1 s for a resume of 10,000 tasks).
_CACHED_SQL = (
    "SELECT w.key, r.id, length(v.value) FROM json_each(?) AS w CROSS JOIN records AS r ON "
    "r.workflow = ? AND r.task_id = w.key AND r.fingerprint = w.value AND r.ok = 1 AND "
    "r.has_value = 1 CROSS JOIN vals AS v ON v.record = r.id")
_STREAM = 1 << 20  # values at least this large are unpickled from the file in chunks


class _Cached(Mapping[str, Any]):
    """Read-only: task id -> recorded value, each loaded when it is asked for."""

    def __init__(self, store: Store, ids: dict[str, tuple[int, int]]) -> None:
        self._store = store
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._ids

    def __getitem__(self, task_id: str) -> Any:
        value = self.get(task_id, _MISSING)
        if value is _MISSING:
            raise KeyError(task_id)
        return value

    def get(self, task_id: str, default: Any = None) -> Any:
        found = self._ids.get(task_id)
        if found is None:
            return default
        try:
            return self._store._load(*found)
        except Exception as exc:  # noqa: BLE001 - a value that cannot be loaded is not reused
            msg = (f"task {task_id!r}: its recorded value in store {self._store.path!r} cannot "
                   f"be loaded ({type(exc).__name__}: {exc}), so it runs again")
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return default


_MISSING = object()


class _BlobReader(io.RawIOBase):
    """A raw file over a SQLite blob, read in chunks of at most 1 MiB."""

    def __init__(self, blob: sqlite3.Blob) -> None:
        self._blob = blob

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._blob.read(min(len(view), 1 << 20))
        view[:len(data)] = data
        return len(data)


def _close(writer: _Writer, rdb: sqlite3.Connection, rlock: threading.Lock) -> None:
    if writer.child:
        return  # the connections are the parent's: leave them to it
    writer.close()
    with rlock:
        rdb.close()


# Opening ------------------------------------------------------------------------------------

def _check_path(path: Any) -> str:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TaskOptionError(f"store={path!r} ({type(path).__name__}) must be the path of a "
                              "SQLite file (str or pathlib.Path) or a px.Store")
    text = os.fspath(path)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if text in ("", ":memory:"):
        raise TaskOptionError(f"store={text!r} is not a file: give the path of a SQLite file, "
                              "e.g. store='runs.db'")
    return text
