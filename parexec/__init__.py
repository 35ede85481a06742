"""parexec: run a pipeline of Python functions as a task graph, as fast as the machine allows.

Usage::

    import parexec as px

    @px.task(isolation="process")
    def square(x):
        return x * x

    with px.Workflow("demo") as wf:
        parts = [square(i) for i in range(10)]
        total = px.task(sum)(parts)

    result = px.run(wf)
    print(result[total])
"""

from ._cache import worker_cache as worker_cache
from ._context import TaskContext as TaskContext
from ._context import current as current
from ._errors import Cancelled as Cancelled
from ._errors import CycleError as CycleError
from ._errors import DuplicateTaskError as DuplicateTaskError
from ._errors import MemoryLimitExceeded as MemoryLimitExceeded
from ._errors import MissingDependencyError as MissingDependencyError
from ._errors import ParexecError as ParexecError
from ._errors import PicklingError as PicklingError
from ._errors import RemoteError as RemoteError
from ._errors import ResourceError as ResourceError
from ._errors import ScriptError as ScriptError
from ._errors import StoreError as StoreError
from ._errors import TaskOptionError as TaskOptionError
from ._errors import TaskTimeout as TaskTimeout
from ._errors import WaitTimeout as WaitTimeout
from ._errors import WorkerCrashed as WorkerCrashed
from ._errors import WorkflowError as WorkflowError
from ._errors import WorkflowFailed as WorkflowFailed
from ._events import EVENT_KINDS as EVENT_KINDS
from ._events import Event as Event
from ._executor import Executor as Executor
from ._options import Retry as Retry
from ._options import parse_size as parse_size
from ._pools import shutdown as shutdown
from ._results import RunResult as RunResult
from ._results import RunStats as RunStats
from ._results import TaskRun as TaskRun
from ._run import Run as Run
from ._run import last_result as last_result
from ._run import run as run
from ._run import start as start
from ._status import RunStatus as RunStatus
from ._status import TaskStatus as TaskStatus
from ._store import Store as Store
from ._task import GroupRef as GroupRef
from ._task import MapRef as MapRef
from ._task import Outcome as Outcome
from ._task import TaskRef as TaskRef
from ._task import TaskSpec as TaskSpec
from ._task import TaskTemplate as TaskTemplate
from ._task import task as task
from ._workflow import Workflow as Workflow
from ._workflow import group as group
from ._yaml import StepOutput as StepOutput
from ._yaml import load as load
from ._yaml import loads as loads

__version__ = "0.1.0"

__all__ = [
    "EVENT_KINDS", "Cancelled", "CycleError", "DuplicateTaskError", "Event", "Executor",
    "GroupRef",
    "MapRef", "MemoryLimitExceeded", "MissingDependencyError", "Outcome", "ParexecError",
    "PicklingError", "RemoteError", "ResourceError", "Retry", "Run", "RunResult", "RunStats",
    "RunStatus", "ScriptError", "StepOutput", "Store", "StoreError", "TaskContext",
    "TaskOptionError", "TaskRef", "TaskRun", "TaskSpec", "TaskStatus", "TaskTemplate",
    "TaskTimeout", "WaitTimeout", "WorkerCrashed", "Workflow", "WorkflowError",
    "WorkflowFailed", "current", "group", "last_result", "load", "loads", "parse_size", "run",
    "shutdown", "start", "task", "worker_cache",
]

# Tracebacks and reprs say ``parexec.TaskTimeout``, not ``parexec._errors.TaskTimeout``.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or callable(_obj):
        try:
            _obj.__module__ = "parexec"
        except (AttributeError, TypeError):
            pass
del _name, _obj
