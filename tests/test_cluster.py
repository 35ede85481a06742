"""Tests of cluster isolation: tasks on a Dask distributed LocalCluster started here."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import helpers
import psutil
import pytest
from helpers import add, flaky, gone, raise_custom, sleep_pid, sleep_then

import parexec as px

distributed = pytest.importorskip("distributed")


# Task functions defined here are imported by the Dask workers (tests/ is on their path).

def record(path, name, value=None, seconds=0.0):
    """Append ``name`` to the file at ``path`` (one line per execution), then sleep."""
    with open(path, "a") as f:
        f.write(name + "\n")
    time.sleep(seconds)
    return value


def total(*values):
    return sum(values)


def big(mib, tag=0):
    """A fresh ``mib`` MiB value."""
    return bytes([tag % 256]) * (mib * 2**20)


def grow(value, tag):
    """A new value of the same size, computed from ``value``."""
    return bytes([tag % 256]) + value[1:]


def size(value):
    return len(value)


def make_lock():
    return threading.Lock()


def warm_up(client):
    """Run one cluster task per worker thread, so tasks that follow find their child process
    started (a stop may otherwise land before a loaded machine has started the child)."""
    nthreads = sum(client.nthreads().values())
    with px.Workflow("warm", isolation="cluster") as wf:
        for k in range(nthreads):
            wf.add(px.task(sleep_then).options(id=f"w-{k}"), 0.3)
    px.run(wf, cluster=client, progress=False)


def wait_for_file(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    with open(path) as f:
        return int(f.read())


# Two workers with two threads each; they declare CPU=2, so a task with cpus=2 has a worker
# to itself (tests that need one task per worker use that).
@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                       dashboard_address=":0", resources={"CPU": 2})
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
def test_cluster_timeout_stops_only_that_task(client):
    """A cluster task that overruns is marked timed out at once and stopped; no Dask worker
    is restarted, the other task finishes undisturbed, and nothing is left running."""
    workers = set(client.scheduler_info()["workers"])
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
    assert result.tasks["slow"].worker in workers  # the worker it ran on, kept
    assert set(client.scheduler_info()["workers"]) == workers
    deadline = time.monotonic() + 30
    while [k for keys in client.processing().values() for k in keys]:  # the stop lands
        assert time.monotonic() < deadline, client.processing()
        time.sleep(0.05)


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
def test_process_death_fails_only_the_task_it_ran(client, tmp_path):
    """The process running a cluster task dies: that task fails with WorkerCrashed (retried
    by its policy, as process tasks are); the Dask worker and the other task are untouched."""
    from helpers import die_once
    with px.Workflow("c") as wf:
        wf.add(px.task(die_once).options(id="dies", isolation="cluster", on_error="ignore"),
               str(tmp_path / "died"))
        wf.add(px.task(die_once).options(id="retried", isolation="cluster", retry=1),
               str(tmp_path / "died-2"))
        wf.add(px.task(sleep_pid).options(id="other", isolation="cluster"), 1.0)
    workers = set(client.scheduler_info()["workers"])
    result = px.run(wf, cluster=client, progress=False)
    assert isinstance(result.errors["dies"], px.WorkerCrashed)
    assert result["retried"] == "survived" and result.tasks["retried"].attempts == 2
    assert result.tasks["other"].status == "succeeded"
    assert set(client.scheduler_info()["workers"]) == workers  # no Dask worker restarted


@pytest.mark.timeout(120)
def test_cpus_become_dask_worker_resources(client):
    """When workers declare a CPU resource, a task's cpus are passed to Dask: cpus=2 tasks
    never share a 2-CPU worker, cpus=1 tasks do."""
    with px.Workflow("r", isolation="cluster") as wf:
        for k in range(4):
            wf.add(px.task(sleep_then).options(id=f"big-{k}", cpus=2), 0.5)
        for k in range(4):
            wf.add(px.task(sleep_then).options(id=f"small-{k}", cpus=1,
                                               after=[f"big-{j}" for j in range(4)]), 0.5)
    result = px.run(wf, cluster=client, progress=False)

    def overlapping(prefix):
        spans = {}
        for key, t in result.tasks.items():
            if key.startswith(prefix):
                spans.setdefault(t.worker, []).append((t.started_at, t.finished_at))
        pairs = 0
        for row in spans.values():
            row.sort()
            pairs += sum(row[k + 1][0] < row[k][1] - 0.05 for k in range(len(row) - 1))
        return pairs

    assert overlapping("big-") == 0
    assert overlapping("small-") >= 1


# Stopping one cluster task hits only that task (issue 21 items 1, 4 and 7) -----------------

@pytest.mark.timeout(120)
def test_stops_spare_siblings_and_results_on_the_same_worker(client, tmp_path):
    """Repeated timeouts on a worker: its sibling tasks run once (attempts=1, side effect
    once), upstream results it holds are not recomputed, and nothing fails with KilledWorker."""
    log = str(tmp_path / "runs.log")
    with px.Workflow("stops", isolation="cluster") as wf:
        ups = [wf.add(px.task(record).options(id=f"up-{k}"), log, f"up-{k}", k)
               for k in range(4)]
        for k in range(3):
            wf.add(px.task(record).options(id=f"sib-{k}", after=ups), log, f"sib-{k}", k, 5.0)
        slows = [wf.add(px.task(sleep_pid).options(id=f"slow-{k}", timeout=0.5,
                                                  on_error="ignore", after=ups), 60)
                 for k in range(6)]
        wf.add(px.task(total).options(id="sum", after=slows), *ups)
    result = px.run(wf, cluster=client, progress=False)
    with open(log) as f:
        lines = sorted(f.read().split())
    assert lines == sorted([f"up-{k}" for k in range(4)] + [f"sib-{k}" for k in range(3)])
    assert all(result.tasks[f"sib-{k}"].attempts == 1 for k in range(3))
    assert {result.tasks[f"slow-{k}"].status for k in range(6)} == {"timed_out"}
    assert result["sum"] == 6, result.errors


@pytest.mark.timeout(120)
def test_timeout_kills_the_processes_a_cluster_task_started(client, tmp_path):
    """A cluster task running `sleep 45` that times out: the sleep is gone too."""
    from helpers import run_sleep
    pidfile = str(tmp_path / "sleep.pid")
    warm_up(client)
    with px.Workflow("tree") as wf:
        wf.add(px.task(run_sleep).options(id="sleeper", isolation="cluster", timeout=3.0,
                                          on_error="ignore"), pidfile, 45)
    result = px.run(wf, cluster=client, progress=False)
    assert result.tasks["sleeper"].status == "timed_out"
    pid = wait_for_file(pidfile)
    try:
        assert gone(pid, 20), "the task's `sleep 45` survived its timeout"
    finally:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


@pytest.mark.timeout(120)
def test_a_group_decision_stops_the_losing_cluster_task_alone(client, tmp_path):
    """wait="any": once one cluster member succeeds (after the other started a `sleep`),
    the other is stopped: its `sleep` is gone and no Dask worker is restarted."""
    from helpers import run_sleep
    pidfile = str(tmp_path / "sleep.pid")
    warm_up(client)
    workers = set(client.scheduler_info()["workers"])
    with px.Workflow("race") as wf:
        loser = wf.add(px.task(run_sleep).options(id="loser", isolation="cluster"), pidfile, 45)
        winner = wf.add(px.task(wait_for_file).options(id="winner", isolation="cluster"),
                        pidfile)
        g = px.group([loser, winner], wait="any", id="first")
    result = px.run(wf, cluster=client, progress=False)
    pid = result[g]  # the winner returns once the loser's `sleep` is running
    assert result.tasks["loser"].status == "cancelled"
    try:
        assert gone(pid, 20), "the losing task's `sleep 45` survived"
    finally:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    assert set(client.scheduler_info()["workers"]) == workers


@pytest.mark.timeout(120)
def test_workers_without_a_nanny_get_their_task_stopped(tmp_path):
    """LocalCluster(processes=False): a timed-out cluster task is really stopped (its `sleep`
    is gone and the run does not wait for it)."""
    from helpers import run_sleep
    pidfile = str(tmp_path / "sleep.pid")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        warm_up(c)
        with px.Workflow("nonanny") as wf:
            wf.add(px.task(run_sleep).options(id="sleeper", isolation="cluster", timeout=3.0,
                                              on_error="ignore"), pidfile, 45)
            wf.add(px.task(add).options(id="other", isolation="cluster"), 1, 2)
        t0 = time.monotonic()
        result = px.run(wf, cluster=c, progress=False)
        assert time.monotonic() - t0 < 30
        assert result.tasks["sleeper"].status == "timed_out" and result["other"] == 3
        pid = wait_for_file(pidfile)
        try:
            assert gone(pid, 20), "the task's `sleep 45` survived its timeout"
        finally:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


# Start times and workers (issue 21 items 2 and 16) ---------------------------------------

@pytest.mark.timeout(120)
def test_cluster_timeout_counts_from_the_start_on_a_worker(client):
    """Twelve 0.5 s tasks that each need a whole worker (two workers), under a 2.5 s
    timeout: time spent queued in Dask (up to 2.5 s) does not count, so none times out."""
    warm_up(client)
    with px.Workflow("queued", isolation="cluster") as wf:
        for k in range(12):
            wf.add(px.task(sleep_then).options(id=f"t-{k}", cpus=2, timeout=2.5), 0.5, k)
    result = px.run(wf, cluster=client, progress=False)
    assert {t.status for t in result.tasks.values()} == {"succeeded"}, result.errors
    assert all(t.attempts == 1 for t in result.tasks.values())


@pytest.mark.timeout(120)
def test_cluster_tasks_name_the_worker_that_ran_them(client):
    """Two tasks on two workers: TaskRun.worker holds two distinct Dask worker addresses."""
    with px.Workflow("where", isolation="cluster") as wf:
        for k in range(2):
            wf.add(px.task(sleep_then).options(id=f"t-{k}", cpus=2), 0.5)
    result = px.run(wf, cluster=client, progress=False)
    workers = {t.worker for t in result.tasks.values()}
    assert len(workers) == 2 and workers <= set(client.scheduler_info()["workers"])


# Pickling (issue 21 items 5 and 14) ------------------------------------------------------

@pytest.mark.timeout(120)
def test_unpicklable_cluster_result_fails_that_task_alone(client, caplog):
    """A cluster task returning a lock fails alone with PicklingError naming it; on_error is
    honoured and an independent task succeeds."""
    from helpers import return_unpicklable
    with px.Workflow("unpicklable") as wf:
        wf.add(px.task(return_unpicklable).options(id="lock", isolation="cluster",
                                                   on_error="ignore"))
        wf.add(px.task(sleep_then).options(id="other", isolation="cluster"), 0.5, "ok")
    result = px.run(wf, cluster=client, progress=False)
    err = result.errors["lock"]
    assert isinstance(err, px.PicklingError) and "'lock'" in str(err)
    assert result["other"] == "ok" and result.status == "partial"
    assert "scheduler failed" not in caplog.text


@pytest.mark.timeout(120)
def test_unpicklable_argument_of_a_cluster_task_names_it(client, caplog):
    """An unpicklable value passed to a cluster task: PicklingError naming the task, and no
    ERROR logs from Dask."""
    with px.Workflow("badarg") as wf:
        lock = wf.add(px.task(make_lock).options(id="make"))
        wf.add(px.task(add).options(id="remote", isolation="cluster", on_error="ignore"),
               lock, 1)
    with caplog.at_level(logging.INFO):
        result = px.run(wf, cluster=client, progress=False)
    err = result.errors["remote"]
    assert isinstance(err, px.PicklingError) and "'remote'" in str(err)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# Values stay on the cluster unless the driver wants them (issue 21 item 8) ---------------

@pytest.mark.timeout(120)
def test_values_not_wanted_stay_on_the_cluster(client):
    """Four 60 MiB results passed between cluster tasks, not kept (keep="leaves") and
    consumed only on the cluster, never grow the driver by their size (peak RSS, VmHWM)."""
    from parexec._limits import PeakMeter
    with px.Workflow("big", isolation="cluster") as wf:
        prev = wf.add(px.task(big).options(id="big-0"), 60)
        for k in range(1, 4):
            prev = wf.add(px.task(grow).options(id=f"big-{k}"), prev, k)
        wf.add(px.task(size).options(id="size"), prev)
    meter = PeakMeter()
    meter.reset()
    rss = psutil.Process().memory_info().rss
    result = px.run(wf, cluster=client, progress=False, keep="leaves")
    peak = meter.peak()
    if peak is None:
        pytest.skip("no VmHWM on this system")
    assert result["size"] == 60 * 2**20
    grown = peak - rss
    assert grown < 30 * 2**20, f"the driver grew by {grown / 2**20:.0f} MiB"


# Bad cluster= values (issue 21 item 13, issue 12 item 19) --------------------------------

@pytest.mark.parametrize("value, error", [(42, px.TaskOptionError),
                                          ("not an address", px.TaskOptionError),
                                          ("tcp://host:notaport", px.TaskOptionError),
                                          ("foo://host:1", px.TaskOptionError)])
def test_bad_cluster_values_name_the_value(value, error):
    """cluster= that is neither a Client nor a well-formed address: an error naming it."""
    with px.Workflow("bad") as wf:
        wf.add(px.task(add).options(id="remote", isolation="cluster"), 1, 2)
    with pytest.raises(error, match=f"cluster={value!r}"):
        px.run(wf, cluster=value, progress=False)


@pytest.mark.timeout(60)
def test_unreachable_cluster_fails_within_the_connect_timeout():
    """An address nobody listens on fails within dask's connect timeout (set to 1 s) with a
    ParexecError naming the address."""
    import dask
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    with px.Workflow("far") as wf:
        wf.add(px.task(add).options(id="remote", isolation="cluster"), 1, 2)
    t0 = time.monotonic()
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(px.ParexecError, match=address):
            px.run(wf, cluster=address, progress=False)
    assert time.monotonic() - t0 < 15


@pytest.mark.timeout(60)
def test_pool_reports_start_then_value_and_release_frees_the_result(client):
    """ClusterPool on its own: Started (with the worker) then the Done report on the
    attempt's queue; release(index) lets Dask drop the result it held."""
    from queue import SimpleQueue

    from parexec._cluster import ClusterPool
    from parexec._messages import Done, Started

    class Attempt:  # what the pool reads of the scheduler's _Attempt (hashed by identity)
        index, number, task_id, cpus, memory_limit = 0, 1, "unit", 1.0, None
        handle = worker = None
        t_start = t_end = 0.0

        def __init__(self):
            self.queue = SimpleQueue()

    pool = ClusterPool(client, "parexec-unit-test")
    try:
        attempt = Attempt()
        pool.submit(attempt, add, (1, 2), {})
        started = attempt.queue.get(timeout=30)
        assert type(started) is Started
        assert started.worker in client.scheduler_info()["workers"]
        done = attempt.queue.get(timeout=30)
        assert type(done) is Done
        assert (done.ok, done.value, done.worker) == (True, 3, started.worker)
        key = pool.futures[0].key

        def held():
            return client.run_on_scheduler(
                lambda dask_scheduler: key in dask_scheduler.tasks)

        assert held()
        attempt.handle = None  # the scheduler drops finished attempts
        pool.release(0)
        deadline = time.monotonic() + 30
        while held():
            assert time.monotonic() < deadline, "Dask still holds the released result"
            time.sleep(0.05)
    finally:
        pool.shutdown()


@pytest.mark.timeout(60)
def test_closed_client_is_an_error_naming_it(client):
    """A distributed.Client that was closed: a ParexecError saying so, before anything runs."""
    ran = []
    closed = distributed.Client(client.scheduler.address, set_as_default=False)
    closed.close()
    with px.Workflow("closed") as wf:
        wf.add(ran.append, 1)
        wf.add(px.task(add).options(id="remote", isolation="cluster"), 1, 2)
    with pytest.raises(px.ParexecError, match="closed"):
        px.run(wf, cluster=closed, progress=False)
    assert ran == []


def test_unpicklable_literal_argument_of_a_cluster_task_fails_before_anything_runs(client,
                                                                                   tmp_path):
    """A cluster task's literal argument that cannot be pickled is a PicklingError from run()
    naming the task, before any task ran (API section 7)."""
    import threading
    marker = tmp_path / "ran"
    with px.Workflow("lit") as wf:
        up = wf.add(px.task(lambda: marker.write_text("x")).options(id="up"))
        wf.add(px.task(add).options(id="remote", isolation="cluster"), up, threading.Lock())
    with pytest.raises(px.PicklingError, match="'remote' runs in a cluster worker"):
        px.run(wf, cluster=client, progress=False)
    assert not marker.exists()


def _make_list():
    return list(range(1000))


def _sum_list(xs):
    return sum(xs)


def test_sized_cluster_task_gets_its_input_under_keep_leaves(client):
    """A cluster task whose timeout= is a callable of its input receives that input even
    when keep="leaves" leaves values on the cluster (the driver fetches what it evaluates)."""
    with px.Workflow("sized") as wf:
        xs = wf.add(px.task(_make_list).options(id="make", isolation="cluster"))
        used = wf.add(px.task(_sum_list).options(id="use", isolation="cluster",
                                                 timeout=lambda xs: 5.0 + len(xs) / 1000), xs)
    result = px.run(wf, cluster=client, keep="leaves", progress=False)
    assert result[used] == sum(range(1000))
