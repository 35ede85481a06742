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

Fingerprints must be equal across interpreters, so nothing here hashes ``cloudpickle``
output (class ids and set order change between processes). A fingerprint is a BLAKE2 digest
of the task id, the function's code, the arguments and the fingerprints of upstream tasks.

* **Code** of a function: bytecode, constants and names (nested code included; line
  numbers are not), default arguments, closure values, and what its global names refer
  to: functions and classes, ``px.task`` templates, simple constants (numbers, strings,
  tuples and frozensets of them), and modules. Mutable globals (a dict used as a cache, a
  log list) do not count: they would make every run look new. A global whose attributes
  raise counts as opaque (not at all).
* **Where code comes from decides how deep it is read.** Code of *user modules* (``__main__``
  and any module outside the standard library and the installed-packages folders) is read
  as above, recursively. A function, class or module of the standard library or of an
  installed package counts by its name and version (the Python version, the distribution's
  version): upgrading numpy reruns tasks that use it, but its internals are not hashed.
* **Code reached through a module**: for ``mylib.transform(x)``, the names the function uses
  (its ``co_names``) are looked up on every user module it refers to (also
  ``pkg.sub.transform``, through submodules), and what they name counts as if it were a
  global. A name that matches by accident (``x.transform`` on another object) only makes
  the fingerprint stricter. Not covered: attributes reached through other objects
  (``self.helper()``, ``obj.method()`` where ``obj`` is an argument: the object's class
  counts, see below), functions called through ``getattr`` with a computed name, code run
  through ``exec`` or ``importlib`` at run time, and files a task reads.
* **Classes** of user modules count by their methods, properties, class attributes and
  bases, read like functions; classes of installed packages by name and version.
* **Arguments**: plain data by value (dict keys and sets sorted, so hash randomisation does
  not matter), numpy arrays by dtype, shape and bytes, other objects structurally through
  ``__reduce_ex__(4)`` (what pickle would save, with its sets and dicts sorted), functions
  by their code.

Reading code stops 40 functions deep, arguments 100 containers deep, and one task's
fingerprint visits at most a million objects; a self-referencing argument cannot be
fingerprinted. What cannot be fingerprinted is never cached, nor is anything downstream of
it.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import pickle
import site
import sqlite3
import sys
import sysconfig
import threading
import time
import types
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from queue import Empty, SimpleQueue
from typing import Any, Literal

from ._errors import StoreError, TaskOptionError
from ._task import TaskRef, TaskSpec, TaskTemplate

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

        The writer commits it within milliseconds. Never raises: a record that cannot be
        written counts in ``lost``.
        """
        ok = tr.status == "succeeded"
        self._writer.put(_Record(
            workflow, tr.id, fingerprint or "", ok, tr.status, tr.attempts, tr.started_at,
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
            _migrate_v1(db)
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


def _migrate_v1(db: sqlite3.Connection) -> None:
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
        rec = _Record(workflow, task_id, fp, status == "succeeded", status, attempts, started,
                      finished, duration, worker, peak, error, recorded, None)
        rid = _insert(db, rec, None)
        if has_value:
            db.execute("INSERT INTO vals (record, value) SELECT ?, value FROM records_v1 "
                       "WHERE rowid = ?", (rid, rowid))
            db.execute("UPDATE records SET has_value = 1 WHERE id = ?", (rid,))
    db.execute("DROP TABLE records_v1")


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

    def __init__(self, workflow: str, task_id: str, fingerprint: str, ok: bool, status: str,
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
        (*key, rec.status, rec.attempts, rec.started, rec.finished, rec.duration, rec.worker,
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


# Fingerprints -------------------------------------------------------------------------------

_MAX_VALUE_DEPTH = 100
_MAX_CODE_DEPTH = 40  # functions reached from functions (~6 frames each)
_BUDGET = 1_000_000
_SIMPLE = (type(None), bool, int, float, complex, str, bytes)


class _Unhashable(Exception):
    pass


def fingerprints(specs: Sequence[TaskSpec], order: Sequence[int],
                 deps: Sequence[Sequence[int]]) -> list[str | None]:
    """Fingerprint every task, upstream first; see the module docstring.

    Returns:
        One hex digest per task, None where something cannot be fingerprinted.
    """
    fps: list[str | None] = [None] * len(specs)
    fpr = _Fingerprinter()
    for i in order:
        spec = specs[i]
        ups = [fps[j] for j in deps[i]]
        if any(u is None for u in ups):
            continue  # downstream of something that cannot be fingerprinted
        if spec.group is not None:
            continue  # groups are not cached: their members are
        fpr.budget = _BUDGET
        try:
            h = hashlib.blake2b(digest_size=20)
            h.update(spec.id.encode())
            h.update(b"\0code\0")
            h.update(fpr.code(spec.fn, 0))
            h.update(b"\0args\0")
            by_id = {specs[j].id: fps[j] for j in deps[i]}
            h.update(fpr.value(spec.args, by_id, 0))
            h.update(fpr.value(spec.kwargs, by_id, 0))
            h.update(b"\0up\0")
            for u in ups:
                h.update(u.encode())  # type: ignore[union-attr]
            fps[i] = h.hexdigest()
        except Exception as exc:  # noqa: BLE001 - _Unhashable, or user code that raised
            logger.debug("task %r cannot be fingerprinted, so it is never served from the "
                         "store: %s", spec.id, exc or type(exc).__name__)
            fps[i] = None
        finally:
            fpr.path.clear()
    return fps


class _Fingerprinter:
    """One fingerprinting pass.

    It holds code fingerprints memoised by object (the objects are kept alive, so ids stay
    theirs), the containers on the current path (to refuse cycles), and a budget of objects
    visited per task.
    """

    def __init__(self) -> None:
        self.codes: dict[int, bytes | None] = {}
        self.alive: list[Any] = []
        self.path: set[int] = set()
        self.budget = _BUDGET

    def tick(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise _Unhashable(f"more than {_BUDGET:,} objects to read")

    # Values ------------------------------------------------------------------------------

    def value(self, obj: Any, refs: Mapping[str, str | None], depth: int) -> bytes:
        self.tick()
        if depth > _MAX_VALUE_DEPTH:
            raise _Unhashable(f"arguments nested deeper than {_MAX_VALUE_DEPTH}")
        t = type(obj)
        if t in _SIMPLE:
            return f"{t.__name__}:{obj!r};".encode()
        if isinstance(obj, TaskRef):
            fp = refs.get(obj.id)
            if fp is None:
                raise _Unhashable(f"refers to task {obj.id!r}, which has no fingerprint")
            return f"ref:{fp};".encode()
        if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type, TaskTemplate,
                            functools.partial)):
            return b"fn:" + self.code(obj, 0)
        key = id(obj)
        if key in self.path:
            raise _Unhashable("an argument refers to itself")
        self.path.add(key)
        try:
            return self._container(obj, t, refs, depth)
        finally:
            self.path.discard(key)

    def _container(self, obj: Any, t: type, refs: Mapping[str, str | None],
                   depth: int) -> bytes:
        if t is list or t is tuple:
            return f"{t.__name__}[".encode() + b"".join(
                self.value(v, refs, depth + 1) for v in obj) + b"]"
        if t is dict:
            return b"dict{" + self._items(obj.items(), refs, depth) + b"}"
        if t is set or t is frozenset:
            return b"set{" + b"".join(sorted(self.value(v, refs, depth + 1)
                                             for v in obj)) + b"}"
        np = sys.modules.get("numpy")
        if np is not None and isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                return f"objarray:{obj.shape}:".encode() + self.value(obj.tolist(), refs,
                                                                       depth + 1)
            return (f"array:{obj.dtype.str}:{obj.shape}:".encode()
                    + hashlib.blake2b(obj.tobytes(), digest_size=20).digest())
        return self._reduced(obj, t, refs, depth)

    def _items(self, items: Any, refs: Mapping[str, str | None], depth: int) -> bytes:
        pairs = sorted((self.value(k, refs, depth + 1), self.value(v, refs, depth + 1))
                       for k, v in items)
        return b"".join(k + b"=" + v for k, v in pairs)

    def _reduced(self, obj: Any, t: type, refs: Mapping[str, str | None], depth: int) -> bytes:
        """What pickle would save of ``obj`` (``__reduce_ex__(4)``), read structurally.

        Sets and dicts inside are sorted, so the result is equal across interpreters.
        """
        reducer = copyreg.dispatch_table.get(t)
        try:
            rv = reducer(obj) if reducer is not None else obj.__reduce_ex__(4)
        except Exception as exc:  # noqa: BLE001 - what pickle cannot save
            raise _Unhashable(f"{t.__name__} cannot be pickled ({exc})") from None
        if isinstance(rv, str):
            return f"global:{t.__module__}.{rv};".encode()
        if not isinstance(rv, tuple) or not 2 <= len(rv) <= 6:
            raise _Unhashable(f"{t.__name__}.__reduce_ex__ returned {type(rv).__name__}")
        parts = [b"reduce(", self.value(rv[0], refs, depth + 1),
                 self.value(rv[1], refs, depth + 1)]
        if len(rv) > 2 and rv[2] is not None:
            parts.append(b";state=" + self.value(rv[2], refs, depth + 1))
        if len(rv) > 3 and rv[3] is not None:
            items = list(itertools.islice(rv[3], self.budget + 1))
            parts.append(b";items=" + self.value(items, refs, depth + 1))
        if len(rv) > 4 and rv[4] is not None:
            pairs = list(itertools.islice(rv[4], self.budget + 1))
            parts.append(b";dict=" + self._items(pairs, refs, depth))
        return b"".join(parts) + b")"

    # Code --------------------------------------------------------------------------------

    def code(self, fn: Any, depth: int) -> bytes:
        """Fingerprint of a function, class, template or partial (memoised)."""
        key = id(fn)
        if key in self.codes:
            got = self.codes[key]
            if got is None:
                raise _Unhashable(f"{_qualname(fn)} cannot be fingerprinted")
            return got
        if depth > _MAX_CODE_DEPTH:
            raise _Unhashable(f"code reached more than {_MAX_CODE_DEPTH} functions deep")
        self.alive.append(fn)
        self.codes[key] = f"recursion:{_qualname(fn)};".encode()  # refers to itself
        try:
            out = self._code(fn, depth)
        except Exception:
            self.codes[key] = None
            raise
        self.codes[key] = out
        return out

    def _code(self, fn: Any, depth: int) -> bytes:
        self.tick()
        if isinstance(fn, TaskTemplate):
            return b"template:" + self.code(fn.fn, depth + 1)
        if isinstance(fn, functools.partial):
            return b"partial:" + self.code(fn.func, depth + 1) + self.value(
                (fn.args, fn.keywords), {}, 0)
        if isinstance(fn, types.MethodType):
            return (b"method:" + self.code(fn.__func__, depth + 1)
                    + self.value(fn.__self__, {}, 0))
        if isinstance(fn, type):
            return self._class(fn, depth)
        if not isinstance(fn, types.FunctionType):
            if isinstance(fn, (types.BuiltinFunctionType, types.MethodWrapperType,
                               types.WrapperDescriptorType, types.MethodDescriptorType)):
                return f"named:{_qualname(fn)};".encode()
            return b"callable:" + self.value(fn, {}, 0)  # an object with __call__
        origin = _origin(sys.modules.get(fn.__module__) if isinstance(fn.__module__, str)
                         else None)
        if origin != "user":
            return f"named:{fn.__module__}.{fn.__qualname__}@{origin};".encode()
        h = hashlib.blake2b(digest_size=20)
        h.update(_codeobj(fn.__code__))
        h.update(self.value(fn.__defaults__, {}, 0))
        h.update(self.value(fn.__kwdefaults__, {}, 0))
        for cell in fn.__closure__ or ():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                content = None
            h.update(self.closure(content, depth))
        globs = fn.__globals__
        names = _names(fn.__code__)
        for name in sorted(names):
            if name in globs:
                part = self.ref(globs[name], names, depth)
                if part is not None:
                    h.update(name.encode() + b"=" + part)
        return h.digest()

    def ref(self, obj: Any, names: frozenset[str], depth: int) -> bytes | None:
        """Fingerprint of what a global name or a closure cell holds.

        None when it does not count (mutable data, or an object whose attributes raise).
        """
        if isinstance(obj, types.ModuleType):
            return self.module(obj, names, depth)
        if isinstance(obj, (types.FunctionType, type, TaskTemplate, functools.partial,
                            types.MethodType)):
            return self.code(obj, depth + 1)
        if isinstance(obj, types.BuiltinFunctionType):
            return f"named:{_qualname(obj)};".encode()
        if _is_simple(obj):
            return self.value(obj, {}, 0)
        return None

    def closure(self, obj: Any, depth: int) -> bytes:
        """Fingerprint of a closure value: code as code, data by value when it can be."""
        part = self.ref(obj, frozenset(), depth)
        if part is not None:
            return part
        try:
            return self.value(obj, {}, 0)
        except _Unhashable:
            return f"opaque:{type(obj).__module__}.{type(obj).__qualname__};".encode()

    def module(self, mod: types.ModuleType, names: frozenset[str], depth: int) -> bytes:
        """A module, with what the names used by the code reach through it (user modules)."""
        self.tick()
        name = _module_name(mod)
        origin = _origin(mod)
        if origin != "user":
            return f"module:{name}@{origin};".encode()
        if depth > _MAX_CODE_DEPTH:
            raise _Unhashable(f"code reached more than {_MAX_CODE_DEPTH} modules deep")
        attrs = mod.__dict__
        parts = [f"module:{name}{{".encode()]
        for attr in sorted(names):
            if attr not in attrs:
                continue
            value = attrs[attr]
            if isinstance(value, types.ModuleType):
                sub = _module_name(value)
                # Submodules are followed (pkg.sub.fn); other modules a module imported
                # count by name, which keeps the walk a tree.
                part = self.module(value, names, depth + 1) if sub.startswith(name + ".") \
                    else f"module:{sub};".encode()
            else:
                part = self.ref(value, names, depth)  # type: ignore[assignment]
            if part is not None:
                parts.append(attr.encode() + b"=" + part)
        return b"".join(parts) + b"}"

    def _class(self, cls: type, depth: int) -> bytes:
        origin = _origin(sys.modules.get(cls.__module__) if isinstance(cls.__module__, str)
                         else None)
        if origin != "user":
            return f"named:{cls.__module__}.{cls.__qualname__}@{origin};".encode()
        h = hashlib.blake2b(digest_size=20)
        h.update(f"class:{cls.__module__}.{cls.__qualname__}(".encode())
        for base in cls.__bases__:
            h.update(self.code(base, depth + 1))
        attrs = cls.__dict__
        for attr in sorted(attrs):
            if attr == "__doc__":
                continue  # no behaviour; and a dataclass's shows its defaults in hash order
            value = attrs[attr]
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                funcs = (value.fget, value.fset, value.fdel)
                part = b"property:" + b",".join(
                    self.code(f, depth + 1) if f is not None else b"-" for f in funcs)
            elif isinstance(value, (types.FunctionType, type)):
                part = self.code(value, depth + 1)
            elif _is_simple(value):
                part = self.value(value, {}, 0)
            else:
                part = f"<{type(value).__qualname__}>".encode()
            h.update(attr.encode() + b"=" + part + b";")
        return b"class:" + h.digest()


def _is_simple(value: Any) -> bool:
    if type(value) in _SIMPLE:
        return True
    return type(value) in (tuple, frozenset) and all(_is_simple(v) for v in value)


def _qualname(obj: Any) -> str:
    try:
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    except Exception:  # noqa: BLE001 - hostile attributes
        return type(obj).__qualname__


def _module_name(mod: types.ModuleType) -> str:
    name = mod.__dict__.get("__name__")
    return name if isinstance(name, str) else "?"


def _codeobj(code: types.CodeType) -> bytes:
    parts = [code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode()]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            parts.append(_codeobj(const))
        else:
            parts.append(_const_fp(const))
    return hashlib.blake2b(b"\0".join(parts), digest_size=20).digest()


def _const_fp(const: Any) -> bytes:
    # frozenset constants (``x in {"a", "b"}``) iterate in hash order, which changes between
    # interpreters for strings: sort them.
    if isinstance(const, frozenset):
        return b"frozenset{" + b",".join(sorted(_const_fp(c) for c in const)) + b"}"
    if isinstance(const, tuple):
        return b"(" + b",".join(_const_fp(c) for c in const) + b")"
    return repr(const).encode() if type(const) in _SIMPLE else type(const).__name__.encode()


def _names(code: types.CodeType) -> frozenset[str]:
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return frozenset(names)


# Where code comes from -----------------------------------------------------------------------

_origins: dict[str, str] = {}


def _origin(mod: types.ModuleType | None) -> str:
    """Where ``mod`` comes from: ``"user"`` code is read, anything else counts by version.

    User code is ``__main__`` and modules outside the standard library and the
    installed-packages folders.
    """
    if mod is None:
        return "user"  # a function whose module is gone or made up (exec): read its code
    name = _module_name(mod)
    got = _origins.get(name)
    if got is None:
        got = _origins[name] = _find_origin(mod, name)
    return got


def _find_origin(mod: types.ModuleType, name: str) -> str:
    top = name.partition(".")[0]
    if name == "__main__":
        return "user"
    python = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return python
    if top == "parexec":
        return f"parexec=={_version(top)}"
    file = mod.__dict__.get("__file__")
    if not isinstance(file, str):
        paths = mod.__dict__.get("__path__")
        file = next(iter(paths), None) if paths is not None else None
        if not isinstance(file, str):
            return python  # built into the interpreter
    real = os.path.realpath(file)
    if any(real.startswith(root) for root in _installed_roots()):
        return f"{top}=={_version(top)}"
    return "user"


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    """The folders of the standard library and of installed packages."""
    roots: set[str] = set()
    for scheme_vars in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        paths = sysconfig.get_paths(vars=scheme_vars)
        roots.update(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")
                     if k in paths)
    try:
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - an old virtualenv's site module
        pass
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


@functools.cache
def _version(top: str) -> str:
    from importlib import metadata
    try:
        for dist in metadata.packages_distributions().get(top, ()):
            return metadata.version(dist)
    except Exception:  # noqa: BLE001 - broken metadata: fall back to __version__
        pass
    version = getattr(sys.modules.get(top), "__version__", None)
    return version if isinstance(version, str) else "?"
