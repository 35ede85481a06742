"""Tests of parexec._task: the decorator, options, sizes, Retry, refs in arguments."""

from __future__ import annotations

import random

import pytest
from helpers import echo, noop

import parexec as px
from parexec._task import TaskSpec, find_refs, resolve_refs


def test_bare_decorator_calls_function_outside_workflow():
    """Outside a workflow, a template is a plain call."""
    @px.task
    def double(x):
        return 2 * x

    assert double(21) == 42
    assert double.fn(2) == 4
    assert double.__name__ == "double"


def test_decorator_with_options_and_options_override():
    """Options are kept on the template; .options() returns a new template."""
    @px.task(timeout=5, priority=3)
    def f(x):
        return x

    g = f.options(id="f-b", timeout=1)
    assert f.default_options == {"timeout": 5.0, "priority": 3}
    assert g.default_options == {"timeout": 1.0, "priority": 3, "id": "f-b"}
    assert g(7) == 7


@pytest.mark.parametrize("options, fragment", [
    ({"timeout": 0}, "timeout=0 must be a positive number"),
    ({"timeout": -1}, "timeout=-1 must be a positive number"),
    ({"isolation": "fork"}, "isolation='fork' is unknown"),
    ({"cpus": 0}, "cpus=0 must be a number > 0"),
    ({"memory": "2 bananas"}, "unknown unit 'bananas'"),
    ({"memory": -5}, "must be a positive size"),
    ({"on_error": "explode"}, "on_error='explode' is unknown"),
    ({"retry": "twice"}, "must be px.Retry"),
    ({"priority": 1.5}, "priority=1.5 must be an integer"),
    ({"pools": {"db": 0}}, "whole numbers of units >= 1"),
    ({"timout": 3}, "did you mean 'timeout'"),
    ({"grace": -1}, "grace=-1 must be a number of seconds >= 0"),
    ({"grace": "x"}, "grace='x' must be a number of seconds >= 0"),
])
def test_bad_options_name_the_task_and_the_fix(options, fragment):
    """Each bad option value is a TaskOptionError naming the task and the problem."""
    def fit():
        pass

    with pytest.raises(px.TaskOptionError, match="task 'fit'") as info:
        px.task(**options)(fit)
    assert fragment in str(info.value)
    assert isinstance(info.value, px.WorkflowError)


@pytest.mark.parametrize("text, expected", [
    ("512MB", 512 * 10**6), ("2GiB", 2 * 2**30), ("1.5 gb", 1_500_000_000), (1024, 1024),
    ("100", 100), ("3k", 3000), ("1KiB", 1024),
])
def test_parse_size(text, expected):
    """Decimal and binary units, case-insensitive, plain numbers are bytes."""
    assert px.parse_size(text) == expected


def test_retry_delays_follow_backoff_and_cap():
    """delay(n) = min(max_delay, initial * backoff**(n-1)); jitter stays within bounds."""
    r = px.Retry(5, initial_delay=0.5, backoff=2.0, max_delay=3.0)
    assert [r.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    j = px.Retry(3, initial_delay=1.0, backoff=1.0, jitter=0.25)
    rng = random.Random(1)
    delays = [j.delay(1, rng) for _ in range(200)]
    assert all(0.75 <= d <= 1.25 for d in delays) and max(delays) - min(delays) > 0.2


def test_retry_filters_exception_types():
    """Only exceptions matching `on` are retried; a bare class is accepted."""
    r = px.Retry(2, on=OSError)
    assert r.on == (OSError,)
    assert r.retries(FileNotFoundError()) and not r.retries(ValueError())


@pytest.mark.parametrize("kwargs", [{"max_retries": -1}, {"max_retries": 1, "backoff": 0.5},
                                    {"max_retries": 1, "on": (int,)},
                                    {"max_retries": 1, "initial_delay": -1}])
def test_retry_rejects_bad_values(kwargs):
    """Nonsense retry policies fail at construction."""
    with pytest.raises(px.TaskOptionError):
        px.Retry(**kwargs)


def test_find_and_resolve_refs_in_nested_containers():
    """Refs nested in list/tuple/dict/set are found and replaced; containers are copied."""
    with px.Workflow("w") as wf:
        a = wf.add(lambda: 1)
        b = wf.add(lambda: 2)
    arg = ([a, (b, 3)], {"k": a, "s": {b}}, "plain")
    found = []
    find_refs(arg, found)
    assert [r.id for r in found] == ["<lambda>", "<lambda>-2", "<lambda>", "<lambda>-2"]
    values = {a.index: 10, b.index: 20}
    assert resolve_refs(arg, values.__getitem__) == ([10, (20, 3)], {"k": 10, "s": {20}}, "plain")


def test_taskref_cannot_be_pickled():
    """Passing a ref where a value is expected fails with an explanation."""
    import pickle
    with px.Workflow("w") as wf:
        a = wf.add(lambda: 1)
    with pytest.raises(TypeError, match="future value"):
        pickle.dumps(a)


@pytest.mark.parametrize("bad, fragment", [
    ("sq[0]", "reserved for the items of maps"),
    ("a]", "reserved for the items of maps"),
    ("step\nfake row", "control or non-printable"),
    ("\x1b[2Kwipe", "control or non-printable"),
])
def test_ids_with_brackets_or_control_characters_are_refused(bad, fragment):
    """Ids that could collide with map items or forge terminal output are refused."""
    with pytest.raises(px.TaskOptionError, match=fragment):
        px.task(print, id=bad)
    with px.Workflow("w"):
        a = px.task(lambda: [1], id="a")()
        with pytest.raises(px.TaskOptionError, match=fragment):
            px.task(lambda x: x).map(a, id=bad)
        with pytest.raises(px.TaskOptionError, match=fragment):
            px.group([a], id=bad)
    with pytest.raises(px.TaskOptionError, match="control or non-printable"):
        px.Workflow("w\r")


def test_a_user_id_cannot_clash_with_run_time_map_items():
    """A task named like a map item is refused, so result[...] never returns another value."""
    with px.Workflow("w") as wf:
        src = px.task(lambda: [1, 2], id="src")()
        px.task(lambda x: x * x, id="sq").map(src)
        with pytest.raises(px.TaskOptionError, match="reserved"):
            px.task(lambda: "mine", id="sq[0]")()
    assert len(wf) == 2


def test_task_takes_a_function_and_options_in_one_call():
    """px.task(fn, **options) is the same as px.task(**options)(fn)."""
    t = px.task(max, isolation="process", timeout=3)
    assert t.default_options == {"isolation": "process", "timeout": 3.0}
    assert t(1, 2) == 2


def test_generator_functions_are_refused_at_declaration():
    """A generator function would succeed with an unconsumed generator: refused up front."""
    def gen():
        yield 1

    async def agen():
        yield 1

    for fn in (gen, agen):
        with pytest.raises(px.TaskOptionError, match="generator function"):
            px.task(fn)
        with px.Workflow("w") as wf, pytest.raises(px.TaskOptionError, match="generator"):
            wf.add(fn)


def test_calling_a_template_outside_its_workflow_with_a_ref_is_an_error():
    """A TaskRef is never passed silently into a plain call."""
    with px.Workflow("w"):
        a = px.task(lambda: 1, id="a")()
    with pytest.raises(px.TaskOptionError, match="outside `with px.Workflow"):
        px.task(print)([a])


def test_memory_below_one_byte_is_refused():
    """memory=0.5 means half a byte: almost certainly a missing unit."""
    with pytest.raises(px.TaskOptionError, match="less than one byte"):
        px.task(print, memory=0.5)


def test_refs_in_deep_and_self_referencing_arguments():
    """Refs are found and resolved at any depth, and in structures that contain themselves."""
    with px.Workflow("w"):
        a = px.task(lambda: 1, id="a")()
    deep = a
    for _ in range(5000):  # far beyond the recursion limit
        deep = [deep]
    found = []
    find_refs(deep, found)
    assert found == [a]
    out = resolve_refs(deep, lambda i: "v")
    for _ in range(5000):
        out = out[0]
    assert out == "v"
    tree = {"name": "root", "value": a, "children": []}
    child = {"name": "leaf", "parent": tree, "children": []}
    tree["children"].append(child)
    found = []
    find_refs(tree, found)
    assert found == [a]
    copy = resolve_refs(tree, lambda i: 42)
    assert copy["value"] == 42 and copy["children"][0]["parent"] is copy
    assert tree["value"] is a  # the original is untouched


def test_resource_options_may_be_callables():
    """memory=, cpus= and timeout= callables are kept for the scheduler; the fixed attributes
    keep their defaults; other options stay values only."""
    def size(frame):
        return 3 * len(frame)

    t = px.task(noop, memory=size, cpus=lambda frame: 2, timeout=lambda frame: 5)
    with px.Workflow("w") as wf:
        ref = t([1, 2])
    spec = wf[ref]
    assert set(spec.sizers) == {"memory", "cpus", "timeout"} and spec.sizers["memory"] is size
    assert (spec.memory, spec.cpus, spec.timeout) == (None, 1, None)
    with pytest.raises(px.TaskOptionError, match="priority"):
        px.task(noop, priority=lambda: 1)


def test_sized_values_are_checked_and_name_the_task_and_option():
    """What a callable option returns is read like the fixed option, or refused by name."""
    from parexec._task import sized_value
    assert sized_value("t", "memory", lambda n: f"{n}MB", (2,), {}) == 2 * 10**6
    assert sized_value("t", "timeout", lambda: None, (), {}) is None
    assert sized_value("t", "cpus", lambda: 0.5, (), {}) == 0.5
    with pytest.raises(px.TaskOptionError, match=r"task 't': the timeout= callable returned "
                       r"-1, unusable: .*a number of seconds > 0"):
        sized_value("t", "timeout", lambda: -1, (), {})
    with pytest.raises(px.TaskOptionError, match=r"task 't': the cpus= callable returned None"):
        sized_value("t", "cpus", lambda: None, (), {})
    with pytest.raises(px.TaskOptionError, match=r"the memory= callable raised KeyError"):
        sized_value("t", "memory", lambda: {}["x"], (), {})


@pytest.mark.parametrize("factor", [0.5, True, float("inf"), "2"])
def test_retry_memory_factor_must_be_at_least_one(factor):
    """Retry(memory_factor=...) takes None or a finite number >= 1."""
    assert px.Retry(1, memory_factor=2).memory_factor == 2
    with pytest.raises(px.TaskOptionError, match="memory_factor"):
        px.Retry(1, memory_factor=factor)


def test_map_items_copy_every_option_of_their_template():
    """A map's items are copies of its first item's spec (``TaskSpec.variant``): every
    field but the id, name, argument and dependencies is the template's, whatever field a
    later change adds; an item holding a ref still goes through the full path."""
    with px.Workflow("w", pools={"db": 1}) as wf:
        src = px.task(noop, id="src")()
        tpl = px.task(echo, priority=3, estimate=2.0, timeout=9, retry=2, on_error="ignore",
                      default=-1, cpus=0.5, memory="1MB", pools={"db": 1}, grace=1.5,
                      isolation="thread")
        ref = tpl.map([1, "two", (src, 3)], tag=src, id="m")
    first, second, third = (wf.tasks[f"m[{k}]"] for k in range(3))
    copied = set(TaskSpec.__slots__) - {"id", "name", "args", "deps", "has_refs"}
    for slot in copied:
        assert getattr(second, slot) == getattr(first, slot), slot
        assert getattr(third, slot) == getattr(first, slot), slot
    assert (second.id, second.name, second.args) == ("m[1]", "m[1]", ("two",))
    assert second.deps == ("src",) and second.has_refs  # the fixed keyword argument
    assert third.args == ((src, 3),) and third.deps == ("src",) and third.has_refs
    assert px.run(wf, progress=False)[ref] == [
        ((1,), {"tag": None}), (("two",), {"tag": None}), (((None, 3),), {"tag": None})]


def test_named_map_items_keep_their_template_name():
    with px.Workflow("w") as wf:
        px.task(noop, name="step").map([1, 2], id="m")
    assert [wf.tasks[f"m[{k}]"].name for k in range(2)] == ["step", "step"]
