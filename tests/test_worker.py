"""Tests of parexec._worker: errors keep their type and worker-side frames."""

from __future__ import annotations

import pickle
import traceback

import helpers
import pytest

import parexec as px
from parexec._worker import decode_outcome, run_payload


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_errors_keep_type_attributes_and_worker_frames(isolation):
    """A worker error keeps its class, its attributes, and the frames where it was raised."""
    with px.Workflow("w", isolation=isolation) as wf:
        wf.add(px.task(helpers.raise_custom).options(id="deep"))
    result = px.run(wf, check=False, progress=False)
    err = result.errors["deep"]
    assert type(err) is helpers.CustomError and err.code == 42
    text = "".join(traceback.format_exception(err))
    assert "inner_raise" in text and "raise_custom" in text
    assert "run_payload" not in text and "_thread_worker" not in text
    assert "inner_raise" in result.tasks["deep"].traceback
    with pytest.raises(helpers.CustomError):
        result["deep"]


def test_traceback_supports_post_mortem():
    """The rebuilt traceback walks down to the frame that raised (what pdb.post_mortem uses)."""
    with px.Workflow("w", isolation="process") as wf:
        wf.add(px.task(helpers.raise_custom).options(id="deep"))
    err = px.run(wf, check=False, progress=False).errors["deep"]
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_name == "inner_raise"


def test_run_payload_round_trip_in_process():
    """The worker protocol: a pickled call in, a pickled outcome out."""
    import cloudpickle
    data = cloudpickle.dumps(("t", 1, 1, helpers.add, (2, 3), {}))
    ok, value, tb, (peak, t0, t1) = decode_outcome("t", run_payload(data))
    assert (ok, value, tb, peak) == (True, 5, None, None) and t0 <= t1


def test_run_payload_reports_unloadable_payload():
    """A payload the worker cannot unpickle comes back as an error naming the task."""
    ok, err, _, _ = decode_outcome("t", run_payload(b"not a pickle"))
    assert not ok and "could not unpickle" in str(err)


def test_task_context_outside_and_inside():
    """TaskContext.check() raises Cancelled once the flag is set."""
    class Flag:
        cancel_requested = False
    flag = Flag()
    ctx = px.TaskContext("t", 2, flag)
    ctx.check()
    flag.cancel_requested = True
    assert ctx.cancelled()
    with pytest.raises(px.Cancelled, match="'t'"):
        ctx.check()
    assert pickle.loads(pickle.dumps(px.Cancelled("x"))).args == ("x",)


# async def tasks (issue 12 item 21) -------------------------------------------------------

@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_async_task_value_is_the_coroutines_result(isolation):
    """An async def task's value is what its coroutine returns, in threads and processes."""
    with px.Workflow("w", isolation=isolation) as wf:
        wf.add(px.task(helpers.async_add).options(id="a"), 2, 3)
    assert px.run(wf, progress=False)["a"] == 5


def test_async_io_tasks_next_to_cpu_tasks():
    """asyncio I/O tasks (thread and process) run next to CPU tasks; every value is right."""
    with px.Workflow("w", max_workers=2) as wf:
        for i in range(3):
            wf.add(px.task(helpers.async_echo).options(id=f"echo-t{i}"), b"x" * (i + 1))
            wf.add(px.task(helpers.async_echo).options(id=f"echo-p{i}", isolation="process"),
                   b"y" * (i + 1))
            wf.add(px.task(helpers.cpu_work).options(id=f"cpu-{i}", isolation="process"),
                   10_000 * (i + 1))
            wf.add(px.task(helpers.cpu_work).options(id=f"cpu-t{i}"), 10_000)
    result = px.run(wf, progress=False)
    for i in range(3):
        assert result[f"echo-t{i}"] == b"x" * (i + 1)
        assert result[f"echo-p{i}"] == b"y" * (i + 1)
        assert result[f"cpu-{i}"] == sum(k * k for k in range(10_000 * (i + 1)))


@pytest.mark.timeout(60)
def test_async_thread_task_timeout_cancels_the_coroutine_and_frees_its_slot():
    """A timed-out async thread task is really cancelled: the next task takes the only slot
    within seconds, not after the 30 s sleep, and the coroutine saw CancelledError."""
    import threading
    cancelled = threading.Event()
    with px.Workflow("w", max_workers=1) as wf:
        wf.add(px.task(helpers.async_sleep_then).options(
            id="slow", timeout=0.5, on_error="ignore", priority=10), 30, "late", cancelled)
        wf.add(px.task(helpers.pid).options(id="next"))
    result = px.run(wf, progress=False)
    slow, nxt = result.tasks["slow"], result.tasks["next"]
    assert slow.status == "timed_out" and isinstance(slow.error, px.TaskTimeout)
    assert nxt.status == "succeeded"
    assert nxt.started_at - slow.started_at < 5.0  # 0.5 s timeout, x10 margin
    assert cancelled.is_set()


@pytest.mark.timeout(60)
def test_cancelling_a_run_cancels_its_async_thread_task():
    """run.cancel() stops an awaiting async thread task at once (no grace period wait)."""
    import threading
    import time
    cancelled, started = threading.Event(), threading.Event()
    with px.Workflow("w") as wf:
        wf.add(px.task(helpers.async_sleep_then).options(id="slow"), 30, "late", cancelled,
               started)
    run = px.start(wf, progress=False)
    assert started.wait(20)
    t0 = time.monotonic()
    run.cancel()
    result = run.wait(20)
    assert time.monotonic() - t0 < 3.0  # the grace period is 5 s
    assert result.status == "cancelled"
    assert cancelled.wait(5)


# Errors whose traceback cannot travel (issue 12 item 19) ----------------------------------

def test_recursion_error_in_a_process_keeps_its_type_and_traceback_text():
    """A RecursionError (traceback too deep to pickle) arrives as RecursionError, with the
    worker's traceback text kept."""
    with px.Workflow("w", isolation="process") as wf:
        wf.add(px.task(helpers.recurse_forever).options(id="deep"))
    result = px.run(wf, check=False, progress=False)
    assert type(result.errors["deep"]) is RecursionError
    assert "recurse_forever" in result.tasks["deep"].traceback


def test_unpicklable_traceback_falls_back_to_the_bare_exception():
    """When the frames cannot be pickled, the exception is sent without them."""
    import cloudpickle
    ok, err, tb, _ = decode_outcome("t", run_payload(cloudpickle.dumps(
        ("t", 1, 1, helpers.recurse_forever, (), {}))))
    assert not ok and type(err) is RecursionError and "recurse_forever" in tb


def test_sys_exit_in_a_process_task_arrives_as_system_exit():
    """sys.exit(3) in a process task fails it with SystemExit(3), not a crash or Cancelled."""
    import cloudpickle
    ok, err, _, _ = decode_outcome("t", run_payload(cloudpickle.dumps(
        ("t", 1, 1, helpers.exit_three, (), {}))))
    assert not ok and type(err) is SystemExit and err.code == 3
    with px.Workflow("w", isolation="process") as wf:
        wf.add(px.task(helpers.exit_three).options(id="exits"))
    result = px.run(wf, check=False, progress=False)
    assert type(result.errors["exits"]) is SystemExit and result.errors["exits"].code == 3


def test_traceback_of_a_main_function_names_the_script_file_and_line(run_script):
    """A process task defined in the user's script: its traceback shows the script's path and
    the raising line, not File "<dynamic-code>"."""
    proc = run_script("""
        import traceback, parexec as px

        def fails():
            raise ValueError("from the script")  # the raising line

        with px.Workflow("w", isolation="process") as wf:
            wf.add(px.task(fails).options(id="fails"))
        result = px.run(wf, check=False, progress=False)
        print(result.tasks["fails"].traceback)
        print("".join(traceback.format_exception(result.errors["fails"])))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "<dynamic-code>" not in proc.stdout
    assert proc.stdout.count('script.py", line 5, in fails') == 2, proc.stdout
    assert proc.stdout.count("# the raising line") == 2, proc.stdout


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_async_task_error_shows_the_coroutines_frames_only(isolation):
    """An async task's error keeps its type and frames, without the event loop's frames."""
    with px.Workflow("w", isolation=isolation) as wf:
        wf.add(px.task(helpers.async_raise_custom).options(id="a"))
    err = px.run(wf, check=False, progress=False).errors["a"]
    assert type(err) is helpers.CustomError
    text = "".join(traceback.format_exception(err))
    assert "async_raise_custom" in text and "inner_raise" in text
    assert "run_coroutine" not in text and "base_events.py" not in text


def test_stop_signal_raises_in_the_running_task_only():
    """A grace stop signal raises TaskTimeout/Cancelled naming the task while it runs; the
    same signal between tasks is ignored (it cannot reach the worker's loop)."""
    import os
    import signal

    import cloudpickle

    from parexec import _worker
    saved = {s: signal.signal(s, _worker._on_stop_signal)
             for s in (_worker.SIG_TIMEOUT, _worker.SIG_CANCEL)}
    try:
        os.kill(os.getpid(), _worker.SIG_TIMEOUT)  # no task running: ignored
        for signum, kind in ((_worker.SIG_TIMEOUT, px.TaskTimeout),
                             (_worker.SIG_CANCEL, px.Cancelled)):
            data = cloudpickle.dumps(("slow", 1, 1, helpers.signal_self, (signum,), {}))
            ok, err, _, _ = decode_outcome("slow", run_payload(data))
            assert not ok and isinstance(err, kind) and "'slow'" in str(err)
        os.kill(os.getpid(), _worker.SIG_CANCEL)  # after the tasks: ignored again
        assert _worker._interruptible is None
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
