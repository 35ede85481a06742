"""Maps of tiny and long items, and worker state (issue 16), beside joblib, mpire and Ray.

Usage::

    python -m bench.maps                 # every case, 3 repetitions
    python -m bench.maps --quick         # fewer items, 2 repetitions
    python -m bench.maps --only tiny     # tiny | long | state

Cases, all on 2 worker processes (engines started and warmed up before the figure is taken,
except in ``state``, where starting the workers is part of the job):

* ``tiny``: 10,000 and 1,000 items of ``x * x``. joblib ``Parallel`` (auto batching), mpire
  ``WorkerPool.map`` (auto chunking, pool kept alive), parexec ``template.map`` in a workflow
  (``isolation="process"``; the figure includes building the workflow), Ray tasks (left out
  if ray does not import). Figure: microseconds per item.
* ``long``: 16 items of 0.25 s of pure-Python CPU each; serial in the driver, then each
  engine. Figure: the speedup over serial (2.0 is perfect on 2 workers).
* ``state``: a 0.3 s load (pure-Python CPU), then 200 tiny tasks that use it, with fresh
  workers each repetition. mpire ``worker_state`` + ``worker_init`` against parexec
  ``px.worker_cache``. A third row, ``parexec warm``, keeps the workers and asks for a new
  key each repetition: the load without the worker start.

Engines alternate within each repetition, so a noisy neighbour hits them alike. Each row
prints the median, min and max, and the ratio of the median to joblib's and mpire's.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parexec as px  # noqa: E402
from bench.run import alternate, calibrate  # noqa: E402
from bench.tasks import burn  # noqa: E402

WORKERS = 2
LONG_ITEMS, LONG_SECONDS = 16, 0.25
LOAD_SECONDS, STATE_TASKS = 0.3, 200


# Task functions (this module is imported by name in every engine's workers) ---------------

def square(x: int) -> int:
    return x * x


def load_model(n: int, tag: int = 0) -> list[int]:
    """The 0.3 s load: ``n`` is calibrated; ``tag`` makes a new key (the ``warm`` row)."""
    burn(n)
    return list(range(1000))


def use_model(x: int, n: int, tag: int = 0) -> int:
    model = px.worker_cache(load_model, n, tag)
    return model[x % len(model)] + x * x


_LOAD_N = 0  # set in the driver before mpire forks its workers


def mpire_init(worker_state: dict[str, Any]) -> None:
    worker_state["model"] = load_model(_LOAD_N)


def mpire_use(worker_state: dict[str, Any], x: int) -> int:
    model = worker_state["model"]
    return model[x % len(model)] + x * x  # type: ignore[no-any-return]


# Measuring --------------------------------------------------------------------------------

class Row:
    def __init__(self, case: str, engine: str, unit: str, scale: float) -> None:
        self.case, self.engine, self.unit, self.scale = case, engine, unit, scale
        self.samples: list[float] = []

    @property
    def median(self) -> float:
        return statistics.median(self.samples) * self.scale


def have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure leaves Ray out
        return False
    return True


def px_map(fn: Any, items: Any, **kwargs: Any) -> list[Any]:
    with px.Workflow("bench-map", isolation="process") as wf:
        ref = px.task(fn).map(items, **kwargs)
    return px.run(wf, max_workers=WORKERS, progress=False)[ref]  # type: ignore[no-any-return]


# Cases ------------------------------------------------------------------------------------

def bench_tiny(reps: int, quick: bool, ray: Any) -> list[Row]:
    from joblib import Parallel, delayed
    from mpire import WorkerPool
    rows: list[Row] = []
    sizes = (2_000, 500) if quick else (10_000, 1_000)
    with WorkerPool(n_jobs=WORKERS, keep_alive=True) as mpool:
        par = Parallel(n_jobs=WORKERS)
        par(delayed(square)(i) for i in range(100))  # start and warm up every engine
        mpool.map(square, range(100))
        px_map(square, range(100))
        sq_remote = ray.remote(square) if ray is not None else None
        if ray is not None:
            ray.get([sq_remote.remote(i) for i in range(100)])
        for n in sizes:
            items = list(range(n))
            expected = [x * x for x in items]
            case = f"{n:,} items of x*x"
            engines: list[tuple[str, Callable[[], Any]]] = [
                ("joblib Parallel", lambda items=items: par(delayed(square)(x) for x in items)),
                ("mpire WorkerPool.map", lambda items=items: mpool.map(square, items)),
                ("parexec template.map", lambda items=items: px_map(square, items)),
            ]
            if ray is not None:
                engines.append(("ray tasks", lambda items=items: ray.get(
                    [sq_remote.remote(x) for x in items])))
            for name, fn in engines:  # each engine computes the right thing
                assert list(fn()) == expected, name
            new = [Row(case, name, "us/item", 1e6 / n) for name, _ in engines]
            alternate(new, [fn for _, fn in engines], reps)
            rows += new
    return rows


def bench_long(reps: int, quick: bool) -> list[Row]:
    from joblib import Parallel, delayed
    from mpire import WorkerPool
    nitems, each = (8, 0.08) if quick else (LONG_ITEMS, LONG_SECONDS)
    n = calibrate(each)
    items = [n] * nitems
    case = f"{nitems} items of {each} s CPU"
    with WorkerPool(n_jobs=WORKERS, keep_alive=True) as mpool:
        par = Parallel(n_jobs=WORKERS)
        par(delayed(square)(i) for i in range(10))
        mpool.map(square, range(10))
        px_map(square, range(10))
        engines: list[tuple[str, Callable[[], Any]]] = [
            ("serial (driver)", lambda: [burn(x) for x in items]),
            ("joblib Parallel", lambda: par(delayed(burn)(x) for x in items)),
            ("mpire WorkerPool.map", lambda: mpool.map(burn, items)),
            ("parexec template.map", lambda: px_map(burn, items)),
        ]
        rows = [Row(case, name, "s", 1.0) for name, _ in engines]
        alternate(rows, [fn for _, fn in engines], reps)
    return rows


def bench_state(reps: int, quick: bool) -> list[Row]:
    global _LOAD_N
    from mpire import WorkerPool
    ntasks = 50 if quick else STATE_TASKS
    n = _LOAD_N = calibrate(LOAD_SECONDS)
    items = list(range(ntasks))
    expected = [x % 1000 + x * x for x in items]
    tags = itertools.count(1)

    def mpire_cold() -> list[int]:
        with WorkerPool(n_jobs=WORKERS, use_worker_state=True) as pool:
            return pool.map(mpire_use, items, worker_init=mpire_init)  # type: ignore[no-any-return]

    def px_cold() -> float:
        px.shutdown()  # fresh workers, as mpire's; their start is timed
        t = time.perf_counter()
        out = px_map(use_model, items, n=n)
        took = time.perf_counter() - t
        assert out == expected
        return took

    def px_warm() -> list[Any]:
        return px_map(use_model, items, n=n, tag=next(tags))  # a new key: loads again

    assert mpire_cold() == expected
    px_map(square, range(10))
    case = f"{LOAD_SECONDS} s load, {ntasks} tasks"
    engines: list[tuple[str, Callable[[], Any]]] = [
        ("mpire worker_state", mpire_cold),
        ("parexec worker_cache", px_cold),
        ("parexec warm (new key)", px_warm),
    ]
    rows = [Row(case, name, "s", 1.0) for name, _ in engines]
    alternate(rows, [fn for _, fn in engines], reps)
    return rows


# Report -----------------------------------------------------------------------------------

def render(rows: list[Row]) -> str:
    lines = [f"{'case':<28} {'engine':<24} {'median':>9} {'min':>9} {'max':>9} {'unit':<8} "
             f"{'/joblib':>8} {'/mpire':>8} {'speedup':>8}"]
    lines.append("-" * len(lines[0]))
    by_case: dict[str, list[Row]] = {}
    for r in rows:
        by_case.setdefault(r.case, []).append(r)
    for case, group in by_case.items():
        ref = {r.engine.split()[0]: r.median for r in group}
        for r in group:
            vs_joblib = f"{r.median / ref['joblib']:.2f}" if "joblib" in ref else ""
            vs_mpire = f"{r.median / ref['mpire']:.2f}" if "mpire" in ref else ""
            speedup = f"{ref['serial'] / r.median:.2f}" if "serial" in ref else ""
            lines.append(
                f"{case:<28} {r.engine:<24} {fmt(r.median):>9} "
                f"{fmt(min(r.samples) * r.scale):>9} {fmt(max(r.samples) * r.scale):>9} "
                f"{r.unit:<8} {vs_joblib:>8} {vs_mpire:>8} {speedup:>8}")
    return "\n".join(lines)


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}" if x < 10 else f"{x:.1f}"


def machine() -> str:
    import importlib.metadata as md

    import psutil
    versions = []
    for dist in ("joblib", "mpire", "ray", "loky", "cloudpickle"):
        try:
            versions.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    return (f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {sys.version.split()[0]}, parexec {px.__version__}, "
            + ", ".join(versions) + f"; load average {os.getloadavg()[0]:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.maps",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer items, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--only", nargs="+", choices=("tiny", "long", "state"),
                        help="cases to run")
    parser.add_argument("--no-ray", action="store_true", help="leave Ray out")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 3)
    print(f"machine: {machine()}\n{reps} repetitions, {WORKERS} workers\n", flush=True)
    ray = None
    if not args.no_ray and (args.only is None or "tiny" in args.only):
        if have_ray():
            import ray as ray_module
            ray_module.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
                            configure_logging=False)
            ray = ray_module
        else:
            print("ray does not import: left out\n")
    rows: list[Row] = []
    try:
        for name in args.only or ("tiny", "long", "state"):
            t = time.perf_counter()
            new = (bench_tiny(reps, args.quick, ray) if name == "tiny"
                   else bench_long(reps, args.quick) if name == "long"
                   else bench_state(reps, args.quick))
            rows += new
            print(render(new))
            print(f"({name}: {time.perf_counter() - t:.0f}s; load average now "
                  f"{os.getloadavg()[0]:.2f})\n", flush=True)
    finally:
        if ray is not None:
            ray.shutdown()
        px.shutdown()
    return 0


if __name__ == "__main__":
    # Run the functions of ``bench.maps``, not of ``__main__``: workers import them by name,
    # as they would a user's module (a notebook's functions would travel by value).
    from bench import maps
    raise SystemExit(maps.main())
