"""Fingerprints: what decides that a recorded success serves a task on resume.

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

import copyreg
import functools
import hashlib
import itertools
import logging
import os
import site
import sys
import sysconfig
import types
from collections.abc import Mapping, Sequence
from typing import Any

from ._task import TaskRef, TaskSpec, TaskTemplate

__all__ = ["fingerprints"]

logger = logging.getLogger("parexec")


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
            if attr in _CLASS_NOISE:
                continue  # see _CLASS_NOISE
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


# Class attributes that say nothing about behaviour: ``__doc__`` (a dataclass's shows its
# defaults in hash order), and caches Python adds to a class as it is used, which would make a
# class fingerprint change within one interpreter: ``__slotnames__`` appears once an instance
# is pickled (copyreg), ``_abc_impl`` holds an ABC's registry cache.
_CLASS_NOISE = frozenset({"__doc__", "__slotnames__", "_abc_impl", "__weakref__",
                          "__dict__", "__parameters__", "__orig_bases__"})


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
