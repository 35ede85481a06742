"""Groups and maps: the scheduler applies the decisions of ``_waits``.

Part of the scheduler (see ``_state``). A member reaching a final state is queued and its
groups decide in a loop (nesting depth never meets the recursion limit); a resolved group
cancels its members nothing else needs; a map over a task's result adds one task per item
when that task is done (``add_task``).
"""

from __future__ import annotations

import heapq
from typing import Any

from ._errors import (
    Cancelled,
)
from ._events import logger
from ._pools import process_pool
from ._results import TaskRun
from ._state import Deadline, RunState
from ._status import FINAL, OK, TaskStatus
from ._task import Outcome, TaskSpec
from ._waits import Group, Resolution, map_items

_WAITING, _READY, _RUNNING = TaskStatus.PENDING, TaskStatus.READY, TaskStatus.RUNNING
heappush = heapq.heappush


class Groups(RunState):
    """Groups and maps: member bookkeeping, resolution, expansion."""

    def group_started(self, i: int, now: float) -> None:
        """Task ``i`` started: start the clocks of its groups, and their parents'.

        Iteratively: groups may nest deeper than the recursion limit.
        """
        if self.member_of[i] is None:
            return
        stack = [i]
        while stack:
            for g in self.member_of[stack.pop()] or ():
                group = self.groups.get(g)
                if group is None or group.started:
                    continue
                group.started = True
                self.runs[g].started_at = self.runs[g].first_started_at = now + self.offset
                if group.timeout is not None:
                    self.add_deadline(now + group.timeout, Deadline.GROUP_TIMEOUT, g)
                if self.member_of[g] is not None:
                    stack.append(g)

    def member_done(self, i: int) -> None:
        """Task (or group) ``i`` reached a final state: let its groups decide.

        A group that resolves is itself a member of its parents: those decisions are queued
        and taken in this loop, not by recursion, so nesting depth does not matter.
        """
        if self.stopping or self.member_of[i] is None:
            return
        self.done_members.append(i)
        if self.deciding:
            return
        self.deciding = True
        try:
            while self.done_members:
                self.decide_groups(self.done_members.popleft())
        finally:
            self.deciding = False

    def member_failed(self, i: int) -> bool:
        """Task ``i`` failed for good: whether its groups judge it (then it is handled here).

        A member's failure is its group's to judge (``decide_groups``), not the run's; its
        other dependents follow its ``on_error``: skipped, or given its ``default`` (which
        ``task_failed`` put in its place).
        """
        if self.member_of[i] is None or self.stopping:
            return False
        if self.specs[i].on_error == "ignore":
            self.tainted.add(i)
            self.release_dependents(i)
        else:
            self.skip_downstream(i)
        return True

    def decide_groups(self, i: int) -> None:
        """Apply ``i``'s final state to each unresolved group it belongs to."""
        if self.stopping:
            return
        for g in self.member_of[i] or ():
            group = self.groups.get(g)
            if group is None or group.resolved:
                continue
            state = self.state[i]
            ok = state in OK
            if not ok and group.output == "list" and self.specs[i].on_error == "ignore" \
                    and state in (TaskStatus.FAILED, TaskStatus.TIMED_OUT):
                ok = True  # a map item that failed under on_error="ignore": its default
            decision = group.member_done(i, ok, self)
            if decision is not None:
                self.resolve_group(g, decision.ok, decision.value, decision.error)

    def member_value(self, m: int) -> Any:
        """Member ``m``'s value (see ``_waits.Members``)."""
        return self.values[m]

    def member_outcome(self, g: int, m: int) -> Outcome:
        """Member ``m``'s ``Outcome`` in group ``g`` (see ``_waits.Members``)."""
        if self.state[m] in OK:
            return Outcome(True, self.values[m])
        return Outcome(False, None, self.member_error(g, m))

    def task_id(self, i: int) -> str:
        """Task ``i``'s id (see ``_waits.Members``)."""
        return self.specs[i].id

    def member_error(self, g: int, m: int) -> Exception:
        err = self.runs[m].error
        if isinstance(err, Exception):
            return err
        return Cancelled(f"member {self.specs[m].id!r} of {self.specs[g].id!r} was "
                         f"{self.runs[m].status}")

    def collect(self, group: Group) -> Any:
        values = self.values
        if group.output == "list":
            return [values[m] for m in group.members]
        return {self.specs[m].id: values[m] for m in group.members}

    def resolve_group(self, g: int, ok: bool, value: Any = None,
                      error: BaseException | None = None, timed_out: bool = False) -> None:
        group = self.groups[g]
        group.resolved = True
        tr = self.runs[g]
        tr.finished_at = self.clock() + self.offset
        if tr.started_at is None:
            tr.started_at = tr.first_started_at = tr.finished_at
        self.cancel_members(g)
        if ok:
            self.values[g] = tr.value = value
            self.finalize(g, TaskStatus.SUCCEEDED, "task:completed")
            self.release_dependents(g)
            return
        spec = self.specs[g]
        self.finalize(g, TaskStatus.TIMED_OUT if timed_out else TaskStatus.FAILED, "task:failed",
                      error)
        logger.info("%s %r failed: %s", "map" if group.output == "list" else "group", spec.id,
                    error)
        if self.stopping:
            return
        if self.member_of[g] is not None or spec.on_error == "skip":
            self.partial = self.partial or self.member_of[g] is None
            self.skip_downstream(g)
        elif spec.on_error == "fail":
            self.stop("failed")
        else:
            self.partial = True
            self.values[g] = spec.default
            self.tainted.add(g)
            self.release_dependents(g)

    def cancel_members(self, g: int) -> None:
        """Cancel the unfinished members of a resolved group, nested groups' members too.

        Iteratively; a member something else still needs (another task waiting on it, or
        another unresolved group) is left alone.
        """
        stack = [g]
        while stack:
            self.cancel_members_of(stack.pop(), stack)

    def cancel_members_of(self, g: int, stack: list[int]) -> None:
        for m in self.groups[g].members:
            if self.state[m] in FINAL or self.needed_elsewhere(m, g):
                continue
            if m in self.groups:
                self.groups[m].resolved = True
                stack.append(m)  # its own members are cancelled next
                self.runs[m].finished_at = self.clock() + self.offset
                self.finalize(m, TaskStatus.CANCELLED, "task:cancelled")
            elif self.state[m] is _RUNNING and m in self.batch_of:
                batch = self.batch_of[m]  # its batch's worker is killed: all its items stop
                self.kill_or_flag(batch)
                self.cancel_batch(batch)
            elif self.state[m] is _RUNNING:
                attempt = next((a for a in self.running if a.index == m), None)
                if attempt is not None:
                    if not self.kill_or_flag(attempt):
                        self.abandon(attempt)  # cancelled now; its thread goes on
                    self.runs[m].finished_at = self.clock() + self.offset
                    self.finalize(m, TaskStatus.CANCELLED, "task:cancelled",
                                  number=attempt.number)
            elif self.state[m] is TaskStatus.RETRYING:
                self.cancel_retry(m)
            else:
                self.finalize(m, TaskStatus.CANCELLED, "task:cancelled")
            self.skip_downstream(m, TaskStatus.CANCELLED)

    def needed_elsewhere(self, m: int, g: int) -> bool:
        for j in self.dependents[m]:
            if j == g or self.state[j] in FINAL:
                continue
            group = self.groups.get(j)
            if group is None or not group.resolved:
                return True
        return False

    def expand_map(self, g: int) -> None:
        """The source of a map is done: create one task per item of its value."""
        spec = self.specs[g]
        info = spec.group
        assert info is not None and info.dynamic is not None
        source = self.values[self.graph.deps[g][0]]  # maps are declared, so g is in the graph
        items = map_items(spec, source)
        if isinstance(items, Resolution):  # not an iterable: the map fails
            self.groups[g] = Group(g, [], "all", "list", None)
            self.resolve_group(g, False, error=items.error)
            return
        members = [self.add_task(item, g) for item in items]
        self.groups[g] = Group(g, members, "all", "list", None)
        self.n += len(members)
        if not members:
            self.resolve_group(g, True, [])
            return
        now = self.clock() + self.offset
        for m in members:
            self.state[m] = _READY
            self.runs[m].queued_at = now
            heapq.heappush(self.ready, self.keys[m])
            if self.em:
                self.emit("task:queued", m)

    def add_task(self, spec: TaskSpec, group: int = -1) -> int:
        """Append a task created at run time to every per-task array.

        ``group`` is the map it is an item of; -1 for a task of no group (a ``px.Executor``
        submission, issue 20: ``_submit`` wires its dependencies).
        """
        i = len(self.specs)
        wf = self.wf
        iso = spec.isolation or wf.isolation
        self.specs.append(spec)
        self.runs.append(TaskRun(spec.id))
        self.state.append(TaskStatus.PENDING)
        self.readiness.add()  # its npending, dependents and is_group entries
        self.values.append(None)
        self.keys.append((-spec.priority, -self.graph.rank[group] if 0 <= group < len(
            self.graph.rank) else 0.0, i))
        if iso == "thread":
            self.pools.append(self.threads)
        elif iso == "process":
            if self.procs is None:  # the first process item of a run-time map
                self.procs = process_pool(sweep=True,
                                          max_tasks_per_worker=self.max_tasks_per_worker)
            self.pools.append(self.procs)
        else:
            assert self.cluster is not None  # start() checked that a cluster was given
            self.pools.append(self.cluster)
        exclusive = spec.exclusive = self.specs[group].exclusive if group >= 0 \
            else spec.exclusive
        self.batch_map.append(group if group in self.map_stats
                              and self.batchable(spec, iso, self.specs[group]) else -1)
        self.plain.append((iso == "process" or self.only_threads and iso == "thread")
                          and spec.timeout is None and not spec.pools and not spec.memory
                          and spec.sizers is None and not exclusive)
        self.sizers.append(spec.sizers)
        # A submission is in no group, but [] (not None) still sends it through
        # member_done, where the executor settles its future.
        self.member_of.append((group,) if group >= 0 else ())
        if group >= 0:
            self.runs[i].level = self.level[group]  # the map's own level: its items run there
        if self.releasing:
            self.nconsumers.append(1)  # the map collects it
            self.kept.append(False)
        local = iso != "cluster"
        for g in self.gates:
            g.needs.append(g.need_of(spec, local, group))
        if local and self.mem_gate is not None:
            self.init_memory(i)
        return i
