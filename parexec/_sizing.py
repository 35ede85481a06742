"""Sizing: a task's needs from its inputs and from history, and measured memory.

Part of the scheduler (see ``_state``). Callable ``cpus``/``memory``/``timeout`` options are
evaluated on the task's resolved arguments when it reaches the top of the ready heap; a task
with no declared memory gets the peak its last success recorded (``learned``); the monitor's
reports of measured memory are acted on here (``over_budget``, ``over_limit``).
"""

from __future__ import annotations

import heapq
import warnings

from ._errors import (
    ResourceError,
    TaskOptionError,
)
from ._events import logger
from ._messages import OverBudget, OverLimit
from ._state import RunState
from ._status import TaskStatus
from ._task import resolve_args, resolve_refs, sized_value

_WAITING, _READY, _RUNNING = TaskStatus.PENDING, TaskStatus.READY, TaskStatus.RUNNING
heappush = heapq.heappush

MAX_EVICTIONS = 3  # times one task may be stopped and queued again for the run's memory budget


class Sizing(RunState):
    """Needs from inputs and history; acting on measured memory."""

    def timeout_of(self, i: int) -> float | None:
        """Task ``i``'s timeout for this run (a ``timeout=`` callable's value, if any)."""
        timeout = self.specs[i].timeout
        return self.timeouts.get(i, timeout) if self.overrides else timeout

    def init_memory(self, i: int, stacklevel: int = 1) -> None:
        """Record local task ``i``'s declared need, else give it its learned one.

        The learned need is the peak of its last success in the store, capped at the budget
        with a warning.
        """
        spec, tr = self.specs[i], self.runs[i]
        if spec.memory:
            tr.memory_need, tr.memory_source = spec.memory, "declared"
        elif spec.sizers is None or "memory" not in spec.sizers:
            self.learn_memory(i, stacklevel)

    def learn_memory(self, i: int, stacklevel: int = 1) -> None:
        """Admit task ``i`` with the peak its last success recorded, if the store has one."""
        gate = self.mem_gate
        peak = self.learned_peaks.get(self.specs[i].id)
        if not peak or gate is None:
            return
        need = min(peak, int(gate.capacity))
        if need < peak:
            from ._errors import format_size
            msg = (f"task {self.specs[i].id!r}: its last successful run peaked at "
                   f"{format_size(peak)}, above memory_budget={format_size(gate.capacity)}; "
                   "it is admitted with the whole budget (it runs with no other task that "
                   "counts memory). Raise memory_budget, or declare memory= to override")
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel + 1)
        gate.needs[i] = float(need)
        tr = self.runs[i]
        tr.memory_need, tr.memory_source = need, "learned"

    def size(self, i: int) -> bool:
        """Evaluate task ``i``'s callable options on its resolved arguments and set its needs.

        A callable that raises or returns an unusable value (``TaskOptionError``), or a need
        above the run's budget (``ResourceError``), fails the task under its ``on_error``;
        then False is returned.
        """
        self.sized.add(i)
        spec, tr = self.specs[i], self.runs[i]
        sizers = spec.sizers
        assert sizers is not None
        local = self.pools[i] is not self.cluster
        try:
            args, kwargs = spec.args, spec.kwargs
            if spec.has_refs:
                values = self.values
                args = resolve_args(args, values)
                if kwargs:
                    kwargs = resolve_refs(kwargs, values.__getitem__)
            for key, fn in sizers.items():
                value = sized_value(spec.id, key, fn, args, kwargs)
                if key == "timeout":
                    self.timeouts[i] = value
                elif key == "cpus":
                    if local and value > self.cpu_budget:
                        raise ResourceError(spec.id, "cpus", value, self.cpu_budget,
                                            "computed by its cpus= callable; the CPU budget "
                                            "defaults to max_workers")
                    self.cpus_of[i] = value
                    for g in self.gates:
                        if g.kind == "cpus":
                            g.needs[i] = float(value) if local else 0.0
                elif value is None:  # no memory for these inputs: as if undeclared
                    if local:
                        self.learn_memory(i)
                else:
                    if local and value > self.memory_budget:
                        raise ResourceError(spec.id, "memory", value, self.memory_budget,
                                            "computed by its memory= callable; memory_budget "
                                            "defaults to 90% of the memory available at the "
                                            "start")
                    self.mem_limits[i] = value
                    if local and self.mem_gate is not None:
                        self.mem_gate.needs[i] = float(value)
                    tr.memory_need, tr.memory_source = value, "inputs"
                self.overrides = True
        except (TaskOptionError, ResourceError) as exc:
            tr.finished_at = self.clock() + self.offset
            self.task_failed(i, exc, None, 0)
            return False
        return True

    def grow_memory(self, i: int, factor: float) -> None:
        """Multiply the memory limit and need of task ``i`` by ``factor`` (at most the budget).

        Task ``i`` was stopped by ``MemoryLimitExceeded`` and will be retried; it holds
        nothing now, so its need may change.
        """
        gate = self.mem_gate
        budget = int(gate.capacity) if gate is not None else self.memory_budget
        tr = self.runs[i]
        limit = self.mem_limits.get(i, self.specs[i].memory) if self.overrides \
            else self.specs[i].memory
        if limit:
            self.mem_limits[i] = limit = min(budget, int(limit * factor))
            self.overrides = True
            tr.memory_need = limit
        if gate is not None and gate.needs[i]:  # it holds nothing now: safe to change
            gate.needs[i] = float(min(budget, int(gate.needs[i] * factor)))
            tr.memory_need = int(gate.needs[i])

    def evicted_need(self, i: int, peak: int | None) -> None:
        """Raise the learned need of task ``i``, stopped for the run's budget.

        It is admitted again with the larger of its measured peak and its need (times the
        ``memory_factor`` of its retry policy, if any), never above the budget.
        """
        gate, tr = self.mem_gate, self.runs[i]
        if gate is None or tr.memory_source != "learned":
            return
        policy = self.specs[i].retry
        factor = policy.memory_factor if policy is not None and policy.memory_factor else 1.0
        need = min(gate.capacity, max(float(peak or 0), gate.needs[i] * factor))
        gate.needs[i] = need
        tr.memory_need = int(need)

    def over_budget(self, msg: OverBudget) -> None:
        """The run's process tasks together hold more than the budget (the monitor says).

        The most recently started one is stopped and queued again: its attempt is not
        counted, at most ``MAX_EVICTIONS`` times per task, and never the only one.
        """
        from ._errors import format_size
        monitor = self.monitor
        monitor.budget_reported = False  # the monitor may report again
        mine = [a for a in self.running  # batches are not evicted: their items would restart
                if a.monitor is not None and not a.final and a.items is None
                and not a.prefetched]  # nor queued attempts: they hold no memory yet
        if self.stopping or len(mine) < 2:
            return  # stopping a lone task frees nothing it would not need again
        procs = self.procs
        mine = [a for a in mine if self.evictions.get(a.index, 0) < MAX_EVICTIONS
                and procs is not None and procs.runs(a)]  # not one still queued
        if not mine:
            return
        attempt = max(mine, key=lambda a: self.runs[a.index].started_at or 0.0)
        i = attempt.index
        peak = monitor.peak_of(attempt)  # before the kill: its pool's reader forgets it
        attempt.pool.kill(attempt)
        if not getattr(attempt.handle, "killed", False):
            return  # it had just finished: its result is on the queue; keep it
        monitor.unwatch(attempt)
        self.evictions[i] = self.evictions.get(i, 0) + 1
        attempt.peak_memory = peak  # the memory gate learns its function's need from it
        attempt.final = True
        self.release(attempt)
        self.evicted_need(i, peak)
        self.runs[i].attempts -= 1
        self.state[i] = _READY
        heappush(self.ready, self.keys[i])
        text = (f"run of {self.name!r}: its process tasks held {format_size(msg.used)}, "
                f"above memory_budget={format_size(monitor.budget or 0)}; task "
                f"{attempt.task_id!r}, the last started, was stopped and queued again "
                f"(not counted as an attempt). It starts again when its measured need "
                f"({format_size(peak or 0)}) fits; declare memory= on the task to have it "
                "wait from the start")
        logger.warning(text)
        warnings.warn(text, RuntimeWarning, stacklevel=1)

    def over_limit(self, msg: OverLimit) -> None:
        """A process attempt uses more memory than it declared: kill it.

        Its pool then reports ``MemoryLimitExceeded`` like any failure (retried as its policy
        says).
        """
        attempt, procs = msg.attempt, self.procs
        if not attempt.final and attempt in self.running and procs is not None:
            procs.kill_for_memory(attempt, msg.used, msg.limit)  # only process tasks are watched
