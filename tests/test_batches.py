"""Tests of parexec._batches: process map items sent to workers in batches (issue 16)."""

from __future__ import annotations

import os
import threading

import psutil
import pytest

import parexec as px


def square(x):
    return x * x


def square_or_fail(x):
    if x == 7:
        raise KeyError(f"no {x}")
    return x * x


def who(x):
    return px.current().task_id, os.getpid()


def flaky_once(x, folder):
    """Fails the first time it runs for x == 3 (a marker file remembers), else squares."""
    marker = os.path.join(folder, f"ran-{x}")
    if x == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first try")
    return x * x


def crash_on(x, bad):
    if x == bad:
        os._exit(3)
    return x


def wait_for_file(x, path):
    import time
    while not os.path.exists(path):  # the test creates it; never does when it cancels
        time.sleep(0.01)
    return x


def _map(fn, items, **options):
    with px.Workflow("b", isolation="process") as wf:
        ref = px.task(fn).options(**options).map(items) if options else px.task(fn).map(items)
    return wf, ref


def test_auto_batches_tiny_items_and_keeps_each_items_record():
    """500 tiny items go in batches (most items travel with others) and each item keeps its
    value, its own record (worker pid, worker-side times, one attempt) and its order."""
    wf, ref = _map(square, range(500))
    result = px.run(wf, max_workers=2, progress=False)
    assert result[ref] == [x * x for x in range(500)]
    stats = result.stats.maps["square"]
    assert stats["items"] == 500
    assert sum(size * count for size, count in stats["batches"].items()) == 500
    assert max(stats["batches"]) > 1, stats  # batched
    assert stats["batches"].get(1, 0) < 50
    assert 0 < stats["mean_item_time"] < 0.01
    assert "map square: 500 item(s) in " in result.summary()
    for k in range(500):
        tr = result.tasks[f"square[{k}]"]
        assert tr.status == "succeeded" and tr.attempts == 1
        assert isinstance(tr.worker, int)
        assert tr.started_at <= tr.finished_at


def test_fixed_batch_size_and_batch_one():
    """batch=N sends at most N items at a time; batch=1 sends each alone (no map stats)."""
    with px.Workflow("b", isolation="process") as wf:
        four = px.task(square).map(range(40), batch=4, id="four")
        one = px.task(square).map(range(10), batch=1, id="one")
    result = px.run(wf, max_workers=2, progress=False)
    assert result[four] == [x * x for x in range(40)] and result[one] == [x * x for x in range(10)]
    assert max(result.stats.maps["four"]["batches"]) == 4
    assert "one" not in result.stats.maps


def test_each_item_has_its_own_context_in_a_batch():
    """px.current() inside a batched item names that item."""
    wf, ref = _map(who, range(30))
    result = px.run(wf, max_workers=2, progress=False)
    assert [tid for tid, _ in result[ref]] == [f"who[{k}]" for k in range(30)]


def test_a_failing_item_fails_alone_with_its_type_and_worker_traceback():
    """One item raising in a batch: only it fails (KeyError, its traceback from the worker);
    the others succeed; with on_error='ignore' the map gets its default."""
    wf, ref = _map(square_or_fail, range(20), on_error="ignore", default=-1)
    result = px.run(wf, max_workers=2, progress=False)
    assert result[ref] == [-1 if x == 7 else x * x for x in range(20)]
    bad = result.tasks["square_or_fail[7]"]
    assert bad.status == "failed" and isinstance(bad.error, KeyError)
    assert "square_or_fail" in bad.traceback and "no 7" in bad.traceback
    assert all(result.tasks[f"square_or_fail[{k}]"].status == "succeeded"
               for k in range(20) if k != 7)


def test_an_item_retried_alone(tmp_path):
    """A batched item that fails once is retried on its own (two attempts); the others ran once."""
    with px.Workflow("b", isolation="process") as wf:
        ref = px.task(flaky_once).options(retry=1).map(range(12), folder=str(tmp_path))
    result = px.run(wf, max_workers=2, progress=False)
    assert result[ref] == [x * x for x in range(12)]
    attempts = {k: result.tasks[f"flaky_once[{k}]"].attempts for k in range(12)}
    assert attempts == {k: 2 if k == 3 else 1 for k in range(12)}
    assert result.tasks["flaky_once[3]"].history[0][4] == "failed"


@pytest.mark.timeout(60)
def test_a_worker_dying_in_a_batch_fails_its_items_with_workercrashed():
    """os._exit in one item kills its batch's worker: the crashing item fails with
    WorkerCrashed, every other item either succeeded or failed the same way, and the run
    leaves no worker behind."""
    with px.Workflow("b", isolation="process") as wf:
        ref = px.task(crash_on).options(on_error="ignore", default=None).map(
            range(200), bad=150, batch=20)
    result = px.run(wf, max_workers=2, progress=False)
    assert isinstance(result.tasks["crash_on[150]"].error, px.WorkerCrashed)
    for k in range(200):
        tr = result.tasks[f"crash_on[{k}]"]
        assert tr.status == "succeeded" or isinstance(tr.error, px.WorkerCrashed), (k, tr)
    assert result[ref][0] == 0 and result[ref][199] == 199  # other batches ran


def test_items_with_a_timeout_or_memory_go_one_by_one():
    """Items with a timeout (or memory) are not batched: each is an ordinary attempt."""
    wf, ref = _map(square, range(30), timeout=30)
    result = px.run(wf, max_workers=2, progress=False)
    assert result[ref] == [x * x for x in range(30)]
    assert result.stats.maps.get("square", {"batches": {1: 30}})["batches"] == {1: 30}


def test_thread_maps_are_not_batched():
    """A thread map sends each item on its own (prefetch hides their round trip instead)."""
    with px.Workflow("b") as wf:
        ref = px.task(square).map(range(50))
    result = px.run(wf, max_workers=2, progress=False)
    assert result[ref] == [x * x for x in range(50)]
    assert result.stats.maps == {}


def test_events_per_item():
    """Each batched item has its own queued, started and completed events, in that order."""
    events = []
    wf, ref = _map(square, range(100))
    px.run(wf, max_workers=2, progress=False, on_event=events.append)
    kinds: dict[str, list[str]] = {}
    for e in events:
        if e.task_id and e.task_id.startswith("square["):
            kinds.setdefault(e.task_id, []).append(e.kind)
    assert len(kinds) == 100
    assert all(k == ["task:queued", "task:started", "task:completed"] for k in kinds.values())


@pytest.mark.timeout(60)
def test_cancel_stops_a_running_batch(tmp_path):
    """Cancelling while a batch runs kills its worker at once and cancels its items."""
    never = str(tmp_path / "never")
    with px.Workflow("b", isolation="process") as wf:
        px.task(wait_for_file).map(range(40), path=never, batch=10)
    started = threading.Event()
    run = px.start(wf, max_workers=2, progress=False,
                   on_event=lambda e: started.set() if e.kind == "task:started" else None)
    assert started.wait(30)
    pool = px._pools.process_pool()
    busy = {w.pid for w in list(pool._workers.values()) if w.attempt is not None}
    assert busy  # the workers now running the batches
    run.cancel()
    result = run.wait(30)  # the items wait for a file that never comes: killed, not awaited
    assert result.status == "cancelled"
    assert all(t.status == "cancelled" for tid, t in result.tasks.items() if "[" in tid)
    _, alive = psutil.wait_procs([psutil.Process(p) for p in busy if psutil.pid_exists(p)],
                                 timeout=10)
    assert not alive, "a batch's worker outlived the cancel"


def test_batch_option_is_checked():
    """batch= must be 'auto' or a positive int; the error names the map and the value."""
    with px.Workflow("b"), pytest.raises(px.TaskOptionError, match="batch.*0"):
        px.task(square).map(range(3), batch=0)
    with px.Workflow("b"), pytest.raises(px.TaskOptionError, match="batch.*'big'"):
        px.task(square).map(range(3), batch="big")
