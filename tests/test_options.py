"""Tests of parexec._options: every check of a user-given option, in one table."""

import pytest

import parexec as px
from parexec import _options as o
from parexec._task import TaskRef

CHECKS = [
    # (call, option the message must name)
    (lambda: o.parse_size("2 bananas"), "memory"),
    (lambda: o.parse_size(0.5), "memory"),
    (lambda: o.check_memory(-5, "run", "memory_budget"), "memory_budget"),
    (lambda: o.check_positive(0, "task 'f'", "timeout"), "timeout"),
    (lambda: o.check_timeout(float("inf"), "run"), "timeout"),
    (lambda: o.check_grace(-1, "task 'f'"), "grace"),
    (lambda: o.check_estimate(-2, "task 'f'"), "estimate"),
    (lambda: o.check_cpus(0, "task 'f'"), "cpus"),
    (lambda: o.check_priority(1.5, "task 'f'"), "priority"),
    (lambda: o.check_max_workers(0, "run"), "max_workers"),
    (lambda: o.check_max_concurrent(True, "group 'g'"), "max_concurrent"),
    (lambda: o.check_cpu_budget(-1, "run"), "cpu_budget"),
    (lambda: o.check_id("a[0]", "task 'f': id"), "id"),
    (lambda: o.check_id("a\x1b", "Workflow name"), "name"),
    (lambda: o.check_isolation("fork", "task 'f'"), "isolation"),
    (lambda: o.check_on_error("explode", "task 'f'"), "on_error"),
    (lambda: o.check_wait("some", "group 'g'"), "wait"),
    (lambda: o.check_pools({"db": 0}, "task 'f'"), "pools"),
    (lambda: o.check_pools(3, "task 'f'"), "pools"),
    (lambda: o.check_capacities({"db": 1.5}, "Workflow 'w'"), "pools"),
    (lambda: o.check_retry("twice", "task 'f'"), "retry"),
    (lambda: o.check_retry(-1, "task 'f'"), "max_retries"),
    (lambda: o.Retry(1, backoff=0.5), "backoff"),
    (lambda: o.Retry(1, memory_factor=0.5), "memory_factor"),
    (lambda: o.Retry(1, on=(int,)), "on"),
    (lambda: o.check_after([3], "task 'f'", TaskRef), "after"),
    (lambda: o.check_options("f", {"timout": 3}, TaskRef), "timeout"),
    (lambda: o.check_parallel("no"), "parallel"),
    (lambda: o.check_on_event(42), "on_event"),
    (lambda: o.check_resume(True, None), "resume"),
    (lambda: o.check_keep(42, ["a"], "w", TaskRef), "keep"),
    (lambda: o.check_keep(["b"], ["a"], "w", TaskRef), "keep"),
    (lambda: o.sized_value("f", "memory", lambda: "lots", (), {}), "memory"),
    (lambda: o.sized_value("f", "cpus", lambda: 0, (), {}), "cpus"),
    (lambda: o.sized_value("f", "timeout", lambda: 1 / 0, (), {}), "timeout"),
]


@pytest.mark.parametrize("call, option", CHECKS, ids=[f"{k}-{opt}" for k, (_, opt) in
                                                       enumerate(CHECKS)])
def test_bad_value_is_refused_naming_the_option(call, option):
    """Each checker refuses a bad value with a TaskOptionError whose message names the option."""
    with pytest.raises(px.TaskOptionError) as info:
        call()
    assert option in str(info.value)
    assert isinstance(info.value, (px.WorkflowError, ValueError))


def test_good_values_are_normalised():
    """Checkers return the normalised value: seconds as floats, sizes in bytes, ids as tuples."""
    assert o.parse_size("2GiB") == 2 * 2**30
    assert o.check_timeout(3, "run") == 3.0 and o.check_timeout(None, "run") is None
    assert o.check_grace(0, "run") == 0.0
    assert o.check_pools("db", "task 'f'") == {"db": 1}
    assert o.check_retry(2, "task 'f'") == o.Retry(2)
    assert o.check_retry(0, "task 'f'") is None
    assert o.check_keep("leaves", [], "w", TaskRef) == "leaves"
    assert o.check_keep(["a"], ["a", "b"], "w", TaskRef) == ("a",)


def test_message_says_where_and_what_to_write():
    """A message starts with where the option was given and states the accepted values."""
    with pytest.raises(px.TaskOptionError) as info:
        o.check_max_workers(0, "Workflow 'etl'")
    assert str(info.value) == "Workflow 'etl': max_workers=0 must be an integer >= 1"


def test_public_names_are_the_options_ones():
    """px.Retry and px.parse_size are the classes and functions of _options (one definition)."""
    assert px.Retry is o.Retry and px.parse_size is o.parse_size
