"""Transitions of parexec's scheduler, driven by hand with a fake pool and a fake clock.

In the style of dask's ``tests/test_local.py``: no task ever runs and no time passes. Each
test builds a ``Scheduler`` whose pools are ``FakePool`` objects (they record what they are
asked and never run anything) and whose clock is a ``FakeClock`` the test advances. The test
then plays the loop's part: ``dispatch()``, messages through ``handle(msg, now)``
(``Done``, ``Control``), ``fire_deadlines()`` once the clock is moved, and asserts the
whole outcome: ``sched.state[i]``, the ``TaskRun`` records, the events emitted and what the
pools were asked (submitted, killed, interrupted).

The pure parts are tested on their own at the end: the wait strategies of ``_waits`` (a
fake ``Members``) and ``_graph.Readiness`` (also as a hypothesis property).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import parexec as px
from parexec import _groups, _monitor, _scheduler, _stopping
from parexec._errors import Cancelled, TaskOptionError, TaskTimeout
from parexec._events import Emitter, Event
from parexec._graph import Graph, Readiness
from parexec._messages import Control, Done, OverLimit, Started
from parexec._scheduler import Scheduler
from parexec._state import Attempt
from parexec._status import TaskStatus
from parexec._task import Outcome
from parexec._threadpool import ThreadPool
from parexec._waits import Group, Resolution

S = TaskStatus
T0 = 100.0  # the fake clock's reading when a run begins


def work(*args: Any, **kwargs: Any) -> None:
    """A task function; never called (the fake pools run nothing)."""
    raise AssertionError("a fake pool ran a task")


# The fakes ---------------------------------------------------------------------------------

class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakePool:
    """A pool that records what the scheduler asks of it and never runs anything.

    ``kind="thread"`` behaves as ``ThreadPool`` does for the scheduler (``kill`` returns
    False: a thread cannot be stopped); ``kind="process"`` as ``ProcessPool`` (``kill``
    succeeds). ``interruptible`` is what ``interrupt`` answers (``grace=``).
    """

    def __init__(self, kind: str, log: list[Attempt], max_threads: int = 1 << 30) -> None:
        self.kind = kind
        self.log = log  # every submission, of this pool and of the others, in order
        self.max_threads = max_threads
        self.nbusy = 0
        self.prefetch = False  # ThreadPool's prefetch policy, below (the scheduler sets this)
        self.nprefetched = 0
        self.mean_duration = 1.0
        self.submitted: list[Attempt] = []
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
        self.killed: list[Attempt] = []
        self.interrupted: list[tuple[Attempt, bool]] = []
        self.memory_kills: list[tuple[Attempt, int, int]] = []
        self.interruptible = True
        self.shut = False
        self.restarted: list[Attempt] = []

    def submit(self, attempt: Attempt, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               max_tasks_per_worker: int | None = None) -> None:
        self.nbusy += 1
        if attempt.prefetched:
            self.nprefetched += 1
        self.submitted.append(attempt)
        self.log.append(attempt)
        self.calls.append((fn, args, kwargs))
        attempt.worker = 4242 if self.kind == "process" else "fake-thread"

    may_prefetch = ThreadPool.may_prefetch
    reported = ThreadPool.reported

    def kill(self, attempt: Attempt) -> bool:
        if self.kind == "thread":
            return False
        self.killed.append(attempt)
        return True

    def restart(self, attempt: Attempt) -> None:
        self.restarted.append(attempt)

    def interrupt(self, attempt: Attempt, cancel: bool) -> bool:
        self.interrupted.append((attempt, cancel))
        return self.interruptible

    def kill_for_memory(self, attempt: Attempt, used: int, limit: int) -> None:
        self.memory_kills.append((attempt, used, limit))

    def shutdown(self) -> None:
        self.shut = True


class FakeMonitor:
    """The run's Monitor without its sampling thread: it measures nothing."""

    def __init__(self, *args: Any, queue: Any = None, budget: float | None = None,
                 **kwargs: Any) -> None:
        self.budget = budget
        self.total = self.held = self.peak = 0
        self.budget_reported = False

    def watch(self, attempt: Any, pid: int) -> None:
        pass

    def unwatch(self, attempt: Any) -> None:
        return None

    def peak_of(self, attempt: Any) -> None:
        return None

    def peak_between(self, start: float, end: float) -> None:
        return None

    def stop(self) -> None:
        return None


class SyncEmitter(Emitter):
    """Delivers each event at once, on the caller's thread (no event thread)."""

    def emit(self, event: Event) -> None:
        for callback in self._by_kind.get(event.kind, ()):
            callback(event)


class Harness:
    """A Scheduler over fake pools and a fake clock, and shortcuts to drive it.

    Times are exact: the run's wall-clock offset is 0, so a record's times are fake-clock
    readings.
    """

    def __init__(self, wf: px.Workflow, monkeypatch: pytest.MonkeyPatch, *,
                 max_workers: int = 2, timeout: float | None = None,
                 grace: float | None = None) -> None:
        self.clock = FakeClock()
        self.order: list[Attempt] = []
        self.threads = FakePool("thread", self.order, max_workers)
        self.procs = FakePool("process", self.order)
        self.events: list[Event] = []

        def thread_pool(name: str, max_threads: int) -> FakePool:
            self.threads.max_threads = max_threads
            return self.threads

        def process_pool(sweep: bool = False, max_tasks_per_worker: int | None = None) -> FakePool:
            return self.procs

        monkeypatch.setattr(_scheduler, "ThreadPool", thread_pool)
        monkeypatch.setattr(_scheduler, "process_pool", process_pool)
        monkeypatch.setattr(_groups, "process_pool", process_pool)
        monkeypatch.setattr(_monitor, "Monitor", FakeMonitor)
        wf.validate()
        subscribers = [("*", self.events.append)]
        s = self.sched = Scheduler(wf, max_workers=max_workers, cpu_budget=float(max_workers),
                                   memory_budget=1 << 40, timeout=timeout,
                                   subscribers=subscribers, force_cpu_gate=False,
                                   explicit_memory=False, grace=grace)
        s.clock, s.offset = self.clock, 0.0
        s.emitter, s.em = SyncEmitter(subscribers, wf.name), True
        s.t0 = self.clock()
        s.begin()

    # Reading the state

    def i(self, tid: str) -> int:
        """The index of task ``tid``."""
        return next(k for k, spec in enumerate(self.sched.specs) if spec.id == tid)

    def state(self, *tids: str) -> list[TaskStatus]:
        """The scheduler's states of these tasks."""
        return [self.sched.state[self.i(t)] for t in tids]

    def run(self, tid: str) -> Any:
        """Task ``tid``'s TaskRun."""
        return self.sched.runs[self.i(tid)]

    def submitted(self) -> list[str]:
        """Ids of every attempt handed to a pool, in order."""
        return [a.task_id for a in self.order]

    def attempt(self, tid: str) -> Attempt:
        """Task ``tid``'s latest attempt handed to a pool."""
        found = [a for a in self.order if a.task_id == tid]
        assert found, f"{tid} was never submitted"
        return max(found, key=lambda a: a.number)

    def args(self, tid: str) -> tuple[Any, ...]:
        """The arguments task ``tid``'s latest attempt was submitted with."""
        attempt = self.attempt(tid)
        for pool in (self.threads, self.procs):
            for a, call in zip(pool.submitted, pool.calls, strict=True):
                if a is attempt:
                    return call[1]
        raise AssertionError(tid)

    def kinds(self, tid: str | None = None) -> list[str]:
        """Kinds of the events emitted (about ``tid`` only, if given)."""
        return [e.kind for e in self.events if tid is None or e.task_id == tid]

    def log(self) -> list[tuple[str, str | None]]:
        """(kind, task id) of every event emitted, and forget them."""
        out = [(e.kind, e.task_id) for e in self.events]
        self.events.clear()
        return out

    # Driving it

    def dispatch(self) -> list[str]:
        """Start what the gates admit; the ids handed to a pool by this call."""
        before = len(self.order)
        self.sched.dispatch()
        return self.submitted()[before:]

    def done(self, tid: str, value: Any = None, *, ok: bool = True,
             attempt: Attempt | None = None) -> None:
        """Deliver the ``Done`` of ``tid``'s latest attempt (or ``attempt``), now."""
        attempt = attempt or self.attempt(tid)
        worker = 4242 if attempt.pool is self.procs else "fake-thread"
        self.sched.handle(Done(attempt, ok, value, worker), self.clock())

    def fail(self, tid: str, error: BaseException | None = None) -> None:
        """Deliver a failed ``Done`` of ``tid``'s latest attempt."""
        self.done(tid, error if error is not None else ValueError(f"{tid} broke"), ok=False)

    def control(self, command: Any) -> None:
        """``run.cancel()``, ``pause()`` or ``resume()``."""
        self.sched.handle(Control(command), self.clock())

    def advance(self, seconds: float) -> None:
        """Move the clock and fire the deadlines now due."""
        self.clock.now += seconds
        self.sched.fire_deadlines()


@pytest.fixture
def make(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Build a Harness for a workflow: ``make(wf, max_workers=..., timeout=..., grace=...)``."""
    made: list[Harness] = []
    threads = set(threading.enumerate())

    def build(wf: px.Workflow, **kwargs: Any) -> Harness:
        h = Harness(wf, monkeypatch, **kwargs)
        made.append(h)
        return h

    yield build
    for h in made:
        h.sched.emitter.close()
    # No pool, monitor or event thread was started: the test drove everything itself.
    assert set(threading.enumerate()) <= threads


def task(tid: str, **options: Any) -> Any:
    """A template of ``work`` with id ``tid`` and ``options``."""
    return px.task(work).options(id=tid, **options)


# Start ---------------------------------------------------------------------------------------

def test_begin_queues_the_tasks_with_no_dependencies(make):
    """begin(): tasks with no dependencies are READY (queued now), the others PENDING."""
    with px.Workflow("w") as wf:
        a = task("a")()
        task("b", priority=5)()
        task("c")(a)
    h = make(wf)
    assert h.state("a", "b", "c") == [S.READY, S.READY, S.PENDING]
    assert h.run("a").queued_at == h.run("b").queued_at == T0 and h.run("c").queued_at is None
    assert h.log() == [("workflow:started", None), ("task:queued", "a"), ("task:queued", "b")]
    assert h.submitted() == []


def test_dispatch_starts_the_best_ready_task_within_the_slots(make):
    """dispatch(): the highest priority starts first, no more than max_workers at once."""
    with px.Workflow("w") as wf:
        task("low")()
        task("high", priority=5)()
        task("mid", priority=1)()
    h = make(wf, max_workers=2)
    h.log()
    h.clock.now = T0 + 1
    assert h.dispatch() == ["high", "mid"]
    assert h.state("high", "mid", "low") == [S.RUNNING, S.RUNNING, S.READY]
    tr = h.run("high")
    assert tr.attempts == 1 and tr.started_at == tr.first_started_at == T0 + 1
    assert h.log() == [("task:started", "high"), ("task:started", "mid")]
    assert h.dispatch() == []  # the two slots are taken
    assert h.sched.nholding == 2 and h.threads.nbusy == 2


# Success -------------------------------------------------------------------------------------

def test_success_records_the_value_and_queues_dependents_in_priority_order(make):
    """A Done with a value: SUCCEEDED, value kept, dependents queued and started best first,
    each receiving the value."""
    with px.Workflow("w") as wf:
        a = task("a")()
        task("c1", priority=1)(a)
        task("c2", priority=9)(a)
        task("c3")(a)
    h = make(wf, max_workers=1)
    assert h.dispatch() == ["a"]
    h.log()
    h.clock.now = T0 + 2
    h.done("a", 41)
    assert h.state("a") == [S.SUCCEEDED]
    tr = h.run("a")
    assert (tr.status, tr.value, tr.finished_at, tr.worker) == (S.SUCCEEDED, 41, T0 + 2,
                                                                "fake-thread")
    assert h.sched.values[h.i("a")] == 41
    assert h.state("c1", "c2", "c3") == [S.READY] * 3
    assert h.run("c1").queued_at == T0 + 2
    events = [(e.kind, e.task_id, e.attempt) for e in h.events]
    assert events[0] == ("task:completed", "a", 1) and h.events[0].duration == 2
    assert sorted(events[1:]) == [("task:queued", c, 0) for c in ("c1", "c2", "c3")]
    order = []
    for _ in range(3):
        (started,) = h.dispatch()
        order.append(started)
        assert h.args(started) == (41,)
        h.done(started, started)
    assert order == ["c2", "c1", "c3"]
    assert h.sched.nfinal == h.sched.n == 4 and h.sched.nholding == 0
    assert h.threads.nbusy == 0  # each Done gave its thread back (a new one starts only if busy)


# Failure under each on_error ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["thread", "process"])
def test_failure_under_fail_stops_the_run_and_cancels_the_rest(make, kind):
    """on_error="fail": FAILED, the run stops; the other running task is killed (process)
    or flagged (thread); tasks not started are CANCELLED."""
    with px.Workflow("w") as wf:
        bad = task("bad")()
        task("other", isolation=kind)()
        task("after")(bad)
        task("waiting", priority=-1)()  # no slot for it
    h = make(wf, max_workers=2)
    assert h.dispatch() == ["bad", "other"]
    h.log()
    h.clock.now = T0 + 3
    error = ValueError("bad broke")
    h.fail("bad", error)
    s = h.sched
    assert s.stopping == "failed"
    assert h.run("bad").error is error and h.run("bad").status == S.FAILED
    assert h.state("after", "waiting") == [S.CANCELLED, S.CANCELLED]
    other = h.attempt("other")
    if kind == "process":
        assert h.procs.killed == [other] and other.final and not other.holding
        assert h.state("other") == [S.CANCELLED] and h.run("other").finished_at == T0 + 3
        assert s.nfinal == s.n
    else:
        assert h.threads.killed == [] and other.cancel_requested and not other.final
        assert h.state("other") == [S.RUNNING]  # it may still return; the run waits
        assert s.grace_at == T0 + 3 + _stopping.GRACE
        h.done("other", Cancelled("stopped"), ok=False)
        assert h.state("other") == [S.CANCELLED]
    log = h.log()
    assert log[0] == ("task:failed", "bad")
    assert ("task:cancelled", "after") in log and ("task:cancelled", "waiting") in log
    assert ("task:cancelled", "other") in log
    assert h.dispatch() == []
    assert s.nfinal == s.n and s.nholding == 0


def test_failure_under_skip_skips_downstream_and_the_rest_goes_on(make):
    """on_error="skip": FAILED, every task downstream SKIPPED (task:skipped only), an
    independent branch goes on; the run is partial."""
    with px.Workflow("w") as wf:
        bad = task("bad", on_error="skip")()
        child = task("child")(bad)
        task("grandchild")(child)
        task("independent")()
    h = make(wf)
    assert h.dispatch() == ["bad", "independent"]
    h.log()
    h.fail("bad")
    assert h.state("bad", "child", "grandchild", "independent") == \
        [S.FAILED, S.SKIPPED, S.SKIPPED, S.RUNNING]
    assert sorted(h.log()) == [("task:failed", "bad"), ("task:skipped", "child"),
                               ("task:skipped", "grandchild")]
    assert h.sched.stopping is None and h.sched.partial
    h.done("independent", 1)
    assert h.state("independent") == [S.SUCCEEDED] and h.sched.nfinal == h.sched.n


def test_failure_under_ignore_passes_the_default_to_dependents(make):
    """on_error="ignore": FAILED with its error, and dependents run with its default."""
    with px.Workflow("w") as wf:
        soft = task("soft", on_error="ignore", default=-1)()
        task("uses")(soft)
    h = make(wf)
    h.dispatch()
    h.fail("soft")
    assert h.state("soft", "uses") == [S.FAILED, S.READY]
    assert isinstance(h.run("soft").error, ValueError)
    assert h.dispatch() == ["uses"] and h.args("uses") == (-1,)
    assert h.sched.partial and h.sched.stopping is None


def test_a_crashed_worker_fails_only_its_task(make):
    """A Done carrying WorkerCrashed (the pool's report of a dead worker) fails that task
    under its on_error; the other running task is untouched."""
    with px.Workflow("w", isolation="process") as wf:
        task("crashes", on_error="skip")()
        task("sibling")()
    h = make(wf)
    h.dispatch()
    h.fail("crashes", px.WorkerCrashed("crashes", -9))
    assert h.state("crashes", "sibling") == [S.FAILED, S.RUNNING] and h.procs.killed == []
    assert isinstance(h.run("crashes").error, px.WorkerCrashed)


# Retries -------------------------------------------------------------------------------------

def test_retry_waits_for_its_due_time_holding_no_slot(make):
    """A retried attempt: RETRYING until the policy's delay has passed on the clock, its
    slot free meanwhile; then started again; history keeps the earlier attempts."""
    policy = px.Retry(2, initial_delay=1.0, backoff=2.0, on=(OSError,))
    with px.Workflow("w") as wf:
        task("flaky", retry=policy)()
        task("other", priority=-1)()
    h = make(wf, max_workers=1)
    assert h.dispatch() == ["flaky"]
    h.log()
    h.clock.now = T0 + 1
    h.fail("flaky", OSError("down"))
    assert h.state("flaky") == [S.RETRYING]
    assert h.log() == [("task:retrying", "flaky")]
    assert h.dispatch() == ["other"]  # the slot is free while flaky waits
    h.done("other")
    h.advance(0.999)
    assert h.state("flaky") == [S.RETRYING] and h.dispatch() == []
    h.advance(0.001)  # T0 + 2: attempt 1 failed at T0 + 1, delay 1.0
    assert h.state("flaky") == [S.READY]
    assert h.dispatch() == ["flaky"] and h.attempt("flaky").number == 2
    h.fail("flaky", OSError("down again"))  # at T0 + 2; next delay 2.0
    h.advance(1.999)
    assert h.dispatch() == []
    h.advance(0.001)
    assert h.dispatch() == ["flaky"]
    h.clock.now = T0 + 5
    h.done("flaky", "finally")
    tr = h.run("flaky")
    assert (tr.status, tr.value, tr.attempts) == (S.SUCCEEDED, "finally", 3)
    assert tr.first_started_at == T0 and tr.started_at == T0 + 4
    assert [tuple(r) for r in tr.history] == [(1, T0, T0 + 1, "fake-thread", "failed"),
                                              (2, T0 + 2, T0 + 2, "fake-thread", "failed")]
    assert [(e.kind, e.attempt) for e in h.events if e.task_id == "flaky"] == [
        ("task:started", 2), ("task:retrying", 2), ("task:started", 3),
        ("task:completed", 3)]


def test_an_exception_the_policy_does_not_retry_fails_at_once(make):
    """Retry(on=(OSError,)): a ValueError fails the task at its first attempt."""
    with px.Workflow("w") as wf:
        task("t", retry=px.Retry(3, initial_delay=0, on=(OSError,)), on_error="skip")()
    h = make(wf)
    h.dispatch()
    h.fail("t")
    assert h.state("t") == [S.FAILED] and h.run("t").attempts == 1 and not h.sched.deadlines


# Timeouts ------------------------------------------------------------------------------------

def test_process_timeout_kills_the_worker_and_frees_the_slot(make):
    """A process attempt past its timeout: task:timeout, its worker killed, TIMED_OUT with
    TaskTimeout, slot freed at once; its late Done changes nothing."""
    with px.Workflow("w", isolation="process") as wf:
        task("slow", timeout=5, on_error="ignore")()
        task("next", priority=-1)()
    h = make(wf, max_workers=1)
    assert h.dispatch() == ["slow"]
    h.log()
    h.advance(4.999)
    assert h.state("slow") == [S.RUNNING] and h.procs.killed == []
    h.advance(0.001)
    attempt = h.attempt("slow")
    assert h.procs.killed == [attempt]
    tr = h.run("slow")
    assert h.state("slow") == [S.TIMED_OUT] and tr.status == S.TIMED_OUT
    assert isinstance(tr.error, TaskTimeout) and "timeout of 5s" in str(tr.error)
    assert tr.finished_at == T0 + 5 and tr.duration == 5
    assert h.log() == [("task:timeout", "slow"), ("task:failed", "slow")]
    assert h.dispatch() == ["next"]  # the slot was freed by the kill
    h.done("slow", "too late", attempt=attempt)
    assert h.state("slow") == [S.TIMED_OUT] and tr.value is None


def test_thread_timeout_abandons_the_attempt_and_holds_its_slot_until_it_returns(make):
    """A thread attempt past its timeout: TIMED_OUT, its cancel flag set; it keeps its slot
    (nothing else starts) until its Done arrives, whose value is dropped."""
    with px.Workflow("w") as wf:
        task("stuck", timeout=1, on_error="ignore")()
        task("next", priority=-1)()
    h = make(wf, max_workers=1)
    assert h.dispatch() == ["stuck"]
    h.advance(1)
    attempt = h.attempt("stuck")
    assert h.state("stuck") == [S.TIMED_OUT] and attempt.cancel_requested and attempt.final
    assert h.threads.killed == [] and attempt in h.sched.zombies
    assert h.dispatch() == []  # its slot is still held
    h.advance(10)
    assert h.dispatch() == []
    h.done("stuck", "late")
    assert h.state("stuck") == [S.TIMED_OUT] and h.run("stuck").value is None
    assert not h.sched.zombies
    assert h.dispatch() == ["next"]


def test_timed_out_attempt_is_retried_when_the_policy_allows(make):
    """A timed-out attempt counts as a failure for the retry policy (history: timed_out)."""
    with px.Workflow("w", isolation="process") as wf:
        task("t", timeout=1, retry=px.Retry(1, initial_delay=0.5))()
    h = make(wf)
    h.dispatch()
    h.advance(1)
    assert h.state("t") == [S.RETRYING]
    h.advance(0.5)
    assert h.dispatch() == ["t"]
    h.done("t", "ok")
    assert h.run("t").history == [(1, T0, T0 + 1, 4242, "timed_out")]


# Cancel, pause -------------------------------------------------------------------------------

def test_cancel_kills_processes_flags_threads_and_cancels_the_rest(make):
    """run.cancel(): a running process task is killed, a running thread task flagged, a
    ready, a pending and a retrying task are cancelled; no new start."""
    with px.Workflow("w") as wf:
        proc = task("proc", isolation="process")()
        task("thread")()
        task("retrying", retry=px.Retry(1, initial_delay=30), priority=9)()
        task("ready", priority=-1)()
        task("pending")(proc)
    h = make(wf, max_workers=3)
    assert h.dispatch() == ["retrying", "proc", "thread"]
    h.fail("retrying", OSError("x"))
    assert h.state("retrying") == [S.RETRYING]
    h.log()
    h.clock.now = T0 + 1
    h.control("cancel")
    s = h.sched
    assert s.stopping == "cancelled"
    assert h.procs.killed == [h.attempt("proc")]
    assert h.attempt("thread").cancel_requested and h.state("thread") == [S.RUNNING]
    assert h.state("proc", "ready", "pending", "retrying") == [S.CANCELLED] * 4
    retry_error = h.run("retrying").error
    assert isinstance(retry_error, Cancelled) and "waiting to retry" in str(retry_error)
    assert h.run("retrying").history is None  # its one attempt is its record
    assert sorted(h.log()) == sorted(("task:cancelled", t)
                                     for t in ("proc", "ready", "pending", "retrying"))
    assert h.dispatch() == []
    h.done("thread", "returned anyway")  # a thread that ends with a value succeeded
    assert h.state("thread") == [S.SUCCEEDED] and s.nfinal == s.n and s.nholding == 0


def test_cancel_gives_up_on_a_thread_ignoring_its_flag_after_the_grace_period(make):
    """A thread task that ignores the cancel flag: CANCELLED once GRACE has passed, with a
    warning naming it; its slot stays held."""
    with px.Workflow("w") as wf:
        task("deaf")()
    h = make(wf)
    h.dispatch()
    h.control("cancel")
    assert h.state("deaf") == [S.RUNNING]
    h.advance(_stopping.GRACE - 0.001)
    assert h.state("deaf") == [S.RUNNING] and not h.sched.grace_ended
    h.advance(0.001)
    assert h.state("deaf") == [S.CANCELLED] and h.sched.grace_ended
    assert "deaf" in h.sched.late_warning and h.sched.nholding == 1


def test_pause_starts_nothing_until_resume(make):
    """While paused nothing is dispatched (a running task still completes); resume starts."""
    with px.Workflow("w") as wf:
        first = task("first")()
        task("second")(first)
    h = make(wf)
    assert h.dispatch() == ["first"]
    h.log()
    h.control("pause")
    assert h.sched.paused and h.log() == [("workflow:paused", None)]
    h.done("first", 1)
    assert h.state("second") == [S.READY]
    assert h.dispatch() == [] and h.dispatch() == []
    h.control("pause")  # twice: one event
    h.control("resume")
    assert not h.sched.paused
    assert h.log() == [("task:completed", "first"), ("task:queued", "second"),
                       ("workflow:resumed", None)]
    assert h.dispatch() == ["second"]


def test_run_timeout_stops_the_run_as_timed_out(make):
    """The run's own timeout: at its deadline the run stops as "timed_out", finished tasks
    keep their values, the running process task is killed and the rest cancelled."""
    with px.Workflow("w", isolation="process") as wf:
        quick = task("quick")()
        task("slow")(quick)
    h = make(wf, timeout=10)
    h.dispatch()
    h.done("quick", "q")
    h.dispatch()
    h.advance(9.999)
    assert h.sched.stopping is None
    h.advance(0.001)
    assert h.sched.stopping == "timed_out"
    assert h.state("quick", "slow") == [S.SUCCEEDED, S.CANCELLED]
    assert h.procs.killed == [h.attempt("slow")] and h.run("quick").value == "q"


def test_a_prefetched_thread_attempt_starts_when_its_started_message_arrives(make):
    """With short thread tasks, a task beyond the slots is queued ahead (prefetched) with no
    task:started; its Started message starts its record's clock and emits the event."""
    with px.Workflow("w") as wf:
        task("first")()
        task("second", priority=-1)()
    h = make(wf, max_workers=1)
    h.threads.mean_duration = 0.0  # as measured once short tasks ran
    assert h.dispatch() == ["first", "second"]
    second = h.attempt("second")
    assert second.prefetched and h.threads.nprefetched == 1
    assert [(e.kind, e.task_id) for e in h.events if e.kind == "task:started"] == \
        [("task:started", "first")]
    h.done("first")
    h.clock.now = T0 + 2
    h.sched.handle(Started(second, T0 + 2, "fake-thread"), h.clock())
    assert h.kinds("second")[-1] == "task:started"
    assert h.run("second").started_at == T0 + 2 and h.run("second").worker == "fake-thread"
    h.done("second")
    assert h.threads.nprefetched == 0 and h.sched.nholding == 0


def test_over_limit_asks_the_pool_to_kill_for_memory(make):
    """The monitor's OverLimit about a running attempt: the scheduler has its pool kill it
    (the pool then reports MemoryLimitExceeded); a report about a decided attempt is
    ignored."""
    with px.Workflow("w", isolation="process") as wf:
        task("hog", memory="1KB", timeout=1, on_error="ignore")()
    h = make(wf)
    h.dispatch()
    attempt = h.attempt("hog")
    h.sched.handle(OverLimit(attempt, 5000, 1000), h.clock())
    assert h.procs.memory_kills == [(attempt, 5000, 1000)]
    h.advance(1)  # timed out: decided
    h.sched.handle(OverLimit(attempt, 6000, 1000), h.clock())
    assert len(h.procs.memory_kills) == 1


@pytest.mark.parametrize(("on_error", "status", "final_event"), [
    ("skip", "partial", "workflow:completed"), ("fail", "failed", "workflow:failed")])
def test_finish_builds_the_result_and_the_final_event(make, on_error, status, final_event):
    """The end of a run: RunResult status from the tasks, the records in it, the pools shut
    down, and the workflow's final event."""
    with px.Workflow("w") as wf:
        task("ok")()
        task("bad", on_error=on_error)()
    h = make(wf)
    h.dispatch()
    h.clock.now = T0 + 1
    h.done("ok", 1)
    h.fail("bad")
    h.clock.now = T0 + 2
    h.sched.finish()
    result = h.sched.result
    assert result.status == status and result.tasks["ok"].value == 1
    assert result.tasks["bad"].status == "failed" and result.stats.makespan == 2
    assert h.threads.shut and h.kinds()[-1] == final_event


# Groups --------------------------------------------------------------------------------------

def group_wf(wait: str, kinds: tuple[str, ...] = ("thread", "process", "thread"), **options):
    """A group of members m0, m1, m2 (isolations ``kinds``), and a task "after" using it."""
    with px.Workflow("w") as wf:
        members = [task(f"m{k}", isolation=kind, priority=-k)() for k, kind in enumerate(kinds)]
        g = px.group(members, wait=wait, id="g", **options)
        task("after")(g)
    return wf


def test_group_all_collects_every_value(make):
    """wait="all": the group succeeds with {id: value} once every member succeeded."""
    h = make(group_wf("all"), max_workers=3)
    assert sorted(h.dispatch()) == ["m0", "m1", "m2"]
    h.done("m0", 0)
    h.done("m2", 2)
    assert h.state("g") == [S.PENDING]
    h.clock.now = T0 + 4
    h.done("m1", 1)
    assert h.state("g", "after") == [S.SUCCEEDED, S.READY]
    assert h.run("g").value == {"m0": 0, "m1": 1, "m2": 2}
    assert h.run("g").started_at == T0 and h.run("g").finished_at == T0 + 4
    assert h.dispatch() == ["after"] and h.args("after") == ({"m0": 0, "m1": 1, "m2": 2},)


def test_group_all_fails_at_the_first_failure_and_cancels_the_others(make):
    """wait="all": the first failure fails the group; the running process member is killed,
    the thread member flagged and cancelled; on_error="skip" skips the group's dependents."""
    h = make(group_wf("all", on_error="skip"), max_workers=3)
    h.dispatch()
    h.log()
    h.fail("m0")
    m1, m2 = h.attempt("m1"), h.attempt("m2")
    assert h.state("m0", "m1", "m2", "g", "after") == \
        [S.FAILED, S.CANCELLED, S.CANCELLED, S.FAILED, S.SKIPPED]
    assert h.procs.killed == [m1] and m2.cancel_requested and m2 in h.sched.zombies
    assert isinstance(h.run("g").error, ValueError)
    assert sorted(h.log()) == [("task:cancelled", "m1"), ("task:cancelled", "m2"),
                               ("task:failed", "g"), ("task:failed", "m0"),
                               ("task:skipped", "after")]
    assert h.sched.stopping is None and h.sched.partial


@pytest.mark.parametrize("first_ok", [True, False])
def test_group_race_takes_the_first_to_finish(make, first_ok):
    """wait="race": the first member to end decides, value or error; the others cancelled."""
    h = make(group_wf("race", on_error="ignore", default="fallback"), max_workers=3)
    h.dispatch()
    if first_ok:
        h.done("m2", "fast")
    else:
        h.fail("m2")
    assert h.state("m0", "m1") == [S.CANCELLED, S.CANCELLED]
    assert h.procs.killed == [h.attempt("m1")] and h.attempt("m0").cancel_requested
    if first_ok:
        assert h.state("g") == [S.SUCCEEDED] and h.run("g").value == "fast"
        assert h.dispatch() == ["after"] and h.args("after") == ("fast",)
    else:
        assert h.state("g") == [S.FAILED] and isinstance(h.run("g").error, ValueError)
        assert h.dispatch() == ["after"] and h.args("after") == ("fallback",)


def test_group_any_takes_the_first_success_and_fails_only_if_all_fail(make):
    """wait="any": failures wait; the first success decides and cancels the rest. When all
    fail, the group fails with an ExceptionGroup of every member's error."""
    h = make(group_wf("any"), max_workers=3)
    h.dispatch()
    h.fail("m0")
    assert h.state("g") == [S.PENDING]
    h.done("m1", "won")
    assert h.state("g", "m2") == [S.SUCCEEDED, S.CANCELLED] and h.run("g").value == "won"

    h2 = make(group_wf("any", on_error="skip"), max_workers=3)
    h2.dispatch()
    for m in ("m0", "m1", "m2"):
        h2.fail(m)
    error = h2.run("g").error
    assert h2.state("g", "after") == [S.FAILED, S.SKIPPED]
    assert isinstance(error, ExceptionGroup) and len(error.exceptions) == 3
    assert "every member failed" in str(error)


def test_group_all_settled_waits_for_every_member_and_never_fails(make):
    """wait="all_settled": the value maps each id to its Outcome, failures included."""
    h = make(group_wf("all_settled"), max_workers=3)
    h.dispatch()
    h.fail("m0")
    h.done("m1", 1)
    assert h.state("g") == [S.PENDING]
    h.done("m2", 2)
    value = h.run("g").value
    assert h.state("g") == [S.SUCCEEDED] and list(value) == ["m0", "m1", "m2"]
    assert not value["m0"].ok and isinstance(value["m0"].error, ValueError)
    assert value["m1"] == Outcome(True, 1) and value["m2"] == Outcome(True, 2)


def test_group_timeout_fails_the_group_and_cancels_its_members(make):
    """A group's own timeout, counted from its first member's start: TIMED_OUT with
    TaskTimeout, members cancelled (the process one killed)."""
    h = make(group_wf("all", ("process", "process", "thread"), timeout=2, on_error="skip"),
             max_workers=2)
    assert h.dispatch() == ["m0", "m1"]
    h.done("m0", 0)
    assert h.dispatch() == ["m2"]
    h.advance(1.999)
    assert h.state("g") == [S.PENDING]
    h.advance(0.001)
    error = h.run("g").error
    assert h.state("g", "m0", "m1", "m2", "after") == \
        [S.TIMED_OUT, S.SUCCEEDED, S.CANCELLED, S.CANCELLED, S.SKIPPED]
    assert isinstance(error, TaskTimeout) and "'g' did not resolve within its timeout of 2s" \
        in str(error)
    assert h.procs.killed == [h.attempt("m1")] and h.attempt("m2").cancel_requested


def test_group_max_concurrent_admits_one_member_at_a_time(make):
    """max_concurrent=1: with free slots, a second member starts only when the first ends."""
    h = make(group_wf("all", ("thread", "thread", "thread"), max_concurrent=1), max_workers=3)
    assert h.dispatch() == ["m0"]
    h.done("m0", 0)
    assert h.dispatch() == ["m1"]
    h.fail("m1")  # the group fails: m2, never started, is cancelled
    assert h.state("m2", "g") == [S.CANCELLED, S.FAILED] and h.dispatch() == []


# Maps ----------------------------------------------------------------------------------------

def map_wf(**options: Any) -> px.Workflow:
    """src -> map "sq" over src's result -> "total"."""
    with px.Workflow("w") as wf:
        src = task("src")()
        sq = px.task(work).options(**options).map(src, id="sq")
        task("total")(sq)
    return wf


def test_map_over_a_result_adds_one_task_per_item(make):
    """A map over a task's result: one READY task per item (ids sq[k], argument the item),
    and the map's value is their values in item order."""
    h = make(map_wf())
    n = h.sched.n
    h.dispatch()
    h.log()
    h.done("src", [3, 1, 2])
    assert h.sched.n == n + 3
    assert h.state("sq[0]", "sq[1]", "sq[2]") == [S.READY] * 3
    assert h.log() == [("task:completed", "src"), ("task:queued", "sq[0]"),
                       ("task:queued", "sq[1]"), ("task:queued", "sq[2]")]
    assert h.dispatch() == ["sq[0]", "sq[1]"]
    assert [h.args(t) for t in ("sq[0]", "sq[1]")] == [(3,), (1,)]
    h.done("sq[1]", 1)
    assert h.dispatch() == ["sq[2]"]
    h.done("sq[2]", 4)
    h.done("sq[0]", 9)
    assert h.state("sq", "total") == [S.SUCCEEDED, S.READY]
    assert h.dispatch() == ["total"] and h.args("total") == ([9, 1, 4],)


def test_map_over_a_non_iterable_fails_the_map(make):
    """A map over a value that is not iterable fails with TaskOptionError naming both."""
    h = make(map_wf())
    h.dispatch()
    h.done("src", 42)
    error = h.run("sq").error
    assert h.state("sq") == [S.FAILED] and isinstance(error, TaskOptionError)
    assert "'sq'" in str(error) and "int" in str(error)
    assert h.sched.stopping == "failed" and h.state("total") == [S.CANCELLED]


def test_map_over_an_empty_result_succeeds_with_an_empty_list(make):
    """A map over [] adds no task and succeeds at once with []."""
    h = make(map_wf())
    n = h.sched.n
    h.dispatch()
    h.done("src", [])
    assert h.sched.n == n and h.state("sq", "total") == [S.SUCCEEDED, S.READY]
    assert h.dispatch() == ["total"] and h.args("total") == ([],)


# Grace ---------------------------------------------------------------------------------------

def test_grace_interrupts_a_process_attempt_then_kills_it_at_the_deadline(make):
    """grace>0, process: the timeout raises TaskTimeout inside (interrupt), the attempt keeps
    its slot, and its worker is killed grace seconds later if still running."""
    with px.Workflow("w", isolation="process") as wf:
        task("slow", timeout=1, grace=3, on_error="ignore")()
        task("next", priority=-1)()
    h = make(wf, max_workers=1)
    h.dispatch()
    h.advance(1)
    attempt = h.attempt("slow")
    assert h.procs.interrupted == [(attempt, False)] and h.procs.killed == []
    assert h.state("slow") == [S.TIMED_OUT] and attempt in h.sched.interrupted
    assert h.dispatch() == []  # it holds its slot during its grace
    h.advance(2.999)
    assert h.procs.killed == []
    h.advance(0.001)
    assert h.procs.killed == [attempt] and not attempt.holding
    assert h.dispatch() == ["next"]


def test_grace_process_attempt_that_returns_in_time_is_not_killed(make):
    """grace>0: an interrupted attempt whose Done arrives in its grace frees its slot and
    is never killed."""
    with px.Workflow("w", isolation="process") as wf:
        task("slow", timeout=1, grace=3, on_error="ignore")()
    h = make(wf)
    h.dispatch()
    h.control("cancel")
    attempt = h.attempt("slow")
    assert h.procs.interrupted == [(attempt, True)] and h.state("slow") == [S.CANCELLED]
    h.done("slow", TaskTimeout("interrupted"), ok=False)
    assert not attempt.holding and not h.sched.interrupted
    h.advance(10)
    assert h.procs.killed == []


def test_grace_on_a_thread_raises_inside_then_abandons_as_before(make):
    """grace>0, thread: the timeout asks the thread pool to interrupt, then abandons it."""
    with px.Workflow("w") as wf:
        task("spin", timeout=1, grace=2, on_error="ignore")()
    h = make(wf)
    h.dispatch()
    h.advance(1)
    attempt = h.attempt("spin")
    assert h.threads.interrupted == [(attempt, False)] and attempt in h.sched.zombies
    assert h.state("spin") == [S.TIMED_OUT]


# Pure parts: wait strategies -------------------------------------------------------------------

class FakeMembers:
    """``_waits.Members`` over plain dicts."""

    def __init__(self, values: dict[int, Any], errors: dict[int, Exception]) -> None:
        self.values, self.errors = values, errors

    def member_value(self, m: int) -> Any:
        return self.values[m]

    def member_error(self, g: int, m: int) -> Exception:
        return self.errors[m]

    def member_outcome(self, g: int, m: int) -> Outcome:
        if m in self.values:
            return Outcome(True, self.values[m])
        return Outcome(False, None, self.errors[m])

    def collect(self, group: Group) -> Any:
        return {self.task_id(m): self.values[m] for m in group.members}

    def task_id(self, i: int) -> str:
        return f"t{i}"


def decide(wait: str, outcomes: list[tuple[int, Any]]) -> list[Resolution | None]:
    """Feed (member, value-or-exception) to a group of members 1, 2, 3; its decisions."""
    values = {m: v for m, v in outcomes if not isinstance(v, Exception)}
    errors = {m: v for m, v in outcomes if isinstance(v, Exception)}
    members = FakeMembers(values, errors)
    group = Group(9, [1, 2, 3], wait, "dict", None)  # type: ignore[arg-type]
    return [group.member_done(m, m in values, members) for m, _ in outcomes]


def test_waits_all():
    """"all": undecided until the last success; the first failure decides at once."""
    e = ValueError("x")
    assert decide("all", [(1, "a"), (2, "b"), (3, "c")]) == \
        [None, None, Resolution(True, {"t1": "a", "t2": "b", "t3": "c"})]
    assert decide("all", [(2, "b"), (1, e)]) == [None, Resolution(False, error=e)]


def test_waits_any():
    """"any": the first success decides; all failed gives an ExceptionGroup of them."""
    e1, e2, e3 = ValueError("1"), OSError("2"), KeyError("3")
    assert decide("any", [(1, e1), (2, "b")]) == [None, Resolution(True, "b")]
    *undecided, last = decide("any", [(1, e1), (2, e2), (3, e3)])
    assert undecided == [None, None] and not last.ok
    assert list(last.error.exceptions) == [e1, e2, e3] and "'t9'" in str(last.error)


def test_waits_race():
    """"race": the first member to end decides, success or failure."""
    e = ValueError("x")
    assert decide("race", [(3, "c")]) == [Resolution(True, "c")]
    assert decide("race", [(2, e)]) == [Resolution(False, error=e)]


def test_waits_all_settled():
    """"all_settled": undecided until every member ended; never fails."""
    e = ValueError("x")
    assert decide("all_settled", [(1, "a"), (2, e), (3, "c")]) == [None, None, Resolution(
        True, {"t1": Outcome(True, "a"), "t2": Outcome(False, None, e),
               "t3": Outcome(True, "c")})]


# Pure parts: Readiness -----------------------------------------------------------------------

def graph_of(deps: list[list[int]], ) -> Graph:
    """A Graph with these dependency lists (estimates and rank unused)."""
    n = len(deps)
    dependents: list[list[int]] = [[] for _ in range(n)]
    for i, row in enumerate(deps):
        for d in row:
            dependents[d].append(i)
    return Graph([f"t{i}" for i in range(n)], [tuple(row) for row in deps],
                 [tuple(row) for row in dependents], list(range(n)), [1.0] * n, [1.0] * n)


def test_readiness_prepare_done_and_add():
    """prepare() gives the roots (not groups); done() what lost its last dependency;
    add() appends a free task; the Graph is never changed."""
    graph = graph_of([[], [], [0, 1], [2], [0]])
    before = [list(d) for d in graph.dependents]
    r = Readiness(graph, [False, False, False, False, True])  # 4 is a group
    assert r.prepare() == [0, 1]
    assert r.done(0) == []  # 2 still waits for 1; 4 is a group: never counted
    assert r.done(1) == [2]
    assert r.done(2) == [3]
    assert r.add() == 5 and r.npending[5] == 0 and not r.dependents[5] and not r.group[5]
    assert [list(d) for d in graph.dependents] == before and len(graph.deps) == 5


@st.composite
def dags(draw: Any) -> list[list[int]]:
    """Random DAGs: node i depends on a subset of the nodes before it."""
    n = draw(st.integers(0, 30))
    return [sorted(draw(st.sets(st.integers(0, i - 1), max_size=4))) if i else []
            for i in range(n)]


@given(dags(), st.randoms(use_true_random=False))
def test_readiness_yields_a_topological_order_covering_every_node_once(deps, rnd):
    """Taking everything ready, in any order, and calling done() on it visits every node
    exactly once, each after all its dependencies."""
    r = Readiness(graph_of(deps), [False] * len(deps))
    ready = r.prepare()
    order: list[int] = []
    while ready:
        rnd.shuffle(ready)
        i = ready.pop()
        order.append(i)
        ready.extend(r.done(i))
    assert sorted(order) == list(range(len(deps)))
    position = {node: k for k, node in enumerate(order)}
    assert all(position[d] < position[i] for i, row in enumerate(deps) for d in row)



def test_a_follower_takes_the_slot_freed_by_another_task_unless_a_better_one_waits(make):
    """Pipelining (short process tasks): "follower" waits behind "long". When "short" ends
    without a follower, the free slot goes to the follower (restarted on a free worker,
    task:started now) rather than idling; when "long" later ends, it gives back its own
    slot. A better task ready at that moment would take the slot instead."""
    with px.Workflow("w", isolation="process") as wf:
        task("long", priority=4)()
        task("short", priority=3)()
        task("follower", priority=2)()
    h = make(wf, max_workers=2)
    h.sched.mean_process_duration = 0.0  # as measured once short tasks ran
    assert h.dispatch() == ["long", "short", "follower"]
    follower = h.attempt("follower")
    assert follower.prefetched and follower.leader is h.attempt("long")
    assert h.kinds("follower")[-1] == "task:queued"
    h.done("short")
    h.dispatch()
    assert h.procs.restarted == [follower] and not follower.prefetched
    assert follower.leader is None and h.attempt("long").follower is None
    assert h.kinds("follower")[-1] == "task:started"
    slots = h.sched.gates[0]
    assert slots.used == 2  # long and follower: never more than max_workers
    h.done("long")
    h.done("follower")
    assert slots.used == 0 and h.sched.nholding == 0
    assert h.state("long", "short", "follower") == [S.SUCCEEDED] * 3


def test_a_better_ready_task_keeps_the_freed_slot_from_a_follower(make):
    """The slot freed by a task without follower goes to a ready task better than the
    waiting follower (its priority decides, as without pipelining)."""
    with px.Workflow("w", isolation="process") as wf:
        task("long", priority=4)()
        task("short", priority=3)()
        task("follower", priority=1)()
        task("urgent", priority=2, after=["short"])()
    h = make(wf, max_workers=2)
    h.sched.mean_process_duration = 0.0
    assert h.dispatch() == ["long", "short", "follower"]
    h.done("short")  # "urgent" is ready now, better than the follower
    assert h.dispatch() == ["urgent"] and h.procs.restarted == []
    assert h.attempt("follower").prefetched


def test_a_follower_needs_exactly_its_leaders_slot_and_cpus(make):
    """A follower takes its leader's slot and cpus when the leader ends: a task needing
    other cpus than every running one is not queued behind any (it waits for a slot)."""
    with px.Workflow("w", isolation="process") as wf:
        task("a", priority=3)()
        task("b", priority=2)()
        task("half", priority=1, cpus=0.5)()
    h = make(wf, max_workers=2)
    h.sched.mean_process_duration = 0.0
    assert h.dispatch() == ["a", "b"]  # "half" is not queued behind a 1-cpu task
    cpus = next(g for g in h.sched.gates if g.name == "cpus")
    assert cpus.used == 2
    h.done("a")
    assert h.dispatch() == ["half"] and cpus.used == 1.5
