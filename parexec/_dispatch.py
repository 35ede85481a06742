"""Dispatch: start ready tasks, best first, while every gate admits them.

Part of the scheduler (see ``_state`` for the state it reads and writes). A task refused by
a gate waits on that gate (``parked``) until the gate gives units back (``unpark``); the best
task refused for lack of units holds the gate's reservation (``_gates``: Reservations).
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable

from ._events import logger
from ._gates import RECHECK, YES, CpuGate, Gate
from ._state import Attempt, Deadline, RunState
from ._status import TaskStatus
from ._task import resolve_args, resolve_refs

_WAITING, _READY, _RUNNING = TaskStatus.PENDING, TaskStatus.READY, TaskStatus.RUNNING
heappush = heapq.heappush

MEMORY_RECHECK = 0.25  # seconds between measured-memory checks while a task waits for memory
# Pipelining of short process tasks: the thread pool's prefetch (``_threadpool``,
# PREFETCH_BELOW) for the process pool, whose workers are shared by every run (so "one
# more worker" is no cap). While the run's process tasks take under PIPELINE_BELOW seconds
# on average, a task the slots refuse may be queued behind a running process attempt of
# the run, its *leader*: it is written to the leader's worker at once, which runs it as
# soon as the leader returns (``_processpool``, "Pipelining"), and it takes the leader's
# slot when the scheduler hears the leader ended (``unlink``). At most one follower per leader,
# so no more than max_workers of the run's process tasks ever run.
# Without it, a no-op process task cost a round trip through the scheduler per task (the
# worker idle meanwhile): 0.45x loky's reusable executor at 10,000 tasks, 0.34x with it. The
# same qualifications as for threads (plain tasks: nothing scarce is held while queued)
# and the same cost: a queued task is committed to its worker, so a higher-priority task
# that becomes ready a moment later starts after it (within PIPELINE_BELOW on average).
# At 20 ms: without pipelining a worker idles 200-270 us between tasks (the reply's round
# trip through the reader and scheduler threads), 1-3 % of a task that long; 10 ms tasks
# through px.Executor were 2.3x ProcessPoolExecutor's overhead per task at 5 ms, ~1.0x at
# 20 ms (python -m bench.executor, bench/README.rst).
# A leader may run far longer than the mean: a follower still waiting when a slot frees
# (a task without follower ended) and no better task is ready takes that slot on the free
# worker (``steal``), so it never waits out a long leader while a worker idles.
PIPELINE_BELOW = 0.02
MAX_STALE_LEADERS = 64  # compact the leaders deque when this many ended ones may pile up


class Dispatch(RunState):
    """Starting attempts: the ready heap, the gates, launching."""

    def dispatch(self) -> None:
        """Start ready tasks, best first, while the gates admit them."""
        if self.paused or self.stopping:
            return
        if self.waiting:
            while self.steal():
                pass
        ready, gates = self.ready, self.gates
        state, sizers = self.state, self.sizers
        while True:
            if not ready:
                if self.nholding or not any(g.parked for g in gates):
                    return
                # Nothing runs and nothing is ready: whatever waits on a gate gets its turn.
                # (Checked again once the ready heap is empty: it may have held only tasks
                # cancelled while they waited, found by the property suite.)
                for g in gates:
                    while g.parked:
                        heapq.heappush(ready, heapq.heappop(g.parked))
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
                verdict = g.admits(i)
                if verdict is not YES:  # identity: no __bool__ call on the hot path
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
                if self.plain[i] and self.may_queue(i):
                    heapq.heappop(ready)
                    self.launch(i, prefetch=True)
                    continue
                return
            heapq.heappop(ready)
            heapq.heappush(g.parked, key)
            if short and g.reserve(i, key) and g.parked:
                self.unpark(g)  # a smaller reservation than before may leave room
            if verdict is RECHECK:  # refused by a measurement: no release may wake it
                if not self.recheck_pending:
                    self.recheck_pending = True
                    self.add_deadline(self.clock() + MEMORY_RECHECK, Deadline.RECHECK, g)

    def sort_gates(self) -> None:
        """Which gates a task queued ahead takes now, and which when it starts.

        A prefetched thread task takes every gate but the slots (``unslotted``). A follower
        (``PIPELINE_BELOW``) takes its leader's slot and cpus when the leader ends
        (``handed``), the other gates now (``waiting_gates``): the CPU gate of a run with a
        ``cpu_budget`` (and of every ``px.Executor``) would otherwise refuse it, its units
        all held by the running tasks it waits behind.
        """
        gates = self.gates
        self.unslotted = [g for g in gates if not g.blocks_all]
        self.handed = [g for g in gates if g.blocks_all or isinstance(g, CpuGate)]
        self.waiting_gates = [g for g in gates if g not in self.handed]

    def may_queue(self, i: int) -> bool:
        """Whether plain task ``i``, refused a slot, may wait queued for a worker.

        The thread pool says whether it takes one more (its prefetch policy,
        ``_threadpool.PREFETCH_BELOW``); a process task needs a leader (``PIPELINE_BELOW``)
        whose slot and cpus are exactly what it needs. The gates it takes now must admit it.
        """
        pool = self.pools[i]
        if pool is self.threads:
            if not pool.may_prefetch():
                return False
            held = self.unslotted
        else:
            if pool is not self.procs or self.mean_process_duration >= PIPELINE_BELOW:
                return False
            leader = self.free_leader()
            if leader is None:
                return False
            j = leader.index
            if any(g.need(i) != g.need(j) for g in self.handed):
                return False
            held = self.waiting_gates
        return all(h.admits(i) and (h.holder < 0 or not h.need(i) or h.spares(i))
                   for h in held)

    def steal(self) -> bool:
        """Give a free slot to the oldest follower still waiting behind its leader.

        A follower is committed to its leader's worker, and a leader may run far longer
        than the mean that let it be queued: when a slot is free (a task without follower
        ended) and no better task is ready, the follower takes the slot and starts on a
        free worker (``restart``) instead of waiting. Returns whether one did.
        """
        waiting = self.waiting
        while waiting:
            f = waiting[0]
            if _waits(f):
                break
            waiting.popleft()  # promoted, withdrawn or ended meanwhile
        else:
            return False
        i = f.index
        if self.ready and self.ready[0] < self.keys[i]:
            return False  # the free slot is for a better task
        handed = self.handed  # what its leader would have handed it (sort_gates)
        for g in handed:
            if g.holder >= 0 and g.holder != i or g.used + g.need(i) > g.capacity:
                return False
        waiting.popleft()
        for g in handed:
            g.acquire(i)
        leader = f.leader
        assert leader is not None  # _waits(f)
        leader.follower = f.leader = None
        f.prefetched = False
        self.leaders.append(f)
        self.promoted(f)
        f.pool.restart(f)  # type: ignore[attr-defined]
        return True

    def promoted(self, f: Attempt) -> None:
        """Follower ``f`` now holds a slot and runs in its own right: its record starts."""
        j = f.index
        tr = self.runs[j]
        tr.started_at = started = self.clock() + self.offset  # its Done has the worker's own
        if f.number == 1:
            tr.first_started_at = started
        if self.em and not self.stopping:
            self.emit("task:started", j, f.number)

    def free_leader(self) -> Attempt | None:
        """The oldest process attempt still running with no follower (see ``PIPELINE_BELOW``)."""
        leaders = self.leaders
        while leaders:
            a = leaders[0]
            if _may_lead(a):
                return a
            leaders.popleft()
        return None

    def start_reserved(self, i: int) -> None:
        """Launch ``i``, ending the reservations it held (see ``_gates``: Reservations).

        A map item that may batch takes the items of its map queued behind it along.
        """
        if self.batch_map[i] >= 0:
            self.launch_batch(i)
        else:
            self.launch(i)
        for g in self.gates:
            if g.holder == i:
                g.unreserve()
                if g.parked and g.used < g.capacity:
                    self.unpark(g)

    def may_backfill(self, g: Gate, i: int) -> bool:
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

    def shadow_time(self, g: Gate) -> float:
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
        attempt = Attempt(i, spec.id, number, self.queue, pool, cpus)
        if pool is not self.threads:
            attempt.memory_limit = limit
            if pool is not self.cluster:
                attempt.monitor = self.monitor
                if self.mem_gate is not None:
                    self.mem_gate.started(i, attempt)
        else:
            attempt.sampler = self.monitor
        if prefetch:  # queued beyond the slots: it takes no slot (see may_queue)
            attempt.prefetched = True
            for g in self.unslotted if pool is self.threads else self.waiting_gates:
                g.acquire(i)
            if pool is self.procs:  # behind a leader (PIPELINE_BELOW)
                leader = self.free_leader()
                assert leader is not None  # may_queue found it
                attempt.leader, leader.follower = leader, attempt
                self.waiting.append(attempt)
                if len(self.waiting) > MAX_STALE_LEADERS + self.nholding:
                    self.waiting = _pruned(self.waiting, _waits)
        else:
            for g in self.gates:
                g.acquire(i)
            if pool is self.procs and pool is not None:
                self.leaders.append(attempt)
                if len(self.leaders) > MAX_STALE_LEADERS + self.nholding:
                    self.leaders = _pruned(self.leaders, _may_lead)
        self.state[i] = _RUNNING
        self.nholding += 1
        self.running[attempt] = None
        now = self.clock()
        tr.started_at = started = now + self.offset
        if number == 1:
            tr.first_started_at = started
        if timeout is not None and not getattr(pool, "reports_start", False):
            self.add_deadline(now + timeout, Deadline.TIMEOUT, attempt)
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

    def release(self, attempt: Attempt) -> None:
        """Give back the resources ``attempt`` holds, and let parked tasks retry admission."""
        attempt.holding = False
        self.nholding -= 1
        self.running.pop(attempt, None)
        i = attempt.index
        for g in self.unlink(attempt):
            g.release(i)
            if g.parked:
                self.unpark(g)

    def unlink(self, attempt: Attempt) -> list[Gate]:
        """The gates ``attempt`` holds, now that it ends; its queue links are undone.

        A prefetched thread attempt holds every gate but the slots, a waiting follower the
        ``waiting_gates``. A leader's slot and cpus go to its follower, which starts now
        (see ``PIPELINE_BELOW`` and ``sort_gates``).
        """
        if attempt.prefetched:
            leader = attempt.leader
            if leader is not None:
                leader.follower = attempt.leader = None
            return self.unslotted if attempt.pool is self.threads else self.waiting_gates
        follower = attempt.follower
        if follower is None:
            return self.gates
        attempt.follower = follower.leader = None
        follower.prefetched = False
        self.leaders.append(follower)  # it runs in its own right now: it may lead too
        self.promoted(follower)
        return self.waiting_gates

    def unpark(self, g: Gate) -> None:
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


def _may_lead(a: Attempt) -> bool:
    """Whether process attempt ``a`` still runs with no follower (``free_leader``)."""
    return a.holding and not a.final and a.follower is None


def _waits(f: Attempt) -> bool:
    """Whether follower ``f`` still waits behind its leader (``steal``)."""
    return f.prefetched and f.leader is not None and f.holding and not f.final


def _pruned(queue: collections.deque[Attempt],
            alive: Callable[[Attempt], bool]) -> collections.deque[Attempt]:
    """``queue`` without the entries no longer ``alive``.

    Those deques drop dead entries only lazily, at their front; pruned now and then, they
    stay bounded by what runs.
    """
    return collections.deque(a for a in queue if alive(a))
