"""The public surface: __all__ lists exactly the public names, each documented."""

from __future__ import annotations

import inspect

import pytest

import parexec as px

API_NAMES = {  # spelled as in shared/design/API.md
    "task", "Workflow", "Retry", "run", "start", "current", "last_result", "Event",
    "RunResult", "TaskRun", "ParexecError", "WorkflowError", "CycleError",
    "MissingDependencyError", "DuplicateTaskError", "ResourceError", "PicklingError",
    "WorkflowFailed", "TaskTimeout", "WorkerCrashed", "MemoryLimitExceeded", "Cancelled",
    "StoreError", "TaskRef",
}


def test_all_matches_public_names():
    """__all__ lists every public name of the package and nothing else (submodules such as
    parexec.cli, an attribute once imported, are not names of the package)."""
    public = {n for n in dir(px)
              if not n.startswith("_") and not inspect.ismodule(getattr(px, n))}
    assert set(px.__all__) == public - {"annotations"}
    assert API_NAMES <= set(px.__all__)


def test_public_names_are_documented():
    """Every public class and function has a docstring."""
    for name in px.__all__:
        obj = getattr(px, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, name
            assert obj.__module__ == "parexec", name


def test_task_and_run_statuses_are_exported():
    """px.TaskStatus and px.RunStatus are exported; each member equals its text, and each
    docstring names every value."""
    assert {"TaskStatus", "RunStatus"} <= set(px.__all__)
    assert [str(s) for s in px.RunStatus] == [
        "succeeded", "partial", "failed", "cancelled", "timed_out"]
    assert {str(s) for s in px.TaskStatus if s.final} == {
        "succeeded", "failed", "skipped", "cancelled", "timed_out", "cached"}
    for enum in (px.TaskStatus, px.RunStatus):
        assert all(s == s.value and f"``{s.value!r}``".replace("'", '"') in enum.__doc__
                   for s in enum), enum
    assert px.TaskStatus.CACHED.ok and not px.TaskStatus.SKIPPED.ok


def _imports(path, *, lazy: bool = False) -> set[str]:
    """The parexec modules ``path`` imports at run time: when it is executed, and with
    ``lazy=True`` also inside its functions and classes (never under
    ``if TYPE_CHECKING:``)."""
    import ast
    found: set[str] = set()
    todo = list(ast.parse(path.read_text(), str(path)).body)
    while todo:  # a work list, not recursion
        node = todo.pop()
        if lazy and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            todo += node.body
        elif lazy and isinstance(node, ast.For | ast.While | ast.AsyncWith | ast.AsyncFor):
            todo += node.body + node.orelse if hasattr(node, "orelse") else node.body
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                todo += node.body
            todo += node.orelse
        elif isinstance(node, ast.Try | ast.With):
            todo += node.body
            todo += getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            for handler in getattr(node, "handlers", []):
                todo += handler.body
        elif isinstance(node, ast.ImportFrom):
            base = ("parexec" if node.level == 1 else "") + (
                ("." if node.level == 1 and node.module else "") + (node.module or ""))
            if base == "parexec":  # from . import _x
                found.update(f"parexec.{a.name}" for a in node.names)
            elif base.startswith("parexec."):
                found.add(".".join(base.split(".")[:2]))
        elif isinstance(node, ast.Import):
            found.update(".".join(a.name.split(".")[:2]) for a in node.names
                         if a.name.startswith("parexec."))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module
    (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _import_graph(lazy: bool) -> dict[str, set[str]]:
    import pathlib
    package = pathlib.Path(px.__file__).parent
    return {f"parexec.{p.stem}": _imports(p, lazy=lazy) - {"parexec", "parexec.__init__"}
            for p in package.glob("*.py") if p.stem != "__init__"}


def test_no_module_imports_one_that_imports_it_back():
    """No parexec module imports (at module level) one that imports it back, neither at
    module level nor inside a function (issue 14: _results <-> _display, _task <->
    _workflow and _workflow <-> _gates were such cycles); TYPE_CHECKING imports are left
    out, and so are cycles made only of imports inside functions."""
    eager, lazy = _import_graph(False), _import_graph(True)
    assert _cycles(eager) == []  # a cycle of module-level imports fails at import time
    back = sorted(f"{a} <-> {b}" for a, deps in eager.items() for b in deps
                  if a in lazy.get(b, ()))
    assert back == []
    assert "parexec._results" not in eager["parexec._display"]


def test_the_cycle_finder_finds_cycles():
    """_cycles reports a cycle, a self-contained chain is not one, and a 3-cycle is found
    whole (so the test above cannot pass by finding nothing)."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.timeout(300)
def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each parexec module can be the first one imported (no import-order dependence): one
    child interpreter imports them one by one, forgetting parexec in between."""
    import json
    import pathlib
    import subprocess
    import sys
    package = pathlib.Path(px.__file__).parent
    names = sorted(f"parexec.{p.stem}" for p in package.glob("*.py")
                   if p.stem not in ("__init__", "__main__"))
    script = (
        "import importlib, json, sys, traceback\n"
        "failed = {}\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'parexec' or m.startswith('parexec.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BaseException:\n"
        "        failed[name] = traceback.format_exc(limit=-3)\n"
        "print(json.dumps(failed))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, cwd=package.parent)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {}
