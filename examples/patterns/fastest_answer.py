"""Fastest answer (wait="race"): several strategies, the first to finish wins.

Three solvers attack the same problem in worker processes; whichever finishes first
decides, and the others are stopped at once.
"""

from __future__ import annotations

import time

import parexec as px


@px.task(isolation="process")
def solve(strategy: str, seconds: float) -> str:
    time.sleep(seconds)  # stands for a search of unknown length
    return f"{strategy} found the answer in {seconds:.1f}s"


def main() -> None:
    with px.Workflow("fastest-answer") as wf:
        winner = px.group([solve("exhaustive", 30.0), solve("greedy", 0.4),
                           solve("annealing", 10.0)], wait="race", id="race")
    t0 = time.monotonic()
    result = px.run(wf, max_workers=3, progress=False)
    print(result[winner])
    print(f"run took {time.monotonic() - t0:.1f}s;",
          {k: t.status for k, t in result.tasks.items() if k.startswith("solve")})


if __name__ == "__main__":
    main()
