"""Nested groups: a group can be a member of another group.

Two regions each ask redundant replicas (any); the report needs both regions (all).
"""

from __future__ import annotations

import time

import parexec as px


@px.task
def read(replica: str, delay: float, ok: bool = True) -> str:
    time.sleep(delay)
    if not ok:
        raise OSError(f"{replica} failed")
    return f"data@{replica}"


def main() -> None:
    with px.Workflow("nested-groups") as wf:
        eu = px.group([read("eu-1", 0.1, ok=False), read("eu-2", 0.2)], wait="any", id="eu")
        us = px.group([read("us-1", 0.15), read("us-2", 0.3)], wait="any", id="us")
        both = px.group([eu, us], wait="all", id="regions")
        report = px.task(lambda d: " + ".join(f"{k}: {v}" for k, v in sorted(d.items())))(both)
    result = px.run(wf, max_workers=4, progress=False)
    print(result[report])


if __name__ == "__main__":
    main()
