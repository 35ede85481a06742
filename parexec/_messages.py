"""The messages a run's scheduler receives on its queue, one class per kind.

Pools, the monitor and the ``Run`` handle never change run state: they put one of these on
the run's queue and the scheduler thread acts (``Scheduler.handle``). Everything a worker
measured about an attempt travels in its ``Done``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ._state import Attempt

__all__ = ["CancelAll", "CancelTask", "Close", "Command", "Control", "Done", "ItemDone",
           "Message", "OverBudget", "OverLimit", "Started", "Submit"]


@dataclass(slots=True)
class Done:
    """An attempt ended: its function returned (``ok``) or raised, or its worker died.

    Attributes:
        attempt: The attempt.
        ok: Whether ``value`` is the function's return value (else an exception).
        value: The return value, or the exception (``WorkerCrashed`` for a dead worker).
        worker: Where it ran: a pid, a thread name or a cluster worker's address.
        traceback: The worker-side traceback text, when the exception could not keep it.
        t_start: When the function started, on the worker's monotonic clock (0: unknown).
        t_end: When it returned (0: unknown).
        peak_memory: Peak memory of its worker while it ran, in bytes (None: not measured).
        result_bytes: Size of its pickled result (process tasks).
        shm_bytes: Bytes it moved through shared memory.
        pipe_bytes: Bytes it moved through its pipe.
    """

    attempt: Attempt
    ok: bool
    value: Any
    worker: int | str | None
    traceback: str | None = None
    t_start: float = 0.0
    t_end: float = 0.0
    peak_memory: int | None = None
    result_bytes: int | None = None
    shm_bytes: int = 0
    pipe_bytes: int = 0


@dataclass(slots=True)
class ItemDone:
    """Item ``k`` of a streamed batch (map items with a ``timeout``) ended; the next starts.

    Attributes:
        attempt: The batch.
        k: The item's position in the batch.
        outcome: ``(ok, value | error bytes, t_start, t_end)`` as ``run_batch`` makes it, or
            ``(False, exception, 0.0, 0.0)`` when it could not be unpickled here.
        peak_memory: The worker's peak memory so far in the batch, in bytes (None: unknown).
    """

    attempt: Attempt
    k: int
    outcome: tuple[Any, ...]
    peak_memory: int | None = None


@dataclass(slots=True)
class Started:
    """A worker took an attempt that waited after its hand-over (its clock starts now)."""

    attempt: Attempt
    t_start: float
    worker: int | str | None


Command = Literal["cancel", "pause", "resume"]


@dataclass(slots=True)
class Control:
    """``run.cancel()``, ``pause()`` or ``resume()``, from any thread."""

    command: Command


@dataclass(slots=True)
class OverLimit:
    """The monitor measured a process attempt above its declared ``memory``."""

    attempt: Attempt
    used: int
    limit: int


@dataclass(slots=True)
class OverBudget:
    """The monitor measured the run's process tasks above the memory budget together."""

    used: int


# px.Executor (issue 20): what its scheduler hears from the caller's side (``_submit``).

@dataclass(slots=True)
class Submit:
    """``ex.submit()``: add ``spec`` as a task whose outcome settles ``future``.

    Attributes:
        future: The ``px.Executor`` future (its ``index`` is set when the task is added).
        spec: The task, its futures still in its arguments (they stand for their values).
        deps: The futures of this executor found in the arguments, without repeats.
    """

    future: Any
    spec: Any
    deps: list[Any]


@dataclass(slots=True)
class CancelTask:
    """``future.cancel()`` on a future not settled yet: stop its task, running or not."""

    future: Any


@dataclass(slots=True)
class CancelAll:
    """Ctrl-C or ``shutdown(cancel_futures=True)``: stop every unfinished task.

    Attributes:
        done: A ``threading.Event`` set once the tasks were stopped (workers killed), or None.
    """

    done: Any = None


@dataclass(slots=True)
class Close:
    """``shutdown()``: nothing more will be submitted; end once every task is final."""


Message = Done | ItemDone | Started | Control | OverLimit | OverBudget | Submit | CancelTask \
    | CancelAll | Close
