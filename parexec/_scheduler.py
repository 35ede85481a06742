"""The scheduler: one thread per run owns all run state, and this is its loop.

The state is ``_state.RunState`` (every field documented there). Workers never touch it:
pools, the monitor and the ``Run`` handle put typed messages on ``queue`` (``_messages``),
and each message or due deadline is one transition, written in the scheduler's parts:

* ``_dispatch``    start ready tasks, best first, while every gate admits them
* ``_completion``  an attempt ended: succeed, retry or fail its task (``on_error``)
* ``_stopping``    timeouts, cancel, pause, grace periods, kills
* ``_sizing``      needs from inputs and history, measured memory (evict, kill)
* ``_groups``      groups and maps (decisions in ``_waits``, pure)

The loop::

    while True:
        dispatch()                        # ready tasks, best first, while every gate admits
        if every task is final: done      # (after a brief wait for abandoned threads)
        wait on queue until the next message or the nearest deadline
        handle every message waiting; fire due deadlines

Dispatch is O(1) per task plus heap operations and releasing dependents is O(out-degree)
(``_graph.Readiness``), so a run is O(V + E) + heap work.

Cancellation (``run.cancel()``, Ctrl-C, the run's timeout, a failure under
``on_error="fail"``): nothing new starts; tasks not running become ``cancelled``; process
attempts are stopped at once by killing their worker; thread attempts cannot be stopped, so
their cancel flag is set (``px.current().cancelled()``) and the run waits for them to
return, at most ``GRACE`` seconds, then warns with the ids of those that ignored the flag.
With ``grace > 0`` an attempt first gets ``px.TaskTimeout`` or ``px.Cancelled`` raised inside
it, so its ``finally`` blocks run (see ``_stopping``).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from queue import Empty, SimpleQueue
from typing import Any

from ._batches import Batches, MapStats
from ._completion import Completion
from ._dispatch import Dispatch
from ._errors import (
    TaskTimeout,
    user_stacklevel,
)
from ._events import Emitter, Event, logger
from ._gates import GroupGate, MemoryGate, PoolGate, build_gates
from ._graph import Readiness
from ._graph import depths as graph_levels
from ._groups import Groups
from ._messages import Control, Done, ItemDone, Message, OverLimit, Started
from ._pools import ThreadPool, process_pool
from ._results import RunResult, TaskRun, build_stats
from ._sizing import Sizing
from ._state import Attempt, Deadline, Pool
from ._status import FINAL, EventKind, RunStatus, TaskStatus
from ._stopping import GRACE, Stopping
from ._waits import Group
from ._workflow import Workflow

__all__ = ["GRACE", "Scheduler"]



_MISSING = object()
_WAITING, _READY, _RUNNING = TaskStatus.PENDING, TaskStatus.READY, TaskStatus.RUNNING
heappush = heapq.heappush



class Scheduler(Completion, Dispatch, Batches, Sizing, Stopping, Groups):
    """The run state and the loop; see the module docstring."""

    # px.Executor (issue 20, ``_submit``): an open run does not end when its tasks are all
    # final; it waits for more until its executor is shut down.
    open_ended = False

    def __init__(self, wf: Workflow, *, max_workers: int, cpu_budget: float,
                 memory_budget: int, timeout: float | None,
                 subscribers: list[tuple[str, Callable[[Event], Any]]],
                 force_cpu_gate: bool, store: Any = None, resume: bool = False,
                 cluster: Any = None, own_store: bool = True,
                 keep: Any = "all", explicit_memory: bool = True,
                 grace: float | None = None, max_tasks_per_worker: int | None = None) -> None:
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
        self.max_tasks_per_worker = max_tasks_per_worker
        procs = self.procs = process_pool(sweep=True, max_tasks_per_worker=max_tasks_per_worker) \
            if "process" in isolation else None
        self.cluster = None
        if "cluster" in isolation:
            import uuid

            from ._cluster import ClusterPool
            self.cluster = ClusterPool(cluster, f"parexec-{wf.name}-{uuid.uuid4().hex[:8]}")
        pool_of: dict[str, Pool | None] = {"thread": self.threads, "process": procs,
                                           "cluster": self.cluster}
        # Every task's pool exists: a process task made procs, start() checked cluster=.
        self.pools = [pool_of[iso] for iso in isolation]  # type: ignore[misc]
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
            learned = bool(self.learned_peaks)
            for i, s in enumerate(specs):  # only declared or learned needs are recorded
                if (s.memory or learned) and s.group is None and isolation[i] != "cluster":
                    self.init_memory(i, stacklevel=level)
        # Groups and maps: member_of[i] lists the groups task i belongs to.
        # (Tuples of ints, which the garbage collector does not track; see compile_graph.)
        self.member_of: list[Sequence[int] | None] = [None] * n
        self.groups: dict[int, Group] = {}
        # Readiness counts missing dependencies in lists of this run (map items append).
        self.readiness = Readiness(graph, [s.group is not None for s in specs])
        self.is_group = self.readiness.group
        self.dependents = self.readiness.dependents
        self.maps_of: dict[int, list[int]] = {}  # task -> maps over its result
        self.batch_map = [-1] * n  # the map whose batches task i may join (see _batches)
        self.batch_of: dict[int, Attempt] = {}  # running map item -> its batch
        # A streamed batch (items with a timeout) -> (position of its running item, when
        # that item's timeout is due); one deadline per batch is in the heap at a time.
        self.item_clock: dict[Attempt, tuple[int, float]] = {}
        self.map_stats: dict[int, MapStats] = {}
        for g, spec in enumerate(specs):
            info = spec.group
            if info is None:
                continue
            if info.dynamic is None:
                members = list(graph.deps[g])  # a group's dependencies are its members
                self.groups[g] = Group(g, members, info.wait, info.output,  # type: ignore[arg-type]
                                       info.timeout)
                for m in members:
                    self.member_of[m] = (*(self.member_of[m] or ()), g)
            else:
                members = []
                self.maps_of.setdefault(graph.deps[g][0], []).append(g)
            if info.output == "list" and info.batch != 1:  # a map: which items batch
                self.map_stats[g] = MapStats()
                batch_map, batchable = self.batch_map, self.batchable
                for m in members:  # items share their options: ask once per kind
                    if batchable(specs[m], isolation[m], spec):
                        batch_map[m] = g
            if info.max_concurrent is not None:
                needs = [0.0] * n
                for m in members:
                    if not self.is_group[m]:
                        needs[m] = 1.0
                self.gates.append(GroupGate(g, spec.id, info.max_concurrent, needs))
        self.sort_gates()  # what a task queued ahead takes (prefetch, pipelining)
        # Prefetch only in runs whose local tasks all run on threads: a prefetched task runs
        # as soon as a thread is idle, and while process tasks hold the slots, threads are
        # idle, so it would run beyond max_workers (found by the property suite, F3).
        only_threads = self.only_threads = "process" not in isolation and not any(
            wf.isolation_of(s) == "process" for s in specs if s.group is not None)
        self.threads.prefetch = only_threads
        self.plain = [(iso == "process" or only_threads and iso == "thread")
                      and s.timeout is None and not s.pools and not s.memory
                      and s.sizers is None and not s.exclusive
                      for iso, s in zip(isolation, specs, strict=True)]
        self.mean_process_duration = 1.0  # running average (seconds), starts "slow"
        self.leaders = collections.deque()
        self.waiting = collections.deque()
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
            from ._fingerprint import fingerprints
            self.fps = fingerprints(specs, graph.order, graph.deps)
            if resume:
                fp_of = {s.id: fp for s, fp in zip(specs, self.fps, strict=True)
                         if fp is not None}
                self.cached = store.cached(wf.name, fp_of)

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
        handle, done = self.handle, self.attempt_done
        while True:
            if self.ready or self.nholding == 0 or self.waiting:  # (waiting: see steal)
                self.dispatch()
            if self.nfinal == self.n and not self.open_ended:
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
                while True:  # an attempt's Done (the common message) goes straight on
                    if type(msg) is Done:
                        done(msg, now)
                    else:
                        handle(msg, now)
                    if queue.empty():
                        break
                    msg = queue.get_nowait()
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

    # Messages ---------------------------------------------------------------------------

    def handle(self, msg: Message, now: float) -> None:
        """Act on one message from a pool, the monitor or the ``Run`` handle."""
        kind = type(msg)
        if kind is Done:
            self.attempt_done(msg, now)  # type: ignore[arg-type]
        elif kind is ItemDone:
            self.item_done(msg, now)  # type: ignore[arg-type]
        elif kind is Started:
            self.attempt_started(msg.attempt, msg.t_start, msg.worker)  # type: ignore[union-attr]
        elif kind is Control:
            self.control(msg.command)  # type: ignore[union-attr]
        elif kind is OverLimit:
            self.over_limit(msg)  # type: ignore[arg-type]
        else:
            self.over_budget(msg)  # type: ignore[arg-type]

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
            elif kind == Deadline.ITEM_TIMEOUT:
                self.item_deadline(payload)
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
        status = RunStatus(self.stopping or ("partial" if self.partial else "succeeded"))
        stats = build_stats(
            self.runs, self.is_group, makespan=end - self.t0, graph=self.graph if self.n else None,
            pool_utilization={g.pool: g.utilization() for g in self.gates
                              if isinstance(g, PoolGate)},
            pools=self.wf.pools, scheduler_overhead=getattr(self, "cpu_time", 0.0),
            cpu_utilization=cpu, driver_peak=monitor.peak if monitor is not None else None)
        stats.maps = {self.specs[g].id: m.as_dict() for g, m in self.map_stats.items()
                      if m.items}
        self.result = RunResult(self.name, status, {tr.id: tr for tr in self.runs},
                                stats, self.t0 + self.offset, end + self.offset, self.keep)
        kind: EventKind = ("workflow:completed" if status in ("succeeded", "partial") else
                           "workflow:cancelled" if status == "cancelled" else "workflow:failed")
        if self.emitter.wants(kind):
            self.emitter.emit(Event(kind, self.name, None, end + self.offset, 0, stats.makespan,
                                    None))
        self.emitter.close()
        logger.info("run of %r %s in %.3fs", self.name, status, stats.makespan)
