"""parexec benchmarks, side by side with the executors users would use instead.

Usage::

    python -m bench              # the full set (about 15 minutes on 2 cores)
    python -m bench --quick      # smaller sizes, under 2 minutes
    python -m bench --only threads processes

Each benchmark runs every engine alternately within each repetition (so a noisy neighbour
hits all engines alike), repeats at least 5 times, and prints the median, min and max of
each engine with its ratio to the reference engine (marked ``*``). Engines whose package is
not installed are left out with a note. No figure here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import gc
import graphlib
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as cf_wait
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parexec as px  # noqa: E402
from bench.tasks import burn, noop, sleep_ms, touch  # noqa: E402

REPS = 5


@dataclass
class Row:
    bench: str
    case: str
    engine: str
    samples: list[float] = field(default_factory=list)
    unit: str = "s"
    scale: float = 1.0  # figure = seconds * scale (e.g. 1e6 / N for us per task)
    reference: bool = False
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) * self.scale

    @property
    def low(self) -> float:
        return min(self.samples) * self.scale

    @property
    def high(self) -> float:
        return max(self.samples) * self.scale


def have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` took; a runner that times itself returns its own float instead."""
    gc.collect()
    t = time.perf_counter()
    own = fn()
    return own if isinstance(own, float) else time.perf_counter() - t


def alternate(rows: list[Row], runners: list[Callable[[], Any]], reps: int) -> None:
    for _ in range(reps):
        for row, runner in zip(rows, runners, strict=True):
            row.samples.append(timed(runner))


# Graph shapes ------------------------------------------------------------------------------

def shape_deps(shape: str, n: int, seed: int = 0) -> list[list[int]]:
    """deps[i] for the benchmark shapes: fan-in (n-1 independent + one sink) or layered
    (100 layers, each task depends on 2 random tasks of the previous layer)."""
    if shape == "fanin":
        return [[] for _ in range(n - 1)] + [list(range(n - 1))]
    rng = random.Random(seed)
    per = max(2, n // 100)
    deps: list[list[int]] = []
    prev: list[int] = []
    while len(deps) < n:
        cur = []
        for _ in range(min(per, n - len(deps))):
            deps.append(rng.sample(prev, 2) if len(prev) >= 2 else [])
            cur.append(len(deps) - 1)
        prev = cur
    return deps


def px_workflow(deps: list[list[int]], fn: Callable[..., Any] = noop,
                costs: list[float] | None = None, estimates: bool = True,
                isolation: str = "thread") -> px.Workflow:
    wf = px.Workflow("bench", isolation=isolation)
    refs: list[px.TaskRef] = []
    tmpl = px.task(fn)
    for i, d in enumerate(deps):
        args = [refs[j] for j in d]
        if costs is not None:
            t = tmpl.options(estimate=costs[i]) if estimates else tmpl
            refs.append(wf.add(t, costs[i], *args))
        else:
            refs.append(wf.add(tmpl, *args))
    wf.validate()
    return wf


def dask_graph(deps: list[list[int]], fn: Callable[..., Any] = noop,
               costs: list[float] | None = None) -> tuple[dict[Any, Any], list[Any]]:
    # Keys share one prefix, (name, index), so dask's per-prefix bookkeeping stays linear.
    dsk: dict[Any, Any] = {}
    for i, d in enumerate(deps):
        args = [("t", j) for j in d]
        dsk[("t", i)] = (fn, costs[i], *args) if costs is not None else (fn, *args)
    return dsk, [("t", i) for i in range(len(deps))]


def graphlib_loop(deps: list[list[int]], workers: int, fn: Callable[..., Any] = noop,
                  costs: list[float] | None = None) -> None:
    """The minimal DAG executor people write: graphlib + ThreadPoolExecutor."""
    ts: graphlib.TopologicalSorter[int] = graphlib.TopologicalSorter(
        {i: d for i, d in enumerate(deps)})
    ts.prepare()
    results: dict[int, Any] = {}
    done: SimpleQueue[Any] = SimpleQueue()
    with ThreadPoolExecutor(workers) as ex:
        while ts.is_active():
            for node in ts.get_ready():
                args = [results[j] for j in deps[node]]
                if costs is not None:
                    args.insert(0, costs[node])
                f = ex.submit(fn, *args)
                f.add_done_callback(lambda f, node=node: done.put((node, f)))
            node, f = done.get()
            results[node] = f.result()
            ts.done(node)


def level_by_level(deps: list[list[int]], workers: int, costs: list[float]) -> None:
    """Each dependency level waits for its slowest task (the seeds' "parallel groups")."""
    depth = [0] * len(deps)
    for i, d in enumerate(deps):
        depth[i] = 1 + max((depth[j] for j in d), default=-1)
    levels: dict[int, list[int]] = {}
    for i, k in enumerate(depth):
        levels.setdefault(k, []).append(i)
    with ThreadPoolExecutor(workers) as ex:
        for k in sorted(levels):
            cf_wait([ex.submit(sleep_ms, costs[i]) for i in levels[k]])


# 1. Overhead, threads ------------------------------------------------------------------------

def bench_threads(quick: bool) -> list[Row]:
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    out: list[Row] = []
    workers = 2
    for shape in ("fanin", "layered"):
        for n in sizes:
            deps = shape_deps(shape, n)
            wf = px_workflow(deps)
            case = f"{shape} N={n:,}"
            scale = 1e6 / n
            rows = [Row("overhead-threads", case, "ThreadPoolExecutor (no deps)", unit="us/task",
                        scale=scale, reference=True),
                    Row("overhead-threads", case, "graphlib + ThreadPoolExecutor",
                        unit="us/task", scale=scale),
                    Row("overhead-threads", case, "parexec threads", unit="us/task",
                        scale=scale)]

            def raw(n: int = n) -> None:
                with ThreadPoolExecutor(workers) as ex:
                    cf_wait([ex.submit(noop) for _ in range(n)])

            runners: list[Callable[[], Any]] = [
                raw, lambda deps=deps: graphlib_loop(deps, workers),
                lambda wf=wf: px.run(wf, max_workers=workers, progress=False)]
            if have("dask") and n <= (1_000 if quick else 10_000):
                import dask.threaded
                dsk, keys = dask_graph(deps)
                rows.append(Row("overhead-threads", case, "dask.threaded.get", unit="us/task",
                                scale=scale))
                runners.append(lambda dsk=dsk, keys=keys: dask.threaded.get(
                    dsk, keys, num_workers=workers))
            alternate(rows, runners, REPS)
            if have("distributed") and n <= (1_000 if quick else 10_000):
                rows.append(_distributed_row(case, deps, scale))
            out += rows
    return out


def _distributed_row(case: str, deps: list[list[int]], scale: float) -> Row:
    from distributed import Client, LocalCluster
    row = Row("overhead-threads", case, "dask distributed (threads)", unit="us/task",
              scale=scale, note="separate cluster, timed after the others")
    with LocalCluster(processes=False, n_workers=1, threads_per_worker=2,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        for r in range(REPS):
            dsk, keys = dask_graph(deps)
            dsk = {(f"t{r}", k[1]): tuple((f"t{r}", a[1]) if isinstance(a, tuple) else a
                                          for a in v) for k, v in dsk.items()}
            keys = [(f"t{r}", k[1]) for k in keys]
            row.samples.append(timed(lambda dsk=dsk, keys=keys: client.get(dsk, keys)))
    return row


# 2. Overhead, processes ----------------------------------------------------------------------

def bench_processes(quick: bool) -> list[Row]:
    from loky import get_reusable_executor
    sizes = [1_000] if quick else [1_000, 10_000]
    workers = 2
    out: list[Row] = []
    # Cold start: the first task through a fresh pool (spawning its workers).
    cold = [Row("cold-start", "2 workers, 2 tasks", "loky get_reusable_executor",
                reference=True),
            Row("cold-start", "2 workers, 2 tasks", "parexec processes")]

    def loky_cold() -> float:
        t = time.perf_counter()
        ex = get_reusable_executor(max_workers=workers, reuse=False)
        [f.result() for f in [ex.submit(noop) for _ in range(2)]]
        took = time.perf_counter() - t
        ex.shutdown(wait=True, kill_workers=True)
        return took

    def px_cold() -> float:
        px.shutdown()
        wf = px_workflow([[], []], isolation="process")
        t = time.perf_counter()
        px.run(wf, max_workers=workers, progress=False)
        return time.perf_counter() - t

    alternate(cold, [loky_cold, px_cold], REPS)
    out += cold
    ex = get_reusable_executor(max_workers=workers)
    for n in sizes:
        case = f"N={n:,} independent"
        scale = 1e6 / n
        wf = px_workflow([[] for _ in range(n)], isolation="process")
        rows = [Row("overhead-processes", case, "loky get_reusable_executor", unit="us/task",
                    scale=scale, reference=True),
                Row("overhead-processes", case, "ProcessPoolExecutor", unit="us/task",
                    scale=scale),
                Row("overhead-processes", case, "parexec processes", unit="us/task",
                    scale=scale)]
        ppe = ProcessPoolExecutor(workers)
        ppe.submit(noop).result()
        px.run(px_workflow([[], []], isolation="process"), max_workers=workers, progress=False)
        runners: list[Callable[[], Any]] = [
            lambda n=n: [f.result() for f in [ex.submit(noop) for _ in range(n)]],
            lambda n=n, ppe=ppe: [f.result() for f in [ppe.submit(noop) for _ in range(n)]],
            lambda wf=wf: px.run(wf, max_workers=workers, progress=False)]
        if have("joblib"):
            from joblib import Parallel, delayed
            rows.append(Row("overhead-processes", case, "joblib Parallel(loky)",
                            unit="us/task", scale=scale))
            par = Parallel(n_jobs=workers, backend="loky")
            runners.append(lambda n=n, par=par: par(delayed(noop)() for _ in range(n)))
        if have("dask"):
            import dask.multiprocessing
            dsk, keys = dask_graph([[] for _ in range(n)])
            rows.append(Row("overhead-processes", case, "dask.multiprocessing.get",
                            unit="us/task", scale=scale))
            runners.append(lambda dsk=dsk, keys=keys: dask.multiprocessing.get(
                dsk, keys, num_workers=workers))
        alternate(rows, runners, REPS)
        ppe.shutdown()
        out += rows
    return out


# 3. CPU-bound speedup ------------------------------------------------------------------------

def calibrate(seconds: float) -> int:
    n = 20_000
    while True:
        t = time.perf_counter()
        burn(n)
        d = time.perf_counter() - t
        if d > 0.05:
            return int(n * seconds / d)
        n *= 2


def bench_cpu(quick: bool) -> list[Row]:
    ntasks, each = (8, 0.08) if quick else (16, 0.25)
    loops = calibrate(each)
    workers = 2
    case = f"{ntasks} tasks x {each}s pure Python"
    deps: list[list[int]] = [[] for _ in range(ntasks)]
    rows = [Row("cpu-speedup", case, "sequential", reference=True),
            Row("cpu-speedup", case, "parexec processes"),
            Row("cpu-speedup", case, "parexec threads (GIL)")]
    wf_p = px.Workflow("cpu", isolation="process")
    wf_t = px.Workflow("cpu")
    for _ in deps:
        wf_p.add(burn, loops)
        wf_t.add(burn, loops)
    px.run(px_workflow([[], []], isolation="process"), max_workers=workers, progress=False)
    runners: list[Callable[[], Any]] = [
        lambda: [burn(loops) for _ in deps],
        lambda: px.run(wf_p, max_workers=workers, progress=False),
        lambda: px.run(wf_t, max_workers=workers, progress=False)]
    if have("joblib"):
        from joblib import Parallel, delayed
        rows.append(Row("cpu-speedup", case, "joblib Parallel(loky)"))
        runners.append(lambda: Parallel(n_jobs=workers)(delayed(burn)(loops) for _ in deps))
    if have("dask"):
        import dask.multiprocessing
        dsk = {("b", i): (burn, loops) for i in range(ntasks)}
        rows.append(Row("cpu-speedup", case, "dask.multiprocessing.get"))
        runners.append(lambda: dask.multiprocessing.get(dsk, list(dsk), num_workers=workers))
    alternate(rows, runners, REPS)
    seq = statistics.median(rows[0].samples)
    for row in rows:
        row.note = f"speedup {seq / statistics.median(row.samples):.2f}"
    return rows


# 4. Schedule quality -------------------------------------------------------------------------

def stg_graph(n: int, seed: int) -> tuple[list[list[int]], list[float]]:
    """A random graph in the style of the Standard Task Graph Set: integer costs 1-10,
    each task with 0-4 predecessors among the tasks before it."""
    rng = random.Random(seed)
    deps, costs = [], []
    for i in range(n):
        k = rng.randint(0, min(i, 4))
        window = list(range(max(0, i - 20), i))
        deps.append(sorted(rng.sample(window, min(k, len(window)))))
        costs.append(float(rng.randint(1, 10)))
    return deps, costs


def bench_schedule(quick: bool) -> list[Row]:
    cases = [(60, 1)] if quick else [(50, 1), (100, 2), (200, 3), (300, 4)]
    procs = [2, 4] if quick else [2, 4, 8, 16]
    ms = 1.0  # one cost unit = 1 ms of sleep
    out: list[Row] = []
    for n, seed in cases:
        deps, costs = stg_graph(n, seed)
        costs_ms = [c * ms for c in costs]
        finish = [0.0] * n
        for i in range(n):
            finish[i] = costs_ms[i] + max((finish[j] for j in deps[i]), default=0.0)
        cp, work = max(finish) / 1000, sum(costs_ms) / 1000
        wf_e = px_workflow(deps, sleep_ms, costs_ms, estimates=True)
        wf_n = px_workflow(deps, sleep_ms, costs_ms, estimates=False)
        for p in procs:
            bound = max(cp, work / p)
            case = f"n={n} seed={seed} P={p}"
            rows = [Row("schedule-quality", case, "parexec (estimates)", unit="x bound",
                        scale=1 / bound),
                    Row("schedule-quality", case, "parexec (no estimates)", unit="x bound",
                        scale=1 / bound),
                    Row("schedule-quality", case, "level by level", unit="x bound",
                        scale=1 / bound, reference=True)]
            runners: list[Callable[[], Any]] = [
                lambda wf=wf_e, p=p: px.run(wf, max_workers=p, progress=False),
                lambda wf=wf_n, p=p: px.run(wf, max_workers=p, progress=False),
                lambda deps=deps, p=p, costs=costs_ms: level_by_level(deps, p, costs)]
            if have("dask"):
                import dask.threaded
                dsk, keys = dask_graph(deps, sleep_ms, costs_ms)
                rows.append(Row("schedule-quality", case, "dask.threaded.get", unit="x bound",
                                scale=1 / bound))
                runners.append(lambda dsk=dsk, keys=keys, p=p: dask.threaded.get(
                    dsk, keys, num_workers=p))
            alternate(rows, runners, REPS)
            out += rows
    return out


# 5. Scale ------------------------------------------------------------------------------------

def bench_scale(quick: bool) -> list[Row]:
    sizes = [10_000, 20_000] if quick else [10_000, 100_000, 1_000_000]
    out: list[Row] = []
    for n in sizes:
        deps = shape_deps("layered", n)
        case = f"layered N={n:,}"
        reps = REPS if n <= 100_000 else 1
        build = Row("scale", case, "build", unit="us/task", scale=1e6 / n)
        valid = Row("scale", case, "validate", unit="us/task", scale=1e6 / n)
        run = Row("scale", case, "run", unit="us/task", scale=1e6 / n)
        mem = Row("scale", case, "memory (tracemalloc peak)", unit="bytes/task", scale=1 / n)
        for _ in range(reps):
            gc.collect()
            t = time.perf_counter()
            wf = px_workflow_unvalidated(deps)
            build.samples.append(time.perf_counter() - t)
            valid.samples.append(timed(wf.validate))
            run.samples.append(timed(lambda wf=wf: px.run(wf, progress=False)))
            del wf
        gc.collect()
        tracemalloc.start()
        wf = px_workflow_unvalidated(deps)
        wf.validate()
        result = px.run(wf, progress=False)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del wf, result
        mem.samples.append(peak)
        if reps == 1:
            for row in (build, valid, run):
                row.note = "1 repetition"
        out += [build, valid, run, mem]
    return out


def px_workflow_unvalidated(deps: list[list[int]]) -> px.Workflow:
    wf = px.Workflow("scale")
    refs: list[px.TaskRef] = []
    for d in deps:
        refs.append(wf.add(noop, *[refs[j] for j in d]))
    return wf


# 6. Memory pressure ---------------------------------------------------------------------------

class MemorySampler:
    """Peak system memory in use above the level at start, sampled every 20 ms."""

    def __init__(self) -> None:
        import threading

        import psutil
        self._psutil = psutil
        self.base = psutil.virtual_memory().used
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._psutil.virtual_memory().used - self.base)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _measured(fn: Callable[[], Any], peak: Row) -> float:
    """Seconds ``fn`` took; its peak memory goes to ``peak`` (memory benchmarks)."""
    gc.collect()
    time.sleep(0.5)  # let the previous run's memory go back to the system
    sampler = MemorySampler()
    t = time.perf_counter()
    fn()
    took = time.perf_counter() - t
    peak.samples.append(float(sampler.stop()))
    return took


def bench_memory(quick: bool) -> list[Row]:
    ntasks, gib, need, budget = (4, 0.25, "0.4GB", "1GB") if quick else \
        (8, 1.0, "1.2GB", "3GB")
    case = f"{ntasks} x {gib:g} GiB, budget {budget}"
    wf = px.Workflow("memory", isolation="process")
    for _ in range(ntasks):
        wf.add(px.task(touch).options(memory=need), gib)
    px.run(px_workflow([[] for _ in range(ntasks)], isolation="process"), max_workers=ntasks,
           progress=False)  # warm: start the workers
    ppe = ProcessPoolExecutor(ntasks)
    [f.result() for f in [ppe.submit(noop) for _ in range(ntasks)]]
    rows = [Row("memory-pressure", case, "ProcessPoolExecutor: makespan", reference=True),
            Row("memory-pressure", case, "parexec memory gate: makespan")]
    peak_case = f"{ntasks} x {gib:g} GiB, peak in use"
    peaks = [Row("memory-pressure", peak_case, "ProcessPoolExecutor", unit="GiB",
                 scale=1 / 2**30, reference=True),
             Row("memory-pressure", peak_case, "parexec memory gate", unit="GiB",
                 scale=1 / 2**30)]

    alternate(rows, [
        lambda: _measured(lambda: [f.result() for f in [ppe.submit(touch, gib)
                                                       for _ in range(ntasks)]], peaks[0]),
        lambda: _measured(lambda: px.run(wf, max_workers=ntasks, memory_budget=budget,
                                        progress=False), peaks[1])], REPS)
    ppe.shutdown()
    for row in peaks:
        row.note = f"budget {budget}"
    return rows + peaks


def bench_memory_measured(quick: bool) -> list[Row]:
    """Issue 21 item 11: the same pressure with no memory= declared; parexec measures."""
    ntasks, gib, budget = (4, 0.25, "0.75GB") if quick else (6, 0.5, "1.5GB")
    case = f"{ntasks} x {gib:g} GiB undeclared"
    wf = px.Workflow("measured", isolation="process")
    for _ in range(ntasks):
        wf.add(px.task(touch), gib)
    px.run(px_workflow([[] for _ in range(ntasks)], isolation="process"), max_workers=ntasks,
           progress=False)  # warm: start the workers
    ppe = ProcessPoolExecutor(ntasks)
    [f.result() for f in [ppe.submit(noop) for _ in range(ntasks)]]
    rows = [Row("memory-measured", case, "ProcessPoolExecutor: makespan", reference=True),
            Row("memory-measured", case, "parexec measured gate: makespan")]
    peaks = [Row("memory-measured", f"{case}, peak", "ProcessPoolExecutor", unit="GiB",
                 scale=1 / 2**30, reference=True, note=f"budget {budget}"),
             Row("memory-measured", f"{case}, peak", "parexec measured gate", unit="GiB",
                 scale=1 / 2**30, note=f"budget {budget}")]

    alternate(rows, [
        lambda: _measured(lambda: [f.result() for f in [ppe.submit(touch, gib)
                                                       for _ in range(ntasks)]], peaks[0]),
        lambda: _measured(lambda: px.run(wf, max_workers=ntasks, memory_budget=budget,
                                        progress=False), peaks[1])], 2 if quick else REPS)
    ppe.shutdown()
    return rows + peaks


def bench_memory_learned(quick: bool) -> list[Row]:
    """Issue 17 item 6: the memory-pressure case with no memory= declared, run twice with a
    store; the second run admits each task with the peak its first run recorded."""
    import tempfile
    ntasks, gib, budget = (4, 0.25, "1GB") if quick else (8, 1.0, "3GB")
    case = f"{ntasks} x {gib:g} GiB, budget {budget}"
    wf = px.Workflow("learned", isolation="process")
    for k in range(ntasks):
        wf.add(px.task(touch).options(id=f"touch{k}"), gib)
    px.run(px_workflow([[] for _ in range(ntasks)], isolation="process"), max_workers=ntasks,
           progress=False)  # warm: start the workers
    ppe = ProcessPoolExecutor(ntasks)
    [f.result() for f in [ppe.submit(noop) for _ in range(ntasks)]]
    engines = ["ProcessPoolExecutor", "parexec 1st run", "parexec 2nd, learned"]
    rows = [Row("memory-learned", case, f"{e}: makespan", reference=k == 0)
            for k, e in enumerate(engines)]
    peaks = [Row("memory-learned", f"{ntasks} x {gib:g} GiB, peak in use", e, unit="GiB",
                 scale=1 / 2**30, reference=k == 0, note=f"budget {budget}")
             for k, e in enumerate(engines)]
    folder = tempfile.mkdtemp(prefix="parexec-bench-")
    stores: list[str] = []

    def first() -> Any:
        stores.append(os.path.join(folder, f"runs{len(stores)}.db"))  # a new store each rep
        return px.run(wf, max_workers=ntasks, memory_budget=budget, store=stores[-1],
                      progress=False)

    def second() -> Any:
        result = px.run(wf, max_workers=ntasks, memory_budget=budget, store=stores[-1],
                        progress=False)
        assert all(t.memory_source == "learned" for t in result.tasks.values())
        return result

    alternate(rows, [
        lambda: _measured(lambda: [f.result() for f in [ppe.submit(touch, gib)
                                                       for _ in range(ntasks)]], peaks[0]),
        lambda: _measured(first, peaks[1]),
        lambda: _measured(second, peaks[2])], 2 if quick else REPS)
    ppe.shutdown()
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
    return rows + peaks


# 6b. Fair reservations -----------------------------------------------------------------------

def bench_fairness(quick: bool) -> list[Row]:
    """Issue 21 item 10: a priority=10 task needing both units of pool db=2 becomes ready
    while small tasks (1 unit, 50 ms) hold the pool. Figure: how long it waits to start.
    The plain pool runs in submission order (a ThreadPoolExecutor(2), units as a semaphore)."""
    import threading
    nsmall = 10 if quick else 30
    case = f"db=2, 1 big + {nsmall} small"
    rows = [Row("fairness", case, "ThreadPoolExecutor + semaphore", reference=True,
                note="wait of the big task"),
            Row("fairness", case, "parexec (reservation)", note="wait of the big task")]

    def plain() -> float:
        units = threading.Semaphore(2)
        waited: list[float] = []

        def small() -> None:
            with units:
                sleep_ms(50)

        def big(ready: float) -> None:
            units.acquire()
            units.acquire()
            waited.append(time.perf_counter() - ready)
            sleep_ms(50)
            units.release()
            units.release()

        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(sleep_ms, 20)
            smalls = [ex.submit(small) for _ in range(nsmall)]
            first.result()
            ex.submit(big, time.perf_counter())
            cf_wait(smalls)
        return waited[0]

    def reserved() -> float:
        with px.Workflow("fair", pools={"db": 2}) as wf:
            first = wf.add(px.task(sleep_ms).options(id="first"), 20)
            for k in range(nsmall):
                wf.add(px.task(sleep_ms).options(id=f"small{k}", pools="db"), 50)
            wf.add(px.task(sleep_ms).options(id="big", priority=10, pools={"db": 2},
                                             after=[first]), 50)
        big = px.run(wf, max_workers=2, progress=False).tasks["big"]
        return big.started_at - big.queued_at

    alternate(rows, [plain, reserved], REPS)
    return rows


# 7. Cluster -----------------------------------------------------------------------------------

def bench_cluster(quick: bool) -> list[Row]:
    if not have("distributed"):
        return []
    from distributed import Client, LocalCluster
    sizes = [100] if quick else [200, 1_000]
    out: list[Row] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        for n in sizes:
            deps = shape_deps("layered", n)
            case = f"layered N={n:,}, LocalCluster(2)"
            wf = px_workflow(deps, isolation="cluster")
            rows = [Row("cluster", case, "dask client.get", unit="us/task", scale=1e6 / n,
                        reference=True),
                    Row("cluster", case, "parexec isolation='cluster'", unit="us/task",
                        scale=1e6 / n)]
            counter = iter(range(10**6))

            def plain(deps: list[list[int]] = deps, counter: Any = counter) -> None:
                r = next(counter)  # fresh keys: dask returns results it still holds
                dsk = {(f"d{r}", i): (noop, *[(f"d{r}", j) for j in d]) for i, d in
                       enumerate(deps)}
                client.get(dsk, list(dsk))

            alternate(rows, [plain, lambda wf=wf: px.run(wf, cluster=client, progress=False)],
                      REPS)
            out += rows
    return out


BENCHES = {"threads": bench_threads, "processes": bench_processes, "cpu": bench_cpu,
           "schedule": bench_schedule, "scale": bench_scale, "memory": bench_memory,
           "measured": bench_memory_measured, "learned": bench_memory_learned,
           "fairness": bench_fairness,
           "cluster": bench_cluster}


def machine() -> str:
    import psutil
    versions = []
    for mod in ("loky", "cloudpickle", "dask", "distributed", "joblib"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return (f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, parexec {px.__version__}, "
            + ", ".join(versions))


def render(rows: list[Row]) -> str:
    lines = []
    by_case: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        by_case.setdefault((r.bench, r.case), []).append(r)
    head = f"{'benchmark':<19} {'case':<26} {'engine':<32} {'median':>10} {'min':>10} " \
           f"{'max':>10} {'unit':<10} {'ratio':>6}"
    lines += [head, "-" * len(head)]
    for (bench, case), group in by_case.items():
        ref = next((r for r in group if r.reference), None)
        for r in group:
            ratio = f"{r.median / ref.median:.2f}" if ref is not None and ref.median else ""
            mark = "*" if r.reference else " "
            lines.append(f"{bench:<19} {case:<26} {mark}{r.engine:<31} {fmt(r.median):>10} "
                         f"{fmt(r.low):>10} {fmt(r.high):>10} {r.unit:<10} {ratio:>6}"
                         + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def fmt(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x < 10 else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under 2 minutes")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="benchmarks to run")
    parser.add_argument("--json", metavar="PATH", help="also write the samples as JSON")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"mode: {'quick' if args.quick else 'full'}; {REPS} repetitions unless noted; "
          "* = reference of the ratio column\n", flush=True)
    rows: list[Row] = []
    missing = [m for m in ("dask", "distributed", "joblib") if not have(m)]
    if missing:
        print(f"not installed, left out: {', '.join(missing)} "
              "(pip install -r bench/requirements.txt)\n")
    for name in args.only or list(BENCHES):
        t = time.perf_counter()
        new = BENCHES[name](args.quick)
        rows += new
        print(render(new))
        print(f"({name}: {time.perf_counter() - t:.0f}s)\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)
    px.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
