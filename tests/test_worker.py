"""Tests of parexec._worker: errors keep their type and worker-side frames."""

from __future__ import annotations

import pickle
import traceback

import pytest

import parexec as px
from parexec._worker import decode_outcome, run_payload
import helpers


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
