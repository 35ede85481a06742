"""Declaring tasks: ``px.task``, its options, and the references tasks pass to each other.

A ``TaskTemplate`` is what ``@px.task`` returns. Called inside ``with px.Workflow(...)``
it adds one ``TaskSpec`` to that workflow and returns a ``TaskRef``; called anywhere else it
simply calls the function. Any ``TaskRef`` found in the arguments (also inside lists,
tuples, dicts and sets) is a data dependency, replaced by the upstream task's value before
the call.

Options are checked when they are given, so a typo fails at definition time, naming the task.
"""

from __future__ import annotations

import difflib
import functools
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, overload

from ._errors import TaskOptionError

if TYPE_CHECKING:
    from ._workflow import Workflow

__all__ = ["GroupInfo", "GroupRef", "MapRef", "Outcome", "Retry", "TaskRef", "TaskSpec",
           "TaskTemplate", "WAITS", "check_callable", "check_id", "parse_size", "resolve_args",
           "resolve_refs", "sized_value", "task"]

P = ParamSpec("P")
R = TypeVar("R")

Isolation = Literal["thread", "process", "cluster"]
OnError = Literal["fail", "skip", "ignore"]
ISOLATIONS = ("thread", "process", "cluster")
ON_ERRORS = ("fail", "skip", "ignore")

# Decimal and binary units, as dask.utils.parse_bytes reads them; single letters are decimal.
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: int | float | str, *, what: str = "memory") -> int:
    """Parse a memory size: bytes as a number, or a string like ``"512MB"`` or ``"2GiB"``.

    Args:
        value: A positive number of bytes, or a number followed by a unit (B, KB, MB, GB,
            TB decimal; KiB, MiB, GiB, TiB binary; case-insensitive).
        what: The name of the field, used in the error message.

    Returns:
        The size in bytes.

    Raises:
        TaskOptionError: The value is not a positive size.
    """
    if isinstance(value, bool):
        raise TaskOptionError(f"{what}={value!r} is not a size; give bytes or a string like '2GB'")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit not in _UNITS:
            raise TaskOptionError(
                f"{what}={value!r} has an unknown unit {m.group(2)!r}; use one of "
                "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '512MB' or '2GiB')")
    else:
        raise TaskOptionError(
            f"{what}={value!r} is not a size; give bytes or a string like '512MB' or '2GiB'")
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise TaskOptionError(f"{what}={value!r} must be a positive size")
    if size < 1:
        raise TaskOptionError(
            f"{what}={value!r} is less than one byte; a bare number counts bytes, so write the "
            f"unit (e.g. '{value}GB')")
    return int(size)


@dataclass(frozen=True)
class Retry:
    """How a failed attempt is retried.

    The delay before attempt ``n + 1`` is ``min(max_delay, initial_delay * backoff**(n - 1))``
    plus a uniform random offset in ``[-jitter, +jitter]`` seconds (never below zero). Only
    exceptions that are instances of ``on`` are retried. Waiting for a retry holds no slot.

    Usage::

        @px.task(retry=px.Retry(3, initial_delay=0.5, on=(OSError,)))
        def fetch(url): ...

    Args:
        max_retries: How many times to retry after the first attempt (>= 0).
        initial_delay: Seconds before the first retry.
        backoff: Factor applied to the delay after each retry (>= 1).
        max_delay: Upper bound of a delay, in seconds.
        jitter: Largest random offset added to or removed from a delay, in seconds.
        on: Exception types that are retried.
        memory_factor: With a factor (>= 1), an attempt stopped by ``MemoryLimitExceeded``
            is retried with its memory limit and its need multiplied by it, never above the
            run's memory budget (``Retry(2, memory_factor=2)`` doubles the memory each time).
    """

    max_retries: int
    initial_delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.0
    on: tuple[type[BaseException], ...] = (Exception,)
    memory_factor: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) \
                or self.max_retries < 0:
            raise TaskOptionError(
                f"Retry(max_retries={self.max_retries!r}) must be an integer >= 0")
        for field, low in (("initial_delay", 0.0), ("backoff", 1.0), ("max_delay", 0.0),
                           ("jitter", 0.0)):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not value >= low or not math.isfinite(value):
                raise TaskOptionError(f"Retry({field}={value!r}) must be a number >= {low:g}")
        factor = self.memory_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                   or not factor >= 1 or not math.isfinite(factor)):
            raise TaskOptionError(
                f"Retry(memory_factor={factor!r}) must be a number >= 1 (how much the memory of "
                "an attempt stopped by MemoryLimitExceeded grows), or None")
        on = self.on
        if isinstance(on, type):
            on = (on,)
        if not isinstance(on, tuple) or not on or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise TaskOptionError(
                f"Retry(on={self.on!r}) must be an exception type or a tuple of them")
        object.__setattr__(self, "on", on)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_delay, self.initial_delay * self.backoff ** (attempt - 1))
        if self.jitter:
            base += (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base)

    def retries(self, error: BaseException) -> bool:
        """Whether ``error`` is of a type this policy retries."""
        return isinstance(error, self.on)


class TaskRef:
    """A reference to a task's future value, usable as an argument of another task.

    Attributes:
        id: The task id.
        workflow: The workflow the task belongs to.
    """

    __slots__ = ("id", "workflow", "index")

    def __init__(self, workflow: Workflow, id: str, index: int) -> None:
        self.workflow = workflow
        self.id = id
        self.index = index  # creation order = the task's index in the compiled graph

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{self!r} is a reference to a task's future value and cannot be pickled; pass it "
            "as an argument of another task of the same workflow (parexec replaces it by the "
            "value before the call)")


class GroupRef(TaskRef):
    """A reference to a group's value (see ``px.group``); usable like a ``TaskRef``."""

    __slots__ = ()


class MapRef(GroupRef):
    """A reference to a map's value, the list of its results in item order."""

    __slots__ = ()


@dataclass(frozen=True)
class Outcome:
    """How one member of an ``"all_settled"`` group ended.

    Attributes:
        ok: Whether the member produced a value.
        value: The value (None if not ok).
        error: The exception (None if ok; ``px.Cancelled`` for a member that never ran).
    """

    ok: bool
    value: Any = None
    error: BaseException | None = None


WAITS = ("all", "any", "all_settled", "race")


@dataclass(frozen=True)
class GroupInfo:
    """What makes a spec a group: its members and strategy (``TaskSpec.group``).

    ``dynamic`` is set for a map over a task's result: ``(fn, options, fixed_kwargs, base)``,
    expanded into member tasks ``base[0]``, ``base[1]``, ... once the source is done.
    """

    wait: str
    members: tuple[str, ...]
    max_concurrent: int | None = None
    timeout: float | None = None
    output: str = "dict"  # "dict" (group) or "list" (map)
    dynamic: tuple[Any, ...] | None = None


_NO_POOLS: dict[str, int] = {}  # shared by every task without pools; never mutated


class TaskSpec:
    """One task of a workflow, as declared (what ``wf[id]`` returns).

    Attributes mirror the options of ``px.task``; ``deps`` are the ids this task depends on
    (data dependencies first, then ``after=``), in declaration order and without repeats.
    ``memory``, ``cpus`` and ``timeout`` given as callables are in ``sizers`` (option ->
    callable, else None; the attributes then keep their defaults), evaluated by the
    scheduler on the resolved arguments when the task becomes ready. ``exclusive`` (not a
    ``px.task`` option; the YAML loader sets it for ``parallel.enabled: false``) makes the
    task run with no other local task of the run; on a map it applies to every item.
    """

    __slots__ = ("id", "name", "fn", "args", "kwargs", "deps", "has_refs", "isolation",
                 "priority", "estimate", "timeout", "retry", "on_error", "cpus", "memory",
                 "pools", "default", "group", "sizers", "exclusive", "grace")

    def __init__(self, id: str, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], deps: tuple[str, ...], has_refs: bool,
                 options: Mapping[str, Any]) -> None:
        self.id = id
        self.name: str = options.get("name") or id
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.deps = deps
        self.has_refs = has_refs
        self.isolation: Isolation | None = options.get("isolation")
        self.priority: int = options.get("priority", 0)
        self.estimate: float | None = options.get("estimate")
        self.timeout: float | None = options.get("timeout")
        # None: not given, so the run's or the workflow's grace applies (default 0).
        self.grace: float | None = options.get("grace")
        self.retry: Retry | None = options.get("retry")
        self.on_error: OnError = options.get("on_error", "fail")
        self.cpus: float = options.get("cpus", 1)
        self.memory: int | None = options.get("memory")
        self.pools: dict[str, int] = options.get("pools", _NO_POOLS)
        self.default: Any = options.get("default")
        self.group: GroupInfo | None = None  # set for groups and maps
        self.exclusive = False
        self.sizers: dict[str, Callable[..., Any]] | None = None
        if callable(self.memory) or callable(self.cpus) or callable(self.timeout):
            self.sizers = {k: options[k] for k in ("memory", "cpus", "timeout")
                           if callable(options.get(k))}
            if callable(self.memory):
                self.memory = None
            if callable(self.cpus):
                self.cpus = 1
            if callable(self.timeout):
                self.timeout = None

    def __repr__(self) -> str:
        fn = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"<TaskSpec {self.id!r} fn={fn} deps={list(self.deps)}>"


# Option parsing ---------------------------------------------------------------------------

_OPTIONS = ("id", "name", "isolation", "priority", "estimate", "timeout", "retry", "on_error",
            "cpus", "memory", "pools", "after", "default", "grace")


def check_grace(value: Any, where: str) -> float | None:
    """Validate a ``grace`` (seconds >= 0, or None for "not given").

    Raises:
        TaskOptionError: ``value`` is not a finite number of seconds >= 0; the message
            starts with ``where`` (e.g. ``"task 'fit'"``).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (value >= 0 and math.isfinite(value)):
        raise TaskOptionError(f"{where}: grace={value!r} must be a number of seconds >= 0")
    return float(value)


def check_positive(value: Any, where: str, field: str,
                   meaning: str = "a positive number of seconds") -> float | None:
    """Validate an optional positive finite number (None passes).

    ``where`` prefixes the message, e.g. ``"task 'fit'"``.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (value > 0 and math.isfinite(value)):
        raise TaskOptionError(f"{where}: {field}={value!r} must be {meaning}")
    return float(value)


def check_id(value: Any, where: str, *, brackets: bool = True) -> str:
    """Validate a task, group or workflow id (or display name); return it.

    Ids are printed in summaries, progress bars and terminals, so control characters (which
    could forge table rows or rewrite lines) are refused; ``[`` and ``]`` are reserved for
    map items (``name[0]``), whose ids must never collide with a user's.

    Raises:
        TaskOptionError: The value is not a non-empty printable string.
    """
    if not isinstance(value, str) or not value:
        raise TaskOptionError(f"{where}={value!r} must be a non-empty string")
    if not value.isprintable():
        raise TaskOptionError(f"{where}={value!r} contains control or non-printable characters; "
                              "use printable text")
    if brackets and ("[" in value or "]" in value):
        raise TaskOptionError(f"{where}={value!r} contains '[' or ']', which are reserved for "
                              "the items of maps (name[0], name[1], ...); choose another id")
    return value


def sized_value(task: str, key: str, fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: Mapping[str, Any]) -> Any:
    """Evaluate the callable option ``key`` (memory, cpus, timeout) on resolved arguments.

    Returns the value normalised like a fixed option (bytes, cores, seconds; None for no
    memory or no timeout).

    Raises:
        TaskOptionError: The callable raised, or returned a value of the wrong type; the
            message names the task and the option.
    """
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported as the task's failure
        raise TaskOptionError(
            f"task {task!r}: the {key}= callable raised {type(exc).__name__}: {exc}; fix it "
            f"(it receives the task's resolved arguments) or give a fixed {key}=") from exc
    if value is None and key != "cpus":
        return None
    try:
        if key == "memory":
            return parse_size(value, what="memory")
        if key == "cpus":
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not (value > 0 and math.isfinite(value)):
                raise TaskOptionError(f"cpus={value!r} must be a number > 0")
            return value
        return check_positive(value, "", "timeout")
    except TaskOptionError as exc:
        text = str(exc).removeprefix(": ")
        raise TaskOptionError(
            f"task {task!r}: the {key}= callable returned {value!r}, unusable: {text}; make "
            "it return " + {"memory": "bytes or a size like '512MB' (or None)",
                            "cpus": "a number of cores > 0",
                            "timeout": "a number of seconds > 0 (or None)"}[key]) from None


def check_options(task: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise task options; return them as a new dict.

    Args:
        task: The task id or function name, for messages.
        options: Options as given to ``px.task``.

    Raises:
        TaskOptionError: An option is unknown or has an unusable value.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in _OPTIONS:
            close = difflib.get_close_matches(key, _OPTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f"; known options: {', '.join(_OPTIONS)}"
            raise TaskOptionError(f"task {task!r}: unknown option {key!r}{hint}")
        if key in ("id", "name"):
            if value is not None:
                check_id(value, f"task {task!r}: {key}", brackets=key == "id")
        elif key == "isolation":
            if value is not None and value not in ISOLATIONS:
                raise TaskOptionError(
                    f"task {task!r}: isolation={value!r} is unknown; use one of "
                    f"{', '.join(map(repr, ISOLATIONS))}")
        elif key == "priority":
            if isinstance(value, bool) or not isinstance(value, int):
                raise TaskOptionError(f"task {task!r}: priority={value!r} must be an integer")
        elif key == "estimate":
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not (value >= 0 and math.isfinite(value)):
                    raise TaskOptionError(
                        f"task {task!r}: estimate={value!r} must be a number of seconds >= 0")
                value = float(value)
        elif key in ("timeout", "cpus", "memory") and callable(value):
            pass  # evaluated on the task's resolved arguments when it becomes ready
        elif key == "timeout":
            if value is not None:
                value = check_positive(value, f"task {task!r}", "timeout")
        elif key == "grace":
            value = check_grace(value, f"task {task!r}")
        elif key == "retry":
            if value is None or value == 0:
                value = None
            elif isinstance(value, int) and not isinstance(value, bool):
                try:
                    value = Retry(max_retries=value)
                except TaskOptionError as exc:
                    raise TaskOptionError(f"task {task!r}: {exc}") from None
            elif not isinstance(value, Retry):
                raise TaskOptionError(
                    f"task {task!r}: retry={value!r} must be px.Retry(...) or an int "
                    "(the number of retries)")
        elif key == "on_error":
            if value not in ON_ERRORS:
                raise TaskOptionError(
                    f"task {task!r}: on_error={value!r} is unknown; use one of "
                    f"{', '.join(map(repr, ON_ERRORS))}")
        elif key == "cpus":
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not (value > 0 and math.isfinite(value)):
                raise TaskOptionError(f"task {task!r}: cpus={value!r} must be a number > 0")
        elif key == "memory":
            if value is not None:
                try:
                    value = parse_size(value)
                except TaskOptionError as exc:
                    raise TaskOptionError(f"task {task!r}: {exc}") from None
        elif key == "pools":
            value = _check_pools(task, value)
        elif key == "after":
            if value is None:
                value = ()
            elif isinstance(value, (str, TaskRef)):
                value = (value,)
            else:
                value = tuple(value)
            for item in value:
                if not isinstance(item, (str, TaskRef)):
                    raise TaskOptionError(
                        f"task {task!r}: after= entries must be task refs or ids, got {item!r}")
        out[key] = value
    return out


def _check_pools(task: str, value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {value: 1}
    if isinstance(value, Mapping):
        pools: dict[str, int] = {}
        for name, units in value.items():
            if not isinstance(name, str) or isinstance(units, bool) \
                    or not isinstance(units, int) or units < 1:
                raise TaskOptionError(
                    f"task {task!r}: pools={dict(value)!r} must map pool names to whole "
                    "numbers of units >= 1, e.g. {'database': 1}")
            pools[name] = units
        return pools
    if isinstance(value, Iterable):
        names = list(value)
        if all(isinstance(n, str) for n in names):
            return {n: 1 for n in names}
    raise TaskOptionError(
        f"task {task!r}: pools={value!r} must be a pool name or a mapping like {{'database': 1}}")


# References inside arguments --------------------------------------------------------------
#
# Arguments are user data: they may nest deeper than the recursion limit or contain
# themselves (a tree with parent links). Both walks below are iterative, with a visited set.

_CONTAINERS = (list, tuple, dict, set, frozenset)


def _children(obj: Any) -> Iterable[Any]:
    return obj.values() if isinstance(obj, dict) else obj


def find_refs(obj: Any, found: list[TaskRef]) -> None:
    """Append every TaskRef inside ``obj`` (nested in list/tuple/dict/set) to ``found``.

    Refs come in order of appearance (depth first).
    """
    if isinstance(obj, TaskRef):
        found.append(obj)
        return
    if not isinstance(obj, _CONTAINERS):
        return
    seen = {id(obj)}
    stack = [iter(_children(obj))]
    while stack:
        for item in stack[-1]:
            if isinstance(item, TaskRef):
                found.append(item)
            elif isinstance(item, _CONTAINERS) and id(item) not in seen:
                seen.add(id(item))
                stack.append(iter(_children(item)))
                break
        else:
            stack.pop()


def resolve_args(args: tuple[Any, ...], values: list[Any]) -> tuple[Any, ...]:
    """Positional arguments with refs replaced by ``values[ref.index]``.

    This is the hot path: a flat tuple of refs and plain values walks nothing.
    """
    return tuple([values[a.index] if isinstance(a, TaskRef)
                  else resolve_refs(a, values.__getitem__) if isinstance(a, _CONTAINERS) else a
                  for a in args])


_BUILDING = object()  # memo marker of an immutable container whose items are not built yet


def resolve_refs(obj: Any, value_of: Callable[[int], Any]) -> Any:
    """Return ``obj`` with every TaskRef replaced by ``value_of(ref.index)``.

    Containers are copied (the copies keep their type, namedtuples and dict subclasses
    included); a container reached twice is copied once, so shared and self-referencing
    structures keep their shape.

    Raises:
        TaskOptionError: ``obj`` contains a cycle that runs through a tuple or frozenset
            (such a value cannot be rebuilt with its refs replaced).
    """
    if isinstance(obj, TaskRef):
        return value_of(obj.index)
    if not isinstance(obj, _CONTAINERS):
        return obj
    memo: dict[int, Any] = {}

    def start(x: Any) -> list[Any]:
        # A frame: [original, iterator over its items, the resolved items, the copy or None].
        # Mutable containers get their (empty) copy at once, so a cycle back to them finds it.
        copy: Any = None
        if isinstance(x, list):
            copy = []
        elif isinstance(x, dict):
            copy = {} if type(x) is dict else x.copy()
        elif isinstance(x, set):
            copy = type(x)()
        memo[id(x)] = _BUILDING if copy is None else copy
        items = iter(x.items()) if isinstance(x, dict) else iter(x)
        return [x, items, [], copy]

    def finish(frame: list[Any]) -> Any:
        x, _, items, copy = frame
        if isinstance(x, list):
            copy.extend(items)
        elif isinstance(x, dict):
            copy.update(items)
        elif isinstance(x, set):
            copy.update(items)
        elif isinstance(x, tuple):
            copy = type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
        else:  # frozenset
            copy = type(x)(items)
        memo[id(x)] = copy
        return copy

    stack = [start(obj)]
    result: Any = None
    while stack:
        frame = stack[-1]
        is_dict = isinstance(frame[0], dict)
        pushed = False
        for item in frame[1]:
            key, value = item if is_dict else (None, item)
            if isinstance(value, TaskRef):
                value = value_of(value.index)
            elif isinstance(value, _CONTAINERS):
                known = memo.get(id(value))
                if known is _BUILDING:
                    raise TaskOptionError(
                        "an argument contains a cycle through a tuple or frozenset together with "
                        "task refs; parexec cannot rebuild it: use a list or dict for the cycle")
                if known is None:
                    frame.append(key)  # where the child's copy goes once it is built
                    stack.append(start(value))
                    pushed = True
                    break
                value = known
            frame[2].append((key, value) if is_dict else value)
        if pushed:
            continue
        stack.pop()
        result = finish(frame)
        if stack:
            parent = stack[-1]
            key = parent.pop()
            parent[2].append((key, result) if isinstance(parent[0], dict) else result)
    return result


# Templates --------------------------------------------------------------------------------

def check_callable(fn: Any) -> None:
    """Refuse what cannot be a task's function: non-callables and generator functions."""
    import inspect
    if not callable(fn):
        raise TaskOptionError(f"px.task needs a callable, got {fn!r}")
    target = getattr(fn, "func", fn)  # functools.partial
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        raise TaskOptionError(
            f"{_fn_name(fn)} is a generator function: as a task its value would be an "
            "unconsumed generator. Return a list (e.g. `return list(gen())`) instead")


def _fn_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        inner = getattr(fn, "func", None)  # functools.partial
        name = getattr(inner, "__name__", None) or type(fn).__name__
    return name


class TaskTemplate(Generic[P, R]):
    """A function declared as a task, with its default options.

    Called inside ``with px.Workflow(...)``, it adds a task and returns a ``TaskRef``;
    called outside any workflow, it calls the function and returns its value.

    Attributes:
        fn: The plain function.
    """

    def __init__(self, fn: Callable[P, R], options: Mapping[str, Any] | None = None) -> None:
        check_callable(fn)
        self.fn = fn
        self._options = check_options(_fn_name(fn), options or {})
        functools.update_wrapper(self, fn)

    @property
    def default_options(self) -> dict[str, Any]:
        """The options every task made from this template starts with."""
        return dict(self._options)

    def options(self, **overrides: Any) -> TaskTemplate[P, R]:
        """Return a new template with some options replaced.

        Example: ``load.options(id="load-b", timeout=5)("b.csv")``.
        """
        name = overrides.get("id") or self._options.get("id") or _fn_name(self.fn)
        merged = {**self._options, **check_options(name, overrides)}
        return TaskTemplate(self.fn, merged)

    @overload
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...
    @overload
    def __call__(self, *args: Any, **kwargs: Any) -> TaskRef: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from ._workflow import current_workflow
        wf = current_workflow()
        if wf is None:
            if args or kwargs:
                refs: list[TaskRef] = []
                find_refs(args, refs)
                find_refs(kwargs, refs)
                if refs:
                    raise TaskOptionError(
                        f"{_fn_name(self.fn)}(...) was called outside `with px.Workflow(...)` "
                        f"with {refs[0]!r}, the future value of a task: call it inside the "
                        f"workflow's `with` block (or use wf.add({_fn_name(self.fn)}, ...))")
            return self.fn(*args, **kwargs)
        return wf._add(self.fn, args, kwargs, self._options)

    def map(self, items: Any, *, max_concurrent: int | None = None, id: str | None = None,
            **kwargs: Any) -> MapRef:
        """Add one task per item (``fn(item, **kwargs)``) to the current workflow.

        ``items`` may be an iterable, or a ``TaskRef`` whose result is one: the tasks are
        then created at run time, when that result is known. The ``MapRef``'s value is the
        list of results in item order. See ``Workflow.map``.
        """
        from ._workflow import current_workflow
        wf = current_workflow()
        if wf is None:
            raise TaskOptionError(
                f"{_fn_name(self.fn)}.map(...) must be called inside `with px.Workflow(...)`; "
                "outside a workflow, call the function in a loop")
        return wf.map(self, items, max_concurrent=max_concurrent, id=id, **kwargs)

    def __repr__(self) -> str:
        return f"<TaskTemplate {_fn_name(self.fn)} {self._options}>"

    def __reduce__(self) -> Any:
        # A template pickles as its plain function's template: process tasks that call
        # other templates (outside a workflow they are plain calls) keep working.
        return (TaskTemplate, (self.fn, self._options))


@overload
def task(fn: Callable[P, R], /, **options: Any) -> TaskTemplate[P, R]: ...
@overload
def task(fn: None = None, /, **options: Any) -> Callable[[Callable[P, R]], TaskTemplate[P, R]]: ...


def task(fn: Callable[P, R] | None = None, /, **options: Any) -> Any:
    """Declare a function as a task.

    Three spellings: ``@px.task``, ``@px.task(**options)`` or ``px.task(fn, **options)``.

    Usage::

        @px.task(isolation="process", memory="2GB", timeout=60, retry=3)
        def fit(frame, alpha=1.0): ...

        with px.Workflow("train") as wf:
            model = fit.options(id="fit-small", priority=5)(frame, alpha=0.1)

    Called inside ``with px.Workflow(...)``, the template adds a task and returns a
    ``TaskRef``; anywhere else it calls the function. ``.options(**overrides)`` returns a new
    template, e.g. to name a task: ``load.options(id="load-b")("b.csv")``.

    Args:
        fn: The function (for the bare decorator and ``px.task(fn, ...)``). ``async def``
            functions are run to completion on an event loop in their worker; generator
            functions are refused (their value would be an unconsumed generator).
        **options: Any of:

            * ``id`` (str): the task's id, unique in its workflow (default: the function's
              name, then ``name-2``, ``name-3``, ...). ``[``, ``]`` and control characters
              are not allowed.
            * ``name`` (str): display name (default: the id).
            * ``isolation`` (``"thread"`` | ``"process"`` | ``"cluster"``): where it runs
              (default: the workflow's, ``"thread"``). Process tasks run in worker processes
              and can be killed; thread tasks share the interpreter.
            * ``priority`` (int, default 0): among ready tasks, a HIGHER priority starts
              first; ties go to the longer remaining critical path, then creation order.
            * ``estimate`` (seconds, default None): expected duration, used to rank the
              critical path (1 s per task when unknown; a store's recorded durations fill in).
            * ``timeout`` (seconds, default None): bound of ONE attempt; a process task that
              overruns is killed alone, a thread task is marked timed out and flagged.
            * ``grace`` (seconds >= 0, default the run's, else the workflow's, else 0):
              with ``grace > 0``, a task that times out or is cancelled first gets
              ``px.TaskTimeout`` (or ``px.Cancelled``) raised inside it, so its ``except``,
              ``finally`` and ``with`` blocks run. A process task still running ``grace``
              seconds later is killed (its ``finally`` blocks then do not run). In a thread
              the exception interrupts Python code only, not a blocking C call such as
              ``time.sleep`` or a socket read: it lands once that call returns, and until
              then the thread holds its slot as with ``grace=0``. The task's outcome is
              decided at the timeout or cancel: catching the exception does not save it.
            * ``retry`` (``px.Retry(...)`` or int = max_retries, default no retry).
            * ``on_error`` (``"fail"`` | ``"skip"`` | ``"ignore"``, default ``"fail"``): stop
              the run / skip the dependents / give dependents ``default``.
            * ``cpus`` (float > 0, default 1): cores the task uses, counted against the CPU
              budget; also caps BLAS/OpenMP threads inside the task.
            * ``memory`` (bytes or a string like ``"512MB"``/``"2GiB"``, default None): peak
              memory the task needs, counted against the memory budget; a process task whose
              worker's resident memory (interpreter included) exceeds it is stopped. With a
              ``store=`` and no ``memory``, the peak of the task's last success is its need.
            * ``memory``, ``cpus`` and ``timeout`` may also be callables of the task's
              resolved arguments, evaluated when it becomes ready, e.g.
              ``memory=lambda frame: 3 * frame.nbytes``. A callable that raises or returns
              an unusable value fails the task with ``TaskOptionError``; a need above the
              budget fails it with ``ResourceError`` (both under its ``on_error``).
            * ``pools`` (``{"name": units}`` or ``"name"`` = 1 unit): named resource pools of
              the workflow the task holds while it runs.
            * ``after`` (list of refs or ids): ordering-only dependencies.
            * ``default`` (any, default None): what dependents receive when
              ``on_error="ignore"`` swallowed a failure.

    Returns:
        A ``TaskTemplate``, or a decorator producing one.

    Raises:
        TaskOptionError: An option is unknown or has an unusable value (the message names
            the task and the closest option).
    """
    if fn is not None:
        return TaskTemplate(fn, options)

    def decorate(f: Callable[P, R]) -> TaskTemplate[P, R]:
        return TaskTemplate(f, options)
    return decorate
