"""px.Executor (issue 20): a concurrent.futures.Executor on parexec's engine."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path

import psutil
import pytest
from helpers import gone

import parexec as px


def add(a, b=0):
    return a + b


def total(xs, extra=None):
    flat = [x for item in xs for x in (item if isinstance(item, tuple) else (item,))]
    return sum(flat) + sum((extra or {}).values())


def fail(message):
    raise ValueError(message)


def spin(seconds):
    """Sleep in short steps, so an exception raised in this thread (grace=) lands soon."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)


def pid_then_sleep(path, seconds):
    """Write this worker's pid to ``path``, sleep, return the pid."""
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def wait_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return path.read_text()


@pytest.fixture(params=["thread", "process"])
def ex(request):
    with px.Executor(max_workers=2, isolation=request.param) as executor:
        yield executor


def test_submit_result(ex):
    """submit returns a concurrent.futures.Future whose result is the function's value."""
    f = ex.submit(add, 1, b=2)
    assert isinstance(f, cf.Future)
    assert f.result(30) == 3
    assert f.done() and not f.cancelled()


def test_exception_keeps_type_and_traceback(ex):
    """A task's exception reaches result() with its type and its worker-side frames."""
    f = ex.submit(fail, "bad input")
    with pytest.raises(ValueError, match="bad input") as info:
        f.result(30)
    assert isinstance(f.exception(), ValueError)
    text = "".join(traceback.format_exception(info.value))
    assert "in fail" in text and 'raise ValueError(message)' in text


def test_wait_and_as_completed(ex):
    """concurrent.futures.wait and as_completed work on its futures, cancelled ones too."""
    fs = [ex.submit(add, i) for i in range(6)]
    slow = ex.submit(px.task(spin, grace=1), 30)
    done, not_done = cf.wait(fs, timeout=30)
    assert done == set(fs) and not not_done
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=30)) == list(range(6))
    assert slow.cancel()
    assert list(cf.as_completed([slow], timeout=10)) == [slow]
    assert cf.wait([slow], timeout=10).done == {slow}


def test_asyncio_run_in_executor(ex):
    """asyncio's loop.run_in_executor runs calls on it."""
    async def main():
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(ex, add, i, 10) for i in range(4)))
    assert asyncio.run(main()) == [10, 11, 12, 13]


def test_dask_compute_scheduler():
    """dask.compute(..., scheduler=ex) runs a dask graph on it."""
    dask = pytest.importorskip("dask")
    xs = [dask.delayed(add)(i, 1) for i in range(5)]
    with px.Executor(max_workers=2) as ex:
        assert dask.compute(dask.delayed(sum)(xs), scheduler=ex) == (15,)


def test_futures_as_arguments_nested(ex):
    """Futures inside lists, tuples and dicts are waited for and replaced by their values."""
    a = ex.submit(add, 1)
    b = ex.submit(add, 2)
    c = ex.submit(total, [a, (b, a)], extra={"b": b})
    assert c.result(30) == 1 + 2 + 1 + 2
    d = ex.submit(add, c, c)  # a settled future as argument: its value still comes
    assert d.result(30) == 12


def test_upstream_failure_cancels_dependents(ex):
    """A submission taking a failed future fails with px.Cancelled naming its error."""
    bad = ex.submit(fail, "upstream broke")
    after = ex.submit(add, bad, 1)
    later = ex.submit(add, after, 1)
    with pytest.raises(px.Cancelled, match="upstream broke") as info:
        after.result(30)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(px.Cancelled):
        later.result(30)
    bad.exception(30)
    late = ex.submit(add, [bad], 1)  # submitted after the failure settled
    with pytest.raises(px.Cancelled, match="upstream broke"):
        late.result(30)


def test_foreign_refs_refused():
    """A TaskRef of a workflow cannot be passed to submit (its value is not this run's)."""
    with px.Workflow("w"):
        ref = px.task(add)(1)
    with px.Executor(max_workers=1, isolation="thread") as ex, \
            pytest.raises(px.TaskOptionError, match="another workflow"):
        ex.submit(add, ref)


def test_memory_budget_gates_submissions():
    """Submissions declaring memory run at most as many at once as the budget holds."""
    lock = threading.Lock()
    running = [0, 0]  # now, most

    def hold(seconds):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(seconds)
        with lock:
            running[0] -= 1

    task = px.task(hold, memory="100MB")
    with px.Executor(max_workers=4, isolation="thread", memory_budget="250MB") as ex:
        fs = [ex.submit(task, 0.1) for _ in range(6)]
        cf.wait(fs, timeout=60)
    assert [f.exception() for f in fs] == [None] * 6
    assert running[1] == 2
    with px.Executor(max_workers=1, isolation="thread", memory_budget="50MB") as ex, \
            pytest.raises(px.ResourceError, match="memory"):
        ex.submit(task, 0)


@pytest.mark.timeout(90)
def test_cancel_running_process_task_kills_its_worker_alone(tmp_path):
    """cancel() of a running process task kills its worker; a sibling keeps its worker."""
    with px.Executor(max_workers=2) as ex:
        victim = ex.submit(pid_then_sleep, str(tmp_path / "victim"), 60)
        sibling = ex.submit(pid_then_sleep, str(tmp_path / "sibling"), 1.5)
        victim_pid = int(wait_file(tmp_path / "victim"))
        sibling_pid = int(wait_file(tmp_path / "sibling"))
        assert victim.running()
        assert victim.cancel() is True
        assert victim.cancelled()
        with pytest.raises(cf.CancelledError):
            victim.result(1)
        assert gone(victim_pid)
        assert sibling.result(30) == sibling_pid  # its worker was not disturbed
        assert psutil.pid_exists(sibling_pid)
        assert sibling.cancel() is False  # finished futures cannot be cancelled


@pytest.mark.timeout(90)
def test_cancel_of_a_task_queued_on_a_busy_worker_never_runs_it(tmp_path):
    """Short tasks are queued on a busy worker, behind the task it runs (pipelining): one
    cancelled there never runs, and the worker is not killed for it."""
    import helpers
    with px.Executor(max_workers=1) as ex:
        for f in [ex.submit(helpers.pid) for _ in range(20)]:  # short on average: pipelined
            worker = f.result(30)
        release, started = tmp_path / "release", tmp_path / "started"
        held = ex.submit(helpers.hold_until, str(release), str(started))
        helpers.wait_file(started)
        ran = tmp_path / "ran"
        queued = ex.submit(helpers.append_pid, str(ran))
        deadline = time.monotonic() + 10
        pool = px._pools.process_pool()
        while not any(w.next is not None for w in pool._workers.values()):
            assert time.monotonic() < deadline, "never queued behind the held task"
            time.sleep(0.01)
        assert queued.cancel() is True
        release.touch()
        assert held.result(30) == worker
        assert ex.submit(helpers.pid).result(30) == worker  # the same worker
        assert queued.cancelled() and not ran.exists()


@pytest.mark.timeout(60)
def test_cancel_running_thread_task_sets_its_flag():
    """cancel() of a running thread task sets its cancel flag; the future ends cancelled."""
    started = threading.Event()
    saw = []

    def loop():
        started.set()
        ctx = px.current()
        deadline = time.monotonic() + 30
        while not ctx.cancelled() and time.monotonic() < deadline:
            time.sleep(0.005)
        saw.append(ctx.cancelled())

    with px.Executor(max_workers=1, isolation="thread") as ex:
        f = ex.submit(loop)
        assert started.wait(30)
        assert f.cancel()
    assert f.cancelled() and saw == [True]


def test_timeout_raises_task_timeout(ex):
    """A template's timeout stops the task; result() raises px.TaskTimeout (a TimeoutError)."""
    slow = px.task(spin, timeout=0.2, grace=1)  # a thread task gets TaskTimeout raised
    f = ex.submit(slow, 30)
    with pytest.raises(px.TaskTimeout) as info:
        f.result(30)
    assert isinstance(info.value, TimeoutError)
    assert ex.submit(add, 1).result(30) == 1  # the executor goes on


def test_retry_option_applies():
    """A template's retry runs a failing task again."""
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("try again")
        return "ok"

    task = px.task(flaky, retry=px.Retry(2, initial_delay=0.01))
    with px.Executor(max_workers=1, isolation="thread") as ex:
        assert ex.submit(task).result(30) == "ok"
    assert len(attempts) == 3


@pytest.mark.timeout(90)
def test_shutdown_cancel_futures_stops_running_tasks(tmp_path):
    """shutdown(cancel_futures=True) cancels every unfinished future, running ones included."""
    ex = px.Executor(max_workers=1)
    running = ex.submit(pid_then_sleep, str(tmp_path / "pid"), 60)
    queued = ex.submit(add, 1)
    pid = int(wait_file(tmp_path / "pid"))
    started = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - started < 30
    assert running.cancelled() and queued.cancelled()
    assert gone(pid)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(add, 1)


def test_map_order_and_exceptions(ex):
    """map yields results in item order; an item's exception is raised when reached."""
    assert list(ex.map(add, range(50), range(50))) == [2 * i for i in range(50)]
    assert list(ex.map(add, range(20), chunksize=3)) == list(range(20))
    assert list(ex.map(add, [])) == []

    def odd_fails(i):
        if i == 7:
            raise KeyError(i)
        return i

    got = []
    with pytest.raises(KeyError):
        for y in ex.map(odd_fails if ex._isolation == "thread" else fail_at_7, range(20)):
            got.append(y)
    assert got == list(range(7))


def fail_at_7(i):
    if i == 7:
        raise KeyError(i)
    return i


def test_map_of_many_tiny_items_runs_in_few_tasks():
    """10,000 tiny items run in a few chunks, not 10,000 tasks."""
    events = []
    with px.Executor(max_workers=2) as ex:
        ex.on("task:completed", events.append)
        assert sum(ex.map(add, range(10_000))) == sum(range(10_000))
    assert 1 <= len(events) <= 100


def test_map_timeout():
    """map(timeout=) raises TimeoutError when a result is late."""
    with px.Executor(max_workers=1, isolation="thread") as ex:
        it = ex.map(px.task(spin, grace=1), [5], timeout=0.2)
        with pytest.raises(TimeoutError):
            next(it)
        ex.shutdown(cancel_futures=True)


def test_values_are_dropped_once_settled():
    """The run keeps no value of a settled future that nothing pending consumes."""
    with px.Executor(max_workers=1, isolation="thread") as ex:
        big = ex.submit(bytes, 10_000)
        use = ex.submit(len, big)
        assert use.result(30) == 10_000
        ex.submit(add, 0).result(30)  # the scheduler handled both settlements
        sched = ex._scheduler
        assert sched.values[big.index] is None and sched.values[use.index] is None
        assert sched.specs[use.index].args == ()
        assert sched.runs[big.index] is sched.runs[use.index]  # one shared settled record
        assert big.result() == bytes(10_000)  # the future keeps it


def test_events_and_priorities():
    """ex.on delivers task events; higher priority waiting submissions start first."""
    events = []
    gate = threading.Event()
    order = []
    with px.Executor(max_workers=1, isolation="thread") as ex:
        ex.on("task:started", events.append)
        first = ex.submit(gate.wait, 30)
        low = ex.submit(px.task(order.append, priority=0), "low")
        high = ex.submit(px.task(order.append, priority=5), "high")
        ex.submit(add, 0).result  # noqa: B018
        time.sleep(0.05)  # the three are waiting behind `first`
        gate.set()
        cf.wait([first, low, high], timeout=30)
    assert order == ["high", "low"]
    assert {e.task_id for e in events} >= {"wait", "append", "append-2"}


def test_running_and_repr():
    """running() is True while the task runs; the repr names the task and its state."""
    gate = threading.Event()
    started = threading.Event()

    def block():
        started.set()
        gate.wait(30)

    with px.Executor(max_workers=1, isolation="thread") as ex:
        f = ex.submit(block)
        assert started.wait(30)
        deadline = time.monotonic() + 10
        while not f.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert f.running() and "block" in repr(f)
        gate.set()
        f.result(30)


CTRL_C = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import parexec as px

    def pid_then_sleep(path, seconds):
        Path(path).write_text(str(os.getpid()))
        time.sleep(seconds)

    if __name__ == "__main__":
        try:
            with px.Executor(max_workers=2) as ex:
                f = ex.submit(pid_then_sleep, sys.argv[1], 120)
                f.result()
        except KeyboardInterrupt:
            # Still inside the interpreter: the worker must already be stopped, not only
            # by the exit hooks.
            import psutil
            try:
                psutil.Process(int(Path(sys.argv[1]).read_text())).wait(10)
            except psutil.NoSuchProcess:
                pass
            except psutil.TimeoutExpired:
                print("worker still running", flush=True)
            print("cancelled:", f.cancelled(), flush=True)
            raise
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("twice", [False, True])
def test_ctrl_c_stops_running_process_tasks(tmp_path, twice):
    """Ctrl-C in the caller (waiting on result()) stops the running process task's worker."""
    script = tmp_path / "main.py"
    script.write_text(CTRL_C)
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([sys.executable, str(script), str(pidfile)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = int(wait_file(pidfile, 60))
        proc.send_signal(signal.SIGINT)
        if twice:
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "KeyboardInterrupt" in err
    assert "cancelled: True" in out and "still running" not in out
    assert gone(worker, 10)


AT_EXIT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import parexec as px

    def write_later(path):
        time.sleep(0.3)
        Path(path).write_text(str(os.getpid()))

    if __name__ == "__main__":
        ex = px.Executor(max_workers=1)
        ex.submit(write_later, sys.argv[1])
        # no shutdown: the interpreter's exit waits for the work, as the stdlib's executors do
""")


@pytest.mark.timeout(120)
def test_exit_without_shutdown_finishes_work_and_leaves_no_worker(tmp_path):
    """An executor never shut down finishes its work at exit, and its workers exit too."""
    script = tmp_path / "main.py"
    script.write_text(AT_EXIT)
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(script), str(out)], check=True, timeout=90)
    assert gone(int(out.read_text()), 10)


def test_pools_and_cpus_gate_submissions():
    """Named pool units and cpus within cpu_budget limit how many submissions run at once."""
    lock = threading.Lock()
    running = {"db": [0, 0], "cpu": [0, 0]}

    def hold(kind):
        with lock:
            running[kind][0] += 1
            running[kind][1] = max(running[kind][1], running[kind][0])
        time.sleep(0.05)
        with lock:
            running[kind][0] -= 1

    db = px.task(hold, pools="db")
    heavy = px.task(hold, cpus=2)
    with px.Executor(max_workers=4, isolation="thread", cpu_budget=4, pools={"db": 1}) as ex:
        fs = [ex.submit(db, "db") for _ in range(4)]
        cf.wait(fs, timeout=60)
        fs += [ex.submit(heavy, "cpu") for _ in range(4)]
        cf.wait(fs, timeout=60)
        assert [f.exception() for f in fs] == [None] * 8
        with pytest.raises(px.ResourceError, match="'gpu'"):
            ex.submit(px.task(hold, pools="gpu"), "db")
    assert running["db"][1] == 1 and running["cpu"][1] == 2


def test_max_tasks_per_worker_recycles_workers():
    """max_tasks_per_worker=1 gives each process task a fresh worker."""
    with px.Executor(max_workers=1, max_tasks_per_worker=1) as ex:
        pids = [ex.submit(os.getpid).result(60) for _ in range(3)]
    assert len(set(pids)) == 3


def test_template_isolation_and_on_after_start():
    """A template's isolation wins over the executor's; on() after the start is refused."""
    with px.Executor(max_workers=1, isolation="process") as ex:
        here = ex.submit(px.task(os.getpid, isolation="thread")).result(60)
        there = ex.submit(os.getpid).result(60)
        with pytest.raises(RuntimeError, match="before the first submit"):
            ex.on("*", print)
    assert here == os.getpid() != there


def test_progress_bar_counts_submissions(capsys):
    """progress=True shows a bar whose total grows with the submissions."""
    with px.Executor(max_workers=1, isolation="thread", progress=True) as ex:
        assert [f.result(30) for f in [ex.submit(add, i) for i in range(3)]] == [0, 1, 2]
    assert "3/3" in capsys.readouterr().err


@pytest.mark.timeout(90)
@pytest.mark.parametrize("chunksize", [None, 1])
def test_map_timeout_stops_the_late_item(tmp_path, chunksize):
    """A map's TimeoutError cancels the item it waited for: its process worker is killed."""
    with px.Executor(max_workers=1) as ex:
        it = ex.map(pid_then_sleep, [str(tmp_path / "pid")], [60], timeout=1.0,
                    chunksize=chunksize)
        with pytest.raises(TimeoutError):
            next(it)
        assert gone(int(wait_file(tmp_path / "pid")))


def cleanup_on_cancel(path, seconds):
    """Write the pid, sleep in short steps; on px.Cancelled, write 'cleaned' first."""
    Path(path).write_text(str(os.getpid()))
    try:
        spin(seconds)
    finally:
        Path(path + ".done").write_text("cleaned")


@pytest.mark.timeout(90)
def test_cancel_with_grace_lets_a_process_task_clean_up(tmp_path):
    """With grace, cancel() raises px.Cancelled inside a process task, so its finally runs."""
    path = str(tmp_path / "pid")
    with px.Executor(max_workers=1) as ex:
        f = ex.submit(px.task(cleanup_on_cancel, grace=10), path, 60)
        wait_file(Path(path))
        assert f.cancel() and f.cancelled()
        assert wait_file(Path(path + ".done"), 30) == "cleaned"


@pytest.mark.timeout(90)
def test_memory_limit_stops_a_process_task():
    """A process task above its declared memory fails with px.MemoryLimitExceeded."""
    from helpers import leak_memory
    with px.Executor(max_workers=1) as ex:
        f = ex.submit(px.task(leak_memory, memory="200MB"), 50, 2000)
        with pytest.raises(px.MemoryLimitExceeded):
            f.result(60)
        assert ex.submit(add, 1).result(30) == 1


def test_options_that_cannot_apply_are_refused():
    """after= and isolation='cluster' in a template are refused at submit, naming the task."""
    with px.Executor(max_workers=1, isolation="thread") as ex:
        with pytest.raises(px.TaskOptionError, match="'add'.*after="):
            ex.submit(px.task(add, after=["x"]), 1)
        with pytest.raises(px.TaskOptionError, match="cluster"):
            ex.submit(px.task(add, isolation="cluster"), 1)
        with pytest.raises(px.TaskOptionError, match="callable"):
            ex.submit(42)
        assert ex.submit(add, 2).result(30) == 2
