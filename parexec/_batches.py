"""Batches: the items of a process map go to a worker several at a time (issue 16).

Part of the scheduler (see ``_state``). Sending a tiny item costs a round trip through the
scheduler, a pipe and the worker (about 100 us), far more than ``x * x`` itself. So when an
item of a map with ``batch="auto"`` (the default) or ``batch=N`` is admitted, the items of
the same map waiting right behind it in the ready heap go with it, in one message, to one
worker, which runs them one after the other (``_worker.run_batch``) and answers once.

The batch holds one item's resources (its slot, cpus, memory, pool units): its items run
one at a time. Everything else stays per item: each is RUNNING from the batch's start, has
its own attempt number, worker-side start and end times, value or error (type and
worker traceback kept), retries, events, progress, ``on_error`` and ``default``; the
worker's peak memory during the batch is each item's peak.

``"auto"`` sizes batches from the items' measured durations (``note_item_time``): the first
items go one by one until one has been timed, then batches aim at ``TARGET_SECONDS``, long
enough to hide the round trip and short enough for responsive progress, cancellation and
fair sharing, as joblib's auto-batching does. A batch never takes more than its share of
what is left (``1 / (2 * slots)``), so the end of a map keeps every worker busy.

Items with a ``timeout`` travel in *streamed* batches: the worker sends each item's
outcome as it ends (``_worker.run_batch``, ``ItemDone``), so the scheduler knows which item
runs since when. One that overruns is timed out alone (``item_timed_out``): its worker is
killed, the items settled before it keep their values, and those after it, which never
started, are sent again without counting an attempt.

Sent one by one (a batch of one is an ordinary attempt): thread items (prefetch already
hides their round trip), and items with ``memory``, ``grace`` or a callable option, whose
limits and stops act on a whole worker. A worker that dies during a batch fails
each of its items with ``WorkerCrashed`` (each retried as its policy says); cancelling the
run, or the map resolving early, kills the batch's worker and cancels its items.
"""

from __future__ import annotations

import heapq
from typing import Any

from ._errors import TaskTimeout
from ._messages import Done, ItemDone
from ._state import Attempt, Deadline, RunState
from ._status import TaskStatus
from ._task import resolve_args, resolve_refs
from ._worker import decode_outcome, run_batch

TARGET_SECONDS = 0.02  # what one auto-sized batch should take to run
MAX_BATCH = 1000  # items in one message, at most (bounds its size and the lost work)

_READY, _RUNNING = TaskStatus.READY, TaskStatus.RUNNING


class MapStats:
    """What one map's batching did, for ``RunStats.maps`` and ``summary()``."""

    __slots__ = ("items", "sizes", "total_time", "timed")

    def __init__(self) -> None:
        self.items = 0        # items sent (attempts, retries included)
        self.sizes: dict[int, int] = {}  # batch size -> how many batches of that size
        self.total_time = 0.0  # worker-side seconds of the timed items
        self.timed = 0        # items timed

    @property
    def mean_item_time(self) -> float | None:
        """Mean worker-side duration of one item (seconds), None before any ended."""
        return self.total_time / self.timed if self.timed else None

    def as_dict(self) -> dict[str, Any]:
        """The figures as plain data."""
        return {"items": self.items, "batches": dict(sorted(self.sizes.items())),
                "mean_item_time": self.mean_item_time}


class Batches(RunState):
    """Sizing, sending and answering batches of map items."""

    def batchable(self, spec: Any, iso: str, map_spec: Any) -> bool:
        """Whether items like ``spec`` (of map ``map_spec``) may travel in batches."""
        info = map_spec.group
        return (iso == "process" and info is not None and info.output == "list"
                and info.batch != 1 and not spec.memory
                and spec.sizers is None and not (spec.grace or (spec.grace is None
                                                                and self.grace)))

    def note_item_time(self, g: int, seconds: float) -> None:
        """An item of map ``g`` ran ``seconds`` in its worker."""
        stats = self.map_stats.get(g)
        if stats is not None:
            stats.total_time += seconds
            stats.timed += 1

    def batch_size(self, g: int) -> int:
        """How many items of map ``g`` the next batch takes."""
        info = self.specs[g].group
        assert info is not None
        stats = self.map_stats[g]
        group = self.groups.get(g)
        left = group.pending if group is not None else 1
        share = max(1, left // (2 * self.threads.max_threads))
        if info.batch != "auto":
            return min(int(info.batch), MAX_BATCH)
        mean = stats.mean_item_time
        if mean is None:
            return 1  # time one first
        return max(1, min(int(TARGET_SECONDS / max(mean, 1e-7)), share, MAX_BATCH))

    def launch_batch(self, i: int) -> None:
        """Start map item ``i`` (admitted, popped) with the items of its map queued behind it."""
        g = self.batch_map[i]
        size = self.batch_size(g)
        stats = self.map_stats[g]
        items = [i]
        ready, state, batch_map = self.ready, self.state, self.batch_map
        while len(items) < size and ready:
            j = ready[0][2]
            if batch_map[j] != g or state[j] is not _READY:
                break
            heapq.heappop(ready)
            items.append(j)
        stats.items += len(items)
        stats.sizes[len(items)] = stats.sizes.get(len(items), 0) + 1
        if len(items) == 1:
            self.launch(i)
            return
        spec0, pool = self.specs[i], self.pools[i]
        batch = Attempt(i, f"{self.specs[g].id}[batch of {len(items)}]", 1, self.queue, pool,
                        spec0.cpus)
        batch.monitor = self.monitor
        batch.items = members = []
        if self.mem_gate is not None:
            self.mem_gate.started(i, batch)
        for gate in self.gates:
            gate.acquire(i)
        self.nholding += 1
        self.running[batch] = None
        now = self.clock()
        started = now + self.offset
        values, runs, specs = self.values, self.runs, self.specs
        parts = []
        for j in items:
            spec, tr = specs[j], runs[j]
            number = tr.attempts = tr.attempts + 1
            members.append((j, number))  # its Attempt is made only if it needs one (item)
            state[j] = _RUNNING
            tr.started_at = started
            if number == 1:
                tr.first_started_at = started
            self.batch_of[j] = batch
            if self.em:
                self.emit("task:started", j, number)
            parts.append((spec.id, number,
                          resolve_args(spec.args, values) if spec.has_refs else spec.args))
        self.group_started(i, now)
        try:
            kwargs = spec0.kwargs
            if kwargs and spec0.has_refs:
                kwargs = resolve_refs(kwargs, values.__getitem__)
            timeout = spec0.timeout
            if timeout is None:
                pool.submit(batch, run_batch, (spec0.fn, parts, kwargs), {})
            else:  # streamed: each item's outcome comes ahead, and starts the next one's clock
                pool.submit(batch, run_batch, (spec0.fn, parts, kwargs, True), {})
                self.item_clock[batch] = (0, now + timeout)
                self.add_deadline(now + timeout, Deadline.ITEM_TIMEOUT, batch)
        except Exception as exc:  # noqa: BLE001 - e.g. PicklingError: fails these items only
            batch.final = True
            self.release(batch)
            for j, number in self.unbatch(batch):
                runs[j].finished_at = self.clock() + self.offset
                self.attempt_failed(j, self.item(batch, j, number), exc, None, retryable=False)

    def item_done(self, msg: ItemDone, now: float) -> None:
        """Item ``msg.k`` of a streamed batch ended: settle it; the next one starts now."""
        batch, k = msg.attempt, msg.k
        members = batch.items
        if batch.final or members is None or not 0 <= k < len(members) - 1:
            return  # decided meanwhile (killed); the last item comes in the batch's Done
        j, number = members[k]
        if self.batch_of.get(j) is batch:
            del self.batch_of[j]
            if self.state[j] is _RUNNING:
                self.settle_item(j, number, batch, msg.outcome, batch.worker,
                                 msg.peak_memory, now)
        if batch.final:  # settling it stopped the batch (its map resolved, the run stops)
            return
        j, _ = members[k + 1]  # runs now, on the worker's clock as on ours
        if self.batch_of.get(j) is batch and self.state[j] is _RUNNING:
            self.runs[j].started_at = now + self.offset
        timeout = self.specs[j].timeout
        if timeout is not None:  # its deadline replaces the last one's (one per batch)
            self.item_clock[batch] = (k + 1, now + timeout)

    def item_deadline(self, batch: Attempt) -> None:
        """A streamed batch's deadline is due: its running item overran, or moved on since."""
        clock = self.item_clock.get(batch)
        if clock is None or batch.final or batch not in self.running:
            return
        k, due = clock
        if due > self.clock():  # a later item runs now: wait for its own deadline
            self.add_deadline(due, Deadline.ITEM_TIMEOUT, batch)
        else:
            self.item_timed_out(batch, k)

    def item_timed_out(self, batch: Attempt, k: int) -> None:
        """Item ``k`` of a streamed batch overran its timeout: it is timed out alone.

        Its worker is killed; the items after it, which never started, are sent again
        without counting an attempt (those before it were settled as they ended).
        """
        assert batch.items is not None  # a streamed batch's (item_deadline)
        j, number = batch.items[k]
        if self.batch_of.get(j) is not batch or self.state[j] is not _RUNNING:
            return  # it ended, and its outcome is being settled
        spec, tr = self.specs[j], self.runs[j]
        error = TaskTimeout(f"task {spec.id!r} attempt {number} exceeded its timeout of "
                            f"{spec.timeout or 0:g}s")
        tr.finished_at = self.clock() + self.offset
        tr.worker = batch.worker
        if self.em:
            self.emit("task:timeout", j, number, tr.duration, error)
        if not self.kill_or_flag(batch, cancel=False):
            return  # its worker is gone already: the batch's Done settles every item
        self.resend_after(batch, k)
        self.unbatch(batch)  # its items are all settled or sent again (j just below)
        self.attempt_failed(j, self.item(batch, j, number), error, None, timed_out=True)

    def resend_after(self, batch: Attempt, k: int) -> None:
        """``batch`` stopped while its item at position ``k`` ran: those after it never started.

        They leave the batch and are ready again, their attempt not counted, before item
        ``k`` is settled: a failure of it that stops the run or resolves the map then finds
        them ready (and cancels them), not running in a batch that no longer runs.
        """
        state, runs, ready, keys, batch_of = \
            self.state, self.runs, self.ready, self.keys, self.batch_of
        now = self.clock() + self.offset
        for m, n in (batch.items or [])[k + 1:]:
            if batch_of.get(m) is not batch:
                continue
            del batch_of[m]
            if state[m] is not _RUNNING:
                continue
            tr = runs[m]  # as if it had not been sent
            tr.attempts = n - 1
            tr.started_at = None
            tr.queued_at = now
            if n == 1:
                tr.first_started_at = None
            state[m] = _READY
            heapq.heappush(ready, keys[m])
            if self.em:
                self.emit("task:queued", m)

    def settle_item(self, j: int, number: int, batch: Attempt, outcome: tuple[Any, ...],
                    worker: int | str | None, peak: int | None, now: float) -> None:
        """Settle item ``j`` of ``batch`` alone, with its outcome from ``run_batch``."""
        tr = self.runs[j]
        tr.worker = worker
        tr.peak_memory = peak
        ok, value, t0, t1 = outcome
        if t1:
            tr.started_at = t0 + self.offset
            tr.finished_at = t1 + self.offset
            if number == 1:
                tr.first_started_at = tr.started_at
            self.note_item_time(self.batch_map[j], t1 - t0)
        else:
            tr.finished_at = now + self.offset
        a = self.item(batch, j, number)
        if ok:
            self.settle(j, a, True, value, None)
        elif isinstance(value, BaseException):  # it could not be read here
            self.settle(j, a, False, value, None)
        else:
            _, error, tb_text, _ = decode_outcome(a.task_id, value)
            self.settle(j, a, False, error, tb_text)

    def item(self, batch: Attempt, j: int, number: int) -> Attempt:
        """The attempt of item ``j`` of ``batch`` (made when it must be settled alone)."""
        spec = self.specs[j]
        return Attempt(j, spec.id, number, self.queue, batch.pool, spec.cpus)

    def unbatch(self, batch: Attempt) -> list[tuple[int, int]]:
        """``(index, attempt number)`` of ``batch``'s items still running; they leave it."""
        out = []
        batch_of, state = self.batch_of, self.state
        self.item_clock.pop(batch, None)
        for j, number in batch.items or ():
            if batch_of.get(j) is batch:
                del batch_of[j]
                if state[j] is _RUNNING:
                    out.append((j, number))
        return out

    def cancel_batch(self, batch: Attempt) -> None:
        """Cancel the running items of ``batch``, whose worker was just killed."""
        now = self.clock() + self.offset
        for j, number in self.unbatch(batch):
            self.runs[j].finished_at = now
            self.finalize(j, TaskStatus.CANCELLED, "task:cancelled", number=number)
            if not self.stopping:
                self.skip_downstream(j, TaskStatus.CANCELLED)

    def batch_done(self, msg: Done, now: float) -> None:
        """A batch ended: settle each item with its own outcome (or the batch's error)."""
        batch = msg.attempt
        if batch.final:  # killed (cancelled): its items were settled then
            if batch.holding:
                self.release(batch)
            return
        if msg.peak_memory is not None:
            batch.peak_memory = msg.peak_memory
        self.release(batch)
        outcomes = msg.value if msg.ok else None
        if outcomes is None and batch in self.item_clock:
            # A streamed batch's worker died in its first item not settled yet.
            running = next((k for k, (j, _) in enumerate(batch.items or ())
                            if self.batch_of.get(j) is batch and self.state[j] is _RUNNING),
                           None)
            if running is not None:
                self.resend_after(batch, running)  # the others never started
        items = self.unbatch(batch)
        runs = self.runs
        g = self.batch_map[batch.index]
        members = batch.items or []
        n = len(members) or 1
        if outcomes is not None and len(items) == n and self.all_succeeded(g, items, outcomes):
            self.settle_batch(g, items, outcomes, msg)
            return
        # The outcomes are those of the last items (a streamed batch's came ahead but one).
        for k, (j, number) in enumerate(items if outcomes is None
                                        else members[len(members) - len(outcomes):]):
            if self.state[j] is not _RUNNING:
                continue  # cancelled meanwhile (its group resolved)
            tr = runs[j]
            tr.shm_bytes += msg.shm_bytes // n
            tr.pipe_bytes += msg.pipe_bytes // n
            if outcomes is None:  # the batch failed as a whole (its worker died, ...)
                tr.worker, tr.peak_memory = msg.worker, msg.peak_memory
                tr.finished_at = now + self.offset
                self.settle(j, self.item(batch, j, number), False, msg.value, msg.traceback)
                continue
            self.settle_item(j, number, batch, outcomes[k], msg.worker, msg.peak_memory, now)

    def all_succeeded(self, g: int, items: list[tuple[int, int]], outcomes: list[Any]) -> bool:
        """Whether a batch may be settled at once (``settle_batch``).

        It may when every item succeeded and nothing but map ``g`` (deciding as ``"all"``)
        hears of them, with no store, events, debug log or ``keep=`` to serve per item.
        """
        group = self.groups.get(g)
        if (group is None or group.resolved or group.wait != "all" or self.store is not None
                or self.em or self.releasing or self.debug or self.stopping):
            return False
        member_of, dependents = self.member_of, self.dependents
        for (j, _), outcome in zip(items, outcomes, strict=True):
            groups = member_of[j]
            heard = dependents[j]  # (g,) for a declared map's items, () for run-time ones
            if not outcome[0] or groups is None or len(groups) != 1 or groups[0] != g \
                    or len(heard) > 1 or heard and heard[0] != g:
                return False
        return True

    def settle_batch(self, g: int, items: list[tuple[int, int]], outcomes: list[Any],
                     msg: Done) -> None:
        """Succeed every item of a batch, then let map ``g`` decide once.

        The same transitions as ``settle`` per item (value, record, state), without the
        per-item steps that do nothing here (see ``all_succeeded``).
        """
        runs, values, state, offset = self.runs, self.values, self.state, self.offset
        worker, peak = msg.worker, msg.peak_memory
        shm, pipe = msg.shm_bytes // len(items), msg.pipe_bytes // len(items)
        succeeded = TaskStatus.SUCCEEDED
        spent = 0.0
        for (j, number), (_, value, t0, t1) in zip(items, outcomes, strict=True):
            tr = runs[j]
            tr.started_at = started = t0 + offset
            tr.finished_at = t1 + offset
            if number == 1:
                tr.first_started_at = started
            tr.worker, tr.peak_memory = worker, peak
            tr.shm_bytes += shm
            tr.pipe_bytes += pipe
            spent += t1 - t0
            values[j] = tr.value = value
            state[j] = tr.status = succeeded
        self.nfinal += len(items)
        stats = self.map_stats[g]
        stats.total_time += spent
        stats.timed += len(items)
        group = self.groups[g]
        group.pending -= len(items)
        if not group.pending:
            self.resolve_group(g, True, self.collect(group))
