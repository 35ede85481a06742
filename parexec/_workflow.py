"""Workflows: a named set of task specs, and the ``with`` block that fills it.

A workflow is data. It holds specs in creation order; ``validate()`` compiles them into a
``Graph`` (cached until the next change) and checks resources against the workflow's own
settings. Running it is the scheduler's business (``px.run`` / ``px.start``).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._errors import DuplicateTaskError, MissingDependencyError, TaskOptionError
from ._events import check_kind
from ._gates import check_resources
from ._graph import Graph, compile_graph, critical_path, levels, to_dot
from ._options import (
    check_batch,
    check_capacities,
    check_cpu_budget,
    check_grace,
    check_id,
    check_isolation,
    check_max_concurrent,
    check_max_tasks_per_worker,
    check_max_workers,
    check_memory,
    check_timeout,
    check_wait,
)
from ._task import (
    _SCALARS,
    GroupInfo,
    GroupRef,
    MapRef,
    TaskRef,
    TaskSpec,
    TaskTemplate,
    _active,
    _fn_name,
    check_callable,
    check_options,
    current_workflow,
    find_refs,
)

if TYPE_CHECKING:
    from ._events import Event

__all__ = ["Workflow", "current_workflow", "group"]


class Workflow:
    """A named graph of tasks.

    Usage::

        with px.Workflow("etl", max_workers=4, pools={"database": 2}) as wf:
            a = load("a.csv")
            b = load("b.csv")
            merge(a, b)
        result = px.run(wf)

    Args:
        name: The workflow's name (shown in events, summaries and traces).
        max_workers: Default number of task slots for runs of this workflow.
        pools: Named resource pools and their capacities, e.g. ``{"database": 2}``.
        memory_budget: Default memory budget (bytes or ``"16GB"``).
        cpu_budget: Default CPU budget (cores).
        isolation: Default isolation of tasks that do not choose one.
        timeout: Default time limit of a whole run, in seconds.
        description: Free text.
        grace: Default ``grace`` (seconds) of tasks that set none, when the run sets none
            either (default 0); see ``px.task``.
        max_tasks_per_worker: Default of ``px.run``'s option: replace a process worker
            after it ran this many tasks (None: never).

    Raises:
        TaskOptionError: A setting has an unusable value.
    """

    def __init__(self, name: str = "workflow", *, max_workers: int | None = None,
                 pools: Mapping[str, int] | None = None,
                 memory_budget: int | str | None = None, cpu_budget: float | None = None,
                 isolation: str = "thread", timeout: float | None = None,
                 description: str = "", grace: float | None = None,
                 max_tasks_per_worker: int | None = None) -> None:
        self.name = check_id(name, "Workflow name", brackets=False)
        self.max_workers = check_max_workers(max_workers, f"Workflow {name!r}")
        self.pools: dict[str, int] = check_capacities(pools or {}, f"Workflow {name!r}")
        self.memory_budget = check_memory(memory_budget, f"Workflow {name!r}", "memory_budget")
        self.cpu_budget = check_cpu_budget(cpu_budget, f"Workflow {name!r}")
        self.isolation = check_isolation(isolation, f"Workflow {name!r}")
        self.timeout = check_timeout(timeout, f"Workflow {name!r}")
        self.grace = check_grace(grace, f"Workflow {name!r}")
        self.max_tasks_per_worker = check_max_tasks_per_worker(max_tasks_per_worker,
                                                               f"Workflow {name!r}")
        self.description = description
        self._specs: dict[str, TaskSpec] = {}
        self._name_counts: dict[str, int] = {}
        self._graph: Graph | None = None
        self._listeners: list[tuple[str, Callable[[Event], Any]]] = []
        self._token: contextvars.Token[tuple[Workflow, ...]] | None = None

    # The with block -------------------------------------------------------------------

    def __enter__(self) -> Workflow:
        self._token = _active.set(_active.get() + (self,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _active.reset(self._token)
            self._token = None

    # Building -------------------------------------------------------------------------

    def add(self, fn: Callable[..., Any] | TaskTemplate[Any, Any], /, *args: Any,
            **kwargs: Any) -> TaskRef:
        """Add a task calling ``fn(*args, **kwargs)`` and return its ``TaskRef``.

        ``fn`` may be a plain function or a ``TaskTemplate`` (whose options apply). To give
        options, use a template: ``wf.add(load.options(id="load-b"), "b.csv")``.
        """
        if isinstance(fn, TaskTemplate):
            return self._add(fn.fn, args, kwargs, fn._options)
        if not callable(fn):
            raise TaskOptionError(f"Workflow.add needs a function or a px.task, got {fn!r}")
        check_callable(fn)
        return self._add(fn, args, kwargs, {})

    def _add(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             options: Mapping[str, Any]) -> TaskRef:
        tid = options.get("id")
        if tid is None:
            tid = self._auto_id(_fn_name(fn))
        elif tid in self._specs:
            raise DuplicateTaskError(
                f"workflow {self.name!r} already has a task with id {tid!r}; give this task "
                "another id= (ids must be unique within a workflow)")
        refs: list[TaskRef] = []
        if args:
            find_refs(args, refs)
        if kwargs:
            find_refs(kwargs, refs)
        after = options.get("after", ())
        deps: tuple[str, ...] = ()
        if refs or after:
            seen: dict[str, None] = {}
            for ref in refs:
                self._check_ref(tid, ref)
                seen[ref.id] = None
            for item in after:
                if isinstance(item, TaskRef):
                    self._check_ref(tid, item)
                    item = item.id
                seen[item] = None
            deps = tuple(seen)
        index = len(self._specs)
        self._specs[tid] = TaskSpec(tid, fn, args, kwargs, deps, bool(refs), options)
        self._graph = None
        return TaskRef(self, tid, index)

    def group(self, members: Iterable[TaskRef], *, wait: str = "all",
              max_concurrent: int | None = None, timeout: float | None = None,
              id: str | None = None, on_error: str = "fail", default: Any = None) -> GroupRef:
        """Add a group of tasks resolved by a wait strategy; see ``px.group``."""
        refs = list(members) if not isinstance(members, TaskRef) else None
        if id is not None:
            check_id(id, "group id")
        gid = id or "group"
        if not refs:
            raise TaskOptionError(f"group {gid!r} needs a non-empty list of task refs")
        for ref in refs:
            if not isinstance(ref, TaskRef):
                raise TaskOptionError(
                    f"group {gid!r}: members must be refs returned by tasks of this workflow, "
                    f"got {ref!r}")
            self._check_ref(gid, ref)
        check_wait(wait, f"group {gid!r}")
        info = GroupInfo(wait, tuple(dict.fromkeys(r.id for r in refs)),
                         check_max_concurrent(max_concurrent, f"group {gid!r}"),
                         check_timeout(timeout, f"group {gid!r}"))
        return self._add_group(info, id, "group", on_error, default, GroupRef)  # type: ignore[return-value]

    def map(self, fn: Callable[..., Any] | TaskTemplate[Any, Any], items: Any, *,
            max_concurrent: int | None = None, id: str | None = None,
            batch: int | str = "auto", **kwargs: Any) -> MapRef:
        """Add one task per item, ``fn(item, **kwargs)``, and return a ``MapRef``.

        Task ids are ``name[0]``, ``name[1]``, ... where ``name`` is ``id`` or the function's
        name. The map's value is the list of results in item order; it fails like a group
        with ``wait="all"``. ``max_concurrent`` caps how many items run at once.

        Args:
            fn: A function or ``px.task`` template (its options apply to every item).
            items: An iterable, or a ``TaskRef`` whose result is an iterable (the tasks are
                then created at run time).
            max_concurrent: Most items running at once.
            id: Name of the map (and prefix of its tasks' ids).
            batch: How many items of a process map go to a worker in one message.
                ``"auto"`` (default) sizes batches from the items' measured durations so
                one batch runs for tens of milliseconds, which hides the round trip of
                tiny items; ``N`` fixes the size; ``1`` sends one item per message.
                Batching is invisible otherwise: each item keeps its own record, value,
                error, retries, events and progress; an item that overruns its
                ``timeout`` is timed out alone. Items with ``memory``, ``grace`` or a
                callable option are sent one by one, as are thread items.
            **kwargs: Fixed keyword arguments given to every call.
        """
        template = fn if isinstance(fn, TaskTemplate) else TaskTemplate(fn)
        options = template._options
        if id is not None:
            check_id(id, "map id")
        if id is not None and id in self._specs:
            raise DuplicateTaskError(
                f"workflow {self.name!r} already has a task with id {id!r}; give this map "
                "another id=")
        base = id if id is not None else self._auto_id(options.get("id") or _fn_name(template.fn))
        limit = check_max_concurrent(max_concurrent, f"map {base!r}")
        batch = check_batch(batch, f"map {base!r}")
        item_options = {k: v for k, v in options.items() if k not in ("id", "after")}
        if isinstance(items, TaskRef):
            self._check_ref(base, items)
            info = GroupInfo("all", (items.id,), limit, None, "list",
                             dynamic=(template.fn, item_options, kwargs, base), batch=batch)
            return self._add_group(info, base, "map", options.get("on_error", "fail"),
                                   options.get("default"), MapRef)  # type: ignore[return-value]
        try:
            values = list(items)
        except TypeError:
            raise TaskOptionError(
                f"map {base!r}: items={items!r} must be an iterable or a task ref") from None
        ids = self._add_items(base, template.fn, values, kwargs, item_options)
        info = GroupInfo("all", ids, limit, None, "list", batch=batch)
        # The map fails like its items (as a map over a task's result does).
        return self._add_group(info, base, "map", options.get("on_error", "fail"),
                               options.get("default"), MapRef)  # type: ignore[return-value]

    def _add_items(self, base: str, fn: Callable[..., Any], values: list[Any],
                   kwargs: dict[str, Any], options: dict[str, Any]) -> tuple[str, ...]:
        """Add the tasks ``base[k]`` calling ``fn(values[k], **kwargs)``; return their ids.

        An item holding no refs (a number, a string: the common case) is a copy of the
        first item's spec with its own id and argument; any other goes through ``_add``.
        """
        ids = tuple([f"{base}[{k}]" for k in range(len(values))])
        if not ids:
            return ids
        if not self._specs.keys().isdisjoint(ids):  # no user id holds brackets; a safeguard
            raise DuplicateTaskError(f"workflow {self.name!r} already has tasks named "
                                     f"{base}[...]; give this map another id=")
        refs: list[TaskRef] = []
        if kwargs:
            find_refs(kwargs, refs)
        for ref in refs:
            self._check_ref(base, ref)
        deps = tuple(dict.fromkeys([ref.id for ref in refs]))
        first = TaskSpec(ids[0], fn, (), kwargs, deps, bool(refs), options)
        specs, scalars = self._specs, _SCALARS
        for tid, item in zip(ids, values, strict=True):
            if type(item) in scalars:
                specs[tid] = first.variant(tid, (item,), deps, first.has_refs)
            else:  # it may hold refs: find them (and check them) as for any task
                self._add(fn, (item,), kwargs, {**options, "id": tid})
        self._graph = None
        return ids

    def _add_group(self, info: GroupInfo, gid: str | None, kind: str, on_error: str,
                   default: Any, ref_type: type[TaskRef]) -> TaskRef:
        options = check_options(gid or kind, {"on_error": on_error, "default": default})
        if gid is None:
            gid = self._auto_id(kind)
        elif gid in self._specs:
            raise DuplicateTaskError(
                f"workflow {self.name!r} already has a task with id {gid!r}; give this "
                f"{kind} another id=")
        index = len(self._specs)
        deps = info.members
        spec = TaskSpec(gid, _group_marker, (), {}, deps, False, options)
        spec.group = info
        self._specs[gid] = spec
        self._graph = None
        return ref_type(self, gid, index)

    def _auto_id(self, base: str) -> str:
        if not base.isprintable() or "[" in base or "]" in base:  # an odd __name__
            base = "".join(c if c.isprintable() and c not in "[]" else "_" for c in base) or "task"
        count = self._name_counts.get(base, 0)
        tid = base if count == 0 else f"{base}-{count + 1}"
        while tid in self._specs:
            count += 1
            tid = f"{base}-{count + 1}"
        self._name_counts[base] = count + 1
        return tid

    def _check_ref(self, tid: str, ref: TaskRef) -> None:
        if ref.workflow is not self:
            raise MissingDependencyError(
                f"task {tid!r} uses {ref!r} from workflow {ref.workflow.name!r}, not from "
                f"{self.name!r}; a task can only depend on tasks of its own workflow")

    # Introspection --------------------------------------------------------------------

    @property
    def tasks(self) -> Mapping[str, TaskSpec]:
        """Read-only mapping of task id to ``TaskSpec``, in creation order."""
        return MappingProxyType(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __getitem__(self, task_id: str | TaskRef) -> TaskSpec:
        key = task_id.id if isinstance(task_id, TaskRef) else task_id
        try:
            return self._specs[key]
        except KeyError:
            raise KeyError(f"workflow {self.name!r} has no task {key!r}") from None

    def __contains__(self, task_id: object) -> bool:
        key = task_id.id if isinstance(task_id, TaskRef) else task_id
        return key in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __repr__(self) -> str:
        return f"<Workflow {self.name!r} tasks={len(self._specs)}>"

    def _repr_html_(self) -> str:
        from ._display import workflow_html
        return workflow_html(self)

    # Checking and analysis ------------------------------------------------------------

    def validate(self) -> Workflow:
        """Check the workflow; raise on the first problem.

        Checks dependencies (missing ids, cycles) and resources against this workflow's
        settings (a pool a task names must exist and hold its units; ``cpus`` and
        ``memory`` must fit the budgets when they are set). ``px.run`` validates again
        against the run's own settings, and nothing runs when validation fails.

        Returns:
            The workflow, so calls can be chained.

        Raises:
            WorkflowError: a subclass naming the task and what to change.
        """
        graph = self.graph()
        check_resources(self, graph, cpu_budget=self.cpu_budget or self.max_workers,
                        memory_budget=self.memory_budget)
        return self

    def isolation_of(self, spec: TaskSpec) -> str:
        """Where ``spec``'s work runs: its isolation, else the workflow's.

        ``"group"`` for a group; for a map over a task's result, where its items run.
        """
        info = spec.group
        if info is not None:
            if info.dynamic is None:
                return "group"
            return info.dynamic[1].get("isolation") or self.isolation
        return spec.isolation or self.isolation

    def graph(self, estimates: Mapping[str, float] | None = None) -> Graph:
        """The compiled graph (cached while the workflow is unchanged)."""
        if estimates:
            return compile_graph(self._specs, self.name, estimates)
        if self._graph is None:
            self._graph = compile_graph(self._specs, self.name)
        return self._graph

    def levels(self) -> list[list[str]]:
        """Task ids grouped by dependency depth: each inner list can run in parallel."""
        return levels(self.graph())

    def critical_path(self) -> list[str]:
        """Ids along the longest path, weighted by ``estimate`` (1 per task where unknown)."""
        return critical_path(self.graph())

    def to_dot(self) -> str:
        """The graph as Graphviz DOT text."""
        self.graph()
        return to_dot(self.graph(), self._specs, self.name)

    # Events ---------------------------------------------------------------------------

    def on(self, kind: str, callback: Callable[[Event], Any]) -> Callable[[Event], Any]:
        """Call ``callback(event)`` for every event of ``kind`` in every run of this workflow.

        Args:
            kind: An event kind such as ``"task:failed"``, or ``"*"`` for all.
            callback: Called on the run's event thread; exceptions are logged, never raised.

        Returns:
            The callback, so ``on`` can be used as a decorator helper.
        """
        check_kind(kind)
        if not callable(callback):
            raise TaskOptionError(f"wf.on({kind!r}, ...) needs a callable, got {callback!r}")
        self._listeners.append((kind, callback))
        return callback


def _group_marker() -> None:
    """Stands for a group's function: groups are resolved by the scheduler, never called."""
    raise RuntimeError("a group is not a function")  # pragma: no cover


def group(members: Iterable[TaskRef], *, wait: str = "all", max_concurrent: int | None = None,
          timeout: float | None = None, id: str | None = None, on_error: str = "fail",
          default: Any = None) -> GroupRef:
    """Group tasks under a wait strategy; the ``GroupRef`` is usable as an argument.

    Usage::

        with px.Workflow("fetch") as wf:
            a, b, c = fetch("a"), fetch("b"), fetch("c")
            first = px.group([a, b, c], wait="any", timeout=5.0)
            report = summarize(first)

    ======================  ===========================  ============================
    ``wait``                value                        fails when
    ======================  ===========================  ============================
    ``"all"`` (default)     ``{id: value}``              any member fails
    ``"any"``               first successful value       every member failed
    ``"all_settled"``       ``{id: px.Outcome}``         never
    ``"race"``              value of the first to end    the first to end failed
    ======================  ===========================  ============================

    When a group resolves before all members ended, the unfinished ones are cancelled (unless
    another task still needs them): pending ones never start, process members are stopped,
    thread members get their cancel flag. Failures of members are the group's to judge; the
    group itself fails like a task with ``on_error``.

    Args:
        members: Refs of tasks (or groups, or maps) of one workflow.
        wait: The strategy, see the table.
        max_concurrent: Most members running at once (a member slot is refilled as soon as
            any member finishes).
        timeout: Seconds from the first member's start to the group's resolution.
        id: The group's id (default ``"group"``, ``"group-2"``, ...).
        on_error: ``"fail"``, ``"skip"`` or ``"ignore"``, as for tasks.
        default: The value dependents receive when ``on_error="ignore"`` swallowed a failure.

    Raises:
        TaskOptionError: Bad arguments.
    """
    refs = list(members) if not isinstance(members, TaskRef) else [members]
    wf = current_workflow()
    if wf is None:
        owners = {id_(r.workflow): r.workflow for r in refs if isinstance(r, TaskRef)}
        if len(owners) != 1:
            raise TaskOptionError(
                "px.group(...) needs refs of one workflow (call it inside `with px.Workflow`)")
        wf = next(iter(owners.values()))
    return wf.group(refs, wait=wait, max_concurrent=max_concurrent, timeout=timeout, id=id,
                    on_error=on_error, default=default)


id_ = id
