"""Tests of parexec._batches: process map items sent to workers in batches (issue 16)."""

from __future__ import annotations

import os
import threading

import helpers
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


def odd_values(x):
    """A lock for 5 (no pickler takes it), a lambda for 6 (only cloudpickle does), else x."""
    if x == 5:
        return threading.Lock()
    if x == 6:
        return lambda: "made in the worker"
    return x


def test_an_unpicklable_value_fails_its_item_alone():
    """One item's value that cannot be pickled fails that item with PicklingError; the
    others of its batch keep theirs, a value only cloudpickle can send included."""
    with px.Workflow("b", isolation="process") as wf:
        ref = px.task(odd_values).options(on_error="ignore", default="lost").map(
            range(10), batch=10)
    result = px.run(wf, max_workers=1, progress=False)
    values = result[ref]
    assert isinstance(result.tasks["odd_values[5]"].error, px.PicklingError)
    assert "odd_values[5]" in str(result.tasks["odd_values[5]"].error)
    assert values[6]() == "made in the worker"
    assert [v for k, v in enumerate(values) if k != 6] == [0, 1, 2, 3, 4, "lost", 7, 8, 9]
    assert result.stats.maps["odd_values"]["batches"] == {10: 1}


class _RaisesSystemExit:
    def __reduce__(self):
        raise SystemExit("a __reduce__ that exits")


def exiting_value(x):
    """Item 1 returns a value whose pickling raises SystemExit (not an Exception)."""
    return _RaisesSystemExit() if x == 1 else x


@pytest.mark.parametrize("timeout", [None, 30], ids=["batch", "streamed"])
def test_a_value_whose_pickling_raises_anything_fails_its_item_alone(timeout):
    """Whatever pickling a value raises (here SystemExit), in a plain or a streamed batch,
    only that item fails (PicklingError); its worker lives on and the others keep theirs."""
    options = {"on_error": "ignore", "default": "lost"} | (
        {"timeout": timeout} if timeout else {})
    with px.Workflow("b", isolation="process") as wf:
        ref = px.task(exiting_value).options(**options).map(range(5), batch=5)
    result = px.run(wf, max_workers=1, progress=False)
    assert result[ref] == [0, "lost", 2, 3, 4]
    assert isinstance(result.tasks["exiting_value[1]"].error, px.PicklingError)
    assert len({result.tasks[f"exiting_value[{k}]"].worker for k in range(5)}) == 1


def test_the_list_of_a_map_holds_the_default_of_its_last_ignored_failure():
    """on_error='ignore': a failed item's default is in the map's list, also when that item
    is the last to finish (its groups decided before the default was set)."""
    with px.Workflow("b") as wf:
        ref = px.task(square_or_fail).options(on_error="ignore", default=-1).map([1, 2, 7])
    assert px.run(wf, max_workers=1, progress=False)[ref] == [1, 4, -1]


@pytest.mark.timeout(60)
def test_a_failing_timed_out_item_stops_the_run_without_hanging(tmp_path):
    """An item that times out for good fails its map (on_error='fail'): the run ends at
    once, the items after it in its batch cancelled (they were ready again, not running
    in a batch that no longer runs), those before it kept."""
    pidfile = str(tmp_path / "pid")
    with px.Workflow("b", isolation="process") as wf:
        px.task(hang_on).options(timeout=3).map(range(4), bad=1, pidfile=pidfile, batch=4)
    result = px.start(wf, max_workers=1, progress=False, check=False).wait(30)
    assert result.status == "failed"
    states = [result.tasks[f"hang_on[{k}]"].status for k in range(4)]
    assert states == ["succeeded", "timed_out", "cancelled", "cancelled"]


@pytest.mark.timeout(60)
def test_a_worker_dying_in_a_streamed_batch_keeps_what_finished():
    """A streamed batch (timeout set) whose worker dies in item 150: the items before it
    keep their values (their messages, still in the pipe when the worker died, are read
    before its death is handled), item 150 fails with WorkerCrashed, and the items after
    it, which never started, run again at attempt 1."""
    events = []
    with px.Workflow("b", isolation="process") as wf:
        ref = px.task(crash_on).options(timeout=30, on_error="ignore", default=None).map(
            range(200), bad=150, batch=200)
    result = px.run(wf, max_workers=1, progress=False, on_event=events.append)
    assert result[ref] == [None if k == 150 else k for k in range(200)]
    assert isinstance(result.tasks["crash_on[150]"].error, px.WorkerCrashed)
    assert all(result.tasks[f"crash_on[{k}]"].attempts == 1 for k in range(200))
    seen = [e.kind for e in events if e.task_id == "crash_on[180]"]
    assert seen == ["task:queued", "task:started", "task:queued", "task:started",
                    "task:completed"]  # sent again: queued again, then started again


def test_items_with_memory_go_one_by_one():
    """Items with a memory limit are not batched (the limit kills one attempt's worker):
    each is an ordinary attempt."""
    wf, ref = _map(square, range(30), memory="1GB")
    result = px.run(wf, max_workers=2, progress=False)
    assert result[ref] == [x * x for x in range(30)]
    assert result.stats.maps.get("square", {"batches": {1: 30}})["batches"] == {1: 30}


def hang_on(x, bad, pidfile):
    """Hangs for item ``bad`` (after writing its pid), else returns its item and pid."""
    import time
    if x == bad:
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)
    return x, os.getpid()


def test_items_with_a_timeout_are_batched_and_succeed():
    """Items with a timeout go in batches too (streamed: each outcome comes ahead of the
    next item), and each keeps its own record."""
    with px.Workflow("b", isolation="process") as wf:
        ref = px.task(square).options(timeout=30).map(range(60), batch=20)
    result = px.run(wf, max_workers=2, progress=False)
    assert result[ref] == [x * x for x in range(60)]
    assert result.stats.maps["square"]["batches"] == {20: 3}
    records = [result.tasks[f"square[{k}]"] for k in range(60)]
    assert all(tr.attempts == 1 for tr in records)
    assert all(tr.peak_memory and tr.peak_memory > 1 << 20 for tr in records)  # measured
    assert all(tr.started_at <= tr.finished_at for tr in records)


@pytest.mark.timeout(60)
def test_an_item_overrunning_its_timeout_is_timed_out_alone(tmp_path):
    """In a batch of 8 on one worker, item 3 hangs past its 3 s timeout: it alone times out
    (its worker killed), the items before it keep their values from that worker, and the
    four after it, which never started, run in a new worker, still at attempt 1."""
    pidfile = str(tmp_path / "pid")
    with px.Workflow("b", isolation="process") as wf:
        ref = px.task(hang_on).options(timeout=3, on_error="ignore", default="late").map(
            range(8), bad=3, pidfile=pidfile, batch=8)
    result = px.run(wf, max_workers=1, progress=False)
    values = result[ref]
    tr = result.tasks["hang_on[3]"]
    assert tr.status == "timed_out" and isinstance(tr.error, px.TaskTimeout)
    assert tr.attempts == 1 and tr.worker == int(open(pidfile).read())
    assert values[3] == "late"
    first = values[0][1]
    assert [v[0] for k, v in enumerate(values) if k != 3] == [0, 1, 2, 4, 5, 6, 7]
    assert values[1][1] == values[2][1] == first == tr.worker  # settled before the kill
    assert len({values[k][1] for k in (4, 5, 6, 7)} - {first}) == 1  # sent again, elsewhere
    assert all(result.tasks[f"hang_on[{k}]"].attempts == 1 for k in range(8))
    assert result.stats.maps["hang_on"]["batches"] == {8: 1, 4: 1}
    assert helpers.gone(tr.worker), "the overrunning item's worker was not killed"


@pytest.mark.timeout(60)
def test_a_timed_out_item_is_retried_alone(tmp_path):
    """retry= applies to the item that overran: it is tried again on its own, its history
    records the timeout, and no other item of its batch counts an attempt."""
    pidfile = str(tmp_path / "pid")
    with px.Workflow("b", isolation="process") as wf:
        px.task(hang_on).options(timeout=3, retry=1, on_error="ignore").map(
            range(4), bad=1, pidfile=pidfile, batch=4)
    result = px.run(wf, max_workers=1, progress=False)
    tr = result.tasks["hang_on[1]"]
    assert tr.status == "timed_out" and tr.attempts == 2
    assert [h.outcome for h in tr.history] == ["timed_out"]
    assert [result.tasks[f"hang_on[{k}]"].attempts for k in (0, 2, 3)] == [1, 1, 1]


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
    assert all(helpers.gone(p) for p in busy), "a batch's worker outlived the cancel"


def test_batch_option_is_checked():
    """batch= must be 'auto' or a positive int; the error names the map and the value."""
    with px.Workflow("b"), pytest.raises(px.TaskOptionError, match="batch.*0"):
        px.task(square).map(range(3), batch=0)
    with px.Workflow("b"), pytest.raises(px.TaskOptionError, match="batch.*'big'"):
        px.task(square).map(range(3), batch="big")
