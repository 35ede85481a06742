"""Moving large values between tasks (issue 15), side by side with joblib, Dask and Ray.

Usage::

    python -m bench.transfer                 # both cases, 3 repetitions
    python -m bench.transfer --quick         # 8 MB arrays instead of 64/100 MB
    python -m bench.transfer --before DIR    # also a parexec from DIR (e.g. an older commit)

Case ``producers``: 8 process tasks each return a 64 MB float64 array, 8 process tasks sum
one each, on 2 workers. Figures: wall time of the run (engines started and warmed up before)
and the driver's peak RSS during it (VmHWM, reset just before).

Case ``chain``: 12 thread tasks in a chain, each returning a new 100 MB array from the
previous one. Figure: the driver's memory still held after the run with its result kept
(RSS after minus RSS before; parexec with ``keep="leaves"``, dask threaded returns the last
value), and the peak RSS above that baseline during the run.

Every engine runs in a fresh interpreter per repetition, engines alternating within each
repetition so a noisy neighbour hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 10**6
PRODUCERS = 8
CHAIN = 12
WORKERS = 2


# Task functions (importable by every engine's workers) -----------------------------------

def produce(n: int, i: int) -> Any:
    import numpy as np
    return np.full(n, float(i))


def consume(a: Any) -> float:
    return float(a.sum())


def step(a: Any, n: int) -> Any:
    import numpy as np
    return np.ones(n) if a is None else a + 1.0


# Measurements -------------------------------------------------------------------------

def rss() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# Engines: producer/consumer ------------------------------------------------------------

def producers_parexec(n: int) -> tuple[float, int]:
    import parexec as px

    def workflow(size: int) -> px.Workflow:
        with px.Workflow("transfer", isolation="process") as wf:
            for i in range(PRODUCERS):
                p = wf.add(px.task(produce).options(id=f"p{i}"), size, i)
                wf.add(px.task(consume).options(id=f"c{i}"), p)
        return wf

    px.run(workflow(1 << 18), max_workers=WORKERS, progress=False)  # start the workers
    wf = workflow(n)
    reset_peak()
    t = time.perf_counter()
    result = px.run(wf, max_workers=WORKERS, progress=False)
    wall = time.perf_counter() - t
    assert result[f"c{PRODUCERS - 1}"] == (PRODUCERS - 1) * n
    return wall, peak()


def producers_joblib(n: int) -> tuple[float, int]:
    from joblib import Parallel, delayed
    with Parallel(n_jobs=WORKERS, backend="loky") as parallel:
        parallel(delayed(consume)(a) for a in
                 parallel(delayed(produce)(1 << 18, i) for i in range(PRODUCERS)))
        reset_peak()
        t = time.perf_counter()
        arrays = parallel(delayed(produce)(n, i) for i in range(PRODUCERS))
        sums = parallel(delayed(consume)(a) for a in arrays)
        wall = time.perf_counter() - t
    assert sums[-1] == (PRODUCERS - 1) * n
    return wall, peak()


def producers_dask(n: int) -> tuple[float, int]:
    import dask
    from dask.multiprocessing import get

    def graph(size: int) -> dict[str, Any]:
        g: dict[str, Any] = {}
        for i in range(PRODUCERS):
            g[f"p{i}"] = (produce, size, i)
            g[f"c{i}"] = (consume, f"p{i}")
        return g

    keys = [f"c{i}" for i in range(PRODUCERS)]
    # Without fusion: dask would merge each producer with its consumer into one task, and
    # no array would move at all (0.015 s for 8 x 8 MB), which is not what is measured here.
    with dask.config.set({"num_workers": WORKERS, "optimization.fuse.active": False}):
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(WORKERS) as pool:
            get(graph(1 << 18), keys, pool=pool)
            reset_peak()
            t = time.perf_counter()
            sums = get(graph(n), keys, pool=pool)
            wall = time.perf_counter() - t
    assert sums[-1] == (PRODUCERS - 1) * n
    return wall, peak()


def producers_ray(n: int) -> tuple[float, int]:
    import ray
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             object_store_memory=2 * PRODUCERS * n * 8)
    try:
        p, c = ray.remote(produce), ray.remote(consume)
        ray.get([c.remote(p.remote(1 << 18, i)) for i in range(PRODUCERS)])
        reset_peak()
        t = time.perf_counter()
        sums = ray.get([c.remote(p.remote(n, i)) for i in range(PRODUCERS)])
        wall = time.perf_counter() - t
    finally:
        ray.shutdown()
    assert sums[-1] == (PRODUCERS - 1) * n
    return wall, peak()


def producers_sequential(n: int) -> tuple[float, int]:
    reset_peak()
    t = time.perf_counter()
    sums = [consume(produce(n, i)) for i in range(PRODUCERS)]
    wall = time.perf_counter() - t
    assert sums[-1] == (PRODUCERS - 1) * n
    return wall, peak()


# Engines: chain ------------------------------------------------------------------------

def chain_parexec(n: int) -> tuple[int, int]:
    import gc

    import parexec as px
    with px.Workflow("chain") as wf:
        prev = None
        for i in range(CHAIN):
            prev = wf.add(px.task(step).options(id=f"s{i}"), prev, n)
    gc.collect()
    base = rss()
    reset_peak()
    result = px.run(wf, keep="leaves", progress=False)
    high = peak()
    gc.collect()
    held = rss() - base
    assert result[f"s{CHAIN - 1}"][0] == CHAIN
    return held, high - base


def chain_dask(n: int) -> tuple[int, int]:
    import gc

    from dask.threaded import get
    g: dict[str, Any] = {}
    prev = None
    for i in range(CHAIN):
        g[f"s{i}"] = (step, prev, n)
        prev = f"s{i}"
    gc.collect()
    base = rss()
    reset_peak()
    value = get(g, f"s{CHAIN - 1}", num_workers=WORKERS)
    high = peak()
    gc.collect()
    held = rss() - base
    assert value[0] == CHAIN
    return held, high - base


ENGINES = {
    "producers": {"parexec": producers_parexec, "joblib": producers_joblib,
                  "dask multiprocessing": producers_dask, "ray": producers_ray,
                  "one process": producers_sequential},
    "chain": {"parexec": chain_parexec, "dask threaded": chain_dask},
}
REFERENCE = {"producers": "ray", "chain": "dask threaded"}


def child(case: str, engine: str, n: int) -> None:
    path = os.environ.get("PAREXEC_BENCH_PATH")
    if path:  # ``-m`` put the checkout first on sys.path: the other parexec goes before it
        sys.path.insert(0, path)
    import numpy  # noqa: F401 - imported before any baseline is taken
    figures = ENGINES[case][engine](n)
    print(json.dumps(figures))


def have(module: str) -> bool:
    from importlib.util import find_spec
    return find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 MB arrays")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--before", metavar="DIR", help="also run the parexec found in DIR")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    sizes = {"producers": (MB if args.quick else 8 * MB),  # float64 items: 8 or 64 MB
             "chain": (MB if args.quick else 100 * MB // 8)}
    needs = {"joblib": "joblib", "dask multiprocessing": "dask", "dask threaded": "dask",
             "ray": "ray"}
    plan: list[tuple[str, str, str]] = []  # (case, engine label, parexec path or "")
    for case, engines in ENGINES.items():
        for engine in engines:
            if engine in needs and not have(needs[engine]):
                print(f"{engine}: not installed, left out (pip install -r bench/requirements.txt)")
                continue
            plan.append((case, engine, ""))
            if engine == "parexec" and args.before:
                plan.append((case, "parexec (before)", args.before))
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.reps):
        for case, label, path in plan:
            engine = "parexec" if label.startswith("parexec") else label
            env = dict(os.environ, PAREXEC_BENCH_PATH=path, PYTHONPATH=os.pathsep.join(
                p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
            out = subprocess.run([sys.executable, "-m", "bench.transfer", "--child", case,
                                  engine, str(sizes[case])], capture_output=True, text=True,
                                 env=env, cwd=ROOT, timeout=600)
            if out.returncode:
                print(f"{case} {label} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            samples.setdefault((case, label), []).append(
                tuple(json.loads(out.stdout.strip().splitlines()[-1])))
    render(samples, sizes)
    return 0


def render(samples: dict[tuple[str, str], list[Any]], sizes: dict[str, int]) -> None:
    cols = {"producers": ("wall s", "driver peak RSS MB"),
            "chain": ("held after run MB", "peak above base MB")}
    for case in ENGINES:
        ref = samples.get((case, REFERENCE[case]))
        a, b = cols[case]
        print(f"\n{case} ({sizes[case] * 8 / MB:.0f} MB arrays); ratio to {REFERENCE[case]}")
        print(f"{'engine':<22} {a + ' (median, min-max)':>34} {'ratio':>6} "
              f"{b + ' (median, min-max)':>40} {'ratio':>6}")
        for (c, label), rows in samples.items():
            if c != case:
                continue
            line = f"{label:<22}"
            for k in (0, 1):
                vals = [r[k] for r in rows]
                scale = 1.0 if case == "producers" and k == 0 else 1 / MB
                med = statistics.median(vals) * scale
                rmed = statistics.median(r[k] for r in ref) * scale if ref else 0
                width = 34 if k == 0 else 40
                text = f"{med:.3g} ({min(vals) * scale:.3g}-{max(vals) * scale:.3g})"
                line += f" {text:>{width}} {med / rmed if rmed else float('nan'):>6.2f}"
            print(line)


if __name__ == "__main__":
    raise SystemExit(main())
