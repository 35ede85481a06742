"""Redundant sources (wait="any"): ask several mirrors, keep the first good answer.

The primary mirror is down, the second is slow, the third answers quickly: the group
resolves with the first success, and the slow mirror's process is stopped.
"""

from __future__ import annotations

import time

import parexec as px


@px.task(isolation="process")
def query(mirror: str, delay: float, up: bool = True) -> str:
    time.sleep(delay)
    if not up:
        raise ConnectionError(f"{mirror} is unreachable")
    return f"price=42.0 (from {mirror})"


def main() -> None:
    with px.Workflow("redundant-sources") as wf:
        answers = [query("primary", 0.05, up=False), query("eu-mirror", 30.0),
                   query("us-mirror", 0.3)]
        price = px.group(answers, wait="any", id="first-answer")
        px.task(print)(price)
    t0 = time.monotonic()
    result = px.run(wf, max_workers=3, progress=False)
    print(f"answered in {time.monotonic() - t0:.1f}s; statuses:",
          {k: v.status for k, v in result.tasks.items() if k.startswith("query")})


if __name__ == "__main__":
    main()
