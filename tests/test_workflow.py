"""Tests of parexec._workflow: building workflows, ids, dependencies."""

from __future__ import annotations

import pytest

import parexec as px
from helpers import add, noop


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
