"""The public surface: __all__ lists exactly the public names, each documented."""

from __future__ import annotations

import inspect

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
