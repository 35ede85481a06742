"""Store benchmarks (issue 12 item 10): what history costs a run that uses the store.

``python bench/store.py durations --runs 200 --runs 1000`` records that many runs of a
100-task workflow (each task a new version every run, with a 10 KB value: the worst case
for history, since no record replaces another), then times ``Store.durations()`` in a fresh
interpreter. ``python bench/store.py rss`` records 12 versions of one task with a 50 MB
value, then resumes the latest version in a fresh interpreter and reports the driver's RSS
before and after the resume, and its peak.

Both only use ``Store(path)``, ``record``, ``close``, ``durations`` and ``px.run``, so the
same script measures an older checkout: ``PYTHONPATH=/path/to/old/checkout python
bench/store.py ...``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import types

import parexec as px

HERE = os.path.dirname(os.path.abspath(__file__))


def fill(path: str, runs: int, tasks: int = 10, value_bytes: int = 100_000) -> None:
    """Record ``runs`` runs of ``tasks`` tasks, each run a new version of every task."""
    from parexec._store import Store
    store = Store(path)
    value = b"v" * value_bytes
    for r in range(runs):
        for t in range(tasks):
            tr = types.SimpleNamespace(
                id=f"t{t}", status="succeeded", attempts=1, started_at=0.0, finished_at=1.0,
                duration=1.0 + r, worker="w", peak_memory=1000, value=value, error=None)
            store.record("bench", tr, f"{r:08d}{t:04d}")
    store.close()


def time_durations(path: str) -> float:
    """Seconds for one ``durations()`` call in a fresh interpreter."""
    code = ("import sys, time; from parexec._store import Store; s = Store(sys.argv[1]); "
            "t = time.perf_counter(); d = s.durations('bench'); "
            "print(time.perf_counter() - t, len(d))")
    # len(d) is printed too, so a store that found nothing cannot pass for a fast one
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(path)).stdout.split()
    assert int(out[1]) > 0, out
    return float(out[0])


def big(version: int) -> bytes:
    """A 50 MB result that differs per version."""
    return bytes([version]) * 50_000_000


def rss_workflow(version: int) -> px.Workflow:
    with px.Workflow("rss") as wf:
        wf.add(px.task(big).options(id="big"), version)
    return wf


def resume_child(path: str, version: int) -> None:
    """In a fresh interpreter: resume ``version``; print RSS (MB) before the run, after it
    (the result holding the one value it served), and the peak."""
    import psutil
    me = psutil.Process()
    before = me.memory_info().rss / 2**20
    result = px.run(rss_workflow(version), store=path, resume=True, progress=False)
    assert result.tasks["big"].status == "cached", result.tasks["big"].status
    after = me.memory_info().rss / 2**20
    # VmHWM, not ru_maxrss: Linux keeps the parent's ru_maxrss across fork and exec.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    print(f"{before:.0f} {after:.0f} {peak:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("durations")
    d.add_argument("--runs", type=int, action="append")
    d.add_argument("--repeat", type=int, default=5)
    d.add_argument("--tasks", type=int, default=100)
    d.add_argument("--value-bytes", type=int, default=10_000)
    sub.add_parser("rss")
    child = sub.add_parser("resume-child")
    child.add_argument("path")
    child.add_argument("version", type=int)
    args = parser.parse_args()
    print(f"parexec from {os.path.dirname(px.__file__)}")
    if args.what == "resume-child":
        resume_child(args.path, args.version)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.what == "durations":
            for runs in args.runs or [200, 1000]:
                path = os.path.join(tmp, f"d{runs}.db")
                t0 = time.perf_counter()
                fill(path, runs, args.tasks, args.value_bytes)
                filled = time.perf_counter() - t0
                times = sorted(time_durations(path) for _ in range(args.repeat))
                size = os.path.getsize(path) / 1e6
                print(f"{runs:5d} runs ({size:.0f} MB, recorded in {filled:.1f} s): "
                      f"durations() median {times[len(times) // 2] * 1e3:.1f} ms "
                      f"(min {times[0] * 1e3:.1f}, max {times[-1] * 1e3:.1f})")
        else:
            path = os.path.join(tmp, "rss.db")
            for version in range(12):
                px.run(rss_workflow(version), store=path, progress=False)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "resume-child",
                                  path, "11"], capture_output=True, text=True, check=True,
                                 cwd=HERE).stdout.split()
            print(f"12 versions of a 50 MB result; resuming one: RSS {out[-3]} MB before the "
                  f"run, {out[-2]} MB after, peak {out[-1]} MB")


if __name__ == "__main__":
    main()
