"""Tests of parexec._graph: compile, cycles, levels, critical path, DOT."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import noop

import parexec as px


def chain(wf, names, extra_edges=()):
    refs = {}
    for n in names:
        refs[n] = wf.add(px.task(noop).options(id=n))
    return refs


def test_cycle_message_lists_the_path():
    """A cycle raises CycleError whose message reads a -> b -> c -> a."""
    wf = px.Workflow("w")
    wf.add(px.task(noop).options(id="a", after=["c"]))
    wf.add(px.task(noop).options(id="b", after=["a"]))
    wf.add(px.task(noop).options(id="c", after=["b"]))
    wf.add(px.task(noop).options(id="free"))
    with pytest.raises(px.CycleError) as info:
        wf.validate()
    assert "a -> b -> c -> a" in str(info.value)
    assert info.value.cycle == ["a", "b", "c", "a"]
    assert isinstance(info.value, ValueError)


def test_self_dependency_is_a_cycle():
    """after= naming the task itself is a cycle of one."""
    wf = px.Workflow("w")
    wf.add(px.task(noop).options(id="a", after=["a"]))
    with pytest.raises(px.CycleError, match="a -> a"):
        wf.validate()


def diamond():
    with px.Workflow("d") as wf:
        a = wf.add(px.task(noop).options(id="a", estimate=1))
        b = wf.add(px.task(noop).options(id="b", estimate=5), a)
        c = wf.add(px.task(noop).options(id="c", estimate=1), a)
        wf.add(px.task(noop).options(id="d", estimate=1), b, c)
    return wf


def test_levels_and_critical_path():
    """Levels group by depth; the critical path follows the heaviest estimates."""
    wf = diamond()
    assert wf.levels() == [["a"], ["b", "c"], ["d"]]
    assert wf.critical_path() == ["a", "b", "d"]


def test_critical_path_counts_unknown_estimates_as_one():
    """Without estimates the longest path by task count wins."""
    with px.Workflow("w") as wf:
        a = wf.add(px.task(noop).options(id="a"))
        b = wf.add(px.task(noop).options(id="b"), a)
        wf.add(px.task(noop).options(id="c"), b)
        wf.add(px.task(noop).options(id="lone", estimate=2.5))
    assert wf.critical_path() == ["a", "b", "c"]


def test_to_dot_has_nodes_and_edges():
    """DOT output names every task and edge; after= edges are dashed."""
    wf = diamond()
    wf.add(px.task(noop).options(id="e", after=["d"]))
    dot = wf.to_dot()
    assert dot.startswith('digraph "d" {')
    for edge in ('"a" -> "b";', '"b" -> "d";', '"c" -> "d";', '"d" -> "e" [style=dashed];'):
        assert edge in dot


def test_order_does_not_depend_on_hash_seed(tmp_path):
    """Levels and critical path are identical under different PYTHONHASHSEED values."""
    script = tmp_path / "s.py"
    script.write_text(
        "import parexec as px\n"
        "wf = px.Workflow('w')\n"
        "refs = [wf.add(px.task(len).options(id=f'n{i}'), 'x') for i in range(30)]\n"
        "for i in range(30, 80):\n"
        "    wf.add(px.task(len).options(id=f'n{i}',\n"
        "                                after=[refs[i % 7], refs[(i * 3) % 30]]), 'x')\n"
        "print(wf.levels(), wf.critical_path())\n")
    outs = set()
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                env=env, check=True).stdout)
    assert len(outs) == 1
