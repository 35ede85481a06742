"""Tests of parexec._errors: hierarchy, messages, pickling."""

from __future__ import annotations

import pickle

import pytest

import parexec as px

ALL = [px.CycleError(["a", "b", "a"]), px.MissingDependencyError("m"),
       px.DuplicateTaskError("d"), px.TaskOptionError("o"),
       px.ResourceError("t", "cpus", 4, 2), px.PicklingError("p"), px.TaskTimeout("t"),
       px.WorkerCrashed("t", -9), px.MemoryLimitExceeded("m"), px.Cancelled("c"),
       px.RemoteError("r", "mod.Err", "tb"), px.StoreError("s"), px.WaitTimeout("w")]


@pytest.mark.parametrize("err", ALL, ids=[type(e).__name__ for e in ALL])
def test_every_error_is_a_parexec_error_and_pickles(err):
    """Every error derives from ParexecError and survives pickling with its message."""
    assert isinstance(err, px.ParexecError)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)


def test_builtin_bases():
    """Errors subclass the builtins callers already catch."""
    assert issubclass(px.TaskTimeout, TimeoutError)
    assert issubclass(px.MemoryLimitExceeded, MemoryError)
    assert issubclass(px.CycleError, ValueError) and issubclass(px.CycleError, px.WorkflowError)
    assert issubclass(px.WorkflowFailed, ExceptionGroup)


def test_worker_crashed_names_the_signal():
    """WorkerCrashed says which signal or exit code ended the worker."""
    assert "SIGKILL(-9)" in str(px.WorkerCrashed("t", -9))
    assert "exit code 3" in str(px.WorkerCrashed("t", 3))


def test_script_error_lives_in_errors_and_pickles():
    """px.ScriptError is the class of parexec._errors and round-trips through pickle."""
    import pickle

    from parexec import _errors
    err = _errors.ScriptError("s", 3, "boom\n", "out")
    assert px.ScriptError is _errors.ScriptError and isinstance(err, px.ParexecError)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is px.ScriptError and str(back) == str(err)
    assert (back.step, back.returncode, back.stderr, back.stdout) == ("s", 3, "boom\n", "out")
