"""Tests of parexec._scheduler: dispatch order, concurrency, failures, retries, timeouts,
cancellation, Ctrl-C, scale."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from helpers import (
    boom,
    cooperative,
    echo,
    flaky,
    hold_until,
    ignore_cancel,
    noop,
    overlap_by_events,
    sleep_pid,
    sleep_then,
    stamp,
)

import parexec as px


def record_starts():
    order = []
    return order, (lambda e: order.append(e.task_id) if e.kind == "task:started" else None)


def test_priority_then_critical_path_then_creation_order(isolation):
    """With one slot, ready tasks start by priority, then remaining path, then creation."""
    with px.Workflow("w", isolation=isolation) as wf:
        wf.add(px.task(noop).options(id="plain"))
        wf.add(px.task(noop).options(id="urgent", priority=5))
        head = wf.add(px.task(noop).options(id="long-head"))
        wf.add(px.task(noop).options(id="long-tail", estimate=10), head)
        wf.add(px.task(noop).options(id="plain-2"))
    order, cb = record_starts()
    px.run(wf, max_workers=1, on_event=cb, progress=False)
    # urgent: priority; long-head, then long-tail as soon as it is ready: the longest
    # remaining path; plain before plain-2: creation order.
    assert order == ["urgent", "long-head", "long-tail", "plain", "plain-2"]


def test_parallel_false_is_deterministic_and_sequential(isolation):
    """parallel=False runs one task at a time in the same topological order every time."""
    rng = random.Random(3)
    with px.Workflow("w", isolation=isolation) as wf:
        refs = []
        for i in range(40):
            deps = rng.sample(refs, min(len(refs), 2))
            refs.append(wf.add(px.task(noop).options(id=f"t{i}"), *deps))
    orders = []
    for _ in range(3):
        order, cb = record_starts()
        result = px.run(wf, parallel=False, on_event=cb, progress=False)
        assert result.stats.max_concurrency == 1
        orders.append(order)
    assert orders[0] == orders[1] == orders[2]


def test_max_workers_bounds_concurrency(isolation):
    """No more than max_workers tasks run at once, on threads and processes."""
    with px.Workflow("w", isolation=isolation) as wf:
        for _ in range(6):
            wf.add(sleep_then, 0.3)
    result = px.run(wf, max_workers=2, progress=False)
    assert result.ok and result.stats.max_concurrency == 2
    assert result.stats.makespan >= 0.85  # three waves of 0.3 s


def test_results_flow_along_edges(isolation):
    """Values of upstream tasks arrive as arguments, positional and keyword."""
    with px.Workflow("w", isolation=isolation) as wf:
        a = wf.add(sleep_then, 0.0, 2)
        b = wf.add(sleep_then, 0.0, 3)
        c = wf.add(lambda x, y=0: x * y, a, y=b)
    assert px.run(wf, progress=False)[c] == 6


def test_on_error_fail_stops_the_run(isolation):
    """on_error='fail': the run fails, pending tasks are cancelled, results so far kept."""
    with px.Workflow("w", isolation=isolation) as wf:
        ok = wf.add(px.task(noop).options(id="ok"))
        bad = wf.add(px.task(boom).options(id="bad", after=[ok]))
        wf.add(px.task(noop).options(id="after-bad"), bad)
    result = px.run(wf, check=False, progress=False)
    assert result.status == "failed" and not result.ok
    assert result.tasks["ok"].status == "succeeded"
    assert result.tasks["bad"].status == "failed"
    assert result.tasks["after-bad"].status == "cancelled"
    assert isinstance(result.errors["bad"], ValueError)
    with pytest.raises(px.WorkflowFailed) as info:
        px.run(wf, progress=False)
    assert info.value.result.tasks["ok"].status == "succeeded"
    assert isinstance(info.value.exceptions[0], ValueError)


def test_on_error_skip_and_ignore(isolation):
    """skip: dependents skipped, independent work goes on; ignore: dependents get default."""
    with px.Workflow("w", isolation=isolation) as wf:
        bad = wf.add(px.task(boom).options(id="bad", on_error="skip"))
        child = wf.add(px.task(noop).options(id="child"), bad)
        wf.add(px.task(noop).options(id="grandchild"), child)
        wf.add(px.task(sleep_then).options(id="independent"), 0.05, "fine")
        soft = wf.add(px.task(boom).options(id="soft", on_error="ignore", default=-1))
        uses = wf.add(px.task(lambda v: v * 2).options(id="uses"), soft)
    events = []
    result = px.run(wf, on_event=lambda e: events.append((e.kind, e.task_id)), progress=False)
    assert result.status == "partial"
    assert [result.tasks[t].status for t in ("bad", "child", "grandchild")] == \
        ["failed", "skipped", "skipped"]
    assert result["independent"] == "fine" and result[uses] == -2
    assert result.tasks["soft"].status == "failed" and "soft" in result.errors
    assert [k for k, t in events if t == "child"] == ["task:skipped"]


def test_retry_with_backoff(isolation, tmp_path):
    """A flaky task is retried with the policy's delays; waiting holds no slot."""
    counter = tmp_path / "count"
    policy = px.Retry(3, initial_delay=0.2, backoff=2.0, on=(OSError,))
    with px.Workflow("w", isolation=isolation) as wf:
        f = wf.add(px.task(flaky).options(retry=policy), str(counter), 2, "done")
        wf.add(sleep_then, 0.1, "other")
    events = []
    result = px.run(wf, max_workers=1, on_event=events.append, progress=False)
    assert result[f] == "done" and result.tasks["flaky"].attempts == 3
    kinds = [e.kind for e in events if e.task_id == "flaky"]
    assert kinds == ["task:queued", "task:started", "task:retrying", "task:started",
                     "task:retrying", "task:started", "task:completed"]
    retry_t = [e.time for e in events if e.task_id == "flaky" and e.kind == "task:retrying"]
    start_t = [e.time for e in events if e.task_id == "flaky" and e.kind == "task:started"]
    assert start_t[1] - retry_t[0] >= 0.19 and start_t[2] - retry_t[1] >= 0.39
    # the slot was free while flaky waited: the other task ran in between
    assert result.tasks["sleep_then"].finished_at <= result.tasks["flaky"].finished_at


def test_retry_only_matching_exceptions(isolation):
    """An exception outside Retry.on fails at once."""
    with px.Workflow("w", isolation=isolation) as wf:
        wf.add(px.task(boom).options(retry=px.Retry(3, initial_delay=0, on=(OSError,))))
    result = px.run(wf, check=False, progress=False)
    assert result.tasks["boom"].attempts == 1 and result.status == "failed"


def test_process_timeout_kills_only_that_worker():
    """A process task that overruns is killed; a sibling in another worker is undisturbed."""
    with px.Workflow("w", isolation="process") as wf:
        wf.add(px.task(sleep_pid).options(id="slow", timeout=0.5, on_error="ignore"), 30)
        wf.add(px.task(sleep_pid).options(id="sibling"), 2.0)
    t0 = time.monotonic()
    result = px.run(wf, max_workers=2, progress=False)
    slow, sib = result.tasks["slow"], result.tasks["sibling"]
    assert slow.status == "timed_out" and isinstance(slow.error, px.TaskTimeout)
    assert isinstance(slow.error, TimeoutError)
    assert slow.duration < 5
    assert sib.status == "succeeded" and sib.attempts == 1 and sib.value == sib.worker
    assert time.monotonic() - t0 < 10


def test_process_timeout_is_retried():
    """A timed-out attempt counts as a failure the retry policy may retry."""
    with px.Workflow("w", isolation="process") as wf:
        wf.add(px.task(sleep_pid).options(timeout=0.3, retry=px.Retry(1, initial_delay=0),
                                           on_error="ignore"), 30)
    result = px.run(wf, progress=False)
    assert result.tasks["sleep_pid"].attempts == 2
    assert result.tasks["sleep_pid"].status == "timed_out"


def test_thread_timeout_marks_timed_out_and_holds_the_slot():
    """A thread task that overruns is timed out at once but keeps its slot until it returns."""
    release, returned = threading.Event(), threading.Event()

    def stuck():
        release.wait(30)  # ignores its cancel flag
        returned.set()
        return "late"

    with px.Workflow("w") as wf:
        wf.add(px.task(stuck).options(id="stuck", timeout=0.2, on_error="ignore"))
        wf.add(px.task(returned.is_set).options(id="next"))

    def on_event(e):
        if e.kind == "task:timeout":
            # Not a synchronization: a window in which a freed slot would let "next" start
            # (and see returned unset); the test passes whatever its length.
            threading.Timer(0.3, release.set).start()

    result = px.run(wf, max_workers=1, on_event=on_event, progress=False)
    assert result.tasks["stuck"].status == "timed_out"
    assert result["next"] is True  # "next" started only after the stuck thread returned


def test_cancel_flag_reaches_cooperative_thread_task():
    """run.cancel() sets the flag; a task calling check() ends as cancelled."""
    started = threading.Event()
    with px.Workflow("w") as wf:
        wf.add(px.task(cooperative).options(id="coop"), started)
        wf.add(px.task(noop).options(id="later", after=["coop"]))
    handle = px.start(wf, progress=False)
    assert started.wait(10)
    handle.cancel()
    result = handle.wait(10)
    assert result.status == "cancelled"
    assert result.tasks["coop"].status == "cancelled"
    assert result.tasks["later"].status == "cancelled"
    assert handle.done()


def test_cancel_stops_process_tasks_at_once():
    """Cancelling kills running process tasks instead of waiting for them."""
    with px.Workflow("w", isolation="process") as wf:
        for _ in range(2):
            wf.add(sleep_pid, 300)
    starts = threading.Semaphore(0)
    handle = px.start(wf, max_workers=2, progress=False,
                      on_event=lambda e: starts.release() if e.kind == "task:started" else None)
    assert starts.acquire(timeout=10) and starts.acquire(timeout=10)
    handle.cancel()
    result = handle.wait(60)  # raises WaitTimeout if the run waited for the 300 s tasks
    assert {t.status for t in result.tasks.values()} == {"cancelled"}
    for t in result.tasks.values():  # their workers were killed, not left to finish
        assert isinstance(t.worker, int)
        try:  # killed: its pidfd turns readable (it exited) within moments, not in 300 s
            fd = os.pidfd_open(t.worker)
        except ProcessLookupError:
            continue  # already gone and reaped
        try:
            assert select.select([fd], [], [], 10)[0], f"worker {t.worker} still running"
        finally:
            os.close(fd)


def test_grace_period_warns_about_thread_tasks_ignoring_the_flag(monkeypatch):
    """A thread task ignoring cancellation delays the end by the grace period, with a warning."""
    from parexec import _stopping
    monkeypatch.setattr(_stopping, "GRACE", 0.5)
    release, started = threading.Event(), threading.Event()
    with px.Workflow("w") as wf:
        wf.add(px.task(ignore_cancel).options(id="deaf"), release, started)
    handle = px.start(wf, progress=False)
    assert started.wait(10)
    handle.cancel()
    with pytest.warns(RuntimeWarning, match="deaf"):
        result = handle.wait(10)
    release.set()
    assert result.tasks["deaf"].status == "cancelled"


def test_start_wait_timeout_and_done(isolation):
    """wait(timeout) raises WaitTimeout while running; done() tells the state."""
    with px.Workflow("w", isolation=isolation) as wf:
        wf.add(sleep_then, 0.5, "v")
    handle = px.start(wf, progress=False)
    with pytest.raises(px.WaitTimeout):
        handle.wait(0.05)
    assert not handle.done()
    assert handle.wait(10)["sleep_then"] == "v"
    assert handle.done() and handle.result is not None


def test_pause_and_resume():
    """While paused no task starts; running ones finish; events mark both."""
    gate = threading.Event()
    with px.Workflow("w") as wf:
        first = wf.add(px.task(ignore_cancel).options(id="first"), gate)
        wf.add(px.task(noop).options(id="second"), first)
    events = []
    paused, first_done = threading.Event(), threading.Event()

    def on_event(e):
        events.append((e.kind, e.task_id))
        if e.kind == "workflow:paused":
            paused.set()
        elif e.kind == "task:queued" and e.task_id == "second":
            first_done.set()

    handle = px.start(wf, progress=False, on_event=on_event)
    handle.pause()
    assert paused.wait(10)
    gate.set()
    # "second" is queued once "first" is done; a scheduler ignoring the pause would start it
    # in that same turn of its loop, before it reads the resume sent below, so the order of
    # the events decides, with no time window.
    assert first_done.wait(10)
    handle.resume()
    result = handle.wait(10)
    assert result.ok
    kinds = [(k, tid) for k, tid in events if k in (
        "workflow:paused", "task:started", "task:completed", "workflow:resumed")]
    assert kinds == [("task:started", "first"), ("workflow:paused", None),
                     ("task:completed", "first"), ("workflow:resumed", None),
                     ("task:started", "second"), ("task:completed", "second")]


def test_workflow_timeout_stops_the_run():
    """run(timeout=) stops the run with status timed_out and keeps finished results."""
    with px.Workflow("w", isolation="process") as wf:
        quick = wf.add(sleep_then, 0.0, "q")
        wf.add(px.task(sleep_then).options(after=[quick]), 30)
    t0 = time.monotonic()
    result = px.run(wf, timeout=1.0, check=False, progress=False)
    assert time.monotonic() - t0 < 6
    assert result.status == "timed_out" and result[quick] == "q"
    with pytest.raises(px.WorkflowFailed):
        px.run(wf, timeout=0.5, progress=False)


def test_current_outside_a_task_is_an_error():
    """px.current() outside a task raises a ParexecError."""
    with pytest.raises(px.ParexecError, match="inside a running task"):
        px.current()


def test_current_gives_task_id_and_attempt(isolation):
    """Inside a task, px.current() tells the id and attempt number."""
    from helpers import context_info
    with px.Workflow("w", isolation=isolation) as wf:
        wf.add(px.task(context_info).options(id="who"))
    assert px.run(wf, progress=False)["who"] == ("who", 1, False)


def test_ctrl_c_cancels_keeps_partial_result_and_leaves_no_worker(tmp_path):
    """SIGINT during a run of process tasks: KeyboardInterrupt after cleanup, the partial result
    at px.last_result(), and no worker process left."""
    script = tmp_path / "ctrlc.py"
    script.write_text(
        "import sys, time\n"
        "import parexec as px\n"
        "def work(i, marker=None):\n"
        "    if i < 2:\n"
        "        return i\n"
        "    open(marker, 'a').write('started\\n')\n"
        "    time.sleep(60)\n"
        "with px.Workflow('cc', max_workers=4, isolation='process') as wf:\n"
        "    quick = [wf.add(work, i) for i in range(2)]\n"
        "    for i in range(2, 6):\n"
        "        wf.add(px.task(work).options(after=quick), i, sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    px.run(wf, progress=False)\n"
        "except KeyboardInterrupt:\n"
        "    r = px.last_result()\n"
        "    print('INTERRUPTED', r.status, sorted(r.results.values()), flush=True)\n"
        "    sys.exit(130)\n")
    marker = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, str(script), str(marker)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        # the long tasks run after the quick ones and announce themselves: wait for all
        while not marker.exists() or len(marker.read_text().split()) < 4:
            assert time.monotonic() < deadline, "the long tasks did not start"
            time.sleep(0.05)
        workers = [c for c in parent.children(recursive=True)]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "INTERRUPTED cancelled [0, 1]" in out
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive


def test_layered_graph_of_100000_tiny_thread_tasks():
    """A 100,000-task layered graph runs to the end, every task once, in dependency order."""
    rng = random.Random(0)
    n_layers, per = 100, 1000
    wf = px.Workflow("big")
    prev = []
    for _ in range(n_layers):
        cur = [wf.add(noop, *rng.sample(prev, 2)) if prev else wf.add(noop) for _ in range(per)]
        prev = cur
    result = px.run(wf, progress=False)
    assert result.ok and len(result.tasks) == 100_000
    assert all(t.attempts == 1 for t in result.tasks.values())
    last = result.tasks[prev[-1].id]
    first = result.tasks[wf.graph().ids[0]]
    assert last.started_at >= first.finished_at


# Trust under faults and hostile input (issues 12, 13 and 21) ---------------------------------

def test_runs_never_change_the_workflows_compiled_graph(isolation):
    """A map expanded at run time lives in the run's own arrays: the compiled graph is the
    same after three runs, and two runs at once each get the right values."""
    with px.Workflow("w", isolation=isolation) as wf:
        src = px.task(lambda: [1, 2, 3], id="src")()
        squares = px.task(lambda x: x * x, id="sq").map(src)
        total = px.task(sum, id="total")(squares)
    graph = wf.graph()
    before = [list(d) for d in graph.dependents]
    for _ in range(3):
        assert px.run(wf, progress=False)[total] == 14
    assert wf.graph() is graph and [list(d) for d in graph.dependents] == before
    runs = [px.start(wf, progress=False) for _ in range(2)]
    assert [r.wait()[total] for r in runs] == [14, 14]


def test_unpicklable_literal_argument_fails_before_anything_runs(tmp_path):
    """API section 7: a process task's literal argument that cannot be pickled is a
    PicklingError from run(), and no task ran."""
    marker = tmp_path / "ran"
    with px.Workflow("w") as wf:
        up = px.task(lambda: marker.write_text("x"), id="up")()
        px.task(lambda a, lock: a, id="down", isolation="process")(up, threading.Lock())
    with pytest.raises(px.PicklingError, match="'down'.*arguments cannot be pickled"):
        px.run(wf, progress=False)
    assert not marker.exists()


def test_cluster_map_without_a_cluster_is_an_error_before_anything_runs(tmp_path):
    """A map over a task's result whose items are cluster tasks needs cluster=, checked
    before the source task runs."""
    marker = tmp_path / "ran"
    with px.Workflow("w") as wf:
        src = px.task(lambda: marker.write_text("x") and [1, 2], id="src")()
        px.task(noop, isolation="cluster").map(src, id="items")
    with pytest.raises(px.WorkflowError, match="map 'items' has isolation='cluster'"):
        px.run(wf, progress=False)
    assert not marker.exists()


def test_bad_run_settings_and_empty_workflows():
    """parallel= must be a bool; an empty workflow warns, pointing at the caller's line."""
    with px.Workflow("w") as wf:
        px.task(noop)()
    with pytest.raises(px.TaskOptionError, match="parallel='no' must be True or False"):
        px.run(wf, parallel="no", progress=False)
    with pytest.warns(UserWarning, match="has no tasks") as record:
        px.run(px.Workflow("empty"), progress=False)
    assert record[0].filename == __file__


def sys_exit_3():
    sys.exit(3)


def test_sys_exit_in_a_task_is_reported_as_such(isolation):
    """A task calling sys.exit(3) fails; WorkflowFailed says SystemExit(3), not 'cancelled'."""
    with px.Workflow("w") as wf:
        wf.add(px.task(sys_exit_3).options(id="quit", isolation=isolation))
    with pytest.raises(px.WorkflowFailed) as info:
        px.run(wf, progress=False)
    (inner,) = info.value.exceptions
    assert "task 'quit' raised SystemExit(3)" in str(inner)
    assert isinstance(inner.__cause__, SystemExit) and inner.__cause__.code == 3


def test_a_run_timeout_is_a_timeout_error_and_workflow_failed_pickles_with_its_result():
    """except* TimeoutError catches a run-level timeout; a pickled WorkflowFailed keeps
    .result."""
    import pickle
    with px.Workflow("w") as wf:
        done = px.task(lambda: 7, id="done")()
        wf.add(px.task(sleep_then).options(id="slow", isolation="process"), 30)
    caught = []
    try:
        px.run(wf, timeout=1.0, progress=False)
    except* TimeoutError as group:
        caught.append(group)
    assert caught
    failed = caught[0]
    assert failed.result.status == "timed_out"
    again = pickle.loads(pickle.dumps(failed))
    assert again.result.status == "timed_out" and again.result[done] == 7


@pytest.mark.timeout(60)
def test_cancel_during_a_retry_backoff_keeps_the_last_error(isolation, tmp_path):
    """A task cancelled while it waits to retry says why it was going to be retried."""
    with px.Workflow("w", isolation=isolation) as wf:
        wf.add(px.task(flaky).options(id="flaky", retry=px.Retry(3, initial_delay=30)),
               str(tmp_path / "count"), 5)
    retrying = threading.Event()
    run = px.start(wf, progress=False, on_event=lambda e: e.kind == "task:retrying"
                   and retrying.set(), check=False)
    assert retrying.wait(30)
    run.cancel()
    tr = run.wait(30).tasks["flaky"]
    assert tr.status == "cancelled"
    assert isinstance(tr.error, px.Cancelled) and "waiting to retry" in str(tr.error)
    assert isinstance(tr.error.__cause__, OSError)


@pytest.mark.timeout(60)
def test_a_run_inside_a_thread_task_is_cancelled_with_it():
    """A nested run started by a thread task stops when that task is cancelled."""
    inner_started = threading.Event()

    def outer():
        with px.Workflow("inner") as inner:
            px.task(cooperative, id="loop")(inner_started, 60)
        return px.run(inner, progress=False, check=False).status

    with px.Workflow("outer") as wf:
        o = px.task(outer, id="outer")()
    run = px.start(wf, progress=False, check=False)
    assert inner_started.wait(30)
    t0 = time.monotonic()
    run.cancel()
    result = run.wait(30)
    assert time.monotonic() - t0 < 20  # not the grace period of a task ignoring its flag
    # The outer task returned the status of its inner run, which its cancellation stopped.
    assert result.status == "cancelled" and result.tasks[o.id].value == "cancelled"


def test_resume_after_an_ignored_failure_reruns_what_received_the_default(tmp_path):
    """A task that received a default from an ignored failure is never served by a resume:
    once the upstream succeeds, the downstream sees the real value."""
    db, flag = str(tmp_path / "s.db"), tmp_path / "ok"

    def fetch():
        if not flag.exists():
            raise OSError("network down")
        return [1, 2, 3]

    def report(data):
        return "no data" if data is None else f"{len(data)} rows"

    with px.Workflow("w") as wf:
        data = px.task(fetch, id="fetch", on_error="ignore")()
        rep = px.task(report, id="report")(data)
    assert px.run(wf, store=db, progress=False)[rep] == "no data"
    flag.write_text("up")
    again = px.run(wf, store=db, resume=True, progress=False)
    assert again[rep] == "3 rows" and again.tasks["report"].status == "succeeded"


@pytest.mark.timeout(60)
def test_tasks_stopped_while_running_keep_their_worker():
    """Timed-out and cancelled tasks name the worker they ran on (Gantt rows, traces)."""
    with px.Workflow("w") as wf:
        wf.add(px.task(sleep_pid).options(id="p", isolation="process", timeout=0.5,
                                          on_error="ignore"), 30)
        wf.add(px.task(cooperative).options(id="t", timeout=0.5, on_error="ignore"),
               threading.Event(), 30)
    result = px.run(wf, progress=False)
    assert result.tasks["p"].status == result.tasks["t"].status == "timed_out"
    assert isinstance(result.tasks["p"].worker, int)
    assert isinstance(result.tasks["t"].worker, str)


@pytest.mark.timeout(60)
def test_a_blocking_event_callback_does_not_hold_up_the_run():
    """Callbacks run off the scheduler thread: a callback that blocks cannot stop the run's
    timeout from firing, and run() returns with a warning after the drain period."""
    release = threading.Event()

    def stuck(event):
        if event.kind == "task:started":
            release.wait(20)

    with px.Workflow("w") as wf:
        wf.add(px.task(sleep_then).options(id="slow", isolation="process"), 30)
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="event callback .* is still running"):
        result = px.run(wf, timeout=1.0, on_event=stuck, progress=False, check=False)
    took = time.monotonic() - t0
    release.set()
    assert result.status == "timed_out"
    assert result.tasks["slow"].finished_at - result.started_at < 10
    assert took < 15


def test_prefetched_tasks_are_started_only_when_a_thread_takes_them():
    """task:started follows the real start: never more running tasks than worker threads."""
    running, peak, lock = set(), [0], threading.Lock()

    def watch(event):
        with lock:
            if event.kind == "task:started":
                running.add(event.task_id)
                peak[0] = max(peak[0], len(running))
            elif event.kind in ("task:completed", "task:failed"):
                running.discard(event.task_id)

    with px.Workflow("w") as wf:
        for k in range(3000):
            wf.add(px.task(noop).options(id=f"n{k}"))
    px.run(wf, max_workers=2, on_event=watch, progress=False)
    assert 1 <= peak[0] <= 2


def test_ignored_cancel_warning_is_given_once_at_the_callers_line():
    """A thread task that ignores its flag is reported by one RuntimeWarning that points at
    the caller's code, not at parexec's."""
    release = threading.Event()
    started = threading.Event()
    with px.Workflow("w") as wf:
        px.task(ignore_cancel, id="stubborn")(release, started)
    run = px.start(wf, progress=False, check=False)
    assert started.wait(30)
    run.cancel()
    try:
        with pytest.warns(RuntimeWarning, match="stubborn still running") as record:
            run.wait(60)
    finally:
        release.set()
    assert len(record) == 1 and record[0].filename == __file__


def test_groups_and_arguments_nested_beyond_the_recursion_limit():
    """Groups nested 1,500 deep and arguments nested 3,000 deep run (no RecursionError)."""
    with px.Workflow("deep") as wf:
        a = px.task(lambda: 1, id="a")()
        g = a
        for k in range(1500):
            g = px.group([g], id=f"g{k}")
        b = px.task(lambda v: v, id="b")(g)
        arg = a
        for _ in range(3000):
            arg = [arg]
        c = px.task(lambda v: v, id="c")(arg)
    result = px.run(wf, progress=False)
    value = result[c]
    for _ in range(3000):
        value = value[0]
    assert value == 1
    group_value = result[b]
    for k in reversed(range(1499)):
        group_value = group_value[f"g{k}"]
    assert group_value == {"a": 1}


# keep= (API section 9) ----------------------------------------------------------------------

class _Big:
    pass


_made: dict[str, object] = {}


def _make_big(name, *upstream):
    import weakref
    obj = _Big()
    _made[name] = weakref.ref(obj)
    return obj


def _alive(name, *upstream):
    import gc
    gc.collect()
    return _made[name]() is not None


def test_keep_leaves_releases_intermediates_as_soon_as_consumed(tmp_path):
    """With keep="leaves", a value is dropped once every consumer finished (not at the end
    of the run); its record stays, result[...] raises KeyError naming the setting, and the
    store still has the value."""
    with px.Workflow("w") as wf:
        a = px.task(_make_big, id="a")("a")
        b = px.task(_make_big, id="b")("b", a)
        c = px.task(_alive, id="c")("a", b)  # runs after b, a's only consumer, finished
    result = px.run(wf, keep="leaves", progress=False)
    assert result[c] is False  # a was released before c ran
    tr = result.tasks["a"]
    assert tr.status == "succeeded" and tr.value is None and tr.released
    with pytest.raises(KeyError, match="'a' succeeded, but its value was released.*'leaves'"):
        result[a]
    assert set(result.results) == {"c"}
    db = str(tmp_path / "s.db")
    px.run(wf, keep="leaves", store=db, progress=False)
    resumed = px.run(wf, store=db, resume=True, progress=False)
    assert resumed.tasks["a"].status == "cached" and isinstance(resumed[a], _Big)


def test_keep_a_list_keeps_exactly_those_values():
    """keep=[ref, "id"] keeps those values (and nothing else); unknown ids are refused."""
    with px.Workflow("w") as wf:
        a = px.task(lambda: 1, id="a")()
        b = px.task(lambda x: x + 1, id="b")(a)
        px.task(lambda x: x + 1, id="c")(b)
    result = px.run(wf, keep=[a, "c"], progress=False)
    assert result.results == {"a": 1, "c": 3}
    with pytest.raises(px.TaskOptionError, match="'cc', which is not a task.*did you mean 'c'"):
        px.run(wf, keep=["cc"], progress=False)


@pytest.mark.parametrize("parallel", [True, False])
def test_a_map_over_an_empty_list_resolves_at_once(parallel):
    """template.map([]) gives [] to its dependents (it used to wait forever)."""
    with px.Workflow("w") as wf:
        m = px.task(noop).map([], id="m", max_concurrent=1)
        after = px.task(lambda v: ("got", v), id="after")(m)
    run = px.start(wf, parallel=parallel, progress=False)
    result = run.wait(30)
    assert result[m] == [] and result[after] == ("got", [])


@pytest.mark.timeout(60)
def test_cancel_during_backoff_counts_the_failed_attempt_once(isolation):
    """A task cancelled while waiting for its retry keeps its attempt as its record, not
    also in history: stats never count it twice (max_concurrency stays within the slots)."""
    with px.Workflow("w", isolation=isolation) as wf:
        px.task(boom, id="t", retry=px.Retry(1, initial_delay=30))()
    retrying = threading.Event()
    run = px.start(wf, max_workers=1, progress=False, check=False,
                   on_event=lambda e: retrying.set() if e.kind == "task:retrying" else None)
    assert retrying.wait(30)
    run.cancel()
    result = run.wait(30)
    tr = result.tasks["t"]
    assert tr.status == "cancelled" and tr.attempts == 1 and tr.history is None
    assert result.stats.max_concurrency == 1


# Graceful timeouts and cancellation (grace=, issue 17 item 4) ---------------------------

def _wait_for_file(path, seconds=20):
    """The text of ``path`` once it exists and is not empty (written by a task)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.01)
    raise AssertionError(f"{path} was never written")


@pytest.mark.timeout(60)
def test_grace_process_timeout_runs_finally_and_keeps_the_worker(tmp_path):
    """grace>0: a timed-out process task's finally runs; its worker serves the next task."""
    from helpers import finally_writes, pid
    out, started = tmp_path / "out", tmp_path / "started"
    with px.Workflow("w") as wf:
        slow = wf.add(px.task(finally_writes).options(
            isolation="process", timeout=0.5, grace=5, on_error="ignore"), str(out),
            str(started))
        nxt = wf.add(px.task(pid).options(isolation="process", after=[slow]))
    t0 = time.monotonic()
    result = px.run(wf, max_workers=1, progress=False, check=False)
    assert time.monotonic() - t0 < 5  # the task left at its interruption, not at the kill
    assert result.tasks[slow.id].status == "timed_out"
    assert isinstance(result.tasks[slow.id].error, px.TaskTimeout)
    worker_pid, kind = out.read_text().split()
    assert kind == "TaskTimeout"
    assert int(worker_pid) == int(started.read_text())
    assert result.tasks[nxt.id].status == "succeeded"
    assert result[nxt] == int(worker_pid)  # not killed: the same worker ran the next task


@pytest.mark.timeout(60)
def test_grace_process_task_that_swallows_the_interrupt_is_killed_after_grace(tmp_path):
    """A process task catching the interrupt and sleeping on is killed ``grace`` s later."""
    from helpers import pid, swallow_interrupt
    started = tmp_path / "started"
    with px.Workflow("w") as wf:
        slow = wf.add(px.task(swallow_interrupt).options(
            isolation="process", timeout=0.3, grace=1, on_error="ignore"), str(started))
        nxt = wf.add(px.task(pid).options(isolation="process", after=[slow]))
    t0 = time.monotonic()
    result = px.run(wf, max_workers=1, progress=False, check=False)
    elapsed = time.monotonic() - t0
    assert 1.2 <= elapsed < 10
    assert result.tasks[slow.id].status == "timed_out"
    old = int(started.read_text())
    assert result[nxt] != old  # the killed worker was replaced


@pytest.mark.timeout(60)
def test_grace_cancel_of_a_run_runs_the_process_task_finally(tmp_path):
    """run.cancel() raises px.Cancelled inside a grace process task: its finally runs."""
    from helpers import finally_writes
    out, started = tmp_path / "out", tmp_path / "started"
    with px.Workflow("w") as wf:
        t = wf.add(px.task(finally_writes).options(isolation="process", grace=5),
                   str(out), str(started))
    run = px.start(wf, progress=False, check=False)
    _wait_for_file(started)
    run.cancel()
    result = run.wait(timeout=30)
    assert result.tasks[t.id].status == "cancelled"
    assert out.read_text().split()[1] == "Cancelled"


@pytest.mark.timeout(60)
def test_grace_stops_a_pure_python_thread_loop_at_its_timeout(recwarn):
    """A thread task looping in Python with no check() calls really stops with grace."""
    from helpers import spin
    stopped = threading.Event()
    with px.Workflow("w") as wf:
        t = wf.add(px.task(spin).options(timeout=0.3, grace=2), stopped)
    t0 = time.monotonic()
    result = px.run(wf, progress=False, check=False)
    assert stopped.is_set()
    assert time.monotonic() - t0 < 4  # well under the run's 5 s wait for ignored flags
    assert result.tasks[t.id].status == "timed_out"
    assert not [w for w in recwarn if "ignored" in str(w.message)]


@pytest.mark.timeout(60)
def test_grace_abandons_a_c_level_sleep_in_a_thread_as_today():
    """A thread blocked in time.sleep (C) is not interrupted: abandoned with a warning."""
    with px.Workflow("w") as wf:
        t = wf.add(px.task(time.sleep).options(id="nap", timeout=0.2, grace=0.5), 30)
    with pytest.warns(RuntimeWarning, match="nap"):
        result = px.run(wf, progress=False, check=False)
    assert result.tasks[t.id].status == "timed_out"


@pytest.mark.timeout(60)
def test_grace_interrupt_does_not_leak_into_the_next_task_on_the_same_thread():
    """After a grace interrupt, the next task on the same (only) thread succeeds."""
    from helpers import spin
    stopped = threading.Event()
    with px.Workflow("w") as wf:
        a = wf.add(px.task(spin).options(timeout=0.2, grace=2, on_error="ignore"), stopped)
        b = wf.add(px.task(sleep_then).options(id="next", after=[a]), 0.3, "ok")
    result = px.run(wf, max_workers=1, progress=False, check=False)
    assert result.tasks[a.id].status == "timed_out"
    assert result.tasks[b.id].status == "succeeded" and result[b] == "ok"
    assert result.tasks[b.id].worker == result.tasks[a.id].worker


@pytest.mark.timeout(60)
def test_grace_defaults_come_from_the_run_then_the_workflow(tmp_path):
    """A task's grace wins over the run's, which wins over the workflow's."""
    from helpers import finally_writes
    out, started = tmp_path / "out", tmp_path / "started"
    with px.Workflow("w", grace=0) as wf:
        t = wf.add(px.task(finally_writes).options(isolation="process", timeout=0.3,
                                                    on_error="ignore"), str(out), str(started))
    result = px.run(wf, progress=False, check=False, grace=5)
    assert result.tasks[t.id].status == "timed_out"
    assert out.read_text().split()[1] == "TaskTimeout"


@pytest.mark.timeout(60)
def test_grace_a_failure_under_fail_interrupts_a_running_process_task(tmp_path):
    """A failure under on_error="fail" raises px.Cancelled in a grace process task."""
    from helpers import fail_once_written, finally_writes
    out, started = tmp_path / "out", tmp_path / "started"
    with px.Workflow("w") as wf:
        slow = wf.add(px.task(finally_writes).options(isolation="process", grace=5),
                      str(out), str(started))
        wf.add(px.task(fail_once_written).options(id="bad"), str(started))
    result = px.run(wf, progress=False, check=False, max_workers=2)
    assert result.status == "failed"
    assert result.tasks[slow.id].status == "cancelled"
    assert out.read_text().split()[1] == "Cancelled"


def test_prefetch_never_runs_a_thread_task_beside_process_tasks_holding_every_slot():
    """Short thread tasks are queued ahead only in all-thread runs: while process tasks hold
    both slots, no thread task may run (max_workers bounds every local task)."""
    import os
    with px.Workflow("warm-up") as wf:  # two idle process workers: the sleepers start at once
        for k in range(2):
            wf.add(px.task(sleep_pid).options(id=f"w{k}", isolation="process"), 0.2)
    px.run(wf, max_workers=2, progress=False)
    with px.Workflow("w") as wf:
        for k in range(200):  # short thread tasks first: they turn prefetching on
            wf.add(px.task(noop).options(id=f"warm{k}", priority=10))
        for k in range(2):
            wf.add(px.task(sleep_pid).options(id=f"proc{k}", isolation="process",
                                               priority=5), 1.0)
        for k in range(20):
            wf.add(px.task(noop).options(id=f"late{k}"))
    result = px.run(wf, max_workers=2, progress=False)
    assert result.stats.max_concurrency <= 2
    assert os.getpid() not in {result[f"proc{k}"] for k in range(2)}


@pytest.mark.timeout(60)
def test_a_task_parked_behind_a_member_cancelled_in_the_ready_heap_still_runs():
    """The ready heap may hold only a task cancelled while it waited (the other member of
    an "any" group that just resolved): the tasks parked on a gate must then get their turn
    (found by the property suite: the run waited forever)."""
    with px.Workflow("w", cpu_budget=2.0) as wf:
        first = wf.add(px.task(sleep_then).options(id="m0", priority=3, cpus=1),
                       0.2, "m0")
        second = wf.add(px.task(sleep_then).options(id="m1", priority=2, cpus=1.5),
                        0.2, "m1")
        either = px.group([first, second], wait="any", id="either")
        wf.add(px.task(sleep_then).options(id="whole", priority=1, cpus=2), 0, "h")
    result = px.start(wf, max_workers=2, progress=False).wait(30)
    assert result[either] == "m0"
    assert result.tasks["whole"].status == "succeeded"
    assert result.tasks["m1"].status == "cancelled"


def _count_queued(monkeypatch):
    """Record the process tasks launched queued behind a running one (pipelined)."""
    from parexec import _dispatch
    queued: list[int] = []
    launch = _dispatch.Dispatch.launch

    def counting(self, i, prefetch=False):
        if prefetch and self.pools[i] is self.procs:
            queued.append(i)
        return launch(self, i, prefetch)
    monkeypatch.setattr(_dispatch.Dispatch, "launch", counting)
    return queued


@pytest.mark.timeout(120)
def test_short_process_tasks_are_pipelined_within_max_workers(monkeypatch):
    """No-op process tasks are queued one behind each running task of the run (so a worker
    finds its next task waiting), yet no more than max_workers ever run at once (by the
    workers' own clock readings), and every value is right."""
    queued = _count_queued(monkeypatch)
    with px.Workflow("pipe", isolation="process") as wf:
        refs = [wf.add(px.task(echo).options(id=f"t{k}"), k) for k in range(300)]
    result = px.run(wf, max_workers=2, progress=False)
    assert [result[r] for r in refs] == [((k,), {}) for k in range(300)]
    spans = [(t.started_at, t.finished_at) for t in result.tasks.values()]
    assert overlap_by_events(spans) <= 2
    assert len(queued) > 150, len(queued)  # most of them, once the mean duration is known


@pytest.mark.timeout(120)
def test_process_tasks_of_tens_of_milliseconds_are_not_pipelined(monkeypatch):
    """Above PIPELINE_BELOW (a mean of 20 ms) no task is committed to a busy worker ahead
    of time, so the priorities of tasks that become ready later still decide."""
    queued = _count_queued(monkeypatch)
    with px.Workflow("slow", isolation="process") as wf:
        for k in range(12):
            wf.add(px.task(sleep_then).options(id=f"t{k}"), 0.03)
    result = px.run(wf, max_workers=2, progress=False)
    assert result.ok and queued == []


@pytest.mark.timeout(120)
def test_a_follower_stuck_behind_a_long_leader_takes_a_freed_slot(monkeypatch, tmp_path):
    """Pipelining commits a follower to its leader's worker; when that leader runs long and
    another task ends without a follower, the follower takes the freed slot and starts on
    the free worker (here it releases its own leader, which would otherwise wait 30 s):
    no more than max_workers ran at once."""
    from parexec import _dispatch
    monkeypatch.setattr(_dispatch, "PIPELINE_BELOW", float("inf"))  # queue whatever it is
    queued = _count_queued(monkeypatch)
    release, started = str(tmp_path / "release"), str(tmp_path / "started")
    with px.Workflow("steal", isolation="process") as wf:
        long = wf.add(px.task(hold_until).options(id="long", priority=3), release, started)
        wf.add(px.task(sleep_then).options(id="short", priority=2), 0.5)
        wf.add(px.task(stamp).options(id="follower", priority=1), release)
    result = px.run(wf, max_workers=2, progress=False)
    tasks = result.tasks
    assert queued == [2]  # the follower, queued behind "long" (the oldest leader)
    assert tasks["follower"].finished_at < tasks["long"].finished_at
    assert tasks["long"].finished_at - tasks["long"].started_at < 20  # released, not timed out
    assert result[long] != result["follower"]  # another worker than its leader's
    spans = [(t.started_at, t.finished_at) for t in tasks.values()]
    assert overlap_by_events(spans) <= 2


@pytest.mark.timeout(120)
def test_pipelining_works_under_a_cpu_budget(monkeypatch):
    """A run with a cpu_budget (as every px.Executor has) pipelines its no-op process tasks
    too: a follower takes its leader's cpus when it starts, not while it waits (the CPU
    gate, full with the running tasks, refused every follower). The budget still holds."""
    queued = _count_queued(monkeypatch)
    with px.Workflow("pipe", isolation="process") as wf:
        refs = [wf.add(px.task(echo).options(id=f"t{k}"), k) for k in range(300)]
    result = px.run(wf, max_workers=2, cpu_budget=2, progress=False)
    assert [result[r] for r in refs] == [((k,), {}) for k in range(300)]
    spans = [(t.started_at, t.finished_at) for t in result.tasks.values()]
    assert overlap_by_events(spans) <= 2
    assert len(queued) > 150, len(queued)
