"""The scheduler: one thread per run owns all run state.

Run state (fields of ``_Scheduler``; only the scheduler thread reads or writes them once
the run started):

* ``state[i]``    the ``TaskStatus`` of task ``i``
* ``npending[i]`` dependencies of ``i`` not done yet
* ``ready``       heap of keys ``(-priority, -rank, i)``: tasks whose dependencies are done
* ``gate.parked`` per gate, heap of ready keys that gate refused
* ``deadlines``   heap of ``(when, seq, kind, payload)``: attempt timeouts, retry due times,
                  the run's timeout, the end of a stop's grace period, memory re-checks
* ``nfinal``      tasks in a final state; ``nholding``: attempts holding resources

Workers never touch it: pools put ``(attempt, ok, value, worker, traceback)`` on ``queue``.
The loop is::

    while True:
        dispatch()                        # ready tasks, best first, while every gate admits
        if finished(): break
        wait on queue until the next message or the nearest deadline
        handle every message waiting; fire due deadlines

Each handler is a plain transition of that state. Dispatch is O(1) per task plus heap
operations and releasing dependents is O(out-degree), so a run is O(V + E) + heap work.

Cancellation semantics (``run.cancel()``, Ctrl-C, the run's timeout, a failure under
``on_error="fail"``): nothing new starts; tasks not running become ``cancelled``; process
attempts are stopped at once by killing their worker; thread attempts cannot be stopped, so
their cancel flag is set (``px.current().cancelled()``) and the run waits for them to return,
at most ``GRACE`` seconds, then warns with the ids of those that ignored the flag.

With ``grace > 0`` (a task option, else the run's, else the workflow's), stopping an attempt
first raises ``px.TaskTimeout`` or ``px.Cancelled`` inside it, so its ``finally`` blocks run:
a process worker gets a signal and is killed only if its attempt is still running ``grace``
seconds later (a ``Deadline.KILL`` deadline; until then the attempt, decided already, holds its
resources in ``interrupted``); a thread gets the exception through
``PyThreadState_SetAsyncExc`` (``_pools._Guard``) and is otherwise treated as above.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import time
import traceback
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

from ._dispatch import Dispatch
from ._errors import (
    Cancelled,
    MemoryLimitExceeded,
    TaskTimeout,
    WorkerCrashed,
    user_stacklevel,
)
from ._events import Emitter, Event, logger
from ._gates import GroupGate, MemoryGate, PoolGate, build_gates
from ._graph import Readiness, critical_path
from ._graph import depths as graph_levels
from ._groups import Groups
from ._messages import Control, Done, Message, OverLimit, Started
from ._pools import ThreadPool, process_pool
from ._results import RunResult, RunStats, TaskRun, build_stats
from ._sizing import Sizing
from ._state import Attempt, Deadline
from ._status import FINAL, EventKind, TaskStatus
from ._stopping import GRACE, Stopping
from ._waits import Group
from ._workflow import Workflow

__all__ = ["GRACE", "Scheduler"]



_MISSING = object()
_WAITING, _READY, _RUNNING = TaskStatus.PENDING, TaskStatus.READY, TaskStatus.RUNNING
heappush = heapq.heappush



class Scheduler(Dispatch, Sizing, Stopping, Groups):
    """The run state and the loop; see the module docstring."""

    def __init__(self, wf: Workflow, *, max_workers: int, cpu_budget: float,
                 memory_budget: int, timeout: float | None,
                 subscribers: list[tuple[str, Callable[[Event], Any]]],
                 force_cpu_gate: bool, store: Any = None, resume: bool = False,
                 cluster: Any = None, own_store: bool = True,
                 keep: Any = "all", explicit_memory: bool = True,
                 grace: float | None = None) -> None:
        self.wf = wf
        # grace= (issue 17 item 4): a task's own wins, then the run's, then the workflow's.
        wf_grace = getattr(wf, "grace", None)
        self.grace = grace if grace is not None else wf_grace if wf_grace is not None else 0.0
        self.interrupted: set[Attempt] = set()  # process attempts in their grace period
        self.kill_by = 0.0  # the latest Deadline.KILL deadline (the run waits for it at its end)
        self.explicit_memory = explicit_memory
        self.own_store = own_store
        self.keep = keep
        self.name = wf.name
        # Durations recorded by earlier runs stand in for missing estimates.
        graph = wf.graph(store.durations(wf.name) if store is not None else None)
        self.graph = graph
        self.specs = specs = list(wf.tasks.values())
        n = self.n = len(specs)
        # Map items created at run time are appended to these per-run lists; the compiled
        # graph is shared by every run of the workflow and never changes.
        self.state = [TaskStatus.PENDING] * n
        self.runs = [TaskRun(s.id) for s in specs]
        self.level = graph_levels(graph)
        for tr, level in zip(self.runs, self.level, strict=True):
            tr.level = level
        self.values: list[Any] = [None] * n
        rank = graph.rank
        self.keys = [(-s.priority, -rank[i], i) for i, s in enumerate(specs)]
        isolation = [s.isolation or wf.isolation for s in specs]
        self.queue: SimpleQueue[Any] = SimpleQueue()
        self.threads = ThreadPool(f"parexec-{wf.name}", max_threads=max_workers)
        procs = self.procs = process_pool(sweep=True) if "process" in isolation else None
        self.cluster = None
        if "cluster" in isolation:
            import uuid

            from ._cluster import ClusterPool
            self.cluster = ClusterPool(cluster, f"parexec-{wf.name}-{uuid.uuid4().hex[:8]}")
        self.pools = [self.threads if iso == "thread" else procs if iso == "process"
                      else self.cluster for iso in isolation]
        # Issue 17: peaks of the tasks' last successes (learned needs), and the per-run values
        # of callable options and of needs grown by Retry(memory_factor=...).
        self.learned_peaks: dict[str, int] = store.peak_memory(wf.name) if store is not None \
            else {}
        self.cpu_budget, self.memory_budget = cpu_budget, memory_budget
        self.gates = build_gates(specs, [iso != "cluster" for iso in isolation],
                                 max_workers=max_workers, cpu_budget=cpu_budget,
                                 memory_budget=memory_budget, pools=wf.pools,
                                 force_cpu_gate=force_cpu_gate,
                                 process=[wf.isolation_of(s) == "process" for s in specs],
                                 force_memory_gate=bool(self.learned_peaks))
        self.mem_gate = next((g for g in self.gates if isinstance(g, MemoryGate)), None)
        self.sizers = [s.sizers for s in specs]
        self.sized: set[int] = set()  # tasks whose callable options were evaluated
        self.overrides = False  # whether any of the three dicts below holds a value
        self.cpus_of: dict[int, float] = {}
        self.timeouts: dict[int, float | None] = {}
        self.mem_limits: dict[int, int | None] = {}
        if self.mem_gate is not None:
            level = user_stacklevel()  # a capped learned need warns at the caller's line
            for i, s in enumerate(specs):
                if s.group is None and isolation[i] != "cluster":
                    self.init_memory(i, stacklevel=level)
        # Groups and maps: member_of[i] lists the groups task i belongs to.
        self.member_of: list[list[int] | None] = [None] * n
        self.groups: dict[int, Group] = {}
        # Readiness counts missing dependencies in lists of this run (map items append).
        self.readiness = Readiness(graph, [s.group is not None for s in specs])
        self.is_group = self.readiness.group
        self.dependents = self.readiness.dependents
        self.maps_of: dict[int, list[int]] = {}  # task -> maps over its result
        for g, spec in enumerate(specs):
            info = spec.group
            if info is None:
                continue
            if info.dynamic is None:
                members = list(graph.deps[g])  # a group's dependencies are its members
                self.groups[g] = Group(g, members, info.wait, info.output,  # type: ignore[arg-type]
                                       info.timeout)
                for m in members:
                    self.member_of[m] = (self.member_of[m] or []) + [g]
            else:
                members = []
                self.maps_of.setdefault(graph.deps[g][0], []).append(g)
            if info.max_concurrent is not None:
                needs = [0.0] * n
                for m in members:
                    if not self.is_group[m]:
                        needs[m] = 1.0
                self.gates.append(GroupGate(g, spec.id, info.max_concurrent, needs))
        self.unslotted = [g for g in self.gates if not g.blocks_all]  # a prefetch takes no slot
        # Prefetch only in runs whose local tasks all run on threads: a prefetched task runs
        # as soon as a thread is idle, and while process tasks hold the slots, threads are
        # idle, so it would run beyond max_workers (found by the property suite, F3).
        only_threads = self.only_threads = "process" not in isolation and not any(
            wf.isolation_of(s) == "process" for s in specs if s.group is not None)
        self.plain = [only_threads and iso == "thread" and s.timeout is None and not s.pools
                      and not s.memory and s.sizers is None and not s.exclusive
                      for iso, s in zip(isolation, specs, strict=True)]
        self.nprefetched = 0
        self.mean_thread_duration = 1.0  # running average (seconds), starts "slow"
        self.ready: list[tuple[Any, ...]] = []
        self.deadlines: list[tuple[float, int, Deadline, Any]] = []
        self.seq = itertools.count()
        self.running: dict[Attempt, None] = {}  # attempts whose outcome is undecided
        self.zombies: set[Attempt] = set()  # timed-out thread attempts still holding resources
        self.nfinal = 0
        self.nholding = 0
        self.timeout = timeout
        self.stopping: str | None = None  # the run's final status once it stops early
        self.partial = False
        self.paused = False
        self.grace_at: float | None = None
        self.grace_ended = False
        self.recheck_pending = False
        self.emitter = Emitter(subscribers, wf.name)
        self.late_warning: str | None = None  # thread tasks that ignored their cancel flag
        self.em = self.emitter.active
        self.debug = logger.isEnabledFor(logging.DEBUG)
        self.clock = time.monotonic
        self.offset = time.time() - time.monotonic()
        self.result: RunResult | None = None
        self.crash: BaseException | None = None
        self.store = store
        # Records lost before this run (a Store object shared by several runs) are not ours.
        self.store_lost0: int = getattr(store, "lost", 0) if store is not None else 0
        self.fps: list[str | None] = []
        self.cached: Any = {}
        # keep= other than "all": kept[i] says whether task i's value stays in the result;
        # nconsumers[i] counts its dependents that are not final yet (see consumed()).
        self.releasing = keep != "all"
        self.kept: list[bool] = []
        self.nconsumers: list[int] = []
        if self.releasing:
            self.nconsumers = [len(d) for d in self.dependents]
            if keep == "leaves":
                self.kept = [not c for c in self.nconsumers]
            else:
                wanted = set(keep)
                self.kept = [s.id in wanted for s in specs]
        if self.cluster is not None:
            self.cluster.want_value = self.wants_value
        self.retry_errors: dict[int, BaseException] = {}  # last error of tasks awaiting a retry
        self.done_members: collections.deque[int] = collections.deque()  # see member_done
        self.deciding = False
        self.tainted: set[int] = set()  # tasks whose value is, or was built from, a default
        if store is not None:
            from ._store import fingerprints
            self.fps = fingerprints(specs, graph.order, graph.deps)
            if resume:
                fp_of = {s.id: fp for s, fp in zip(specs, self.fps, strict=True)
                         if fp is not None}
                self.cached = store.cached(wf.name, fp_of)

    # Events ---------------------------------------------------------------------------

    # The loop -------------------------------------------------------------------------

    def main(self) -> None:
        """Run to the end; never raises (an internal error fails the run and is kept)."""
        t_cpu = time.thread_time()
        self.t0 = self.clock()
        try:
            self.begin()
            self.loop()
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised by Run.wait
            self.crash = exc
            logger.critical("parexec scheduler failed; stopping the run", exc_info=True)
            try:
                self.stop("failed")
            except BaseException:  # noqa: BLE001
                pass
        finally:
            self.cpu_time = time.thread_time() - t_cpu
            self.finish()

    def begin(self) -> None:
        from ._gates import MemoryGate
        from ._monitor import Monitor
        # The measured memory gate (issue 21 item 11): the monitor reports, this thread acts.
        memory = self.mem_gate = next(
            (g for g in self.gates if isinstance(g, MemoryGate)), None)
        if memory is not None:
            memory.probe = self.explicit_memory
        self.evictions: dict[int, int] = {}
        self.monitor = Monitor(queue=self.queue,
                               budget=memory.capacity if memory is not None else None)
        if memory is not None:
            pools, threads, cluster = self.pools, self.threads, self.cluster
            memory.monitor = self.monitor
            memory.measured = lambda i: pools[i] is not threads and pools[i] is not cluster
        self.emit("workflow:started")
        if self.debug:
            logger.debug("run of %r: %d tasks, gates %s", self.name, self.n, self.gates)
        logger.info("run of %r started: %d tasks", self.name, self.n)
        now = self.clock() + self.offset
        state, runs, keys, ready = self.state, self.runs, self.keys, self.ready
        if self.cached:
            self.serve_cached()
        for i in self.readiness.prepare():
            if state[i] is _WAITING:
                state[i] = TaskStatus.READY
                runs[i].queued_at = now
                ready.append(keys[i])
                if self.em:
                    self.emit("task:queued", i)
        heapq.heapify(ready)
        if self.timeout is not None:
            self.add_deadline(self.t0 + self.timeout, Deadline.RUN_TIMEOUT, None)
        for g, group in list(self.groups.items()):  # a map over an empty list: done at once
            if not group.members and not group.resolved:
                self.resolve_group(g, True, self.collect(group))

    def loop(self) -> None:
        queue, deadlines, clock = self.queue, self.deadlines, self.clock
        handle = self.handle
        while True:
            if self.ready or self.nholding == 0:
                self.dispatch()
            if self.nfinal == self.n:
                if self.nholding == 0 or self.grace_ended:
                    return
                self.start_grace()  # only timed-out thread tasks are left: wait, briefly
            if deadlines:
                wait = deadlines[0][0] - clock()
                try:
                    msg = queue.get(timeout=wait) if wait > 0 else queue.get_nowait()
                except Empty:
                    msg = None
            else:
                msg = queue.get()
            if msg is not None:
                now = clock()
                handle(msg, now)
                while not queue.empty():
                    handle(queue.get_nowait(), now)
            if deadlines and deadlines[0][0] <= clock():
                self.fire_deadlines()

    def serve_cached(self) -> None:
        """Tasks recorded as succeeded with the same fingerprint are not run (resume)."""
        cached, specs = self.cached, self.specs
        now = self.clock() + self.offset
        served = []
        for i in self.graph.order:  # mark them all first: releasing one must not make a
            value = cached.get(specs[i].id, _MISSING)  # cached dependent ready to run
            if value is _MISSING or self.is_group[i]:
                continue
            tr = self.runs[i]
            self.values[i] = tr.value = value
            tr.queued_at = tr.started_at = tr.finished_at = now
            self.finalize(i, TaskStatus.CACHED, "task:completed")
            served.append(i)
        for i in served:
            self.release_dependents(i)
        logger.info("run of %r: %d task(s) served from the store", self.name, len(cached))

    # Dispatch -------------------------------------------------------------------------

    # Needs from the inputs and from history (issue 17) -------------------------------------

    # Completion -----------------------------------------------------------------------

    def handle(self, msg: Message, now: float) -> None:
        """Act on one message from a pool, the monitor or the ``Run`` handle."""
        kind = type(msg)
        if kind is Done:
            self.attempt_done(msg, now)  # type: ignore[arg-type]
        elif kind is Started:
            self.attempt_started(msg.attempt, msg.t_start, msg.worker)  # type: ignore[union-attr]
        elif kind is Control:
            self.control(msg.command)  # type: ignore[union-attr]
        elif kind is OverLimit:
            self.over_limit(msg)  # type: ignore[arg-type]
        else:
            self.over_budget(msg)  # type: ignore[arg-type]

    def attempt_done(self, msg: Done, now: float) -> None:
        """An attempt ended: record it, then succeed, retry or fail its task."""
        attempt = msg.attempt
        t_start, t_end = msg.t_start, msg.t_end
        if msg.peak_memory is not None:
            attempt.peak_memory = msg.peak_memory  # the memory gate learns from it
        pool = attempt.pool
        if pool is self.threads:
            pool.nbusy -= 1
            if t_start and t_end:
                avg = self.mean_thread_duration
                self.mean_thread_duration = avg + 0.2 * (t_end - t_start - avg)
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
        if attempt.prefetched:
            self.nprefetched -= 1
            gates = self.unslotted
        else:
            gates = self.gates
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
        if ok:
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
            if self.member_of[i] is not None:
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
        if self.member_of[i] is not None:
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
            tr.history.append((attempt.number, tr.started_at or 0.0, tr.finished_at or 0.0,
                               tr.worker, "timed_out" if timed_out else "failed"))
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
        self.finalize(i, TaskStatus.TIMED_OUT if timed_out else TaskStatus.FAILED, "task:failed",
                      error, tb_text, number)
        if self.member_of[i] is not None and not self.stopping:
            # A member's failure is its group's to judge; other dependents follow on_error.
            if spec.on_error == "ignore":
                self.values[i] = spec.default
                self.tainted.add(i)
                self.release_dependents(i)
            else:
                self.skip_downstream(i)
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
            self.values[i] = spec.default
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

    # Deadlines ------------------------------------------------------------------------

    def fire_deadlines(self) -> None:
        deadlines, clock = self.deadlines, self.clock
        while deadlines and deadlines[0][0] <= clock():
            _, _, kind, payload = heapq.heappop(deadlines)
            if kind == Deadline.TIMEOUT:
                if payload in self.running and not payload.final:
                    self.timed_out(payload)
            elif kind == Deadline.RETRY:
                self.retry_errors.pop(payload, None)
                if self.state[payload] is TaskStatus.RETRYING and not self.stopping:
                    self.state[payload] = TaskStatus.READY
                    heapq.heappush(self.ready, self.keys[payload])
            elif kind == Deadline.RUN_TIMEOUT:
                if not self.stopping:
                    logger.warning("run of %r exceeded its timeout of %gs; stopping",
                                   self.name, self.timeout)
                    self.stop("timed_out")
            elif kind == Deadline.GRACE:
                self.end_grace()
            elif kind == Deadline.KILL:
                if payload in self.interrupted:
                    self.kill_interrupted(payload)
            elif kind == Deadline.RECHECK:
                self.recheck_pending = False
                if payload.parked:
                    self.unpark(payload)
            elif kind == Deadline.GROUP_TIMEOUT:
                group = self.groups.get(payload)
                if group is not None and not group.resolved and not self.stopping:
                    self.resolve_group(payload, False, error=TaskTimeout(
                        f"group {self.specs[payload].id!r} did not resolve within its "
                        f"timeout of {group.timeout:g}s"), timed_out=True)

    # Groups and maps ------------------------------------------------------------------

    # Stopping -------------------------------------------------------------------------

    # The end --------------------------------------------------------------------------

    def finish(self) -> None:
        self.threads.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        if self.store is not None:
            if self.own_store:
                self.store.close()  # commits every queued record
            elif hasattr(self.store, "flush"):
                self.store.flush()
        monitor = getattr(self, "monitor", None)
        cpu = monitor.stop() if monitor is not None else None
        end = self.clock()
        if monitor is not None:
            threads, offset = self.threads, self.offset
            for i, tr in enumerate(self.runs):
                if self.pools[i] is threads and tr.started_at is not None \
                        and tr.finished_at is not None and tr.peak_memory is None:
                    tr.peak_memory = monitor.peak_between(tr.started_at - offset,
                                                          tr.finished_at - offset)
        for i in range(self.n):  # only after an internal error can tasks be left open
            if self.state[i] not in FINAL:
                self.state[i] = TaskStatus.CANCELLED
                self.runs[i].status = TaskStatus.CANCELLED
        status = self.stopping or ("partial" if self.partial else "succeeded")
        stats = self.stats(end)
        if monitor is not None:
            stats.cpu_utilization = cpu
            peaks = [tr.peak_memory for tr in self.runs if tr.peak_memory]
            stats.peak_memory = max([monitor.peak, *peaks]) or None
        self.result = RunResult(self.name, status, {tr.id: tr for tr in self.runs},  # type: ignore[arg-type]
                                stats, self.t0 + self.offset, end + self.offset, self.keep)
        kind: EventKind = ("workflow:completed" if status in ("succeeded", "partial") else
                           "workflow:cancelled" if status == "cancelled" else "workflow:failed")
        if self.emitter.wants(kind):
            self.emitter.emit(Event(kind, self.name, None, end + self.offset, 0, stats.makespan,
                                    None))
        self.emitter.close()
        logger.info("run of %r %s in %.3fs", self.name, status, stats.makespan)

    def stats(self, end: float) -> RunStats:
        durations = [tr.elapsed or 0.0 for tr in self.runs]  # every attempt counts
        pools = {g.pool: g.utilization() for g in self.gates if isinstance(g, PoolGate)}
        for pool in self.wf.pools:
            pools.setdefault(pool, 0.0)
        return build_stats(self.runs, self.is_group, makespan=end - self.t0,
                           pool_utilization=pools,
                           critical_path=critical_path(self.graph, durations) if self.n else [],
                           scheduler_overhead=getattr(self, "cpu_time", 0.0))

    # Measured memory (the monitor reports, this thread decides; see _gates) ---------------

