"""Quick start: generate data, process chunks in worker processes, reduce, summarize.

A small but realistic pipeline: simulated sensor readings are generated in chunks, each chunk
is cleaned and summarized in its own process (pure-Python CPU work, so processes beat the
GIL), the partial summaries are merged, and a report is printed.

Run it with:  python examples/quickstart.py
"""

from __future__ import annotations

import math
import random

import parexec as px

N_CHUNKS = 8
READINGS_PER_CHUNK = 200_000


@px.task
def generate(chunk: int, n: int) -> list[float]:
    """Simulated temperatures with a few sensor glitches (NaN and absurd values)."""
    rng = random.Random(chunk)
    data = [20.0 + 5.0 * math.sin(i / 5000) + rng.gauss(0, 1.5) for i in range(n)]
    for _ in range(n // 1000):
        data[rng.randrange(n)] = rng.choice([float("nan"), 999.0, -273.0])
    return data


@px.task(isolation="process", timeout=120, retry=px.Retry(2, initial_delay=0.5))
def summarize(readings: list[float]) -> dict[str, float]:
    """Drop glitches, then count, sum and sum of squares (mergeable statistics)."""
    clean = [x for x in readings if not math.isnan(x) and -50.0 < x < 60.0]
    total = math.fsum(clean)
    squares = math.fsum(x * x for x in clean)
    return {"n": len(clean), "dropped": len(readings) - len(clean), "sum": total,
            "sumsq": squares, "min": min(clean), "max": max(clean)}


@px.task
def merge(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine the per-chunk statistics into the global ones."""
    n = sum(p["n"] for p in parts)
    mean = math.fsum(p["sum"] for p in parts) / n
    var = math.fsum(p["sumsq"] for p in parts) / n - mean * mean
    return {"readings": n, "dropped": sum(p["dropped"] for p in parts), "mean": mean,
            "std": math.sqrt(max(var, 0.0)), "min": min(p["min"] for p in parts),
            "max": max(p["max"] for p in parts)}


def main() -> None:
    with px.Workflow("sensor-report") as wf:
        chunks = [generate(c, READINGS_PER_CHUNK) for c in range(N_CHUNKS)]
        parts = [summarize(chunk) for chunk in chunks]
        report = merge(parts)

    print(f"workflow {wf.name!r}: {len(wf)} tasks in {len(wf.levels())} levels")
    result = px.run(wf)
    stats = result[report]
    print(f"readings: {stats['readings']:,} kept, {stats['dropped']:,} glitches dropped")
    print(f"mean {stats['mean']:.3f} °C, std {stats['std']:.3f}, "
          f"range {stats['min']:.2f} .. {stats['max']:.2f}")
    print()
    print(result.summary())


if __name__ == "__main__":
    main()
