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

Fingerprints (what decides that a task is served) are in ``_fingerprint.py``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import pickle
import sqlite3
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from queue import Empty, SimpleQueue
from typing import Any, Literal

from ._errors import StoreError, TaskOptionError
from ._fingerprint import fingerprints
from ._status import TaskStatus

__all__ = ["Store", "fingerprints"]

logger = logging.getLogger("parexec")

_VERSION = 2
_APPLICATION_ID = 0x70786563  # "pxec": marks a file as a parexec store
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS records (
        id INTEGER PRIMARY KEY,
        workflow TEXT NOT NULL, task_id TEXT NOT NULL,
        fingerprint TEXT NOT NULL,            -- '' when a resume must never serve it
        ok INTEGER NOT NULL,                  -- 1 when the task succeeded
        status TEXT NOT NULL, attempts INTEGER, started REAL, finished REAL, duration REAL,
        worker TEXT, peak_memory INTEGER, has_value INTEGER NOT NULL DEFAULT 0,
        error TEXT, recorded REAL NOT NULL)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS records_key ON records "
    "(workflow, task_id, fingerprint, ok)",
    "CREATE INDEX IF NOT EXISTS records_age ON records (workflow, task_id, recorded)",
    "CREATE TABLE IF NOT EXISTS vals (record INTEGER PRIMARY KEY, value BLOB NOT NULL)",
    """CREATE TABLE IF NOT EXISTS latest (
        workflow TEXT NOT NULL, task_id TEXT NOT NULL, duration REAL, peak_memory INTEGER,
        recorded REAL NOT NULL, PRIMARY KEY (workflow, task_id)) WITHOUT ROWID""",
    "CREATE TRIGGER IF NOT EXISTS records_drop AFTER DELETE ON records "
    "BEGIN DELETE FROM vals WHERE record = OLD.id; END",
)
_INLINE = 256 * 1024  # values estimated below this are pickled and committed with their record
_BATCH = 4 * 1024 * 1024  # bytes of values per transaction (one larger value goes alone)
_EXIT_FLUSH = 120.0  # seconds the interpreter's exit waits for a store's queued records


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


def _connect(path: str, timeout: float) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=timeout, check_same_thread=False,
                           isolation_level=None)


def _open(path: str, timeout: float) -> sqlite3.Connection:
    """Create or open the file, in WAL mode with the current schema; the writing connection."""
    if os.path.isdir(path):
        raise StoreError(f"store {path!r} is a directory; give the path of a file, e.g. "
                         f"{os.path.join(path, 'runs.db')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StoreError(f"store {path!r}: its folder {folder!r} does not exist (check that the "
                         "folder exists and is writable, or give another path)")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        db = _connect(path, timeout)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(_advice(path, exc)) from None
    try:
        deadline = time.monotonic() + timeout
        for attempt in itertools.count():
            try:
                _prepare(db, path, timeout)
                return db
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline or attempt >= 1000:
                    raise
                # Another program is creating or converting the file. SQLite reports this
                # without waiting (switching to WAL bypasses the busy handler), so wait for
                # its lock through the busy handler, then try again.
                db.execute("BEGIN EXCLUSIVE")
                db.execute("ROLLBACK")
    except StoreError:
        db.close()
        raise
    except sqlite3.Error as exc:
        db.close()
        raise StoreError(_advice(path, exc)) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _prepare(db: sqlite3.Connection, path: str, timeout: float) -> None:
    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            raise sqlite3.OperationalError("database is locked")
    db.execute("PRAGMA synchronous=NORMAL")
    # After a checkpoint, cut the WAL file back to 64 MB: one 80 MB value would otherwise
    # leave it that large until the last connection closes.
    db.execute("PRAGMA journal_size_limit=67108864")
    _begin(db, timeout)
    try:
        app = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app not in (0, _APPLICATION_ID) or version > _VERSION or \
                (tables and "records" not in tables):
            raise StoreError(f"store {path!r} is not a parexec store (a SQLite database of "
                             "another program, or of a newer parexec); give another path")
        if version < _VERSION and "records" in tables:
            _migrate_v1(db, path)
        if version < _VERSION:
            _create(db)
            db.execute(f"PRAGMA user_version={_VERSION}")
            db.execute(f"PRAGMA application_id={_APPLICATION_ID}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _create(db: sqlite3.Connection) -> None:
    # Not executescript: it would commit the transaction that holds the write lock.
    for statement in _SCHEMA:
        db.execute(statement)


def _migrate_v1(db: sqlite3.Connection, path: str) -> None:
    """Version 1 kept every record, values inline: keep the latest of each key."""
    db.execute("ALTER TABLE records RENAME TO records_v1")
    db.execute("DROP INDEX IF EXISTS records_lookup")
    _create(db)
    rows = db.execute("SELECT rowid, workflow, task_id, coalesce(fingerprint, ''), status, "
                      "attempts, started, finished, duration, worker, peak_memory, error, "
                      "recorded, has_value FROM records_v1 ORDER BY rowid").fetchall()
    for rowid, *head, has_value in rows:
        (workflow, task_id, fp, status, attempts, started, finished, duration, worker, peak,
         error, recorded) = head
        state = _read_status(status, path, task_id)
        rec = _Record(workflow, task_id, fp, state is TaskStatus.SUCCEEDED, state, attempts,
                      started, finished, duration, worker, peak, error, recorded, None)
        rid = _insert(db, rec, None)
        if has_value:
            db.execute("INSERT INTO vals (record, value) SELECT ?, value FROM records_v1 "
                       "WHERE rowid = ?", (rid, rowid))
            db.execute("UPDATE records SET has_value = 1 WHERE id = ?", (rid,))
    db.execute("DROP TABLE records_v1")


def _read_status(text: Any, path: str, task_id: Any) -> TaskStatus:
    """The ``TaskStatus`` of a record's status column; ``StoreError`` for unknown text."""
    try:
        return TaskStatus(text)
    except ValueError:
        raise StoreError(
            f"store {path!r}: the record of task {task_id!r} has status {text!r}, which is "
            f"not a task status ({', '.join(map(str, TaskStatus))}); the file was not "
            "written by parexec or is damaged: move it away and give a new path") from None


def _begin(db: sqlite3.Connection, timeout: float) -> None:
    """Take the write lock, waiting up to ``timeout`` for another writer (busy handler)."""
    deadline = time.monotonic() + timeout
    for attempt in itertools.count():
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            # The busy handler waited already, unless SQLite refused at once (a file being
            # converted or recovered): then the next BEGIN waits through the handler.
            if not _is_busy(exc) or time.monotonic() > deadline or attempt >= 100:
                raise


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _advice(path: str, exc: BaseException) -> str:
    """What went wrong with the file at ``path``, and what to do."""
    text = str(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    code = code & 0xFF if code is not None else None
    if os.path.isdir(path):
        what = f"is a directory; give the path of a file, e.g. {os.path.join(path, 'runs.db')!r}"
    elif code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT) or "not a database" in text \
            or "malformed" in text:
        what = ("is not a parexec store, or is damaged (not a SQLite database, or truncated); "
                "move it away and give a new path (a new store starts with no history)")
    elif code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in text:
        what = ("is locked by another writer; wait for it, raise px.Store(path, timeout=...), "
                "or give another path")
    elif code == sqlite3.SQLITE_READONLY or "readonly" in text or \
            isinstance(exc, PermissionError):
        what = ("cannot be written (read-only file or folder); make the file and its folder "
                "writable (the -wal and -shm files SQLite keeps beside it too), or give "
                "another path")
    elif code == sqlite3.SQLITE_FULL:
        what = "cannot grow: the disk is full; free space, or prune old records"
    elif code == sqlite3.SQLITE_CANTOPEN or isinstance(exc, FileNotFoundError):
        what = "cannot be opened; check that the folder exists and is writable"
    else:
        what = (f"cannot be used ({type(exc).__name__}: {text}); check the file, or give "
                "another path")
    return f"store {path!r} {what}"


# Writing ------------------------------------------------------------------------------------

class _Record:
    """One finished task, as queued by ``Store.record``."""

    __slots__ = ("workflow", "task_id", "fingerprint", "ok", "status", "attempts", "started",
                 "finished", "duration", "worker", "peak_memory", "error", "recorded", "value")

    def __init__(self, workflow: str, task_id: str, fingerprint: str, ok: bool,
                 status: TaskStatus,
                 attempts: Any, started: Any, finished: Any, duration: Any, worker: Any,
                 peak_memory: Any, error: Any, recorded: float, value: Any) -> None:
        self.workflow, self.task_id, self.fingerprint, self.ok = workflow, task_id, \
            fingerprint, ok
        self.status, self.attempts, self.started, self.finished = status, attempts, started, \
            finished
        self.duration, self.worker, self.peak_memory, self.error = duration, worker, \
            peak_memory, error
        self.recorded, self.value = recorded, value


class _Value:
    """A value pickled off the commit path, for a record already committed as ``rid``."""

    __slots__ = ("rid", "blob")

    def __init__(self, rid: int, blob: bytes) -> None:
        self.rid, self.blob = rid, blob


def _insert(db: sqlite3.Connection, rec: _Record, blob: bytes | None) -> int:
    """Write ``rec`` in the open transaction, replacing the older record with its key."""
    key = (rec.workflow, rec.task_id, rec.fingerprint, int(rec.ok))
    db.execute("DELETE FROM records WHERE workflow = ? AND task_id = ? AND fingerprint = ? "
               "AND ok = ?", key)
    rid = db.execute(
        "INSERT INTO records (workflow, task_id, fingerprint, ok, status, attempts, started, "
        "finished, duration, worker, peak_memory, has_value, error, recorded) VALUES "
        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (*key, rec.status.value, rec.attempts, rec.started, rec.finished, rec.duration, rec.worker,
         rec.peak_memory, int(blob is not None), rec.error, rec.recorded)).lastrowid
    assert rid is not None
    if blob is not None:
        db.execute("INSERT INTO vals (record, value) VALUES (?, ?)", (rid, blob))
    if rec.ok:
        db.execute("INSERT INTO latest VALUES (?,?,?,?,?) ON CONFLICT (workflow, task_id) DO "
                   "UPDATE SET duration = excluded.duration, peak_memory = "
                   "excluded.peak_memory, recorded = excluded.recorded",
                   (rec.workflow, rec.task_id, rec.duration, rec.peak_memory, rec.recorded))
    return rid


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
