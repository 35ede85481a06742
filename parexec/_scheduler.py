"""The scheduler: one thread per run owns all run state.

Run state (fields of ``_Scheduler``; only the scheduler thread reads or writes them once
the run started):

* ``state[i]``    the ``TaskState`` of task ``i``
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
seconds later (a ``_KILL`` deadline; until then the attempt, decided already, holds its
resources in ``interrupted``); a thread gets the exception through
``PyThreadState_SetAsyncExc`` (``_pools._Guard``) and is otherwise treated as above.
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import logging
import time
import traceback
import warnings
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

from ._errors import (
    Cancelled,
    MemoryLimitExceeded,
    ResourceError,
    TaskOptionError,
    TaskTimeout,
    WorkerCrashed,
    user_stacklevel,
)
from ._events import Emitter, Event, logger
from ._gates import EXCLUSIVE, CapacityGate, MemoryGate, build_gates
from ._graph import critical_path
from ._graph import depths as graph_levels
from ._pools import ThreadPool, process_pool
from ._results import RunResult, RunStats, TaskRun, build_stats
from ._task import Outcome, TaskSpec, resolve_args, resolve_refs, sized_value
from ._worker import STARTED
from ._workflow import Workflow

__all__ = ["GRACE", "Scheduler", "TaskState"]

GRACE = 5.0  # seconds a stopping run waits for thread tasks to notice their cancel flag
MEMORY_RECHECK = 0.25  # seconds between measured-memory checks while a task waits for memory
MAX_EVICTIONS = 3  # times one task may be stopped and queued again for the run's memory budget
# Pipelining of short thread tasks. Handing a task to an idle thread and hearing back costs a
# thread round trip (measured 66-75 us on the 2-core test machine), during which that thread
# idles: with 2 slots, no-op tasks ran at 1.5x a raw ThreadPoolExecutor, which keeps its
# queue full. While the run's thread tasks take under PREFETCH_BELOW seconds on average, the
# scheduler queues one extra task per worker thread, so a thread finds its next task waiting.
# Only tasks with no timeout, pools or memory qualify (nothing scarce is held while queued),
# and the threads stay capped at max_workers, so no more tasks run at once than allowed.
PREFETCH_BELOW = 0.002


class TaskState(enum.IntEnum):
    """Where a task is in the run. The states from SUCCEEDED on are final."""

    WAITING = 0     # some dependency is not done yet
    READY = 1       # dependencies done; in the ready heap or parked on a gate
    RUNNING = 2     # an attempt is in a pool
    RETRY_WAIT = 3  # an attempt failed and will be retried at its due time (holds no slot)
    SUCCEEDED = 4
    FAILED = 5
    SKIPPED = 6     # an upstream task failed under on_error="skip"
    CANCELLED = 7   # the run stopped before the task could finish
    TIMED_OUT = 8   # the final attempt overran its timeout
    CACHED = 9      # served from the store


_FINAL = TaskState.SUCCEEDED
_MISSING = object()
_WAITING, _READY, _RUNNING = TaskState.WAITING, TaskState.READY, TaskState.RUNNING
heappush = heapq.heappush
_STATUS = {TaskState.SUCCEEDED: "succeeded", TaskState.FAILED: "failed",
           TaskState.SKIPPED: "skipped", TaskState.CANCELLED: "cancelled",
           TaskState.TIMED_OUT: "timed_out", TaskState.CACHED: "cached"}

# Deadline kinds
_TIMEOUT, _RETRY, _RUN_TIMEOUT, _GRACE, _RECHECK, _GROUP_TIMEOUT, _KILL = range(7)
_DONE_OK = (TaskState.SUCCEEDED, TaskState.CACHED)


class _Group:
    """Run state of one group or map (members are task indices)."""

    __slots__ = ("members", "wait", "output", "pending", "resolved", "started", "timeout")

    def __init__(self, members: list[int], wait: str, output: str,
                 timeout: float | None) -> None:
        self.members = members
        self.wait = wait
        self.output = output
        self.pending = len(members)
        self.resolved = False
        self.started = False
        self.timeout = timeout


class _Attempt:
    """One try of one task. Pools hold it while it runs; the scheduler decides its fate.

    ``final`` is set once the scheduler has decided the outcome (a timeout, a kill); a
    report arriving later only gives back the resources it still ``holding``.

    ``on_cancel`` is set by whatever runs the attempt and can stop it when asked (a thread
    worker running a coroutine, a nested run); ``request_cancel()`` calls it once.
    """

    __slots__ = ("index", "task_id", "number", "queue", "pool", "handle", "cpus",
                 "cancel_requested", "final", "holding", "prefetched", "t_start", "t_end",
                 "monitor", "memory_limit", "peak_memory", "on_cancel", "worker", "result_bytes",
                 "shm_bytes", "pipe_bytes", "sampler")

    def __init__(self, index: int, task_id: str, number: int, queue: SimpleQueue[Any],
                 pool: Any, cpus: float) -> None:
        self.index = index
        self.task_id = task_id
        self.number = number
        self.queue = queue
        self.pool = pool
        self.handle: Any = None
        self.cpus = cpus
        self.cancel_requested = False
        self.final = False
        self.holding = True
        self.prefetched = False
        self.t_start = 0.0  # set by a thread worker when it really starts (monotonic clock)
        self.t_end = 0.0  # ... and when the function returned
        self.monitor: Any = None  # samples a process attempt's worker (see _monitor)
        self.memory_limit: int | None = None
        self.peak_memory: int | None = None
        self.on_cancel: Callable[[], Any] | None = None
        self.worker: int | str | None = None  # set by the pool once known (pid, thread name)
        # Set by the process pool (API section 9 accounting): the size of the pickled result,
        # and the bytes this attempt moved through shared memory and through its pipe.
        self.result_bytes: int | None = None
        self.shm_bytes = 0
        self.pipe_bytes = 0
        # The run's Monitor, for a thread task that starts processes of its own (a script
        # step): ``sampler.watch(attempt, pid)`` makes their memory the task's peak_memory.
        self.sampler: Any = None

    def request_cancel(self) -> None:
        """Set the cancel flag (``px.current().cancelled()``) and call ``on_cancel``.

        Whoever installs ``on_cancel`` must check ``cancel_requested`` right after, since the
        flag may have been set just before.
        """
        if not self.cancel_requested:
            self.cancel_requested = True
            hook = self.on_cancel
            if hook is not None:
                try:
                    hook()
                except Exception:  # noqa: BLE001 - a failing hook must not break the run
                    logger.debug("on_cancel hook of %s failed", self.task_id, exc_info=True)


class Scheduler:
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
        self.interrupted: set[_Attempt] = set()  # process attempts in their grace period
        self.kill_by = 0.0  # the latest _KILL deadline (the run waits for it at its end)
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
        self.dependents = list(graph.dependents)
        self.npending = [len(d) for d in graph.deps]
        self.state = [TaskState.WAITING] * n
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
        self.groups: dict[int, _Group] = {}
        self.is_group = [s.group is not None for s in specs]
        for g, spec in enumerate(specs):
            info = spec.group
            if info is None:
                continue
            if info.dynamic is None:
                members = list(graph.deps[g])  # a group's dependencies are its members
                self.groups[g] = _Group(members, info.wait, info.output, info.timeout)
                for m in members:
                    self.member_of[m] = (self.member_of[m] or []) + [g]
            else:
                members = []
            if info.max_concurrent is not None:
                needs = [0.0] * n
                for m in members:
                    if not self.is_group[m]:
                        needs[m] = 1.0
                self.gates.append(CapacityGate(f"group:{spec.id}", info.max_concurrent, needs))
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
        self.deadlines: list[tuple[float, int, int, Any]] = []
        self.seq = itertools.count()
        self.running: dict[_Attempt, None] = {}  # attempts whose outcome is undecided
        self.zombies: set[_Attempt] = set()  # timed-out thread attempts still holding resources
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

    def emit(self, kind: str, i: int | None = None, attempt: int = 0,
             duration: float | None = None, error: BaseException | None = None) -> None:
        if self.emitter.wants(kind):
            self.emitter.emit(Event(kind, self.name, None if i is None else self.specs[i].id,
                                    self.clock() + self.offset, attempt, duration, error))

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
        memory = self.memory_gate = next(
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
        npending, state, runs, keys, ready = self.npending, self.state, self.runs, self.keys, \
            self.ready
        if self.cached:
            self.serve_cached()
        for i in range(self.n):
            if not npending[i] and state[i] is _WAITING and i not in self.groups:
                state[i] = TaskState.READY
                runs[i].queued_at = now
                ready.append(keys[i])
                if self.em:
                    self.emit("task:queued", i)
        heapq.heapify(ready)
        if self.timeout is not None:
            self.add_deadline(self.t0 + self.timeout, _RUN_TIMEOUT, None)
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
            self.finalize(i, TaskState.CACHED, "task:completed")
            served.append(i)
        for i in served:
            self.release_dependents(i)
        logger.info("run of %r: %d task(s) served from the store", self.name, len(cached))

    def start_grace(self) -> None:
        """Wait for thread attempts to return, but at most ``GRACE`` seconds from now.

        Interrupted process attempts (``grace=``) are waited for until their kill, if later.
        """
        if self.grace_at is None:
            self.grace_at = max(self.clock() + GRACE, self.kill_by)
            self.add_deadline(self.grace_at, _GRACE, None)

    def add_deadline(self, when: float, kind: int, payload: Any) -> None:
        heapq.heappush(self.deadlines, (when, next(self.seq), kind, payload))

    # Dispatch -------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start ready tasks, best first, while the gates admit them."""
        if self.paused or self.stopping:
            return
        ready, gates = self.ready, self.gates
        if not ready and self.nholding == 0:
            # Nothing runs and nothing is ready: whatever waits on a gate must get its turn.
            for g in gates:
                while g.parked:
                    heapq.heappush(ready, heapq.heappop(g.parked))
        state, sizers = self.state, self.sizers
        while ready:
            key = ready[0]
            i = key[2]
            if state[i] is not _READY:  # cancelled while it waited (a group resolved early)
                heapq.heappop(ready)
                continue
            if sizers[i] is not None and i not in self.sized:
                heapq.heappop(ready)  # its callable options first: they set its needs
                if self.size(i):
                    heappush(ready, key)
                continue
            short = True  # refused for lack of units (not for another task's reservation)
            for g in gates:
                if not g.admits(i):
                    break
                if g.holder >= 0 and g.holder != i and key > g.holder_key and g.need(i) \
                        and not self.may_backfill(g, i):
                    short = False
                    break
            else:
                heapq.heappop(ready)
                self.start_reserved(i)
                continue
            if self.nholding == 0:
                heapq.heappop(ready)  # nothing is running: the best task always starts
                self.start_reserved(i)
                continue
            if g.blocks_all:
                if (self.nprefetched < self.threads.max_threads and self.plain[i]
                        and self.mean_thread_duration < PREFETCH_BELOW
                        and all(h.admits(i) and (h.holder < 0 or not h.need(i)
                                                 or h.spares(i)) for h in gates[1:])):
                    heapq.heappop(ready)
                    self.launch(i, prefetch=True)
                    continue
                return
            heapq.heappop(ready)
            heapq.heappush(g.parked, key)
            if short and g.reserve(i, key) and g.parked:
                self.unpark(g)  # a smaller reservation than before may leave room
            if getattr(g, "measured_refusal", False):
                g.measured_refusal = False  # type: ignore[attr-defined]
                if not self.recheck_pending:
                    self.recheck_pending = True
                    self.add_deadline(self.clock() + MEMORY_RECHECK, _RECHECK, g)

    def start_reserved(self, i: int) -> None:
        """Launch ``i``, ending the reservations it held (see ``_gates``: Reservations)."""
        self.launch(i)
        for g in self.gates:
            if g.holder == i:
                g.unreserve()
                if g.parked and g.used < g.capacity:
                    self.unpark(g)

    def may_backfill(self, g: Any, i: int) -> bool:
        """Whether ``i``, ranked below the holder of ``g``'s reservation, may take its units.

        It may when it fits beside the reservation, or when its estimate ends before the
        holder could start anyway (the shadow time).
        """
        holder = g.holder
        if self.state[holder] is not _READY:  # cancelled, or started without unreserving
            g.unreserve()
            return True
        if g.spares(i):
            return True
        estimate = self.specs[i].estimate
        if estimate is None:
            return False
        shadow: float | None = g.shadow
        if shadow is None:
            shadow = g.shadow = self.shadow_time(g)
        return self.clock() + estimate <= shadow

    def shadow_time(self, g: Any) -> float:
        """When the running tasks' estimates say ``g`` has its holder's units (monotonic).

        A task with no estimate, or past it, may end any moment.
        """
        now = self.clock()
        short = g.used + g.holder_need - g.capacity
        if short <= 0:
            return now
        specs, runs, offset = self.specs, self.runs, self.offset
        ends = []
        for attempt in self.running:  # at most max_workers (plus cluster tasks)
            j = attempt.index
            need = g.need(j)
            if need:
                estimate = specs[j].estimate
                started = runs[j].started_at
                end = now if estimate is None or started is None else \
                    max(now, started - offset + estimate)
                ends.append((end, need))
        ends.sort()
        for end, need in ends:
            short -= need
            if short <= 0:
                return end
        return now  # units held by attempts already decided (timed-out threads): unknown

    def launch(self, i: int, prefetch: bool = False) -> None:
        spec = self.specs[i]
        tr = self.runs[i]
        number = tr.attempts = tr.attempts + 1
        pool = self.pools[i]
        cpus, timeout, limit = spec.cpus, spec.timeout, spec.memory
        if self.overrides:  # callable options, or memory grown by Retry(memory_factor=...)
            cpus = self.cpus_of.get(i, cpus)
            timeout = self.timeouts.get(i, timeout)
            limit = self.mem_limits.get(i, limit)
        attempt = _Attempt(i, spec.id, number, self.queue, pool, cpus)
        if pool is not self.threads:
            attempt.memory_limit = limit
            if pool is not self.cluster:
                attempt.monitor = self.monitor
                if self.memory_gate is not None:
                    self.memory_gate.started(i, attempt)
        else:
            attempt.sampler = self.monitor
        if prefetch:  # queued beyond the slots: it takes no slot (see PREFETCH_BELOW)
            attempt.prefetched = True
            self.nprefetched += 1
            for g in self.gates[1:]:
                g.acquire(i)
        else:
            for g in self.gates:
                g.acquire(i)
        self.state[i] = _RUNNING
        self.nholding += 1
        self.running[attempt] = None
        now = self.clock()
        tr.started_at = started = now + self.offset
        if number == 1:
            tr.first_started_at = started
        if timeout is not None and not getattr(pool, "reports_start", False):
            self.add_deadline(now + timeout, _TIMEOUT, attempt)
        if self.member_of[i] is not None:
            self.group_started(i, now)
        if self.em and not prefetch:  # a prefetched attempt says when it really starts
            self.emit("task:started", i, number)
        if self.debug:
            logger.debug("start %s (attempt %d)", spec.id, number)
        try:
            args, kwargs = spec.args, spec.kwargs
            if spec.has_refs:
                if pool is self.cluster and pool is not None:
                    # Upstream results still on the cluster go as Dask futures (no round
                    # trip through the driver); the rest as values.
                    futures, values = pool.futures, self.values
                    args = resolve_refs(args, lambda j: futures.get(j, values[j]))
                    kwargs = resolve_refs(kwargs, lambda j: futures.get(j, values[j]))
                else:
                    values = self.values
                    args = resolve_args(args, values)
                    if kwargs:
                        kwargs = resolve_refs(kwargs, values.__getitem__)
            assert pool is not None  # every task's pool exists: start() checked cluster=
            pool.submit(attempt, spec.fn, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - e.g. PicklingError: fails this task only
            attempt.final = True
            self.release(attempt)
            tr.finished_at = self.clock() + self.offset
            self.attempt_failed(i, attempt, exc, None, retryable=False)

    # Needs from the inputs and from history (issue 17) -------------------------------------

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
                        if g.name == "cpus":
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

    # Completion -----------------------------------------------------------------------

    def handle(self, msg: tuple[Any, ...], now: float) -> None:
        attempt, ok, value, worker, tb_text = msg
        if attempt is None:
            self.control(ok)
            return
        if ok is STARTED:
            self.attempt_started(attempt, value, worker)
            return
        pool = attempt.pool
        if pool is self.threads:
            pool.nbusy -= 1
            if attempt.t_start and attempt.t_end:
                avg = self.mean_thread_duration
                self.mean_thread_duration = avg + 0.2 * (attempt.t_end - attempt.t_start - avg)
        if attempt.final:
            if attempt.holding:
                self.zombies.discard(attempt)
                self.interrupted.discard(attempt)  # returned within its grace: worker kept
                self.release(attempt)
            return
        # This is the hot path of every task: release() and succeeded() are inlined.
        attempt.holding = False
        self.nholding -= 1
        del self.running[attempt]
        i = attempt.index
        if attempt.prefetched:
            self.nprefetched -= 1
            gates = self.gates[1:]
        else:
            gates = self.gates
        for g in gates:
            g.release(i)
            if g.parked:
                self.unpark(g)
        tr = self.runs[i]
        if attempt.t_end:  # the worker's own clock readings are exact
            tr.started_at = attempt.t_start + self.offset
            tr.finished_at = attempt.t_end + self.offset
            if attempt.number == 1:
                tr.first_started_at = tr.started_at
        else:
            tr.finished_at = now + self.offset
        if attempt.peak_memory is not None:
            tr.peak_memory = attempt.peak_memory
        if attempt.result_bytes is not None:
            tr.result_bytes = attempt.result_bytes
            tr.shm_bytes += attempt.shm_bytes
            tr.pipe_bytes += attempt.pipe_bytes
        tr.worker = worker
        if ok:
            self.values[i] = value
            tr.value = value
            self.state[i] = TaskState.SUCCEEDED
            self.nfinal += 1
            tr.status = "succeeded"
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
                self.finalize(i, TaskState.CANCELLED, "task:cancelled", number=attempt.number)
            else:
                self.finalize(i, TaskState.FAILED, "task:failed", value, tb_text,
                              attempt.number)
            if not self.stopping:
                self.skip_downstream(i, TaskState.CANCELLED)
        else:
            self.attempt_failed(i, attempt, value, tb_text)

    def attempt_started(self, attempt: _Attempt, t_start: float, worker: Any) -> None:
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
            self.add_deadline(t_start + timeout, _TIMEOUT, attempt)
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

    def release(self, attempt: _Attempt) -> None:
        """Give back the resources ``attempt`` holds, and let parked tasks retry admission."""
        attempt.holding = False
        self.nholding -= 1
        self.running.pop(attempt, None)
        i = attempt.index
        if attempt.prefetched:
            self.nprefetched -= 1
        for g in self.gates[1:] if attempt.prefetched else self.gates:
            g.release(i)
            if g.parked:
                self.unpark(g)

    def unpark(self, g: Any) -> None:
        """Move the best parked tasks of ``g`` back to the ready heap, as many as may fit."""
        free = g.capacity - g.used
        parked, ready = g.parked, self.ready
        moved = False
        while parked:
            need = g.need(parked[0][2])
            if need > free and moved:
                break
            heapq.heappush(ready, heapq.heappop(parked))
            free -= need
            moved = True

    def finalize(self, i: int, state: TaskState, kind: str, error: BaseException | None = None,
                 tb_text: str | None = None, number: int = 0) -> None:
        self.state[i] = state
        self.nfinal += 1
        tr = self.runs[i]
        tr.status = _STATUS[state]  # type: ignore[assignment]
        if error is not None:
            tr.error = error
            tr.traceback = tb_text or "".join(traceback.format_exception(error))
        if self.store is not None and state is not TaskState.CACHED and not self.is_group[i]:
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
        npending, state, is_group = self.npending, self.state, self.is_group
        now: float | None = None
        for j in self.dependents[i]:
            if is_group[j]:
                if j not in self.groups and state[j] is _WAITING:
                    self.expand_map(j)  # a map over this task's result
                continue  # a group learns of its members through member_done()
            k = npending[j] - 1
            npending[j] = k
            if not k and state[j] is _WAITING:
                state[j] = _READY
                if now is None:
                    now = self.clock() + self.offset
                self.runs[j].queued_at = now
                heappush(self.ready, self.keys[j])
                if self.em:
                    self.emit("task:queued", j)

    def attempt_failed(self, i: int, attempt: _Attempt, error: BaseException,
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
            self.state[i] = TaskState.RETRY_WAIT
            self.retry_errors[i] = error
            if policy.memory_factor is not None and isinstance(error, MemoryLimitExceeded):
                self.grow_memory(i, policy.memory_factor)
            delay = policy.delay(attempt.number)
            self.add_deadline(self.clock() + delay, _RETRY, i)
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
        self.finalize(i, TaskState.TIMED_OUT if timed_out else TaskState.FAILED, "task:failed",
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

    def skip_downstream(self, i: int, status: TaskState = TaskState.SKIPPED) -> None:
        """Finalize every waiting task downstream of ``i`` as skipped (or cancelled).

        Static groups are not touched: they hear of their members through member_done().
        """
        stack = list(self.dependents[i])
        state = self.state
        kind = "task:skipped" if status is TaskState.SKIPPED else "task:cancelled"
        while stack:
            j = stack.pop()
            if state[j] is TaskState.WAITING and j not in self.groups:
                self.finalize(j, status, kind)
                if status is TaskState.SKIPPED:
                    self.partial = True
                stack.extend(self.dependents[j])

    # Deadlines ------------------------------------------------------------------------

    def fire_deadlines(self) -> None:
        deadlines, clock = self.deadlines, self.clock
        while deadlines and deadlines[0][0] <= clock():
            _, _, kind, payload = heapq.heappop(deadlines)
            if kind == _TIMEOUT:
                if payload in self.running and not payload.final:
                    self.timed_out(payload)
            elif kind == _RETRY:
                self.retry_errors.pop(payload, None)
                if self.state[payload] is TaskState.RETRY_WAIT and not self.stopping:
                    self.state[payload] = TaskState.READY
                    heapq.heappush(self.ready, self.keys[payload])
            elif kind == _RUN_TIMEOUT:
                if not self.stopping:
                    logger.warning("run of %r exceeded its timeout of %gs; stopping",
                                   self.name, self.timeout)
                    self.stop("timed_out")
            elif kind == _GRACE:
                self.end_grace()
            elif kind == _KILL:
                if payload in self.interrupted:
                    self.kill_interrupted(payload)
            elif kind == _RECHECK:
                self.recheck_pending = False
                if payload.parked:
                    self.unpark(payload)
            elif kind == _GROUP_TIMEOUT:
                group = self.groups.get(payload)
                if group is not None and not group.resolved and not self.stopping:
                    self.resolve_group(payload, False, error=TaskTimeout(
                        f"group {self.specs[payload].id!r} did not resolve within its "
                        f"timeout of {group.timeout:g}s"), timed_out=True)

    def timed_out(self, attempt: _Attempt) -> None:
        i = attempt.index
        spec = self.specs[i]
        tr = self.runs[i]
        error = TaskTimeout(f"task {spec.id!r} attempt {attempt.number} exceeded its timeout "
                            f"of {self.timeout_of(i) or 0:g}s")
        tr.finished_at = self.clock() + self.offset
        if self.em:
            self.emit("task:timeout", i, attempt.number, tr.duration, error)
        if not self.kill_or_flag(attempt, cancel=False):
            # A thread cannot be stopped: its outcome is decided now, but it keeps its slot
            # (and other resources) until the function returns.
            attempt.final = True
            self.running.pop(attempt, None)
            self.zombies.add(attempt)
        self.attempt_failed(i, attempt, error, None, timed_out=True)

    def grace_of(self, i: int) -> float:
        """Task ``i``'s grace: its own, else the run's, else the workflow's (default 0)."""
        grace = self.specs[i].grace
        return self.grace if grace is None else grace

    def kill_or_flag(self, attempt: _Attempt, cancel: bool = True) -> bool:
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
            self.add_deadline(when, _KILL, attempt)
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

    def kill_interrupted(self, attempt: _Attempt) -> None:
        """An interrupted process attempt outlived its grace: kill its worker (and tree)."""
        self.interrupted.discard(attempt)
        attempt.pool.kill(attempt)
        if attempt.holding:
            self.release(attempt)

    # Groups and maps ------------------------------------------------------------------

    def group_started(self, i: int, now: float) -> None:
        """A member of groups started: start their clocks, and their parents'.

        Iteratively: groups may nest deeper than the recursion limit.
        """
        stack = [i]
        while stack:
            for g in self.member_of[stack.pop()] or ():
                group = self.groups.get(g)
                if group is None or group.started:
                    continue
                group.started = True
                self.runs[g].started_at = self.runs[g].first_started_at = now + self.offset
                if group.timeout is not None:
                    self.add_deadline(now + group.timeout, _GROUP_TIMEOUT, g)
                if self.member_of[g] is not None:
                    stack.append(g)

    def member_done(self, i: int) -> None:
        """Task (or group) ``i`` reached a final state: let its groups decide.

        A group that resolves is itself a member of its parents: those decisions are queued
        and taken in this loop, not by recursion, so nesting depth does not matter.
        """
        if self.stopping:
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

    def decide_groups(self, i: int) -> None:
        """Apply ``i``'s final state to each unresolved group it belongs to."""
        if self.stopping:
            return
        for g in self.member_of[i] or ():
            group = self.groups.get(g)
            if group is None or group.resolved:
                continue
            group.pending -= 1
            ok = self.state[i] in _DONE_OK
            if not ok and group.output == "list" and self.specs[i].on_error == "ignore" \
                    and self.state[i] in (TaskState.FAILED, TaskState.TIMED_OUT):
                ok = True  # a map item that failed under on_error="ignore": its default
            wait = group.wait
            if wait == "all":
                if not ok:
                    self.resolve_group(g, False, error=self.member_error(g, i))
                elif not group.pending:
                    self.resolve_group(g, True, self.collect(group))
            elif wait == "any":
                if ok:
                    self.resolve_group(g, True, self.values[i])
                elif not group.pending:
                    errors = [self.member_error(g, m) for m in group.members]
                    self.resolve_group(g, False, error=ExceptionGroup(
                        f"group {self.specs[g].id!r}: every member failed", errors))
            elif wait == "race":
                if ok:
                    self.resolve_group(g, True, self.values[i])
                else:
                    self.resolve_group(g, False, error=self.member_error(g, i))
            elif not group.pending:  # all_settled
                self.resolve_group(g, True, {
                    self.specs[m].id: Outcome(True, self.values[m]) if self.state[m] in _DONE_OK
                    else Outcome(False, None, self.member_error(g, m)) for m in group.members})

    def member_error(self, g: int, m: int) -> Exception:
        err = self.runs[m].error
        if isinstance(err, Exception):
            return err
        return Cancelled(f"member {self.specs[m].id!r} of {self.specs[g].id!r} was "
                         f"{self.runs[m].status}")

    def collect(self, group: _Group) -> Any:
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
            self.finalize(g, TaskState.SUCCEEDED, "task:completed")
            self.release_dependents(g)
            return
        spec = self.specs[g]
        self.finalize(g, TaskState.TIMED_OUT if timed_out else TaskState.FAILED, "task:failed",
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
            if self.state[m] >= _FINAL or self.needed_elsewhere(m, g):
                continue
            if m in self.groups:
                self.groups[m].resolved = True
                stack.append(m)  # its own members are cancelled next
                self.runs[m].finished_at = self.clock() + self.offset
                self.finalize(m, TaskState.CANCELLED, "task:cancelled")
            elif self.state[m] is _RUNNING:
                attempt = next((a for a in self.running if a.index == m), None)
                if attempt is not None:
                    if not self.kill_or_flag(attempt):
                        # A thread cannot be stopped: cancelled now, its cancel flag set, its
                        # slot held until the function returns (as for a thread timeout).
                        attempt.final = True
                        self.running.pop(attempt, None)
                        self.zombies.add(attempt)
                    self.runs[m].finished_at = self.clock() + self.offset
                    self.finalize(m, TaskState.CANCELLED, "task:cancelled",
                                  number=attempt.number)
            elif self.state[m] is TaskState.RETRY_WAIT:
                self.cancel_retry(m)
            else:
                self.finalize(m, TaskState.CANCELLED, "task:cancelled")
            self.skip_downstream(m, TaskState.CANCELLED)

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
        self.finalize(i, TaskState.CANCELLED, "task:cancelled", error)

    def needed_elsewhere(self, m: int, g: int) -> bool:
        for j in self.dependents[m]:
            if j == g or self.state[j] >= _FINAL:
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
        fn, options, kwargs, base = info.dynamic
        source = self.values[self.graph.deps[g][0]]  # maps are declared, so g is in the graph
        try:
            items = list(source)
        except TypeError:
            self.groups[g] = _Group([], "all", "list", None)
            self.resolve_group(g, False, error=TaskOptionError(
                f"map {spec.id!r}: the value of {info.members[0]!r} is a "
                f"{type(source).__name__}, not an iterable of items"))
            return
        members = [self.add_task(TaskSpec(f"{base}[{k}]", fn, (item,), kwargs, (), False,
                                          options), g)
                   for k, item in enumerate(items)]
        self.groups[g] = _Group(members, "all", "list", None)
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

    def add_task(self, spec: TaskSpec, group: int) -> int:
        """Append a task created at run time (a map item) to every per-task array."""
        i = len(self.specs)
        wf = self.wf
        iso = spec.isolation or wf.isolation
        self.specs.append(spec)
        self.runs.append(TaskRun(spec.id))
        self.state.append(TaskState.WAITING)
        self.npending.append(0)
        self.dependents.append([])
        self.values.append(None)
        self.keys.append((-spec.priority, -self.graph.rank[group] if group < len(
            self.graph.rank) else 0.0, i))
        if iso == "thread":
            self.pools.append(self.threads)
        elif iso == "process":
            if self.procs is None:  # the first process item of a run-time map
                self.procs = process_pool(sweep=True)
            self.pools.append(self.procs)
        else:
            self.pools.append(self.cluster)
        exclusive = spec.exclusive = self.specs[group].exclusive
        self.plain.append(self.only_threads and iso == "thread" and spec.timeout is None
                          and not spec.pools and not spec.memory and spec.sizers is None
                          and not exclusive)
        self.sizers.append(spec.sizers)
        self.member_of.append([group])
        self.is_group.append(False)
        self.runs[i].level = self.level[group]  # the map's own level: its items run there
        if self.releasing:
            self.nconsumers.append(1)  # the map collects it
            self.kept.append(False)
        local = iso != "cluster"
        gid = self.specs[group].id
        for g in self.gates:
            name = g.name
            if name == "slots":
                need = 1.0 if local else 0.0
            elif name == "cpus":
                need = spec.cpus if local else 0.0
            elif name == "memory":
                need = float(spec.memory or 0) if local else 0.0
            elif name.startswith("pool:"):
                need = float(spec.pools.get(name[5:], 0))
            elif name == "exclusive":
                need = (EXCLUSIVE if exclusive else 1.0) if local else 0.0
            else:  # "group:<id>": the map's own max_concurrent
                need = 1.0 if name == f"group:{gid}" else 0.0
            g.needs.append(need)
        if local and self.mem_gate is not None:
            self.init_memory(i)
        return i

    # Stopping -------------------------------------------------------------------------

    def control(self, command: str) -> None:
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
        elif command == "memory":
            self.memory_report()

    def stop(self, status: str) -> None:
        """Stop starting tasks; cancel the pending ones; stop the running ones."""
        if self.stopping:
            return
        self.stopping = status
        state = self.state
        for i in range(self.n):
            s = state[i]
            if s < TaskState.RUNNING:
                self.finalize(i, TaskState.CANCELLED, "task:cancelled")
            elif s is TaskState.RETRY_WAIT:
                self.cancel_retry(i)
        self.ready.clear()
        for g in self.gates:
            g.parked.clear()
        for attempt in list(self.running):
            if self.kill_or_flag(attempt):
                i = attempt.index
                self.runs[i].finished_at = self.clock() + self.offset
                self.finalize(i, TaskState.CANCELLED, "task:cancelled", number=attempt.number)
        for attempt in self.zombies:
            attempt.request_cancel()
        if self.running or self.zombies:
            self.start_grace()  # thread attempts may still return; wait for them, briefly

    def end_grace(self) -> None:
        """The grace period is over: give up on thread attempts that ignored their flag."""
        self.grace_ended = True
        for attempt in list(self.interrupted):  # none is left past its own _KILL deadline
            self.kill_interrupted(attempt)
        late = list(self.running)  # only thread attempts can still be undecided here
        for attempt in late:
            attempt.final = True
            self.running.pop(attempt, None)
            self.zombies.add(attempt)
            self.runs[attempt.index].finished_at = self.clock() + self.offset
            self.finalize(attempt.index, TaskState.CANCELLED, "task:cancelled",
                          number=attempt.number)
        if self.zombies:
            ids = ", ".join(sorted({a.task_id for a in self.zombies}))
            # Warned once, by Run.wait() in the caller's thread, pointing at the caller's code.
            self.late_warning = (
                f"run of {self.name!r}: thread task(s) {ids} still running {GRACE:g}s after "
                "being asked to stop; they ignored px.current().cancelled(). Their threads go "
                "on in the background (they will not block interpreter exit).")
            logger.debug(self.late_warning)

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
            if self.state[i] < _FINAL:
                self.state[i] = TaskState.CANCELLED
                self.runs[i].status = "cancelled"
        status = self.stopping or ("partial" if self.partial else "succeeded")
        stats = self.stats(end)
        if monitor is not None:
            stats.cpu_utilization = cpu
            peaks = [tr.peak_memory for tr in self.runs if tr.peak_memory]
            stats.peak_memory = max([monitor.peak, *peaks]) or None
        self.result = RunResult(self.name, status, {tr.id: tr for tr in self.runs},  # type: ignore[arg-type]
                                stats, self.t0 + self.offset, end + self.offset, self.keep)
        kind = {"succeeded": "workflow:completed", "partial": "workflow:completed",
                "cancelled": "workflow:cancelled"}.get(status, "workflow:failed")
        if self.emitter.wants(kind):
            self.emitter.emit(Event(kind, self.name, None, end + self.offset, 0, stats.makespan,
                                    None))
        self.emitter.close()
        logger.info("run of %r %s in %.3fs", self.name, status, stats.makespan)

    def stats(self, end: float) -> RunStats:
        durations = [tr.elapsed or 0.0 for tr in self.runs]  # every attempt counts
        pools = {g.name[5:]: g.utilization() for g in self.gates if g.name.startswith("pool:")}
        for pool in self.wf.pools:
            pools.setdefault(pool, 0.0)
        return build_stats(self.runs, self.is_group, makespan=end - self.t0,
                           pool_utilization=pools,
                           critical_path=critical_path(self.graph, durations) if self.n else [],
                           scheduler_overhead=getattr(self, "cpu_time", 0.0))

    # Measured memory (the monitor reports, this thread decides; see _gates) ---------------

    def memory_report(self) -> None:
        """Act on the monitor's reports.

        A process task above its declared ``memory`` is killed and fails with
        ``MemoryLimitExceeded`` (retried as its policy says); when the run's process tasks
        together hold more than the budget, the most recently started one is stopped and
        queued again (its attempt not counted, at most ``MAX_EVICTIONS`` times per task, never
        the only one).
        """
        from ._errors import format_size
        monitor = self.monitor
        while monitor.reports:
            report = monitor.reports.popleft()
            if report[0] == "budget":
                monitor.budget_reported = False
                mine = [a for a in self.running if a.monitor is not None and not a.final]
                if self.stopping or len(mine) < 2:
                    continue  # stopping a lone task frees nothing it would not need again
                mine = [a for a in mine if self.evictions.get(a.index, 0) < MAX_EVICTIONS]
                if not mine:
                    continue
                attempt = max(mine, key=lambda a: self.runs[a.index].started_at or 0.0)
                i = attempt.index
                attempt.pool.kill(attempt)
                if not getattr(attempt.handle, "killed", False):
                    continue  # it had just finished: its result is on the queue; keep it
                monitor.unwatch(attempt)
                self.evictions[i] = self.evictions.get(i, 0) + 1
                attempt.final = True
                self.release(attempt)
                self.evicted_need(i, attempt.peak_memory)
                self.runs[i].attempts -= 1
                self.state[i] = _READY
                heappush(self.ready, self.keys[i])
                msg = (f"run of {self.name!r}: its process tasks held {format_size(report[1])}, "
                       f"above memory_budget={format_size(monitor.budget or 0)}; task "
                       f"{attempt.task_id!r}, the last started, was stopped and queued again "
                       f"(not counted as an attempt). It starts again when its measured need "
                       f"({format_size(attempt.peak_memory or 0)}) fits; declare memory= on "
                       "the task to have it wait from the start")
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=1)
                continue
            _, attempt, used, limit = report
            if not attempt.final and attempt in self.running:
                # Killed by the pool, which reports MemoryLimitExceeded like any failure.
                attempt.pool.kill_for_memory(attempt, used, limit)
