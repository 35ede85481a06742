"""Results that survive: a SQLite record of finished tasks, resume, learned durations.

``run(wf, store="path.db")`` records every finished task (status, attempts, timings, worker,
peak memory, the value pickled with cloudpickle, the fingerprint). ``resume=True`` serves a
task whose fingerprint matches a recorded success instead of running it (status
``"cached"``). Durations recorded by earlier runs become the ``estimate`` of tasks that give
none, so the critical-path order improves from run to run.

Writes go through one writer thread: the scheduler only enqueues a record, and the writer
commits whatever is queued in one transaction (WAL, ``synchronous=NORMAL``), so a record is
on disk a few milliseconds after its task finished and a driver killed with SIGKILL loses at
most the records of that instant. Measured here for 10,000 tasks: rollback journal with
``synchronous=FULL`` took 12 s, WAL with ``synchronous=NORMAL`` 2 s, and batching the
commits takes the store off the scheduler's path.

Fingerprints must be equal across interpreters, so nothing here hashes ``cloudpickle``
output (class ids and set order change between processes). A fingerprint is a BLAKE2 digest
of: the task id; the function's code (bytecode, constants and names, nested code included,
default arguments, closure values, and the global functions and simple constants it
refers to); the arguments (plain data by value, arrays by their bytes, other objects by their
``pickle``); and the fingerprints of upstream tasks. What cannot be fingerprinted is never
cached, nor is anything downstream of it. Files a task reads are not tracked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sqlite3
import threading
import types
import warnings
from collections.abc import Mapping, Sequence
from queue import SimpleQueue
from typing import Any

from ._errors import StoreError
from ._task import TaskRef, TaskSpec

__all__ = ["Store", "fingerprints"]

logger = logging.getLogger("parexec")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    workflow TEXT NOT NULL, task_id TEXT NOT NULL, fingerprint TEXT,
    status TEXT NOT NULL, attempts INTEGER, started REAL, finished REAL, duration REAL,
    worker TEXT, peak_memory INTEGER, value BLOB, has_value INTEGER NOT NULL DEFAULT 0,
    error TEXT, recorded REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_lookup ON records (workflow, task_id, fingerprint, status);
"""


class Store:
    """A SQLite file of task records (see the module docstring).

    Args:
        path: The database file; created (owner-only) if missing.

    Raises:
        StoreError: The file is not a database, is locked past the timeout, or its folder
            is not writable. Raised before any task runs.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.path = os.fspath(path)
        try:
            if not os.path.exists(self.path):
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
                os.close(fd)
            self._db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(self._advice(exc)) from None
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()
        self.failed: BaseException | None = None

    def _advice(self, exc: BaseException) -> str:
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            what = "is not a parexec store (not a SQLite database, or damaged); give another path"
        elif "locked" in text or "busy" in text:
            what = "is locked by another writer; wait for it, or give another path"
        elif "unable to open" in text or "readonly" in text or \
                isinstance(exc, (PermissionError, FileNotFoundError)):
            what = "cannot be created or written; check that its folder exists and is writable"
        else:
            what = f"cannot be used ({text})"
        return f"store {self.path!r} {what}"

    # Reading ----------------------------------------------------------------------------

    def durations(self, workflow: str) -> dict[str, float]:
        """The latest successful duration of every task of ``workflow``."""
        rows = self._db.execute(
            "SELECT task_id, duration FROM records WHERE workflow = ? AND status = 'succeeded' "
            "AND duration IS NOT NULL ORDER BY rowid", (workflow,)).fetchall()
        return {tid: d for tid, d in rows}

    def cached(self, workflow: str, wanted: Mapping[str, str]) -> dict[str, Any]:
        """Values of recorded successes whose fingerprint matches ``wanted`` (id -> fp)."""
        found: dict[str, Any] = {}
        if not wanted:
            return found
        rows = self._db.execute(
            "SELECT task_id, fingerprint, value FROM records WHERE workflow = ? AND "
            "status = 'succeeded' AND has_value = 1 ORDER BY rowid", (workflow,)).fetchall()
        for tid, fp, blob in rows:
            if fp is not None and wanted.get(tid) == fp:
                try:
                    found[tid] = pickle.loads(blob)
                except Exception:  # noqa: BLE001 - an unloadable record is just not reused
                    found.pop(tid, None)
        return found

    # Writing ----------------------------------------------------------------------------

    def record(self, workflow: str, tr: Any, fingerprint: str | None) -> None:
        """Queue the record of a finished task (the writer commits it within milliseconds)."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="parexec-store",
                                            daemon=True)
            self._writer.start()
        self._queue.put((workflow, tr.id, fingerprint, tr.status, tr.attempts, tr.started_at,
                         tr.finished_at, tr.duration, None if tr.worker is None
                         else str(tr.worker), tr.peak_memory, tr.value,
                         None if tr.error is None else f"{type(tr.error).__name__}: {tr.error}"))

    def close(self) -> None:
        """Commit everything queued and close the file."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        self._db.close()

    def _write_loop(self) -> None:
        import time
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            done = batch[-1] is None
            rows = []
            for item in batch:
                if item is None:
                    continue
                *head, value, error = item
                blob, has = self._pickle(item[1], item[3], value)
                rows.append((*head, blob, has, error, time.time()))
            if rows:
                try:
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT INTO records (workflow, task_id, fingerprint, status, attempts,"
                        " started, finished, duration, worker, peak_memory, value, has_value,"
                        " error, recorded) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    self.failed = exc
                    logger.error("store %r: could not record %d task(s): %s", self.path,
                                 len(rows), exc)
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
            if done:
                return

    def _pickle(self, task_id: str, status: str, value: Any) -> tuple[bytes | None, int]:
        if status != "succeeded":
            return None, 0
        try:
            import cloudpickle
            return cloudpickle.dumps(value), 1
        except Exception as exc:  # noqa: BLE001
            msg = (f"task {task_id!r}: its value ({type(value).__name__}) cannot be pickled, so "
                   f"the store records it without a value and resume will run it again ({exc})")
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=1)
            return None, 0


# Fingerprints -------------------------------------------------------------------------------

class _Unhashable(Exception):
    pass


def fingerprints(specs: Sequence[TaskSpec], order: Sequence[int],
                 deps: Sequence[Sequence[int]]) -> list[str | None]:
    """Fingerprint every task (None where something cannot be fingerprinted), upstream
    first; see the module docstring."""
    fps: list[str | None] = [None] * len(specs)
    code_cache: dict[int, bytes | None] = {}
    for i in order:
        spec = specs[i]
        ups = [fps[j] for j in deps[i]]
        if any(u is None for u in ups):
            continue  # downstream of something that cannot be fingerprinted
        if spec.group is not None:
            continue  # groups are not cached: their members are
        try:
            h = hashlib.blake2b(digest_size=20)
            h.update(spec.id.encode())
            h.update(b"\0code\0")
            h.update(_code_fp(spec.fn, code_cache))
            h.update(b"\0args\0")
            by_id = {specs[j].id: fps[j] for j in deps[i]}
            h.update(_value_fp(spec.args, by_id, code_cache))
            h.update(_value_fp(spec.kwargs, by_id, code_cache))
            h.update(b"\0up\0")
            for u in ups:
                h.update(u.encode())  # type: ignore[union-attr]
            fps[i] = h.hexdigest()
        except _Unhashable:
            fps[i] = None
    return fps


_SIMPLE = (type(None), bool, int, float, complex, str, bytes)


def _value_fp(obj: Any, refs: Mapping[str, str | None], code: dict[int, bytes | None],
              depth: int = 0) -> bytes:
    if depth > 50:
        raise _Unhashable
    t = type(obj)
    if t in _SIMPLE:
        return f"{t.__name__}:{obj!r};".encode()
    if isinstance(obj, TaskRef):
        fp = refs.get(obj.id)
        if fp is None:
            raise _Unhashable
        return f"ref:{fp};".encode()
    if t in (list, tuple) or (isinstance(obj, tuple) and hasattr(obj, "_fields")):
        inner = b"".join(_value_fp(v, refs, code, depth + 1) for v in obj)
        return f"{t.__qualname__}[".encode() + inner + b"]"
    if isinstance(obj, dict):
        items = sorted((_value_fp(k, refs, code, depth + 1), _value_fp(v, refs, code, depth + 1))
                       for k, v in obj.items())
        return b"dict{" + b"".join(k + b"=" + v for k, v in items) + b"}"
    if isinstance(obj, (set, frozenset)):
        return b"set{" + b"".join(sorted(_value_fp(v, refs, code, depth + 1) for v in obj)) + b"}"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type)):
        return b"fn:" + _code_fp(obj, code)
    if hasattr(obj, "tobytes") and hasattr(obj, "dtype") and hasattr(obj, "shape"):
        return (f"array:{obj.dtype}:{obj.shape}:".encode()
                + hashlib.blake2b(obj.tobytes(), digest_size=20).digest())
    try:
        return b"pickle:" + hashlib.blake2b(pickle.dumps(obj, protocol=4),
                                            digest_size=20).digest()
    except Exception:  # noqa: BLE001
        raise _Unhashable from None


def _code_fp(fn: Any, cache: dict[int, bytes | None], depth: int = 0) -> bytes:
    key = id(fn)
    if key in cache:
        got = cache[key]
        if got is None:
            raise _Unhashable
        return got
    cache[key] = b"recursion"  # a function that refers to itself
    try:
        out = _code_fp_uncached(fn, cache, depth)
    except _Unhashable:
        cache[key] = None
        raise
    cache[key] = out
    return out


def _code_fp_uncached(fn: Any, cache: dict[int, bytes | None], depth: int) -> bytes:
    if depth > 20:
        raise _Unhashable
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None and hasattr(fn, "args"):
        return b"partial:" + _code_fp(inner, cache, depth + 1) + _value_fp(
            (fn.args, fn.keywords), {}, cache)
    if isinstance(fn, type) or isinstance(fn, types.BuiltinFunctionType) or \
            not hasattr(fn, "__code__"):
        name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        if name.startswith("__main__.") and not isinstance(fn, types.BuiltinFunctionType):
            raise _Unhashable  # a class defined in a script: no stable identity to hash
        return f"named:{name};".encode()
    h = hashlib.blake2b(digest_size=20)
    h.update(_codeobj(fn.__code__))
    h.update(_value_fp(fn.__defaults__, {}, cache))
    h.update(_value_fp(fn.__kwdefaults__, {}, cache))
    for cell in fn.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:
            content = None
        h.update(_ref_fp(content, cache, depth))
    globs = getattr(fn, "__globals__", {})
    for name in sorted(_names(fn.__code__)):
        if name in globs:
            value = globs[name]
            # Global functions and simple constants count; a mutable global (a cache, a
            # log list) would make every run look new, so it does not.
            if isinstance(value, (types.FunctionType, types.ModuleType, type)) \
                    or hasattr(value, "fn") or _is_simple(value):
                h.update(name.encode() + b"=" + _ref_fp(value, cache, depth))
    return h.digest()


def _is_simple(value: Any) -> bool:
    if type(value) in _SIMPLE:
        return True
    return isinstance(value, (tuple, frozenset)) and all(_is_simple(v) for v in value)


def _ref_fp(obj: Any, cache: dict[int, bytes | None], depth: int) -> bytes:
    """Fingerprint of something a function refers to (a global or a closure value)."""
    if isinstance(obj, types.ModuleType):
        return f"module:{obj.__name__};".encode()
    if isinstance(obj, types.FunctionType):
        return _code_fp(obj, cache, depth + 1)
    if callable(obj) and not isinstance(obj, (type,)) and hasattr(obj, "fn"):
        return _code_fp(obj.fn, cache, depth + 1)  # a px.task template
    try:
        return _value_fp(obj, {}, cache)
    except _Unhashable:
        return f"opaque:{type(obj).__module__}.{type(obj).__qualname__};".encode()


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


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names

