"""The file of a ``Store``: its schema, opening and migration, transactions and rows.

``_store`` (the ``Store`` class: reading, the cached mapping, pruning) and ``_store_writer``
(the writer threads) both reach the SQLite file through these functions: ``_open`` creates
or opens it in WAL mode with the current schema (``_prepare``, migrating version 1 files),
``_begin`` starts a write transaction that waits for other programs' locks, ``_insert``
writes one ``_Record`` and ``_advice`` turns a SQLite error into a message that says what
to do. The layout of the file is described in ``_store``'s docstring.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
from typing import Any

from ._errors import StoreError
from ._status import TaskStatus

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
