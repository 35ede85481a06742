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
                                       dashboard_address=":0")
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


@pytest.mark.timeout(120)
def test_worker_loss_retries_only_the_task_it_ran(client, tmp_path):
    """A worker process that dies under a task: Dask reruns that task on a fresh worker; the
    task on the other worker is not touched."""
    from helpers import die_once
    with px.Workflow("c") as wf:
        wf.add(px.task(die_once).options(id="dies", isolation="cluster"),
               str(tmp_path / "died"))
        wf.add(px.task(sleep_pid).options(id="other", isolation="cluster"), 1.0)
    result = px.run(wf, cluster=client, progress=False)
    assert result["dies"] == "survived"
    assert result.tasks["other"].status == "succeeded"


@pytest.mark.timeout(120)
def test_cpus_become_dask_worker_resources():
    """When workers declare a CPU resource, a task's cpus are passed to Dask: two cpus=2
    tasks never share a 2-CPU worker, two cpus=1 tasks do."""
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                       dashboard_address=":0", resources={"CPU": 2})
    try:
        with distributed.Client(cluster) as c:
            with px.Workflow("r", isolation="cluster") as wf:
                for k in range(2):
                    wf.add(px.task(sleep_then).options(id=f"big-{k}", cpus=2), 0.5)
                for k in range(2):
                    wf.add(px.task(sleep_then).options(id=f"small-{k}", cpus=1,
                                                       after=["big-0", "big-1"]), 0.5)
            result = px.run(wf, cluster=c, progress=False)
    finally:
        cluster.close()
    t = result.tasks
    # A cluster task's started_at is when it was handed to Dask, so judge by completions:
    # the two big tasks ran one after the other, the two small ones side by side.
    bigs_done = max(t["big-0"].finished_at, t["big-1"].finished_at) - result.started_at
    assert bigs_done >= 0.95
    smalls = [t["small-0"], t["small-1"]]
    assert max(s.finished_at for s in smalls) - min(s.started_at for s in smalls) < 0.95
