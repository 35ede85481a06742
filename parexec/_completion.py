"""Completion: an attempt ended; its task succeeds, is retried, or fails under on_error.

Part of the scheduler (see ``_state``). ``attempt_done`` is the hot path of every task: it
gives the attempt's resources back, records what its ``Done`` measured, and then succeeds
the task (its value released to its dependents), retries it at its policy's due time, or
fails it for good (``task_failed`` applies ``on_error``: stop the run, skip what depends on
it, or hand its dependents the default). ``finalize`` is the one place a task reaches a
final state: record, store, event, its groups, released values (``keep=``).
"""

from __future__ import annotations

import heapq
import logging
import traceback
from typing import Any

from ._errors import Cancelled, MemoryLimitExceeded, TaskTimeout, WorkerCrashed
from ._events import logger
from ._messages import Done
from ._state import Attempt, Deadline, RunState
from ._status import AttemptRecord, EventKind, TaskStatus

_WAITING, _READY = TaskStatus.PENDING, TaskStatus.READY
heappush = heapq.heappush


class Completion(RunState):
    """Attempts that ended, tasks that reach a final state, and what follows from them."""

    def attempt_done(self, msg: Done, now: float) -> None:
        """An attempt ended: record it, then succeed, retry or fail its task."""
        attempt = msg.attempt
        if attempt.items is not None:
            self.batch_done(msg, now)
            return
        t_start, t_end = msg.t_start, msg.t_end
        if msg.peak_memory is not None:
            attempt.peak_memory = msg.peak_memory  # the memory gate learns from it
        pool = attempt.pool
        if pool is self.threads:
            pool.reported(attempt, t_start, t_end)
        elif t_end and pool is self.procs:
            avg = self.mean_process_duration
            self.mean_process_duration = avg + 0.2 * (t_end - t_start - avg)
        if attempt.final:
            if attempt.holding:
                self.zombies.discard(attempt)
                self.interrupted.discard(attempt)  # returned within its grace: worker kept
                self.release(attempt)
            return
        ok, value, worker, tb_text = msg.ok, msg.value, msg.worker, msg.traceback
        # This is the hot path of every task: release() and succeeded() are inlined.
        attempt.holding = False
        self.nholding -= 1
        del self.running[attempt]
        i = attempt.index
        gates = self.gates if attempt.follower is None and not attempt.prefetched \
            else self.unlink(attempt)
        for g in gates:
            g.release(i)
            if g.parked:
                self.unpark(g)
        tr = self.runs[i]
        if t_end:  # the worker's own clock readings are exact
            tr.started_at = t_start + self.offset
            tr.finished_at = t_end + self.offset
            if attempt.number == 1:
                tr.first_started_at = tr.started_at
        else:
            tr.finished_at = now + self.offset
        if msg.peak_memory is not None:
            tr.peak_memory = msg.peak_memory
        if msg.result_bytes is not None:
            tr.result_bytes = msg.result_bytes
            tr.shm_bytes += msg.shm_bytes
            tr.pipe_bytes += msg.pipe_bytes
        tr.worker = worker
        if self.map_stats:
            m = self.batch_map[i]
            if m >= 0 and t_end:  # an item of a batched map: its duration sizes the batches
                self.note_item_time(m, t_end - t_start)
        self.settle(i, attempt, ok, value, tb_text)

    def settle(self, i: int, attempt: Attempt, ok: bool, value: Any,
               tb_text: str | None) -> None:
        """Attempt ``attempt`` of task ``i`` returned ``value`` (``ok``) or raised it."""
        if ok:
            tr = self.runs[i]
            self.values[i] = value
            tr.value = value
            self.state[i] = TaskStatus.SUCCEEDED
            self.nfinal += 1
            tr.status = TaskStatus.SUCCEEDED
            if self.store is not None:
                self.store.record(self.name, tr, self.fingerprint(i))
            if self.em:
                self.emit("task:completed", i, attempt.number, tr.duration)
            if self.debug:
                logger.debug("succeeded %s", tr.id)
            self.member_done(i)
            if not self.stopping:
                self.release_dependents(i)
            if self.releasing:
                self.consumed(i)
        elif self.stopping or attempt.cancel_requested:
            # The run is stopping, or a group no longer needs this thread task: not retried.
            if isinstance(value, Cancelled):
                self.finalize(i, TaskStatus.CANCELLED, "task:cancelled", number=attempt.number)
            else:
                self.finalize(i, TaskStatus.FAILED, "task:failed", value, tb_text,
                              attempt.number)
            if not self.stopping:
                self.skip_downstream(i, TaskStatus.CANCELLED)
        else:
            self.attempt_failed(i, attempt, value, tb_text)

    def attempt_started(self, attempt: Attempt, t_start: float, worker: Any) -> None:
        """A worker took an attempt that waited after its hand-over.

        The run's clock for it (its timeout, ``task:started``, its worker) starts now.
        """
        if attempt.final or attempt not in self.running:
            return
        i = attempt.index
        tr = self.runs[i]
        tr.started_at = t_start + self.offset
        if attempt.number == 1:
            tr.first_started_at = tr.started_at
        if worker is not None:
            tr.worker = worker
        timeout = self.timeout_of(i)
        if timeout is not None and getattr(attempt.pool, "reports_start", False):
            self.add_deadline(t_start + timeout, Deadline.TIMEOUT, attempt)
        if self.em:
            self.emit("task:started", i, attempt.number)

    def fingerprint(self, i: int) -> str | None:
        """The fingerprint to record for task ``i``.

        None (never served by a resume) when it received a default from an ignored failure
        upstream, since a later run in which that upstream succeeds must not be served this
        value.
        """
        fp = self.fps[i] if i < len(self.fps) else None
        tainted = self.tainted
        if tainted and i < len(self.graph.deps):
            if i in tainted or any(d in tainted for d in self.graph.deps[i]):
                tainted.add(i)
                return None
        return fp

    def finalize(self, i: int, state: TaskStatus, kind: EventKind,
                 error: BaseException | None = None, tb_text: str | None = None,
                 number: int = 0) -> None:
        """Task ``i`` reached final ``state``: record, store, announce, tell its groups."""
        self.state[i] = state
        self.nfinal += 1
        tr = self.runs[i]
        tr.status = state
        if error is not None:
            tr.error = error
            tr.traceback = tb_text or "".join(traceback.format_exception(error))
        if self.store is not None and state is not TaskStatus.CACHED and not self.is_group[i]:
            self.store.record(self.name, tr, self.fingerprint(i))
        if self.em:
            self.emit(kind, i, number, tr.duration, error)
        if self.debug:
            logger.debug("%s %s", tr.status, tr.id)
        self.member_done(i)
        if self.releasing:
            self.consumed(i)

    def consumed(self, j: int) -> None:
        """Task ``j`` is final: release the values that nothing unfinished needs any more.

        Only with ``keep=`` other than ``"all"``; its own value too when nothing consumes it.
        """
        nconsumers, kept = self.nconsumers, self.kept
        deps: Any = self.graph.deps[j] if j < len(self.graph.deps) else ()
        group = self.groups.get(j)
        if group is not None and self.specs[j].group.dynamic is not None:  # type: ignore[union-attr]
            deps = [*deps, *group.members]  # a map over a task's result: its items too
        for d in deps:
            left = nconsumers[d] - 1
            nconsumers[d] = left
            if not left and not kept[d]:
                self.release_value(d)
        if not nconsumers[j] and not kept[j]:
            self.release_value(j)

    def wants_value(self, i: int) -> bool:
        """Whether cluster task ``i``'s value must come to the driver.

        It must when it is kept in the result, or when a local task, a group, or a task whose
        options are callables of its arguments (evaluated here) consumes it. Called by the
        cluster pool's fetcher thread; the lists it reads only grow.
        """
        if not self.releasing or i >= len(self.graph.deps) or self.kept[i]:
            return True
        cluster, pools, is_group, sizers = self.cluster, self.pools, self.is_group, self.sizers
        return any(pools[j] is not cluster or is_group[j] or sizers[j] is not None
                   for j in self.dependents[i])

    def release_value(self, i: int) -> None:
        """Drop task ``i``'s value from the run (keep=); its record stays.

        A cluster task's result is dropped from the cluster too.
        """
        tr = self.runs[i]
        if self.values[i] is not None or tr.value is not None:
            self.values[i] = None
            tr.value = None
            tr.released = True
        if self.pools[i] is self.cluster and self.cluster is not None:
            self.cluster.release(i)

    def release_dependents(self, i: int) -> None:
        """Task ``i`` is done (its value is set): queue what it was the last dependency of."""
        if not self.dependents[i]:
            return  # a leaf (most tasks of a wide run): nothing to count
        state = self.state
        now: float | None = None
        for j in self.readiness.done(i):
            if state[j] is _WAITING:
                state[j] = _READY
                if now is None:
                    now = self.clock() + self.offset
                self.runs[j].queued_at = now
                heappush(self.ready, self.keys[j])
                if self.em:
                    self.emit("task:queued", j)
        maps = self.maps_of.get(i)
        if maps is not None:  # maps over this task's result
            for g in maps:
                if g not in self.groups and state[g] is _WAITING:
                    self.expand_map(g)

    def attempt_failed(self, i: int, attempt: Attempt, error: BaseException,
                       tb_text: str | None, *, timed_out: bool = False,
                       retryable: bool = True) -> None:
        spec = self.specs[i]
        tr = self.runs[i]
        policy = spec.retry
        if (retryable and policy is not None and not self.stopping
                and attempt.number <= policy.max_retries and policy.retries(error)):
            if tr.history is None:
                tr.history = []
            tr.history.append(AttemptRecord(attempt.number, tr.started_at or 0.0,
                                            tr.finished_at or 0.0, tr.worker,
                                            "timed_out" if timed_out else "failed"))
            self.state[i] = TaskStatus.RETRYING
            self.retry_errors[i] = error
            if policy.memory_factor is not None and isinstance(error, MemoryLimitExceeded):
                self.grow_memory(i, policy.memory_factor)
            delay = policy.delay(attempt.number)
            self.add_deadline(self.clock() + delay, Deadline.RETRY, i)
            if self.em:
                self.emit("task:retrying", i, attempt.number, tr.duration, error)
            logger.warning("task %r attempt %d failed (%s: %s); retrying in %.2fs",
                           spec.id, attempt.number, type(error).__name__, error, delay)
            return
        self.task_failed(i, error, tb_text, attempt.number, timed_out)

    def task_failed(self, i: int, error: BaseException, tb_text: str | None, number: int,
                    timed_out: bool = False) -> None:
        """Task ``i`` failed for good: record it and apply its ``on_error``."""
        spec = self.specs[i]
        if spec.on_error == "ignore":  # its value, before finalize lets its groups decide
            self.values[i] = spec.default
        self.finalize(i, TaskStatus.TIMED_OUT if timed_out else TaskStatus.FAILED, "task:failed",
                      error, tb_text, number)
        if self.member_failed(i):
            return
        level = logging.WARNING if isinstance(error, (TaskTimeout, WorkerCrashed,
                                                      MemoryLimitExceeded)) else logging.INFO
        logger.log(level, "task %r failed: %s: %s", spec.id, type(error).__name__, error)
        if self.stopping:
            return
        if spec.on_error == "fail":
            self.stop("failed")
        elif spec.on_error == "skip":
            self.partial = True
            self.skip_downstream(i)
        else:  # "ignore": dependents run and receive the default
            self.partial = True
            self.tainted.add(i)
            self.release_dependents(i)

    def skip_downstream(self, i: int, status: TaskStatus = TaskStatus.SKIPPED) -> None:
        """Finalize every waiting task downstream of ``i`` as skipped (or cancelled).

        Static groups are not touched: they hear of their members through member_done().
        """
        stack = list(self.dependents[i])
        state = self.state
        kind: EventKind = "task:skipped" if status is TaskStatus.SKIPPED else "task:cancelled"
        while stack:
            j = stack.pop()
            if state[j] is TaskStatus.PENDING and j not in self.groups:
                self.finalize(j, status, kind)
                if status is TaskStatus.SKIPPED:
                    self.partial = True
                stack.extend(self.dependents[j])
