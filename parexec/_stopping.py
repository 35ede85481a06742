"""Stopping: timeouts, cancellation, pause, grace periods and kills.

Part of the scheduler (see ``_state``). A process attempt is stopped by killing its worker
(with ``grace``, first by an exception raised inside it); a thread attempt cannot be stopped,
so it gets its cancel flag and is *abandoned*: decided now, it keeps its resources until its
function returns, at most ``GRACE`` seconds at the end of a run.
"""

from __future__ import annotations

import heapq

from ._errors import (
    Cancelled,
    TaskTimeout,
)
from ._events import logger
from ._messages import Command
from ._state import Attempt, Deadline, RunState
from ._status import ACTIVE, TaskStatus

_WAITING, _READY, _RUNNING = TaskStatus.PENDING, TaskStatus.READY, TaskStatus.RUNNING
heappush = heapq.heappush

GRACE = 5.0  # seconds a stopping run waits for thread tasks to notice their cancel flag


class Stopping(RunState):
    """Timeouts, cancel, pause, grace and kills."""

    def control(self, command: Command) -> None:
        """``run.cancel()``, ``pause()`` or ``resume()``."""
        if command == "cancel":
            if not self.stopping:
                self.stop("cancelled")
        elif command == "pause":
            if not self.paused and not self.stopping:
                self.paused = True
                self.emit("workflow:paused")
        elif command == "resume":
            if self.paused:
                self.paused = False
                self.emit("workflow:resumed")

    def stop(self, status: str) -> None:
        """Stop starting tasks; cancel the pending ones; stop the running ones."""
        if self.stopping:
            return
        self.stopping = status
        state = self.state
        for i in range(self.n):
            s = state[i]
            if s in ACTIVE:
                self.finalize(i, TaskStatus.CANCELLED, "task:cancelled")
            elif s is TaskStatus.RETRYING:
                self.cancel_retry(i)
        self.ready.clear()
        for g in self.gates:
            g.parked.clear()
        for attempt in list(self.running):
            if self.kill_or_flag(attempt):
                if attempt.items is not None:  # a batch of map items: each is cancelled
                    self.cancel_batch(attempt)
                    continue
                i = attempt.index
                self.runs[i].finished_at = self.clock() + self.offset
                self.finalize(i, TaskStatus.CANCELLED, "task:cancelled", number=attempt.number)
        for attempt in self.zombies:
            attempt.request_cancel()
        if self.running or self.zombies:
            self.start_grace()  # thread attempts may still return; wait for them, briefly

    def start_grace(self) -> None:
        """Wait for thread attempts to return, but at most ``GRACE`` seconds from now.

        Interrupted process attempts (``grace=``) are waited for until their kill, if later.
        """
        if self.grace_at is None:
            self.grace_at = max(self.clock() + GRACE, self.kill_by)
            self.add_deadline(self.grace_at, Deadline.GRACE, None)

    def end_grace(self) -> None:
        """The grace period is over: give up on thread attempts that ignored their flag."""
        self.grace_ended = True
        for attempt in list(self.interrupted):  # none is left past its own Deadline.KILL deadline
            self.kill_interrupted(attempt)
        late = list(self.running)  # only thread attempts can still be undecided here
        for attempt in late:
            self.abandon(attempt)
            self.runs[attempt.index].finished_at = self.clock() + self.offset
            self.finalize(attempt.index, TaskStatus.CANCELLED, "task:cancelled",
                          number=attempt.number)
        if self.zombies:
            ids = ", ".join(sorted({a.task_id for a in self.zombies}))
            # Warned once, by Run.wait() in the caller's thread, pointing at the caller's code.
            self.late_warning = (
                f"run of {self.name!r}: thread task(s) {ids} still running {GRACE:g}s after "
                "being asked to stop; they ignored px.current().cancelled(). Their threads go "
                "on in the background (they will not block interpreter exit).")
            logger.debug(self.late_warning)

    def timed_out(self, attempt: Attempt) -> None:
        i = attempt.index
        spec = self.specs[i]
        tr = self.runs[i]
        error = TaskTimeout(f"task {spec.id!r} attempt {attempt.number} exceeded its timeout "
                            f"of {self.timeout_of(i) or 0:g}s")
        tr.finished_at = self.clock() + self.offset
        if self.em:
            self.emit("task:timeout", i, attempt.number, tr.duration, error)
        if not self.kill_or_flag(attempt, cancel=False):
            self.abandon(attempt)
        self.attempt_failed(i, attempt, error, None, timed_out=True)

    def abandon(self, attempt: Attempt) -> None:
        """Decide a thread attempt that cannot be stopped (its cancel flag is set).

        Its outcome is decided now (timed out or cancelled); it keeps its slot and other
        resources until its function returns (``zombies``), and what it returns then is
        dropped.
        """
        attempt.final = True
        self.running.pop(attempt, None)
        self.zombies.add(attempt)

    def grace_of(self, i: int) -> float:
        """Task ``i``'s grace: its own, else the run's, else the workflow's (default 0)."""
        grace = self.specs[i].grace
        return self.grace if grace is None else grace

    def kill_or_flag(self, attempt: Attempt, cancel: bool = True) -> bool:
        """Stop a running attempt.

        A process worker is killed: the attempt is then final, its resources are released,
        and True is returned. A thread gets its cancel flag.

        With ``grace > 0``, ``px.Cancelled`` (``cancel``) or ``px.TaskTimeout`` is first
        raised inside the attempt: a process attempt is then final too (True), but holds its
        resources until its worker returns or is killed ``grace`` seconds later.
        """
        if attempt.worker is not None:  # the record keeps where it ran, whatever happens next
            self.runs[attempt.index].worker = attempt.worker
        pool = attempt.pool
        grace = self.grace_of(attempt.index)
        if grace > 0 and pool is self.procs and pool is not None \
                and pool.interrupt(attempt, cancel):
            attempt.final = True
            self.running.pop(attempt, None)
            self.interrupted.add(attempt)
            when = self.clock() + grace
            self.kill_by = max(self.kill_by, when)
            self.add_deadline(when, Deadline.KILL, attempt)
            return True
        if pool.kill(attempt):
            attempt.final = True
            self.release(attempt)
            return True
        attempt.request_cancel()
        # An attempt with its own stop (``on_cancel``: a coroutine, a nested run) is not
        # interrupted: an exception raised in its event loop or in its wait for the inner
        # run would cut short the cleanup that stop does.
        if grace > 0 and pool is self.threads and attempt.on_cancel is None:
            pool.interrupt(attempt, cancel)
        return False

    def longest_grace(self) -> float:
        """The longest ``grace`` of the run's tasks (how long a stop may take to finish)."""
        own = [s.grace for s in self.specs if s.grace is not None]
        return max([self.grace, *own])

    def kill_interrupted(self, attempt: Attempt) -> None:
        """An interrupted process attempt outlived its grace: kill its worker (and tree)."""
        self.interrupted.discard(attempt)
        attempt.pool.kill(attempt)
        if attempt.holding:
            self.release(attempt)

    def cancel_retry(self, i: int) -> None:
        """Cancel a task waiting for its retry.

        Its last attempt stays its record (so it leaves ``history``, which holds only the
        attempts before the last one), and its error says why it was going to be retried.
        """
        tr = self.runs[i]
        if tr.history:
            tr.history.pop()
            if not tr.history:
                tr.history = None
        last = self.retry_errors.pop(i, None)
        error = Cancelled(
            f"task {self.specs[i].id!r} was cancelled while waiting to retry after attempt "
            f"{tr.attempts} failed" + (f" ({type(last).__name__}: {last})" if last else ""))
        error.__cause__ = last
        self.finalize(i, TaskStatus.CANCELLED, "task:cancelled", error)
