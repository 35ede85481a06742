"""The state of one run: its fields, and the attempt record the pools hold.

One ``Scheduler`` thread per run owns all of it (``_scheduler``). Pools, the monitor and the
event thread only send it messages (``_messages``), so nothing here needs a lock. Its
transitions live in the scheduler's parts:

========================  ====================================================
``_scheduler``            the loop, messages, completion, the end of the run
``_dispatch``             admission by the gates, launching attempts
``_sizing``               needs from the inputs and from history; measured memory
``_stopping``             timeouts, cancel, pause, grace, killing
``_groups``               groups and maps (their decisions are pure: ``_waits``)
========================  ====================================================

Task ``i`` is an index into every per-task list below; map items created at run time are
appended to them (``Groups.add_task``). The compiled ``Graph`` is shared by every run of the
workflow and never changes, so one workflow can run twice at once.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Protocol

from ._events import Event, logger

if TYPE_CHECKING:
    from collections import deque

    from ._batches import MapStats
    from ._cluster import ClusterPool
    from ._events import Emitter
    from ._gates import Gate, MemoryGate
    from ._graph import Graph, Readiness
    from ._messages import Done, ItemDone
    from ._monitor import Monitor
    from ._pools import ProcessPool, ThreadPool
    from ._results import RunResult, TaskRun
    from ._status import EventKind, TaskStatus
    from ._store import Store
    from ._task import TaskSpec
    from ._waits import Group
    from ._workflow import Workflow

__all__ = ["Attempt", "Deadline", "Pool", "RunState"]


class Pool(Protocol):
    """What the scheduler asks of any pool: threads, processes or a Dask cluster.

    A pool reports each attempt it was given on ``attempt.queue``: a ``Done`` once, maybe a
    ``Started`` first (``_messages``). Graceful interrupts and memory kills are asked of the
    thread and process pools by name (``RunState.threads``, ``RunState.procs``).
    """

    def submit(self, attempt: Any, fn: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> None:
        """Run ``fn(*args, **kwargs)`` for ``attempt``."""

    def kill(self, attempt: Any) -> bool:
        """Stop ``attempt`` now if it can (its worker is killed); whether it could."""

    def shutdown(self) -> None:
        """Stop taking work (the run ended)."""


class Deadline(enum.IntEnum):
    """What a deadline in ``RunState.deadlines`` is for (its payload)."""

    TIMEOUT = 0        # an attempt overran its timeout (the Attempt)
    RETRY = 1          # a failed task's next attempt is due (the task index)
    RUN_TIMEOUT = 2    # the run's own timeout (None)
    GRACE = 3          # a stopping run stops waiting for its thread tasks (None)
    RECHECK = 4        # look at measured memory again for tasks parked on it (the gate)
    GROUP_TIMEOUT = 5  # a group's own timeout (the group's index)
    KILL = 6           # an interrupted process attempt's grace is over (the Attempt)
    ITEM_TIMEOUT = 7   # the running item of a streamed batch may be overdue (the batch)


class Attempt:
    """One try of one task. Pools hold it while it runs; the scheduler decides its fate.

    Only the scheduler thread writes its fields, with two hand-offs: the pool that takes it
    sets ``handle`` and ``worker`` once, before it reports anything about it, and whatever
    runs it may install ``on_cancel``. Everything measured while it runs (its times, peak
    memory, bytes moved) comes back in its ``Done`` message, not through these fields.

    ``final`` is set once the scheduler has decided the outcome (a timeout, a kill); a
    report arriving later only gives back the resources it still ``holding``.
    ``request_cancel()`` sets ``cancel_requested`` (``px.current().cancelled()``) and calls
    ``on_cancel`` once: a thread worker running a coroutine, or a nested run, stops there.
    """

    __slots__ = ("index", "task_id", "number", "queue", "pool", "handle", "cpus",
                 "cancel_requested", "final", "holding", "prefetched", "monitor",
                 "memory_limit", "peak_memory", "on_cancel", "worker", "shm_bytes",
                 "pipe_bytes", "sampler", "items", "leader", "follower")

    def __init__(self, index: int, task_id: str, number: int, queue: SimpleQueue[Any],
                 pool: Pool, cpus: float) -> None:
        self.index = index
        self.task_id = task_id
        self.number = number
        self.queue = queue  # the run's queue, where its pool reports
        self.pool = pool
        self.handle: Any = None  # the pool's own handle (its process worker, thread guard)
        self.cpus = cpus
        self.cancel_requested = False
        self.final = False
        self.holding = True
        self.prefetched = False
        self.monitor: Any = None  # samples a process attempt's worker (see _monitor)
        self.memory_limit: int | None = None
        self.peak_memory: int | None = None  # from its Done (the memory gate learns it)
        self.on_cancel: Callable[[], Any] | None = None
        self.worker: int | str | None = None  # set by the pool once known (pid, thread name)
        # Bytes its arguments moved through shared memory and through its pipe, counted by
        # the process pool's submit (on the scheduler thread); its Done reports the totals.
        self.shm_bytes = 0
        self.pipe_bytes = 0
        # The run's Monitor, for a thread task that starts processes of its own (a script
        # step): ``sampler.watch(attempt, pid)`` makes their memory the task's peak memory.
        self.sampler: Any = None
        # A batch of map items (see _batches): (index, attempt number) of each, in the
        # order they run.
        self.items: list[tuple[int, int]] | None = None
        # Pipelining (see _dispatch.PIPELINE_BELOW): a process attempt queued on the worker
        # of a running one (its ``leader``, whose ``follower`` it is) holds no slot; it takes
        # its leader's when the leader ends. The process pool reads ``leader`` in submit.
        self.leader: Attempt | None = None
        self.follower: Attempt | None = None

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


@dataclass(eq=False, repr=False)
class RunState:
    """Everything one run knows, as dask's ``local.py`` documents its state.

    Only the scheduler thread reads or writes these fields once the run started (the one
    exception: ``wants_value`` reads lists that only grow, from the cluster's fetcher).
    """

    # The run's inputs ----------------------------------------------------------------
    wf: Workflow                  # the workflow (its tasks and settings)
    name: str                     # the workflow's name, for events and messages
    graph: Graph                  # the compiled graph: deps, dependents, rank, order
    specs: list[TaskSpec]         # task i's declaration (map items appended at run time)
    n: int                        # tasks in the run, map items included so far
    timeout: float | None         # the run's timeout (seconds)
    grace: float                  # the run's default grace (seconds) for stopping attempts
    keep: Any                     # keep=: "all", "leaves" or a tuple of task ids
    cpu_budget: float             # cores the running tasks' cpus may add up to
    memory_budget: int            # bytes their memory may add up to
    explicit_memory: bool         # the budget was set by the user (memory probing is on)
    store: Store | None           # the Store recording finished tasks
    own_store: bool               # the run opened the store (and closes it at its end)
    store_lost0: int              # records the store had lost before this run
    fps: list[str | None]         # fingerprint of task i (with a store), else empty
    cached: Any                   # resume: task id -> value recorded as succeeded
    learned_peaks: dict[str, int]  # peak memory of each task's last success (the store's)

    # Per task (index i) ---------------------------------------------------------------
    state: list[TaskStatus]       # where task i is (PENDING ... final)
    readiness: Readiness          # missing dependencies of each task (graphlib's protocol)
    dependents: list[Sequence[int]]  # tasks that consume i (readiness's run-owned list)
    maps_of: dict[int, list[int]]  # task -> the maps over its result (expanded when done)
    batch_map: list[int]          # the map whose batches task i may join, else -1
    batch_of: dict[int, Attempt]  # running map item -> the batch it travels in
    item_clock: dict[Attempt, tuple[int, float]]  # streamed batch -> (running item, due)
    map_stats: dict[int, MapStats]  # batched map -> what its batching did
    runs: list[TaskRun]           # task i's record, returned in the result
    values: list[Any]             # task i's value while something may still need it
    keys: list[tuple[Any, ...]]   # ready-heap key (-priority, -rank, i): best first
    level: list[int]              # depth of i in the graph (for the display)
    pools: list[Pool]             # the pool that runs i (threads, processes, cluster)
    sizers: list[Any]             # callable cpus/memory/timeout of i, or None
    plain: list[bool]             # i may be prefetched or queued behind a leader
                                  # (_threadpool.PREFETCH_BELOW, _dispatch.PIPELINE_BELOW)
    member_of: list[Sequence[int] | None]  # the groups i is a member of
    is_group: list[bool]          # i is a group or a map (it never runs; readiness's list)
    kept: list[bool]              # keep=: i's value stays in the result
    nconsumers: list[int]         # keep=: dependents of i not final yet

    # Per task, set during the run -------------------------------------------------------
    sized: set[int]               # tasks whose callable options were evaluated
    overrides: bool               # whether cpus_of, timeouts or mem_limits hold anything
    cpus_of: dict[int, float]     # cpus computed by a cpus= callable
    timeouts: dict[int, float | None]  # timeouts computed by a timeout= callable
    mem_limits: dict[int, int | None]  # memory limits computed, or grown by a retry policy
    evictions: dict[int, int]     # times i was stopped and queued again for the budget
    retry_errors: dict[int, BaseException]  # last error of tasks waiting for a retry
    tainted: set[int]             # tasks whose value is, or was built from, a default

    # Pools and gates ------------------------------------------------------------------
    queue: SimpleQueue[Any]       # the run's messages: pools, monitor, Run handle
    threads: ThreadPool           # the run's own threads
    procs: ProcessPool | None     # the reusable process workers (when a task needs them)
    max_tasks_per_worker: int | None  # replace a process worker after that many tasks
    cluster: ClusterPool | None   # the pool of isolation="cluster" tasks
    monitor: Monitor              # samples process workers' memory and the CPU
    gates: list[Gate]             # admission: slots first, then cpus, memory, pools...
    mem_gate: MemoryGate | None   # the memory gate among them, if any
    unslotted: list[Gate]         # the gates but the slots (what a prefetched task takes)
    handed: list[Gate]            # slots and cpus: a follower takes its leader's (sort_gates)
    waiting_gates: list[Gate]     # the others: what a follower takes while it waits

    # Waiting work ---------------------------------------------------------------------
    ready: list[tuple[Any, ...]]  # heap of keys of tasks whose dependencies are done
    deadlines: list[tuple[float, int, Deadline, Any]]  # heap (when, seq, kind, payload)
    seq: itertools.count[int]     # tie-breaker of deadlines

    # Attempts -------------------------------------------------------------------------
    running: dict[Attempt, None]  # attempts whose outcome is undecided (in start order)
    zombies: set[Attempt]         # decided thread attempts still holding their resources
    interrupted: set[Attempt]     # process attempts in their grace period before a kill
    nholding: int                 # attempts holding resources (running or zombie)
    only_threads: bool            # every local task runs on threads (threads.prefetch)
    mean_process_duration: float  # running average of process tasks' durations (seconds;
                                  # pipelining, PIPELINE_BELOW)
    waiting: deque[Attempt]       # followers queued behind a leader, oldest first (steal;
                                  # entries promoted or ended meanwhile are dropped lazily)
    leaders: deque[Attempt]       # process attempts that may take a follower, oldest first
                                  # (entries no longer running are dropped lazily)

    # Groups and maps ------------------------------------------------------------------
    groups: dict[int, Group]      # group or map index -> its members and decision
    done_members: Any             # deque of final tasks whose groups must decide
    deciding: bool                # a member_done loop is running (no recursion)

    # The run --------------------------------------------------------------------------
    nfinal: int                   # tasks in a final state (the run ends at n)
    stopping: str | None          # the run's final status once it stops early
    partial: bool                 # some task failed under on_error="skip"/"ignore"
    paused: bool                  # pause(): nothing new starts
    grace_at: float | None        # when a stopping run stops waiting for thread tasks
    grace_ended: bool             # ... and that moment has passed
    kill_by: float                # the latest KILL deadline (the end waits for it)
    recheck_pending: bool         # a RECHECK deadline is queued
    late_warning: str | None      # thread tasks that ignored their cancel flag
    crash: BaseException | None   # the scheduler's own failure (re-raised by Run.wait)
    result: RunResult | None      # the RunResult, once the run ended
    t0: float                     # when the run started (monotonic)
    cpu_time: float               # the scheduler thread's CPU time
    clock: Callable[[], float]    # monotonic clock (tests inject their own)
    offset: float                 # wall clock minus monotonic clock
    emitter: Emitter              # delivers events on the event thread
    em: bool                      # anyone listens to per-task events
    debug: bool                   # debug logging is on
    releasing: bool               # keep= is not "all": values are released when consumed

    def emit(self, kind: EventKind, i: int | None = None, attempt: int = 0,
             duration: float | None = None, error: BaseException | None = None) -> None:
        """Send event ``kind`` (about task ``i``) to the run's subscribers, if any wants it."""
        if self.emitter.wants(kind):
            self.emitter.emit(Event(kind, self.name, None if i is None else self.specs[i].id,
                                    self.clock() + self.offset, attempt, duration, error))

    def add_deadline(self, when: float, kind: Deadline, payload: Any) -> None:
        """Have the loop act on ``payload`` at ``when`` (monotonic seconds)."""
        heapq.heappush(self.deadlines, (when, next(self.seq), kind, payload))

    if TYPE_CHECKING:  # transitions that one part of the scheduler calls in another
        def finalize(self, i: int, state: TaskStatus, kind: EventKind,
                     error: BaseException | None = None, tb_text: str | None = None,
                     number: int = 0) -> None: ...
        def attempt_failed(self, i: int, attempt: Attempt, error: BaseException,
                           tb_text: str | None, *, timed_out: bool = False,
                           retryable: bool = True) -> None: ...
        def task_failed(self, i: int, error: BaseException, tb_text: str | None, number: int,
                        timed_out: bool = False) -> None: ...
        def skip_downstream(self, i: int, status: TaskStatus = ...) -> None: ...
        def release_dependents(self, i: int) -> None: ...
        def release(self, attempt: Attempt) -> None: ...
        def unlink(self, attempt: Attempt) -> list[Gate]: ...
        def size(self, i: int) -> bool: ...
        def timeout_of(self, i: int) -> float | None: ...
        def init_memory(self, i: int, stacklevel: int = 1) -> None: ...
        def stop(self, status: str) -> None: ...
        def kill_or_flag(self, attempt: Attempt, cancel: bool = True) -> bool: ...
        def abandon(self, attempt: Attempt) -> None: ...
        def cancel_retry(self, i: int) -> None: ...
        def group_started(self, i: int, now: float) -> None: ...
        def member_done(self, i: int) -> None: ...
        def member_failed(self, i: int) -> bool: ...
        def expand_map(self, g: int) -> None: ...
        def grow_memory(self, i: int, factor: float) -> None: ...
        def unpark(self, g: Gate) -> None: ...
        def promoted(self, f: Attempt) -> None: ...
        def sort_gates(self) -> None: ...
        def launch(self, i: int, prefetch: bool = False) -> None: ...
        def launch_batch(self, i: int) -> None: ...
        def settle(self, i: int, attempt: Attempt, ok: bool, value: Any,
                   tb_text: str | None) -> None: ...
        def batch_done(self, msg: Done, now: float) -> None: ...
        def item_done(self, msg: ItemDone, now: float) -> None: ...
        def item_timed_out(self, batch: Attempt, k: int) -> None: ...
        def item_deadline(self, batch: Attempt) -> None: ...
        def note_item_time(self, g: int, seconds: float) -> None: ...
        def batchable(self, spec: TaskSpec, iso: str, map_spec: TaskSpec) -> bool: ...
        def cancel_batch(self, batch: Attempt) -> None: ...
        def collect(self, group: Group) -> Any: ...
        def resolve_group(self, g: int, ok: bool, value: Any = None,
                          error: BaseException | None = None,
                          timed_out: bool = False) -> None: ...
