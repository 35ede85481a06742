"""Multi-source aggregation (wait="all"): fetch from every source, then aggregate.

Three simulated sources are fetched in parallel; the group's value maps each fetch to its
rows, and the report needs all of them (any failure fails the group at once).
"""

from __future__ import annotations

import random
import time

import parexec as px


@px.task(retry=px.Retry(2, initial_delay=0.1))
def fetch(source: str, n: int) -> list[dict[str, float]]:
    time.sleep(0.2)  # simulated network latency
    rng = random.Random(source)
    return [{"source": source, "amount": round(rng.uniform(5, 50), 2)} for _ in range(n)]


@px.task
def aggregate(by_task: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    rows = [row for rows in by_task.values() for row in rows]
    return {"rows": len(rows), "total": round(sum(r["amount"] for r in rows), 2)}


def main() -> None:
    with px.Workflow("multi-source-aggregation") as wf:
        sources = px.group([fetch("crm", 40), fetch("billing", 25), fetch("web", 60)],
                           wait="all", timeout=10, id="all-sources")
        report = aggregate(sources)
    result = px.run(wf, max_workers=3, progress=False)
    print("aggregate:", result[report])
    print(f"makespan {result.stats.makespan:.2f}s for 3 fetches of 0.2s each")


if __name__ == "__main__":
    main()
