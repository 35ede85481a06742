"""Best-effort enrichment (wait="all_settled"): core data always, extras when available.

Optional enrichment services may fail; the group never fails, and the merge step keeps
whatever succeeded.
"""

from __future__ import annotations

import time

import parexec as px


@px.task
def load_customer(cid: int) -> dict[str, object]:
    return {"id": cid, "name": f"customer-{cid}"}


@px.task
def enrich(service: str, customer: dict[str, object], fail: bool = False) -> dict[str, object]:
    time.sleep(0.1)
    if fail:
        raise TimeoutError(f"{service} did not answer")
    return {service: f"{service}-data-for-{customer['id']}"}


@px.task
def merge(customer: dict[str, object], extras: dict[str, px.Outcome]) -> dict[str, object]:
    record = dict(customer)
    for outcome in extras.values():
        if outcome.ok:
            record.update(outcome.value)
    record["missing"] = sorted(k for k, o in extras.items() if not o.ok)
    return record


def main() -> None:
    with px.Workflow("best-effort-enrichment") as wf:
        customer = load_customer(7)
        extras = px.group([enrich("geo", customer), enrich("credit", customer, fail=True),
                           enrich("social", customer)], wait="all_settled", id="extras")
        record = merge(customer, extras)
    result = px.run(wf, progress=False)
    print("record:", result[record])
    print("run status:", result.status)


if __name__ == "__main__":
    main()
