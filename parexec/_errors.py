"""Every exception parexec raises, in one place.

Hierarchy::

    ParexecError
    ├── WorkflowError                 the workflow is wrong; nothing ran
    │   ├── CycleError                (also ValueError)  "a -> b -> c -> a"
    │   ├── MissingDependencyError    (also ValueError)
    │   ├── DuplicateTaskError        (also ValueError)
    │   ├── TaskOptionError           (also ValueError)  a bad option value
    │   ├── ResourceError             (also ValueError)  a need above a capacity
    │   └── PicklingError             (also pickle.PicklingError)
    ├── TaskTimeout                   (also TimeoutError) one attempt overran
    ├── WorkerCrashed                 (also RuntimeError) a process worker died
    ├── MemoryLimitExceeded           (also MemoryError)
    ├── Cancelled                     raised by ``current().check()``
    ├── RemoteError                   a worker error that could not travel back as itself
    ├── ScriptError                   a YAML script step exited with a non-zero status
    ├── StoreError                    (also OSError)
    ├── WaitTimeout                   (also TimeoutError) ``Run.wait(timeout)`` expired
    └── WorkflowFailed                (also ExceptionGroup) raised by ``run(check=True)``

Every message names the task (or field) concerned and says what to change. Errors that cross
a process boundary are picklable: their constructor arguments are kept in ``args``.
"""

from __future__ import annotations

import pickle
import signal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._results import RunResult

__all__ = [
    "Cancelled",
    "CycleError",
    "DuplicateTaskError",
    "MemoryLimitExceeded",
    "MissingDependencyError",
    "ParexecError",
    "PicklingError",
    "RemoteError",
    "ResourceError",
    "ScriptError",
    "StoreError",
    "TaskOptionError",
    "TaskTimeout",
    "WaitTimeout",
    "WorkerCrashed",
    "WorkflowError",
    "WorkflowFailed",
]


class ParexecError(Exception):
    """Base class of every exception raised by parexec."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Explicit, so that pickling never takes tblib's path for classes it thinks have a
        # custom __init__ (installed globally by distributed): that path rebuilds through
        # ``MemoryError.__new__``, which CPython refuses for MemoryLimitExceeded.
        return (type(self), self.args, self.__dict__ or None)


class WorkflowError(ParexecError):
    """The workflow definition is invalid; nothing was run."""


class CycleError(WorkflowError, ValueError):
    """The dependencies form a cycle.

    Attributes:
        cycle: The task ids along the cycle, the first repeated at the end.
    """

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = list(cycle)
        path = " -> ".join(self.cycle)
        super().__init__(
            f"dependency cycle: {path}. Remove one of these dependencies "
            "(a data argument or an `after=` entry) to break the cycle."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.cycle,))


class MissingDependencyError(WorkflowError, ValueError):
    """A task depends on a task id that is not in the workflow."""


class DuplicateTaskError(WorkflowError, ValueError):
    """Two tasks were given the same id."""


class TaskOptionError(WorkflowError, ValueError):
    """A task or workflow option has a value parexec cannot use."""


class ResourceError(WorkflowError, ValueError):
    """A task needs more of a resource than the run could ever provide.

    Attributes:
        task_id: The task that asks too much.
        resource: The resource (``"cpus"``, ``"memory"``, or a pool name).
        need: What the task declares.
        capacity: What the run provides (None for an unknown pool).
    """

    def __init__(self, task_id: str, resource: str, need: float, capacity: float | None,
                 hint: str = "") -> None:
        self.task_id, self.resource, self.need, self.capacity = task_id, resource, need, capacity
        if capacity is None:
            msg = (f"task {task_id!r} uses pool {resource!r}, which the workflow does not "
                   f"declare; add it to Workflow(pools={{{resource!r}: N}}) or fix the name")
        else:
            fmt = format_size if resource == "memory" else _fmt
            msg = (f"task {task_id!r} needs {resource}={fmt(need)} but the capacity is "
                   f"{fmt(capacity)}; lower the task's need or raise the capacity")
        super().__init__(msg + (f" ({hint})" if hint else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task_id, self.resource, self.need, self.capacity))


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def format_size(n: float) -> str:
    """A byte count in decimal units, as users write them: ``"2 GB"``, ``"512 MB"``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


class PicklingError(WorkflowError, pickle.PicklingError):
    """A process task's function, arguments or return value cannot be pickled."""


class TaskTimeout(ParexecError, TimeoutError):
    """One attempt of a task ran longer than its ``timeout``."""


class WorkerCrashed(ParexecError, RuntimeError):
    """The process running a task died (segfault, ``os._exit``, a signal, the OOM killer).

    Attributes:
        exitcode: The worker's exit code; negative for a signal (``-9`` is SIGKILL).
    """

    def __init__(self, task_id: str, exitcode: int | None) -> None:
        self.task_id, self.exitcode = task_id, exitcode
        super().__init__(
            f"the worker process running task {task_id!r} died ({describe_exit(exitcode)}) "
            "before returning; likely causes: a segfault in a C extension, os._exit(), "
            "a kill signal, or the system running out of memory"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task_id, self.exitcode))


def user_stacklevel() -> int:
    """The ``stacklevel`` of a warning that points at the first frame outside parexec."""
    import sys
    frame, level = sys._getframe(1), 1
    package = __name__.rpartition(".")[0]
    while frame is not None and frame.f_globals.get("__name__", "").startswith(package + "."):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def describe_exit(exitcode: int | None) -> str:
    """Describe a process exit code, e.g. ``"signal SIGKILL(-9)"`` or ``"exit code 3"``."""
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "signal"
        return f"signal {name}({exitcode})"
    return f"exit code {exitcode}"


class MemoryLimitExceeded(ParexecError, MemoryError):
    """A process task used more memory than it declared with ``memory=``."""


class Cancelled(ParexecError):
    """The task was cancelled; raised inside a task by ``px.current().check()``."""


class RemoteError(ParexecError):
    """An error raised in a worker that could not be sent back as itself.

    It carries the original type name and the worker-side traceback as text.

    Attributes:
        type_name: Qualified name of the original exception type.
        remote_traceback: The traceback as formatted in the worker.
    """

    def __init__(self, message: str, type_name: str = "", remote_traceback: str = "") -> None:
        self.type_name, self.remote_traceback = type_name, remote_traceback
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.type_name, self.remote_traceback))

    def __str__(self) -> str:
        text = str(self.args[0])
        if self.remote_traceback:
            text += "\n\nWorker traceback:\n" + self.remote_traceback.rstrip()
        return text


class ScriptError(ParexecError):
    """A script step exited with a non-zero status (127: it could not be started).

    The message ends with the last lines the step wrote to stderr, or, when it wrote
    nothing there, the last lines of its stdout.

    Attributes:
        step: The step id.
        returncode: The exit status (negative: killed by that signal).
        stderr: The last lines the step wrote to stderr.
        stdout: The last lines the step wrote to stdout.
    """

    def __init__(self, step: str, returncode: int, stderr: str, stdout: str = "") -> None:
        self.step, self.returncode, self.stderr, self.stdout = step, returncode, stderr, stdout
        if stderr.strip():
            tail = f"; last lines of stderr:\n{stderr}"
        elif stdout.strip():
            tail = f"; last lines of stdout:\n{stdout}"
        else:
            tail = ""
        super().__init__(f"step {step!r} exited with status {returncode}{tail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.returncode, self.stderr, self.stdout))


class StoreError(ParexecError, OSError):
    """The result store cannot be used (corrupt, locked, unwritable); names its file."""


class WaitTimeout(ParexecError, TimeoutError):
    """``Run.wait(timeout=...)`` returned before the run finished."""


class WorkflowFailed(ExceptionGroup, ParexecError):
    """Raised by ``run(check=True)`` when the run failed or timed out.

    It is an ``ExceptionGroup`` of the errors of the failed tasks, so ``except*`` works on
    the task errors' types.

    Attributes:
        result: The ``RunResult`` of the run, with every completed task's value.
    """

    result: RunResult

    def __new__(cls, message: str, exceptions: list[Exception],
                result: RunResult | None = None) -> WorkflowFailed:
        self = super().__new__(cls, message, exceptions)
        self.result = result  # type: ignore[assignment]
        return self

    def __init__(self, message: str, exceptions: list[Exception],
                 result: RunResult | None = None) -> None:
        super().__init__(message, exceptions)

    def derive(self, excs: Any) -> WorkflowFailed:  # type: ignore[override]  # noqa: D102
        # except* and .split() build parts through derive(): they stay WorkflowFailed and
        # keep the run's result.
        return WorkflowFailed(self.message, list(excs), self.result)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, list(self.exceptions), self.result))
