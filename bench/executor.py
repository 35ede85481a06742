"""``px.Executor`` beside the executors it replaces (issue 20).

Usage::

    python -m bench.executor             # every case, 5 repetitions
    python -m bench.executor --quick     # fewer tasks, 2 repetitions

Engines, each with 2 worker processes, started and warmed up before any figure is taken:
``concurrent.futures.ProcessPoolExecutor``, loky's ``get_reusable_executor``, pebble's
``ProcessPool`` (its ``schedule`` is its submit) and ``px.Executor``; joblib ``Parallel``
joins the map case.

Cases:

* ``noop burst``: submit N no-op calls, then wait for all. Figure: microseconds per task
  (the engine's throughput overhead).
* ``noop round trip``: submit one no-op and wait for it, N times. Figure: microseconds per
  task (latency).
* ``10 ms tasks``: N calls of ``time.sleep(0.01)`` submitted at once. Figure: microseconds
  per task beyond the ideal ``N * 10 ms / 2``.
* ``map tiny``: ``map`` of 10,000 items of ``x * x`` (each engine's own ``map``; the stdlib
  and loky with ``chunksize=1``, their default, and with ``chunksize=500``; pebble with
  ``chunksize=500``). Figure: microseconds per item.

Engines alternate within each repetition, so a noisy neighbour hits them alike. Each row
prints the median, min and max, and the ratio of the median to the reference (``*``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parexec as px  # noqa: E402

WORKERS = 2


# Task functions (imported by name in every engine's workers) ------------------------------

def noop() -> None:
    return None


def square(x: int) -> int:
    return x * x


def nap() -> None:
    time.sleep(0.01)


# Measuring --------------------------------------------------------------------------------

class Row:
    def __init__(self, case: str, engine: str, scale: float, offset: float = 0.0,
                 ref: bool = False) -> None:
        self.case, self.engine, self.scale, self.offset, self.ref = case, engine, scale, \
            offset, ref
        self.samples: list[float] = []

    def stat(self, f: Callable[[list[float]], float]) -> float:
        return (f(self.samples) - self.offset) * self.scale


def alternate(rows: list[Row], runners: list[Callable[[], Any]], reps: int) -> None:
    for _ in range(reps):
        for row, runner in zip(rows, runners, strict=True):
            gc.collect()
            t = time.perf_counter()
            runner()
            row.samples.append(time.perf_counter() - t)


def burst(submit: Callable[..., Any], n: int, fn: Any = noop) -> Callable[[], Any]:
    def run() -> None:
        fs = [submit(fn) for _ in range(n)]
        for f in fs:
            f.result()
    return run


def round_trip(submit: Callable[..., Any], n: int) -> Callable[[], Any]:
    def run() -> None:
        for _ in range(n):
            submit(noop).result()
    return run


def engines() -> list[tuple[str, Any, Callable[..., Any]]]:
    """(name, executor, submit) of every engine, started and warmed up."""
    from loky import get_reusable_executor
    out: list[tuple[str, Any, Callable[..., Any]]] = []
    ppe = cf.ProcessPoolExecutor(WORKERS)
    out.append(("ProcessPoolExecutor", ppe, ppe.submit))
    lk = get_reusable_executor(WORKERS)
    out.append(("loky reusable", lk, lk.submit))
    try:
        from pebble import ProcessPool
        pb = ProcessPool(WORKERS)
        out.append(("pebble ProcessPool", pb, pb.schedule))
    except ImportError:
        print("pebble is not installed: left out (pip install pebble)")
    ex = px.Executor(max_workers=WORKERS)
    out.append(("px.Executor", ex, ex.submit))
    for _, _, submit in out:
        burst(submit, 50)()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 2 if args.quick else 5
    n_noop, n_trip, n_nap, n_map = (500, 200, 50, 2_000) if args.quick else \
        (2_000, 500, 200, 10_000)
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}; "
          f"{WORKERS} workers; {reps} repetitions")
    engs = engines()
    rows: list[Row] = []
    cases: list[tuple[str, float, float, Callable[[Callable[..., Any]], Callable[[], Any]]]] = [
        (f"noop burst ({n_noop})", 1e6 / n_noop, 0.0, lambda s: burst(s, n_noop)),
        (f"noop round trip ({n_trip})", 1e6 / n_trip, 0.0, lambda s: round_trip(s, n_trip)),
        (f"10 ms tasks ({n_nap})", 1e6 / n_nap, n_nap * 0.01 / WORKERS,
         lambda s: burst(s, n_nap, nap)),
    ]
    for case, scale, offset, make in cases:
        new = [Row(case, name, scale, offset, ref=name == "ProcessPoolExecutor")
               for name, _, _ in engs]
        alternate(new, [make(submit) for _, _, submit in engs], reps)
        rows += new
    items = list(range(n_map))
    expected = [x * x for x in items]
    by_name = {name: ex for name, ex, _ in engs}
    from joblib import Parallel, delayed
    par = Parallel(n_jobs=WORKERS)
    par(delayed(square)(i) for i in range(100))
    maps: list[tuple[str, Callable[[], Any]]] = [
        ("joblib Parallel", lambda: par(delayed(square)(x) for x in items)),
        ("ProcessPoolExecutor map", lambda: list(by_name["ProcessPoolExecutor"].map(
            square, items))),
        ("ProcessPoolExecutor map chunksize=500", lambda: list(
            by_name["ProcessPoolExecutor"].map(square, items, chunksize=500))),
        ("loky map chunksize=500", lambda: list(by_name["loky reusable"].map(
            square, items, chunksize=500))),
        ("px.Executor map", lambda: list(by_name["px.Executor"].map(square, items))),
    ]
    if "pebble ProcessPool" in by_name:
        maps.insert(4, ("pebble map chunksize=500", lambda: list(
            by_name["pebble ProcessPool"].map(square, items, chunksize=500).result())))
    for name, fn in maps:
        assert list(fn()) == expected, name
    new = [Row(f"map tiny ({n_map:,} items)", name, 1e6 / n_map, ref=name == "joblib Parallel")
           for name, _ in maps]
    alternate(new, [fn for _, fn in maps], reps)
    rows += new
    case = None
    for row in rows:
        if row.case != case:
            case = row.case
            ref = next(r for r in rows if r.case == case and r.ref)
            print(f"\n{case}: microseconds per task (per item for maps)")
        median = row.stat(statistics.median)
        ratio = median / ref.stat(statistics.median)
        print(f"  {row.engine:<40}{'*' if row.ref else ' '} median {median:9.1f}"
              f"  min {row.stat(min):9.1f}  max {row.stat(max):9.1f}  x{ratio:5.2f}")
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    for name, ex, _ in engs:
        if name == "pebble ProcessPool":
            ex.close()
            ex.join()
        elif name != "loky reusable":
            ex.shutdown()
    px.shutdown()


if __name__ == "__main__":
    # Run the functions of ``bench.executor``, not of ``__main__``: every engine's workers
    # import them by name, as they would a user's module (``python -m`` makes this module
    # ``__main__``, whose functions cloudpickle-based engines would send by value with
    # every task while ProcessPoolExecutor's forked workers already have them).
    from bench import executor
    executor.main()
