"""Tests of parexec._gates: pools, CPU and memory budgets, validation of needs."""

from __future__ import annotations

import time

import helpers
import pytest
from helpers import noop, sleep_then

import parexec as px
from parexec._gates import CapacityGate


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
    t0 = time.monotonic()
    result = px.run(wf, max_workers=3, progress=False)
    elapsed = time.monotonic() - t0
    db = sorted((t.started_at, t.finished_at) for k, t in result.tasks.items() if k != "free")
    assert all(db[k][1] <= db[k + 1][0] + 1e-3 for k in range(2))
    assert result.tasks[free.id].started_at < db[1][0]
    # The unit is held at least while each db task runs, within the run's span: a bound
    # that holds however slow the machine is (no fixed fraction).
    busy = sum(f - s for s, f in db)
    assert busy / elapsed <= result.stats.pool_utilization["db"] <= 1.0


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
    ({"memory": "10GB"}, {"memory_budget": "1GB"}, "needs memory=10 GB but the capacity is 1 GB"),
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


def _whole_gate_workflow(gate):
    """Thirty small tasks and one priority=10 task that needs the whole pool (or budget),
    ready 20 ms after the small ones took the units."""
    big_opts = {"pools": {"db": 2}} if gate == "pool" else {"cpus": 2}
    small_opts = {"pools": "db"} if gate == "pool" else {"cpus": 1}
    with px.Workflow("starve", pools={"db": 2}) as wf:
        first = wf.add(px.task(sleep_then).options(id="first"), 0.02)
        for k in range(30):
            wf.add(px.task(sleep_then).options(id=f"small{k}", **small_opts), 0.05)
        wf.add(px.task(sleep_then).options(id="big", priority=10, after=[first], **big_opts),
               0.05)
    return wf


@pytest.mark.parametrize("gate", ["pool", "cpu"])
def test_task_needing_a_whole_gate_is_not_starved(gate):
    """A priority=10 task needing both units of a pool (or the whole CPU budget) starts once
    the units held when it became ready come back: no lower task takes them meanwhile."""
    wf = _whole_gate_workflow(gate)
    result = px.run(wf, max_workers=2, cpu_budget=2 if gate == "cpu" else None, progress=False)
    assert result.ok
    big = result.tasks["big"]
    smalls = [t for k, t in result.tasks.items() if k.startswith("small")]
    jumped = [t.id for t in smalls if big.queued_at < t.started_at < big.started_at]
    assert jumped == [], f"{jumped} started while 'big' waited for the units"
    # and it did not wait for the thirty: only those running when it became ready went first
    assert sum(t.started_at < big.started_at for t in smalls) <= 2


def test_backfill_only_tasks_that_end_before_the_reserved_task_could_start():
    """While a task waits for a whole pool, a lower task whose estimate ends before the
    units could come back starts at once; one without an estimate waits behind it."""
    with px.Workflow("backfill", pools={"db": 2}) as wf:
        first = wf.add(px.task(sleep_then).options(id="first"), 0.02)
        wf.add(px.task(sleep_then).options(id="long", pools="db", estimate=1.0), 1.0)
        wf.add(px.task(sleep_then).options(id="big", priority=10, pools={"db": 2},
                                           after=[first]), 0.05)
        wf.add(px.task(sleep_then).options(id="quick", pools="db", estimate=0.1,
                                           after=[first]), 0.1)
        wf.add(px.task(sleep_then).options(id="unknown", pools="db", after=[first]), 0.1)
    result = px.run(wf, max_workers=4, progress=False)
    t = result.tasks
    assert result.ok
    assert t["quick"].started_at < t["long"].finished_at <= t["big"].started_at + 1e-3
    assert t["unknown"].started_at >= t["big"].finished_at - 1e-3


def test_reservation_accounting():
    """A reservation makes room only beside the holder's need; a better task takes it over."""
    g = CapacityGate("pool:db", 3, [1, 2, 1, 3])
    g.acquire(0)
    assert not g.admits(3)
    assert g.reserve(3, (-10, 0, 3))
    assert g.admits(2) and not g.spares(2)  # the unit is free, but it is reserved
    assert not g.reserve(1, (0, 0, 1))       # a lower task does not take it over
    assert g.reserve(1, (-20, 0, 1)) and g.holder == 1
    assert g.spares(2) is False and g.holder_need == 2
    g.unreserve()
    assert g.spares(2)


def test_memory_gate_probes_then_uses_the_learned_peak(monkeypatch):
    """The first process task of an undeclared function runs alone; its peak becomes the
    need of the function's other tasks; above the high-water mark nothing process starts."""
    from types import SimpleNamespace

    from parexec import _gates

    def work():
        pass

    def other():
        pass

    specs = [SimpleNamespace(fn=work)] * 3 + [SimpleNamespace(fn=other)]
    g = _gates.MemoryGate(1000, [0.0] * 4, specs)
    g.measured = lambda i: True
    peaks = {}  # what the monitor sampled, per attempt (by identity, as attempts hash)

    g.monitor = SimpleNamespace(total=0, held=0, peak_of=lambda a: peaks.get(id(a)))
    clock = [100.0]
    monkeypatch.setattr(_gates.time, "monotonic", lambda: clock[0])
    probe = SimpleNamespace(peak_memory=None)
    assert g.admits(0)
    g.acquire(0)
    g.started(0, probe)
    assert g.admits(1) is _gates.RECHECK           # the probe runs: wait for its peak
    assert g.admits(3)                             # another function probes on its own
    peaks[id(probe)] = 400
    clock[0] += 2 * _gates.PROBE_SECONDS
    assert not g.admits(1)                         # the peak was new: is it still growing?
    clock[0] += _gates.PROBE_STABLE
    g.monitor.total = 400
    assert g.admits(1) and g.need(1) == 400 and g.used == 400  # the probe counts too
    g.acquire(1)
    g.monitor.total = 500
    assert not g.admits(2)                         # 400 + 400 + 400 > 1000
    g.release(1)
    g.monitor.total = 900                          # above 80% of the budget
    assert not g.admits(2)
    g.monitor.total = 400
    assert g.admits(2)
    g.monitor.held = 500                           # values in shared memory count too
    assert not g.admits(2)
    g.monitor.held = 0
    probe.peak_memory = 400  # the scheduler sets it from the probe's Done, then releases
    g.release(0)
    assert g.used == 0 and g.learned[work] == 400


def _overlap(result, ids):
    """Most of the given tasks running at once."""
    from parexec._results import _peak_overlap
    return _peak_overlap([(result.tasks[t].started_at, result.tasks[t].finished_at)
                          for t in ids])


def test_memory_from_the_inputs_sets_the_need():
    """memory= as a callable of the resolved arguments: two 600 MB needs under a 1 GB budget
    run one at a time, two 100 MB needs together; TaskRun says what admission used."""
    def run(*mbs):  # one run per pair: which size task ends first must not matter
        with px.Workflow("inputs") as wf:
            sizes = [wf.add(px.task(helpers.identity).options(id=f"size{k}"), mb)
                     for k, mb in enumerate(mbs)]
            sized = px.task(sleep_then).options(memory=lambda seconds, mb: mb * 10**6)
            for k, size in enumerate(sizes):
                wf.add(sized.options(id=f"use{k}"), 0.2, size)
        result = px.run(wf, max_workers=4, memory_budget="1GB", progress=False)
        assert result.ok
        return result

    assert _overlap(run(100, 100), ["use0", "use1"]) == 2
    result = run(600, 600)
    assert _overlap(result, ["use0", "use1"]) == 1
    use0 = result.tasks["use0"]
    assert (use0.memory_need, use0.memory_source) == (600 * 10**6, "inputs")
    assert result.tasks["size0"].memory_source is None
    assert "572.2MiB inputs" in result.summary()


def test_cpus_and_timeout_from_the_inputs():
    """cpus= and timeout= callables: two tasks computing cpus=2 under cpu_budget=2 run apart
    (the CPU gate exists though no task declares cpus), and a computed timeout stops one."""
    with px.Workflow("inputs") as wf:
        two = wf.add(px.task(helpers.identity).options(id="two"), 2)
        wide = px.task(sleep_then).options(cpus=lambda seconds, cpus: cpus)
        wf.add(wide.options(id="wide0"), 0.2, two)
        wf.add(wide.options(id="wide1"), 0.2, two)
        wf.add(px.task(sleep_then).options(id="slow", on_error="skip", isolation="process",
                                           timeout=lambda seconds: seconds / 20), 10)
    t0 = time.monotonic()
    result = px.run(wf, max_workers=3, progress=False)
    assert time.monotonic() - t0 < 9  # stopped at 0.5 s, not after its 10 s
    assert _overlap(result, ["wide0", "wide1"]) == 1
    slow = result.tasks["slow"]
    assert slow.status == "timed_out" and "timeout of 0.5s" in str(slow.error)


def test_a_failing_or_impossible_computed_need_fails_only_its_task():
    """A callable that raises or returns a wrong type is a TaskOptionError naming the task
    and the option; a computed need above the budget is a ResourceError; each fails its task
    under its on_error and the run goes on."""
    def broken(seconds):
        raise ValueError("no size")

    with px.Workflow("inputs") as wf:
        one = wf.add(px.task(helpers.identity).options(id="one"), 0.01)
        bad = wf.add(px.task(sleep_then).options(id="bad", memory=broken, on_error="skip"),
                     one)
        wf.add(px.task(helpers.identity).options(id="after-bad"), bad)
        wf.add(px.task(sleep_then).options(id="typo", on_error="skip",
                                           cpus=lambda seconds: "two"), one)
        huge = wf.add(px.task(sleep_then).options(
            id="huge", on_error="ignore", default="dflt",
            memory=lambda seconds: "5GB"), one)
        wf.add(px.task(helpers.identity).options(id="after-huge"), huge)
        wf.add(px.task(sleep_then).options(id="fine", memory=lambda seconds, value: None),
               one, "ok")
    result = px.run(wf, max_workers=2, memory_budget="1GB", progress=False)
    t = result.tasks
    assert result.status == "partial"
    assert t["fine"].status == "succeeded" and t["fine"].memory_source is None
    assert t["bad"].status == "failed" and t["bad"].attempts == 0
    assert isinstance(t["bad"].error, px.TaskOptionError)
    assert "task 'bad': the memory= callable raised ValueError: no size" in str(t["bad"].error)
    assert t["after-bad"].status == "skipped"
    assert isinstance(t["typo"].error, px.TaskOptionError)
    assert "task 'typo': the cpus= callable returned 'two'" in str(t["typo"].error)
    assert isinstance(t["huge"].error, px.ResourceError)
    assert "task 'huge' needs memory=5 GB but the capacity is 1 GB" in str(t["huge"].error)
    assert result["after-huge"] == "dflt"


def test_items_of_a_map_over_a_result_size_themselves():
    """A map created at run time: each item's memory= callable receives its item, and the
    memory gate exists although no task declares memory."""
    def sizes():
        return [0.6, 0.6]

    with px.Workflow("inputs") as wf:
        items = wf.add(px.task(sizes))
        task = px.task(sleep_then).options(memory=lambda seconds: seconds * 10**9)
        wf.map(task, items, id="hold")
    result = px.run(wf, max_workers=3, memory_budget="1GB", progress=False)
    assert result.ok
    assert _overlap(result, ["hold[0]", "hold[1]"]) == 1
    assert result.tasks["hold[1]"].memory_need == 600 * 10**6


def _spans_overlap(a, b):
    return a.started_at < b.finished_at and b.started_at < a.finished_at


def test_an_exclusive_task_runs_alone_while_the_others_share():
    """TaskSpec.exclusive (YAML parallel.enabled: false): the task runs with no other local
    task, the others run together freely, items of an exclusive map each run alone, and no
    pool appears in the stats."""
    def three():
        return [0.1, 0.1, 0.1]

    with px.Workflow("x") as wf:
        for k in range(3):
            wf.add(px.task(sleep_then).options(id=f"free{k}"), 0.2)
        wf.add(px.task(sleep_then).options(id="alone"), 0.2)
        items = wf.add(px.task(three))
        wf.map(px.task(sleep_then), items, id="each")
        wf.map(px.task(sleep_then), [0.1, 0.1], id="fixed")
    for tid in ("alone", "each", "fixed"):
        wf[tid].exclusive = True
    result = px.run(wf, max_workers=3, progress=False)
    assert result.ok
    t = result.tasks
    alone = ["alone", "each[0]", "each[1]", "each[2]", "fixed[0]", "fixed[1]"]
    for tid in alone:
        others = [o for o in t if o != tid and o not in ("each", "fixed") and t[o].attempts]
        assert not [o for o in others if _spans_overlap(t[tid], t[o])], tid
    assert _overlap(result, ["free0", "free1", "free2"]) >= 2
    assert result.stats.pool_utilization == {}
    assert "pool" not in result.summary()


def test_an_exclusive_task_is_not_starved_by_smaller_tasks():
    """A priority=10 exclusive task that becomes ready while small tasks run holds a
    reservation: the lower small tasks wait for it instead of keeping the run busy."""
    with px.Workflow("x") as wf:
        first = wf.add(px.task(sleep_then).options(id="first"), 0.02)
        for k in range(20):
            wf.add(px.task(sleep_then).options(id=f"small{k}"), 0.05)
        wf.add(px.task(sleep_then).options(id="alone", priority=10, after=[first]), 0.05)
    wf["alone"].exclusive = True
    result = px.run(wf, max_workers=2, progress=False)
    assert result.ok
    alone = result.tasks["alone"]
    smalls = [t for k, t in result.tasks.items() if k.startswith("small")]
    jumped = [t.id for t in smalls if alone.queued_at < t.started_at < alone.started_at]
    assert jumped == [], f"{jumped} started while 'alone' waited for the others to end"
    assert sum(t.started_at < alone.started_at for t in smalls) <= 2
