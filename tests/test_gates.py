"""Tests of parexec._gates: pools, CPU and memory budgets, validation of needs."""

from __future__ import annotations

import pytest

import parexec as px
from parexec._gates import CapacityGate
from helpers import noop, sleep_then


def test_capacity_gate_accounting():
    """admits/acquire/release follow the units in use."""
    g = CapacityGate("pool:db", 2, [1, 2, 0])
    assert g.admits(0) and g.admits(1)
    g.acquire(1)
    assert not g.admits(0) and g.admits(2)
    g.release(1)
    assert g.admits(0) and g.used == 0


def test_named_pool_limits_concurrency_without_blocking_others():
    """Tasks in a pool of capacity 1 never overlap; tasks outside it still run alongside."""
    with px.Workflow("p", pools={"db": 1}) as wf:
        for _ in range(3):
            wf.add(px.task(sleep_then).options(pools="db"), 0.15)
        free = wf.add(px.task(sleep_then).options(id="free"), 0.15)
    result = px.run(wf, max_workers=3, progress=False)
    db = sorted((t.started_at, t.finished_at) for k, t in result.tasks.items() if k != "free")
    assert all(db[k][1] <= db[k + 1][0] + 1e-3 for k in range(2))
    assert result.tasks[free.id].started_at < db[1][0]
    assert 0.3 < result.stats.pool_utilization["db"] <= 1.0


def test_cpu_budget_gates_by_cpus():
    """Tasks declaring cpus=2 under cpu_budget=2 run one at a time."""
    with px.Workflow("c") as wf:
        for _ in range(3):
            wf.add(px.task(sleep_then).options(cpus=2), 0.1)
    result = px.run(wf, max_workers=3, cpu_budget=2, progress=False)
    assert result.stats.max_concurrency == 1


@pytest.mark.parametrize("options, workflow, fragment", [
    ({"pools": {"db": 3}}, {"pools": {"db": 2}}, "needs pools['db']=3 but the capacity is 2"),
    ({"pools": "gpu"}, {}, "pool 'gpu', which the workflow does not declare"),
    ({"cpus": 8}, {"max_workers": 2}, "needs cpus=8 but the capacity is 2"),
    ({"memory": "10GB"}, {"memory_budget": "1GB"}, "needs memory=10000000000"),
])
def test_impossible_needs_are_resource_errors(options, workflow, fragment):
    """A need above a capacity is a ResourceError naming task, resource, need and capacity."""
    ran = []
    with px.Workflow("r", **workflow) as wf:
        wf.add(ran.append, 1)
        wf.add(px.task(noop).options(id="greedy", **options))
    with pytest.raises(px.ResourceError, match="'greedy'") as info:
        px.run(wf, progress=False)
    assert fragment in str(info.value)
    assert ran == []
    with pytest.raises(px.ResourceError):
        wf.validate()


def test_memory_gate_admits_within_budget():
    """Declared memory adds up against the budget: two 600 MB tasks under 1 GB run apart."""
    with px.Workflow("m") as wf:
        for _ in range(2):
            wf.add(px.task(sleep_then).options(memory="600MB"), 0.1)
    result = px.run(wf, max_workers=2, memory_budget="1GB", progress=False)
    assert result.ok and result.stats.max_concurrency == 1
