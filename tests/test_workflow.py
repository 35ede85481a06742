"""Tests of parexec._workflow: building workflows, ids, dependencies."""

from __future__ import annotations

import time

import pytest
from helpers import add, noop

import parexec as px


@px.task
def load(path):
    return path


@px.task
def merge(*parts):
    return parts


def test_with_block_adds_tasks_and_returns_refs():
    """Inside `with`, a template call adds a task and returns a ref with its id."""
    with px.Workflow("etl") as wf:
        a = load("a.csv")
        b = load("b.csv")
        m = merge(a, b)
    assert isinstance(a, px.TaskRef)
    assert (a.id, b.id, m.id) == ("load", "load-2", "merge")
    assert list(wf.tasks) == ["load", "load-2", "merge"]
    assert len(wf) == 3 and wf["merge"].deps == ("load", "load-2")
    assert load("x") == "x"  # outside the block it is a plain call again


def test_ids_from_option_and_collisions():
    """id= wins; auto ids skip ids already taken; a repeated explicit id is an error."""
    with px.Workflow("w") as wf:
        load.options(id="load-2")("x")
        a = load("y")
        b = load("z")
        c = load("w")
    assert (a.id, b.id, c.id) == ("load", "load-3", "load-4")
    with pytest.raises(px.DuplicateTaskError, match="'load'"):
        with wf:
            load.options(id="load")("again")


def test_wf_add_and_after_dependencies():
    """wf.add works without a with block; after= adds ordering-only dependencies."""
    wf = px.Workflow("w")
    a = wf.add(noop)
    b = wf.add(load.options(after=[a, "noop"]), "b")
    c = wf.add(add, "a", b)
    assert wf[b].deps == ("noop",)
    assert wf[c].deps == (b.id,)
    result = px.run(wf, progress=False)
    assert result[c] == "ab"
    assert result.tasks["load"].started_at >= result.tasks["noop"].finished_at


def test_nested_refs_are_dependencies_and_values():
    """Refs in nested containers make dependencies and arrive as values."""
    with px.Workflow("w") as wf:
        a = load("a")
        b = load("b")
        out = wf.add(lambda cfg: cfg, {"inputs": [a, (b,)], "names": {a}})
    assert wf[out].deps == ("load", "load-2")
    assert px.run(wf, progress=False)[out] == {"inputs": ["a", ("b",)], "names": {"a"}}


def test_refs_from_another_workflow_are_rejected():
    """A task cannot depend on a task of another workflow."""
    with px.Workflow("one"):
        a = load("a")
    with pytest.raises(px.MissingDependencyError, match="workflow 'one'"):
        with px.Workflow("two"):
            merge(a)


def test_workflow_settings_are_validated():
    """Bad workflow settings name the field."""
    with pytest.raises(px.TaskOptionError, match="max_workers=0"):
        px.Workflow("w", max_workers=0)
    with pytest.raises(px.TaskOptionError, match="pools="):
        px.Workflow("w", pools={"db": 0})
    with pytest.raises(px.TaskOptionError, match="isolation='gpu'"):
        px.Workflow("w", isolation="gpu")
    with pytest.raises(px.TaskOptionError, match="memory_budget"):
        px.Workflow("w", memory_budget="lots")


def test_on_validates_event_kind():
    """wf.on rejects unknown kinds with a suggestion."""
    wf = px.Workflow("w")
    with pytest.raises(px.TaskOptionError, match="did you mean 'task:failed'"):
        wf.on("task:fail", print)


def test_validate_reports_missing_dependency_and_nothing_runs():
    """A missing after= id fails validation before any task runs."""
    ran = []
    wf = px.Workflow("w")
    wf.add(ran.append, 1)
    wf.add(load.options(after=["lod"]), "x")
    with pytest.raises(px.MissingDependencyError, match="did you mean"):
        wf.validate()
    with pytest.raises(px.MissingDependencyError):
        px.run(wf, progress=False)
    assert ran == []


# Groups and maps ---------------------------------------------------------------------------

from helpers import boom, sleep_then  # noqa: E402


def test_group_all_collects_values_by_id():
    """wait='all' gives {id: value}; a dependent receives it."""
    with px.Workflow("g") as wf:
        a = wf.add(sleep_then, 0.0, 1)
        b = wf.add(sleep_then, 0.0, 2)
        g = px.group([a, b], id="both")
        out = wf.add(lambda d: sorted(d.items()), g)
    assert isinstance(g, px.GroupRef) and wf[g].deps == (a.id, b.id)
    assert px.run(wf, progress=False)[out] == [("sleep_then", 1), ("sleep_then-2", 2)]


def test_group_all_fails_as_soon_as_one_member_fails():
    """One failing member fails the group at once; the slow member is stopped."""
    with px.Workflow("g", isolation="process") as wf:
        slow = wf.add(px.task(sleep_then).options(id="slow"), 30)
        bad = wf.add(px.task(boom).options(id="bad"), "down")
        px.group([slow, bad], id="all", on_error="skip")
    t0 = time.monotonic()
    result = px.run(wf, max_workers=2, progress=False)
    assert time.monotonic() - t0 < 10
    assert result.tasks["all"].status == "failed"
    assert isinstance(result.tasks["all"].error, ValueError)
    assert result.tasks["slow"].status == "cancelled"
    assert result.status == "partial"


def test_group_any_resolves_at_first_success_not_the_slowest():
    """wait='any' resolves when the first success arrives; its dependent runs right then."""
    with px.Workflow("g", isolation="process") as wf:
        # 1 s: enough for "failing" to have failed first even when workers start slowly
        fast = wf.add(px.task(sleep_then).options(id="fast"), 1.0, "fast")
        slow = wf.add(px.task(sleep_then).options(id="slow"), 30, "slow")
        failing = wf.add(px.task(boom).options(id="failing"))
        g = px.group([failing, slow, fast], wait="any", id="first")
        out = wf.add(px.task(lambda v: v + "!").options(id="use", isolation="thread"), g)
    t0 = time.monotonic()
    result = px.run(wf, max_workers=3, progress=False)
    assert result[out] == "fast!" and result.ok
    assert result.tasks["first"].finished_at - result.started_at < 5
    assert time.monotonic() - t0 < 10
    assert result.tasks["slow"].status == "cancelled"
    assert result.tasks["failing"].status == "failed"  # absorbed by the group


def test_group_any_fails_when_every_member_failed():
    """wait='any' fails with an ExceptionGroup of every member's error."""
    with px.Workflow("g") as wf:
        px.group([wf.add(boom, "a"), wf.add(boom, "b")], wait="any", id="none")
    result = px.run(wf, check=False, progress=False)
    err = result.errors["none"]
    assert isinstance(err, ExceptionGroup) and len(err.exceptions) == 2
    assert result.status == "failed"


def test_group_all_settled_never_fails():
    """wait='all_settled' gives {id: Outcome} and never fails."""
    with px.Workflow("g") as wf:
        ok = wf.add(sleep_then, 0.0, "v")
        bad = wf.add(boom, "e")
        g = px.group([ok, bad], wait="all_settled")
    result = px.run(wf, progress=False)
    outcomes = result[g]
    assert outcomes["sleep_then"] == px.Outcome(True, "v")
    assert not outcomes["boom"].ok and isinstance(outcomes["boom"].error, ValueError)
    assert result.status == "succeeded"


def test_group_race_takes_the_first_to_finish_even_a_failure():
    """wait='race' resolves with the first member to end: its value, or its error."""
    with px.Workflow("g") as wf:
        g = px.group([wf.add(sleep_then, 0.3, "slow"), wf.add(sleep_then, 0.05, "quick")],
                     wait="race")
    assert px.run(wf, progress=False)[g] == "quick"
    with px.Workflow("g") as wf:
        px.group([wf.add(sleep_then, 0.3, "slow"), wf.add(boom, "first")], wait="race",
                 id="r")
    result = px.run(wf, check=False, progress=False)
    assert isinstance(result.errors["r"], ValueError) and result.status == "failed"


def test_group_max_concurrent_refills_a_slot_as_soon_as_a_member_ends():
    """max_concurrent caps running members; a slot is refilled without waiting for a batch."""
    with px.Workflow("g") as wf:
        durations = [0.1, 0.6, 0.1, 0.1, 0.1]
        refs = [wf.add(px.task(sleep_then).options(id=f"m{k}"), d) for k, d in
                enumerate(durations)]
        px.group(refs, max_concurrent=2)
    result = px.run(wf, max_workers=4, progress=False)
    spans = {k: (t.started_at, t.finished_at) for k, t in result.tasks.items()
             if k.startswith("m")}
    points = sorted([(s, 1) for s, _ in spans.values()] + [(f, -1) for _, f in spans.values()])
    running = peak = 0
    for _, d in points:
        running += d
        peak = max(peak, running)
    assert peak == 2
    assert spans["m2"][0] < spans["m1"][1]  # m2 started while m1 (0.6 s) still ran


def test_group_timeout_bounds_the_whole_group():
    """A group that does not resolve in time times out; its members are stopped."""
    with px.Workflow("g", isolation="process") as wf:
        g = px.group([wf.add(sleep_then, 30), wf.add(sleep_then, 30)], timeout=0.5,
                     id="slow", on_error="ignore", default="fallback")
        out = wf.add(px.task(lambda v: v).options(isolation="thread"), g)
    t0 = time.monotonic()
    result = px.run(wf, max_workers=2, progress=False)
    assert time.monotonic() - t0 < 10
    assert result.tasks["slow"].status == "timed_out"
    assert isinstance(result.tasks["slow"].error, px.TaskTimeout)
    assert result[out] == "fallback"


def test_nested_groups_and_group_in_after():
    """A group can be a member of another group and an after= dependency."""
    with px.Workflow("g") as wf:
        inner = px.group([wf.add(sleep_then, 0.0, 1), wf.add(sleep_then, 0.0, 2)], id="inner")
        outer = px.group([inner, wf.add(sleep_then, 0.0, 3)], id="outer")
        last = wf.add(load.options(after=[outer]), "done")
    result = px.run(wf, progress=False)
    assert result[outer] == {"inner": {"sleep_then": 1, "sleep_then-2": 2}, "sleep_then-3": 3}
    assert result[last] == "done"
    assert wf.levels()[-1] == ["load"]


def test_group_rejects_bad_arguments():
    """Groups need refs of their workflow and a known strategy."""
    with px.Workflow("g") as wf:
        a = wf.add(noop)
        with pytest.raises(px.TaskOptionError, match="wait='first'"):
            px.group([a], wait="first")
        with pytest.raises(px.TaskOptionError, match="non-empty"):
            px.group([])
        with pytest.raises(px.TaskOptionError, match="max_concurrent=0"):
            px.group([a], max_concurrent=0)


@px.task
def square(x, k=1):
    return x * x * k


@px.task
def numbers(n):
    return list(range(n))


def test_static_map_ids_values_and_fixed_kwargs():
    """template.map(items) adds name[0], name[1], ...; its value is the list in order."""
    with px.Workflow("m") as wf:
        m = square.map([3, 1, 2], k=10)
        total = px.task(sum)(m)
    assert isinstance(m, px.MapRef)
    assert [t for t in wf.tasks][:4] == ["square[0]", "square[1]", "square[2]", "square"]
    result = px.run(wf, progress=False)
    assert result[m] == [90, 10, 40] and result[total] == 140


def test_dynamic_map_expands_at_run_time_with_max_concurrent():
    """A map over a task's result creates its tasks when the result is known."""
    with px.Workflow("m") as wf:
        m = square.map(numbers(50), max_concurrent=3, id="sq")
        total = px.task(sum)(m)
    events = []
    result = px.run(wf, max_workers=4, progress=False, on_event=events.append)
    assert result[m] == [x * x for x in range(50)]
    assert result[total] == sum(x * x for x in range(50))
    assert "sq[49]" in result.tasks and result.tasks["sq[0]"].status == "succeeded"
    running = peak = 0
    for e in events:
        if e.task_id and e.task_id.startswith("sq["):
            if e.kind == "task:started":
                running += 1
                peak = max(peak, running)
            elif e.kind == "task:completed":
                running -= 1
    assert peak <= 3


def test_dynamic_map_of_nothing_and_of_a_non_iterable():
    """An empty source gives []; a non-iterable source fails the map with a clear error."""
    with px.Workflow("m") as wf:
        empty = square.map(numbers(0))
        square.options(on_error="skip").map(wf.add(lambda: 42), id="bad")
    result = px.run(wf, check=False, progress=False)
    assert result[empty] == []
    assert "not an iterable" in str(result.errors["bad"])


def test_failing_map_item_follows_its_on_error():
    """A failing item follows its on_error: 'ignore' puts its default in the map's list;
    'fail' fails the map."""
    def maybe(x):
        if x == 2:
            raise ValueError("bad item")
        return x

    with px.Workflow("m") as wf:
        m = px.task(maybe).options(on_error="ignore", default=-1).map(numbers(4))
    result = px.run(wf, check=False, progress=False)
    assert isinstance(result.errors["maybe[2]"], ValueError)
    assert result[m] == [0, 1, -1, 3] and result.tasks["maybe"].status == "succeeded"
    with px.Workflow("m") as wf:
        px.task(maybe).options(id="strict").map(numbers(4))
    result = px.run(wf, check=False, progress=False)
    assert result.tasks["strict"].status == "failed" and result.status == "failed"


def test_static_and_run_time_maps_fail_alike():
    """A map over a list follows its items' on_error, as a map over a task's result does:
    under "skip" a failing item skips the map's dependents and the run is partial."""
    def f(x):
        if x == 2:
            raise ValueError("two")
        return x

    statuses = []
    for dynamic in (False, True):
        with px.Workflow("w") as wf:
            items = px.task(lambda: [1, 2, 3], id="src")() if dynamic else [1, 2, 3]
            m = px.task(f, on_error="skip").map(items, id="m")
            px.task(lambda v: v, id="after")(m)
            px.task(lambda: "independent", id="other")()
        result = px.run(wf, progress=False, check=False)
        statuses.append((result.status, result.tasks["after"].status,
                         result.tasks["other"].status))
    assert statuses == [("partial", "skipped", "succeeded")] * 2
