"""A rate-limited batch: 1,000 items through a dynamic map, at most 8 calls in flight.

The list of items is only known at run time (it comes from a task), so the map expands
then; ``max_concurrent`` keeps the calls under the API's limit, and a named pool shares
that limit with another step that uses the same API.
"""

from __future__ import annotations

import threading
import time

import parexec as px

in_flight = 0
peak = 0
lock = threading.Lock()


@px.task
def list_items(n: int) -> list[int]:
    return list(range(n))


@px.task(retry=px.Retry(2, initial_delay=0.05), pools="api")
def call_api(item: int) -> int:
    global in_flight, peak
    with lock:
        in_flight += 1
        peak = max(peak, in_flight)
    time.sleep(0.005)  # simulated request
    with lock:
        in_flight -= 1
    return item * 2


@px.task
def checksum(values: list[int]) -> int:
    return sum(values)


def main() -> None:
    with px.Workflow("rate-limited-batch", pools={"api": 8}, max_workers=16) as wf:
        doubled = call_api.map(list_items(1000), max_concurrent=8, id="call")
        total = checksum(doubled)
    result = px.run(wf, progress=False)
    print(f"checksum {result[total]} over {len(result[doubled])} items; "
          f"at most {peak} calls in flight; {result.stats.makespan:.1f}s")


if __name__ == "__main__":
    main()
