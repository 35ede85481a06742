"""The payload of a process task: the standard pickle where it means what cloudpickle would."""

from __future__ import annotations

import os
import pickle
import types

import cloudpickle
import helpers
import pytest

from parexec import _payload
from parexec._payload import dumps_payload

pytestmark = pytest.mark.timeout(30)


def _call(fn, args=(), kwargs=None):
    return ("t", 1, 1.0, fn, args, kwargs or {}, "/dev/shm")


def test_a_module_function_with_plain_arguments_goes_by_the_standard_pickle():
    call = _call(helpers.sleep_then, (0, "x"), {"value": None})
    data = dumps_payload(call)
    assert data == pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
    assert pickle.loads(data) == call
    assert helpers.sleep_then in _payload._by_reference


def test_a_main_function_goes_by_value():
    """A function of ``__main__`` (a script's, a notebook's) is not importable in a worker:
    by name, the standard pickle would send a reference the worker cannot resolve."""
    fn = types.FunctionType(helpers.pid.__code__, {"__name__": "__main__", "os": os}, "pid")
    data = dumps_payload(_call(fn))
    assert pickle.loads(data)[3]() == helpers.pid()  # by reference, it would not load
    assert fn not in _payload._by_reference


def test_arguments_that_are_not_plain_go_by_cloudpickle():
    square = lambda x: x * x  # noqa: E731 - by value
    data = dumps_payload(_call(helpers.sleep_then, (0, square)))
    assert pickle.loads(data)[4][1](3) == 9


def test_an_argument_of_a_main_class_goes_by_value(monkeypatch):
    """The standard pickle would name ``__main__.Thing``, which a worker does not have."""
    import sys
    thing = type("Thing", (), {"__module__": "__main__", "x": 7})
    monkeypatch.setattr(sys.modules["__main__"], "Thing", thing, raising=False)
    data = dumps_payload(_call(helpers.sleep_then, (0, thing())))
    monkeypatch.delattr(sys.modules["__main__"], "Thing")
    assert pickle.loads(data)[4][1].x == 7


def test_a_module_registered_by_value_goes_by_value():
    call = _call(helpers.pid)
    dumps_payload(call)  # known to go by reference
    cloudpickle.register_pickle_by_value(helpers)
    try:
        assert dumps_payload(call) != pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        cloudpickle.unregister_pickle_by_value(helpers)
