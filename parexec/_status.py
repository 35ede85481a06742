"""The names of states, shared by the scheduler, results, display, store and events.

One place names them (issue 14): ``TaskStatus`` is where a task is in a run and how it
ended, ``RunStatus`` how a run ended. Both are ``enum.StrEnum``, so a status compares equal
to its text (``tr.status == "succeeded"``), prints as it, and is stored and serialized as
it. Their ``repr`` is their text's too, so printed records look as they always did. This
module imports nothing of parexec.
"""

from __future__ import annotations

import enum
from typing import Literal, NamedTuple

__all__ = ["ACTIVE", "EVENT_KINDS", "FINAL", "OK", "WAITS", "AttemptRecord", "EventKind",
           "RunStatus", "TaskStatus", "WaitMode"]


class TaskStatus(enum.StrEnum):
    """Where a task is in its run (``TaskRun.status``); the last six are final.

    A ``StrEnum``: a status equals its text (``tr.status == "succeeded"``), prints as it and
    is stored and serialized (JSON, SQLite, traces) as it. A ``TaskRun`` shows ``PENDING``
    until its task ends; the scheduler also tells apart the non-final states in between.

    Usage::

        result = px.run(wf)
        failed = [tid for tid, tr in result.tasks.items()
                  if tr.status is px.TaskStatus.FAILED]
        tr.status.final, tr.status.ok     # has it ended? does it have a value?

    Attributes:
        PENDING: ``"pending"``: some dependency is not done yet.
        READY: ``"ready"``: dependencies done; waiting for its turn or for a gate.
        RUNNING: ``"running"``: an attempt is in a pool.
        RETRYING: ``"retrying"``: an attempt failed; the next one starts at its due time.
        SUCCEEDED: ``"succeeded"`` (final): it returned a value.
        FAILED: ``"failed"`` (final): its last attempt raised (``tr.error``).
        SKIPPED: ``"skipped"`` (final): an upstream task failed under ``on_error="skip"``.
        CANCELLED: ``"cancelled"`` (final): the run stopped, or its group resolved, before
            it finished.
        TIMED_OUT: ``"timed_out"`` (final): its last attempt overran its ``timeout``.
        CACHED: ``"cached"`` (final): served from the store by ``resume=True``.
    """

    PENDING = "pending"      # some dependency is not done yet
    READY = "ready"          # dependencies done; waiting for its turn or for a gate
    RUNNING = "running"      # an attempt is in a pool
    RETRYING = "retrying"    # an attempt failed; the next one starts at its due time
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"      # an upstream task failed under on_error="skip"
    CANCELLED = "cancelled"  # the run stopped (or its group resolved) before it finished
    TIMED_OUT = "timed_out"  # its final attempt overran its timeout
    CACHED = "cached"        # served from the store by a resume

    def __repr__(self) -> str:
        return repr(self._value_)  # prints as the text it always was: 'succeeded'

    @property
    def final(self) -> bool:
        """Whether the task has ended (it will not change again in this run)."""
        return self in FINAL

    @property
    def ok(self) -> bool:
        """True when the task has a value of its own (it succeeded, or the store served it)."""
        return self in OK


FINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.SKIPPED,
                   TaskStatus.CANCELLED, TaskStatus.TIMED_OUT, TaskStatus.CACHED})
OK = frozenset({TaskStatus.SUCCEEDED, TaskStatus.CACHED})
ACTIVE = frozenset({TaskStatus.PENDING, TaskStatus.READY})  # not started, not retrying


class RunStatus(enum.StrEnum):
    """How a run ended (``RunResult.status``).

    A ``StrEnum``: a status equals its text (``result.status == "failed"``) and prints as it.

    Attributes:
        SUCCEEDED: ``"succeeded"``: every task succeeded (or was served from the store).
        PARTIAL: ``"partial"``: some tasks failed under ``on_error="skip"``/``"ignore"``;
            the rest ran.
        FAILED: ``"failed"``: a task failed under ``on_error="fail"`` (or the scheduler did).
        CANCELLED: ``"cancelled"``: ``run.cancel()`` or Ctrl-C stopped it.
        TIMED_OUT: ``"timed_out"``: the run's ``timeout`` stopped it.
    """

    SUCCEEDED = "succeeded"  # every task succeeded (or was served from the store)
    PARTIAL = "partial"      # some failed under on_error="skip"/"ignore"; the rest ran
    FAILED = "failed"        # a task failed under on_error="fail" (or the scheduler did)
    CANCELLED = "cancelled"  # run.cancel(), Ctrl-C
    TIMED_OUT = "timed_out"  # the run's timeout

    def __repr__(self) -> str:
        return repr(self._value_)


EventKind = Literal[
    "workflow:started", "task:queued", "task:started", "task:completed", "task:failed",
    "task:retrying", "task:timeout", "task:skipped", "task:cancelled", "workflow:paused",
    "workflow:resumed", "workflow:completed", "workflow:failed", "workflow:cancelled",
]
EVENT_KINDS: tuple[EventKind, ...] = EventKind.__args__  # type: ignore[attr-defined]

WaitMode = Literal["all", "any", "all_settled", "race"]
WAITS: tuple[WaitMode, ...] = WaitMode.__args__  # type: ignore[attr-defined]


class AttemptRecord(NamedTuple):
    """One attempt before a task's last, in ``TaskRun.history`` (a tuple, as it always was)."""

    number: int                # 1 for the first attempt
    started_at: float          # wall-clock start (seconds since the epoch)
    finished_at: float         # wall-clock end
    worker: int | str | None   # where it ran: a pid, a thread name, a cluster address
    outcome: str               # "failed" or "timed_out"
