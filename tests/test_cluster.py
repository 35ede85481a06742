"""Tests of cluster isolation: tasks on a Dask distributed LocalCluster started here."""

from __future__ import annotations

import time

import pytest

import parexec as px
import helpers
from helpers import add, flaky, raise_custom, sleep_pid, sleep_then

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.mark.timeout(120)
def test_cluster_tasks_chain_on_the_cluster_and_feed_local_tasks(client):
    """Cluster tasks pass data as Dask futures; a local task receives the value; errors keep
    their type and remote frames."""
    with px.Workflow("c") as wf:
        a = wf.add(px.task(add).options(id="a", isolation="cluster"), 1, 2)
        b = wf.add(px.task(add).options(id="b", isolation="cluster"), a, 10)
        local = wf.add(px.task(add).options(id="local"), b, 100)
        wf.add(px.task(raise_custom).options(id="bad", isolation="cluster", on_error="ignore"))
    result = px.run(wf, cluster=client, progress=False)
    assert (result[a], result[b], result[local]) == (3, 13, 113)
    err = result.errors["bad"]
    assert type(err) is helpers.CustomError and "inner_raise" in result.tasks["bad"].traceback


@pytest.mark.timeout(120)
def test_cluster_timeout_restarts_only_that_worker(client):
    """A cluster task that overruns is marked timed out at once and its worker restarted;
    a task on the other worker finishes undisturbed."""
    with px.Workflow("c") as wf:
        wf.add(px.task(sleep_pid).options(id="slow", isolation="cluster", timeout=1.0,
                                          on_error="ignore"), 60)
        wf.add(px.task(sleep_pid).options(id="sibling", isolation="cluster"), 2.5)
    t0 = time.monotonic()
    result = px.run(wf, cluster=client, progress=False)
    assert time.monotonic() - t0 < 30
    assert result.tasks["slow"].status == "timed_out"
    assert result.tasks["sibling"].status == "succeeded"
    assert result.tasks["sibling"].attempts == 1
    deadline = time.monotonic() + 30
    while len(client.scheduler_info()["workers"]) < 2:  # the nanny started a fresh worker
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert not [k for keys in client.processing().values() for k in keys]  # nothing running


@pytest.mark.timeout(120)
def test_retries_named_pools_and_address_string(client, tmp_path):
    """Retries and named pools apply to cluster tasks; an address string opens a client."""
    with px.Workflow("c", pools={"api": 1}) as wf:
        wf.add(px.task(flaky).options(id="flaky", isolation="cluster",
                                      retry=px.Retry(2, initial_delay=0)),
               str(tmp_path / "count"), 1)
        for k in range(3):
            wf.add(px.task(sleep_then).options(id=f"api-{k}", isolation="cluster",
                                               pools="api"), 0.3)
    result = px.run(wf, cluster=client.scheduler.address, progress=False)
    assert result.tasks["flaky"].attempts == 2 and result.ok
    spans = sorted((t.started_at, t.finished_at) for k, t in result.tasks.items()
                   if k.startswith("api-"))
    assert all(spans[k][1] <= spans[k + 1][0] + 1e-3 for k in range(2))


def test_cluster_task_without_cluster_is_an_error_before_running():
    """isolation='cluster' with no cluster= fails validation; nothing runs."""
    ran = []
    with px.Workflow("c") as wf:
        wf.add(ran.append, 1)
        wf.add(px.task(add).options(id="remote", isolation="cluster"), 1, 2)
    with pytest.raises(px.WorkflowError, match="'remote'.*cluster="):
        px.run(wf, progress=False)
    assert ran == []
