"""Compile a workflow's specs into integer-indexed arrays, and check them.

``compile_graph`` runs once per validation. Everything after it (levels, critical path, the
scheduler's release of dependents) works on ints and lists, in O(V + E):

* ``ids[i]``         task id of index ``i`` (indices follow creation order, as ``ref.index``)
* ``deps[i]``        indices ``i`` depends on
* ``dependents[i]``  indices that depend on ``i``
* ``order``          a topological order (Kahn's algorithm, creation order among equals)
* ``rank[i]``        the longest estimated path from ``i`` to a sink, ``i`` included
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import CycleError, MissingDependencyError
from ._task import TaskSpec

__all__ = ["Graph", "Readiness", "compile_graph", "critical_path", "depths", "levels", "to_dot"]


@dataclass(eq=False)
class Graph:
    """A validated task graph; see the module docstring for the fields."""

    ids: list[str]
    deps: list[tuple[int, ...]]
    dependents: list[tuple[int, ...]]
    order: list[int]
    estimates: list[float]
    rank: list[float]


class Readiness:
    """Which tasks of one run may start, in the protocol of ``graphlib.TopologicalSorter``.

    ``prepare()`` gives the tasks with no dependencies, ``done(i)`` the tasks ``i`` was the
    last missing dependency of, and ``add()`` appends a task created while the run goes on
    (a map item). The counts and the dependents lists belong to the run: the ``Graph`` is
    shared by every run of its workflow and is never changed.

    Groups and maps are not counted: they hear of their members from the scheduler
    (``_groups``), and a map over a task's result is expanded when that task is done.
    """

    __slots__ = ("dependents", "npending", "group")

    def __init__(self, graph: Graph, is_group: Sequence[bool]) -> None:
        # The graph's rows, then those of run-time items (a submission's grows: ``_submit``).
        self.dependents: list[Sequence[int]] = list(graph.dependents)
        self.npending = [len(d) for d in graph.deps]
        self.group = list(is_group)

    def prepare(self) -> list[int]:
        """The tasks (not groups) that depend on nothing."""
        group = self.group
        return [i for i, k in enumerate(self.npending) if not k and not group[i]]

    def done(self, i: int) -> list[int]:
        """Task ``i`` finished: the tasks whose last missing dependency it was."""
        npending, group = self.npending, self.group
        ready = []
        for j in self.dependents[i]:
            if group[j]:
                continue
            k = npending[j] = npending[j] - 1
            if not k:
                ready.append(j)
        return ready

    def add(self) -> int:
        """Append a task with no dependencies and no dependents yet; return its index."""
        self.npending.append(0)
        self.dependents.append(())
        self.group.append(False)
        return len(self.npending) - 1


def compile_graph(specs: Mapping[str, TaskSpec], workflow: str = "",
                  estimates: Mapping[str, float] | None = None) -> Graph:
    """Index the specs and check their dependencies.

    Args:
        specs: Task specs by id, in creation order.
        workflow: The workflow name, for messages.
        estimates: Durations to use for tasks that declare no ``estimate`` (e.g. learned
            from a store); 1 second per task where neither is known.

    Raises:
        MissingDependencyError: A task depends on an id that is not in ``specs``.
        CycleError: The dependencies form a cycle (the message lists it).
    """
    ids = list(specs)
    index = {tid: i for i, tid in enumerate(ids)}
    n = len(ids)
    # Rows are tuples (one shared empty one for most tasks): tuples of ints are not tracked
    # by the garbage collector, whose full collections would otherwise walk two lists per
    # task of a large map on every run (issue 16).
    none: tuple[int, ...] = ()
    deps = [none] * n
    users: list[list[int] | None] = [None] * n
    for i, spec in enumerate(specs.values()):
        if not spec.deps:
            continue
        row = []
        for dep in spec.deps:
            j = index.get(dep)
            if j is None:
                raise _missing(spec.id, dep, ids, workflow)
            row.append(j)
            up = users[j]
            if up is None:
                users[j] = [i]
            else:
                up.append(i)
        deps[i] = tuple(row)
    dependents = [tuple(r) if r is not None else none for r in users]

    # Kahn's algorithm; a plain list used as a FIFO keeps creation order among ready nodes.
    npending = [len(d) for d in deps]
    order = [i for i in range(n) if not npending[i]]
    pos = 0
    while pos < len(order):
        for j in dependents[order[pos]]:
            npending[j] -= 1
            if not npending[j]:
                order.append(j)
        pos += 1
    if len(order) < n:
        raise CycleError(_find_cycle(ids, deps, npending))

    learned = estimates or {}
    est = [1.0] * n
    for i, spec in enumerate(specs.values()):
        if spec.estimate is not None:
            est[i] = spec.estimate
        elif spec.id in learned:
            est[i] = learned[spec.id]
    rank = est[:]
    for i in reversed(order):
        below = dependents[i]
        if below:
            rank[i] = est[i] + (rank[below[0]] if len(below) == 1
                                else max([rank[j] for j in below]))
    return Graph(ids, deps, dependents, order, est, rank)


def _missing(task: str, dep: str, ids: Sequence[str], workflow: str) -> MissingDependencyError:
    where = f"workflow {workflow!r}" if workflow else "the workflow"
    close = difflib.get_close_matches(dep, ids, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else \
        "; add that task first or fix the id in `after=`"
    return MissingDependencyError(
        f"task {task!r} depends on {dep!r}, which is not in {where}{hint}")


def _find_cycle(ids: list[str], deps: Sequence[Sequence[int]],
                npending: list[int]) -> list[str]:
    """Return one cycle among the nodes Kahn's algorithm could not order.

    The ids are in data-flow order (upstream first), the first id repeated at the end.
    """
    stuck = {i for i, k in enumerate(npending) if k}
    start = min(stuck)
    # Every stuck node has a stuck dependency, so walking up dependencies must revisit a node.
    seen: dict[int, int] = {}
    path: list[int] = []
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(j for j in deps[node] if j in stuck)
    loop = path[seen[node]:]
    loop.reverse()  # walked downstream -> upstream; report upstream -> downstream
    # Start the message at the earliest-created task of the loop, so it reads naturally.
    k = loop.index(min(loop))
    loop = loop[k:] + loop[:k]
    return [ids[i] for i in loop] + [ids[loop[0]]]


def depths(graph: Graph) -> list[int]:
    """The dependency depth of every task.

    0 for a task without dependencies, else one more than its deepest dependency.
    """
    depth = [0] * len(graph.ids)
    for i in graph.order:
        d = graph.deps[i]
        if d:
            depth[i] = 1 + max(depth[j] for j in d)
    return depth


def levels(graph: Graph) -> list[list[str]]:
    """Group task ids by dependency depth: level 0 has no dependencies."""
    depth = depths(graph)
    out: list[list[str]] = [[] for _ in range(max(depth, default=-1) + 1)]
    for i, k in enumerate(depth):
        out[k].append(graph.ids[i])
    return out


def critical_path(graph: Graph, weights: Sequence[float] | None = None) -> list[str]:
    """The ids along the longest path, weighted by ``weights`` (default: the estimates)."""
    w = graph.estimates if weights is None else weights
    n = len(graph.ids)
    if not n:
        return []
    dist = [0.0] * n
    back = [-1] * n
    for i in graph.order:
        best, arg = 0.0, -1
        for j in graph.deps[i]:
            if dist[j] > best or arg < 0:
                best, arg = dist[j], j
        dist[i] = w[i] + best
        back[i] = arg
    end = dist.index(max(dist))  # the first of the longest
    path = []
    while end >= 0:
        path.append(graph.ids[end])
        end = back[end]
    path.reverse()
    return path


def to_dot(graph: Graph, specs: Mapping[str, TaskSpec], name: str = "workflow") -> str:
    """Graphviz DOT text: one node per task, one edge per dependency (upstream -> downstream).

    Ordering-only (``after=``) edges are dashed.
    """
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(name)} {{", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
    for tid, spec in specs.items():
        label = spec.name if spec.name == tid else f"{spec.name}\\n({tid})"
        extra = "" if spec.isolation in (None, "thread") else f", color={q('blue')}"
        lines.append(f"  {q(tid)} [label={q(label)}{extra}];")
    for tid, spec in specs.items():
        data = _data_deps(spec)
        for dep in spec.deps:
            style = "" if dep in data else " [style=dashed]"
            lines.append(f"  {q(dep)} -> {q(tid)}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _data_deps(spec: TaskSpec) -> set[str]:
    from ._task import find_refs
    found: list[Any] = []
    find_refs(spec.args, found)
    find_refs(spec.kwargs, found)
    return {r.id for r in found}
