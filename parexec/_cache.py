"""Worker state: ``px.worker_cache(fn, *args, **kwargs)`` computes a value once per worker.

A task that loads a model or a dataset calls ``px.worker_cache(load_model, path)``; the first
task on a worker process computes it, later tasks and later runs on that worker reuse it. A
thread task (and the driver) shares one cache per interpreter. See issue 16 item 2.

Why not ``functools.cache``: a function defined in ``__main__`` or a notebook cell travels by
value with every task (cloudpickle rebuilds a new function object, with a new cache, each
time). So the key is what the function *is*, not its identity:

* its qualified name and a digest of its code object (``co_code``, ``co_names`` and
  ``co_consts``, nested code objects included, walked without recursion);
* the values of its closure cells and of its defaults;
* the arguments: ``str``, ``bytes``, ``int``, ``float``, ``bool`` and ``None`` as themselves
  (with their type, so ``1`` and ``True`` differ), a function as its name and code, anything
  else by a digest of its pickle (else the object itself, when it is hashable). A closure or
  default value that can be neither pickled nor hashed (a lock) is keyed by identity.

Globals the function reads are not part of the key: pass what varies as an argument.

Concurrency: one lock per key, taken only on a miss, so threads asking for the same value
wait for the first one to compute it (computed once) while other keys go on. An exception is
not cached: the next call computes again. Values live as long as the worker process (or the
interpreter, for threads): the cache is meant for a few large values, not for memoizing many
small calls. ``px.worker_cache.clear()`` empties the calling process's cache.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import types
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

__all__ = ["WorkerCache", "worker_cache"]

P = ParamSpec("P")
T = TypeVar("T")

# Arguments of these exact types are keys as themselves: cheap, and no pickle to hash.
_PLAIN = frozenset({str, bytes, int, float, bool, type(None)})

# Enough to tell code objects apart; a collision needs a deliberate second preimage.
_DIGEST_SIZE = 16


def _code_digest(code: types.CodeType) -> bytes:
    """Digest of ``code``'s bytecode, names and constants, nested code objects included.

    Iterative (an explicit stack), so deep nesting cannot exhaust the interpreter's stack.
    The file name and line numbers are left out: the same source moved in a notebook, or
    rebuilt by cloudpickle, keeps its key.
    """
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    stack: list[types.CodeType] = [code]
    while stack:
        c = stack.pop()
        h.update(b"\x00code")
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                h.update(b"\x00nested")
                stack.append(const)
            else:
                h.update(repr((type(const).__name__, const)).encode())
    return h.digest()


def _value_key(value: Any, what: str, fn_name: str, strict: bool = True) -> Any:
    """A hashable key for one argument (or, with ``strict=False``, a closure or default value).

    Plain values are themselves; a function is its name and code (not its identity, which
    changes when it travels by value; nor its closure, which may hold the function itself);
    anything else is a digest of its pickle, else the object itself when hashable. With
    ``strict=False`` an object that is neither picklable nor hashable is keyed by identity
    (never a wrong hit; a function sent by value with such a closure misses every time),
    else it raises ``TypeError``.
    """
    kind = type(value)
    if kind in _PLAIN:
        return (kind, value)
    if kind is types.FunctionType:
        return ("fn", value.__qualname__, _code_digest(value.__code__))
    if kind is types.ModuleType:
        return ("module", value.__name__)
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - e.g. a lambda in a list or a local class
        try:
            import cloudpickle
            data = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001
            try:
                hash(value)
            except TypeError:
                pass
            else:
                return ("object", value)
            if not strict:
                return ("id", id(value))
            raise TypeError(
                f"px.worker_cache({fn_name}, ...): {what} of type {kind.__name__} can be "
                f"neither pickled ({type(exc).__name__}: {exc}) nor hashed, so it cannot be "
                "part of the cache key; pass a picklable value (a path, a name, a number) "
                "and build the object inside the function") from exc
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE).digest()


def _fn_key(fn: Callable[..., Any]) -> Any:
    """What ``fn`` computes: its name, code, closure and defaults (not its identity)."""
    from ._task import TaskTemplate
    if isinstance(fn, TaskTemplate):  # a px.task template called outside a workflow
        fn = fn.fn
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    self_key: Any = None
    if isinstance(fn, types.MethodType):
        self_key = _value_key(fn.__self__, "the bound object", name, strict=False)
        fn = fn.__func__
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):  # a builtin, a partial, a callable object
        return (name, _value_key(fn, "the function", name, strict=False))
    parts: list[Any] = [name, _code_digest(code), self_key]
    closure = getattr(fn, "__closure__", None) or ()
    for cell in closure:
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell (a name assigned later in the enclosing scope)
            parts.append(None)
            continue
        parts.append(_value_key(contents, "a closure variable", name, strict=False))
    defaults = getattr(fn, "__defaults__", None)
    if defaults:
        parts.append(tuple(_value_key(d, "a default value", name, strict=False)
                           for d in defaults))
    kwdefaults = getattr(fn, "__kwdefaults__", None)
    if kwdefaults:
        parts.append(tuple((k, _value_key(v, "a default value", name, strict=False))
                           for k, v in sorted(kwdefaults.items())))
    return tuple(parts)


class WorkerCache:
    """Values computed once per worker process (once per interpreter for threads).

    Use the instance ``px.worker_cache``; see the module docstring for the key.
    """

    def __init__(self) -> None:
        self._values: dict[Any, Any] = {}
        self._locks: dict[Any, threading.Lock] = {}
        self._owners: dict[Any, int] = {}  # key -> thread computing it now
        self._guard = threading.Lock()

    def __call__(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Return ``fn(*args, **kwargs)``, computed at most once in this worker per key.

        The key is ``fn``'s qualified name, code, closure and defaults, and the arguments,
        so a function defined in ``__main__`` or a notebook cell (sent by value with every
        task) hits the cache. The value is reused by later tasks and runs on the same
        worker process, and by every thread task of the driver's interpreter; it lives as
        long as that process (``px.worker_cache.clear()`` drops the calling process's
        values). Concurrent first calls from threads compute once; other keys are not
        blocked meanwhile.

        Every call builds the key: about 4 us for a module-level function with a few plain
        arguments, but an argument that is not a ``str``, number, ``bytes`` or ``None`` is
        pickled and hashed each time (10 ms for an 8 MB array). Pass what names the value
        (a path, a model name, a version), not the data itself.

        Usage::

            @px.task(isolation="process")
            def predict(x, path):
                model = px.worker_cache(load_model, path)   # loaded once per worker
                return model(x)

        Args:
            fn: The function that computes the value (for example, loads a model).
            *args: Its positional arguments (part of the key).
            **kwargs: Its keyword arguments (part of the key).

        Returns:
            The value, computed now or by an earlier call with the same key.

        Raises:
            TypeError: An argument can be neither pickled nor hashed.
            RuntimeError: ``fn`` asked for its own value (it would wait for itself).
            Exception: Whatever ``fn`` raises; nothing is cached then, so the next call
                tries again.
        """
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        key: Any = (_fn_key(fn),
                    tuple(_value_key(a, f"argument {i}", name) for i, a in enumerate(args)),
                    tuple((k, _value_key(v, f"argument {k!r}", name))
                          for k, v in sorted(kwargs.items())) if kwargs else ())
        values = self._values
        if key in values:
            return values[key]  # type: ignore[no-any-return]
        me = threading.get_ident()
        with self._guard:
            if self._owners.get(key) == me:
                raise RuntimeError(
                    f"px.worker_cache({name}, ...) was called again, with the same "
                    "arguments, while that value was being computed in the same thread; "
                    "the function must not ask for its own value")
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
        with lock:
            if key in values:
                return values[key]  # type: ignore[no-any-return]
            self._owners[key] = me
            try:
                value = fn(*args, **kwargs)
            finally:
                del self._owners[key]
            values[key] = value
        with self._guard:
            if self._locks.get(key) is lock:
                del self._locks[key]  # later callers take the fast path
        return value

    def clear(self) -> None:
        """Drop every value cached in the calling process.

        Only this process: a process worker's values go when the worker does (see
        ``px.shutdown()`` and ``max_tasks_per_worker``). A value being computed now is
        stored when it is done.
        """
        with self._guard:
            self._values.clear()

    def __len__(self) -> int:
        """How many values this process holds."""
        return len(self._values)

    def _after_fork(self) -> None:
        # A forked child keeps the values (valid copies), but a lock may have been held by
        # a parent thread at the fork, and that thread does not exist here.
        self._guard = threading.Lock()
        self._locks = {}
        self._owners = {}


worker_cache = WorkerCache()
os.register_at_fork(after_in_child=worker_cache._after_fork)
