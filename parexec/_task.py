"""Declaring tasks: ``px.task``, its options, and the references tasks pass to each other.

A ``TaskTemplate`` is what ``@px.task`` returns. Called inside ``with px.Workflow(...)``
it adds one ``TaskSpec`` to that workflow and returns a ``TaskRef``; called anywhere else it
simply calls the function. Any ``TaskRef`` found in the arguments (also inside lists,
tuples, dicts and sets) is a data dependency, replaced by the upstream task's value before
the call.

Options are checked when they are given, so a typo fails at definition time, naming the task
(the checks themselves live in ``_options``, shared with workflows, runs, YAML and the CLI).
The stack of open ``with px.Workflow(...)`` blocks lives here too: templates read it on every
call, and ``_workflow`` imports this module, so keeping it here leaves no import cycle.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, overload

from ._errors import TaskOptionError
from ._options import Retry, parse_size, sized_value  # re-exported: they used to live here
from ._options import check_options as _check_options

if TYPE_CHECKING:
    from ._workflow import Workflow

__all__ = ["GroupInfo", "GroupRef", "MapRef", "Outcome", "Retry", "TaskRef", "TaskSpec",
           "TaskTemplate", "check_callable", "check_options", "current_workflow", "parse_size",
           "resolve_args", "resolve_refs", "sized_value", "task"]

P = ParamSpec("P")
R = TypeVar("R")

Isolation = Literal["thread", "process", "cluster"]
OnError = Literal["fail", "skip", "ignore"]
# The workflows whose ``with`` block is open in this context, innermost last. It lives here,
# not in ``_workflow``, because templates read it on every call and ``_workflow`` imports
# this module: keeping it here leaves no import cycle between the two.
_active: contextvars.ContextVar[tuple[Workflow, ...]] = contextvars.ContextVar(
    "parexec_active_workflows", default=())


def current_workflow() -> Workflow | None:
    """The innermost workflow whose ``with`` block is open in this context, if any."""
    stack = _active.get()
    return stack[-1] if stack else None


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


@dataclass(frozen=True)
class GroupInfo:
    """What makes a spec a group: its members and strategy (``TaskSpec.group``).

    ``dynamic`` is set for a map over a task's result: ``(fn, options, fixed_kwargs, base)``,
    expanded into member tasks ``base[0]``, ``base[1]``, ... once the source is done.
    ``batch`` (maps) is how many process items go to a worker at once: ``"auto"`` or a count.
    """

    wait: str
    members: tuple[str, ...]
    max_concurrent: int | None = None
    timeout: float | None = None
    output: str = "dict"  # "dict" (group) or "list" (map)
    dynamic: tuple[Any, ...] | None = None
    batch: int | str = "auto"


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

    def variant(self, id: str, args: tuple[Any, ...], deps: tuple[str, ...],
                has_refs: bool) -> TaskSpec:
        """A copy with another id, arguments and dependencies: a map's next item.

        The items of a map share every option, so they are copied from a first spec rather
        than parsed again for each of possibly 100,000 items.
        """
        new = _new(TaskSpec)
        new.id = id
        new.name = id if self.name is self.id else self.name  # named after its id, or not
        new.fn = self.fn
        new.args = args
        new.kwargs = self.kwargs
        new.deps = deps
        new.has_refs = has_refs
        new.isolation = self.isolation
        new.priority = self.priority
        new.estimate = self.estimate
        new.timeout = self.timeout
        new.grace = self.grace
        new.retry = self.retry
        new.on_error = self.on_error
        new.cpus = self.cpus
        new.memory = self.memory
        new.pools = self.pools
        new.default = self.default
        new.group = self.group
        new.exclusive = self.exclusive
        new.sizers = self.sizers
        return new

    def __repr__(self) -> str:
        fn = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"<TaskSpec {self.id!r} fn={fn} deps={list(self.deps)}>"


_new = object.__new__


# Option parsing ---------------------------------------------------------------------------

def check_options(task: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise task options; return them as a new dict (see ``_options``).

    Raises:
        TaskOptionError: An option is unknown or has an unusable value.
    """
    return _check_options(task, options, TaskRef)


# References inside arguments --------------------------------------------------------------
#
# Arguments are user data: they may nest deeper than the recursion limit or contain
# themselves (a tree with parent links). Both walks below are iterative, with a visited set.

_CONTAINERS = (list, tuple, dict, set, frozenset)
_SCALARS = frozenset({int, float, str, bytes, bool, type(None), complex})  # hold no refs


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
    if type(obj) is tuple and all(type(a) in _SCALARS for a in obj):
        return  # the common case, a map item's ``(item,)``: nothing to walk
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
            batch: int | str = "auto", **kwargs: Any) -> MapRef:
        """Add one task per item (``fn(item, **kwargs)``) to the current workflow.

        ``items`` may be an iterable, or a ``TaskRef`` whose result is one: the tasks are
        then created at run time, when that result is known. The ``MapRef``'s value is the
        list of results in item order. ``batch`` sends process items to a worker in batches
        (``"auto"``: sized from measured item durations; ``N``: N at a time; ``1``: one per
        message). See ``Workflow.map``.
        """
        wf = current_workflow()
        if wf is None:
            raise TaskOptionError(
                f"{_fn_name(self.fn)}.map(...) must be called inside `with px.Workflow(...)`; "
                "outside a workflow, call the function in a loop")
        return wf.map(self, items, max_concurrent=max_concurrent, id=id, batch=batch, **kwargs)

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
