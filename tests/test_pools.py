"""Tests of parexec._pools: daemon threads, reusable process workers, crashes, kills."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time

import helpers
import psutil
import pytest
from helpers import pid, sleep_pid

import parexec as px
from parexec import _pools, _processpool


def run_one(fn, *args, **options):
    with px.Workflow("one", isolation="process") as wf:
        wf.add(px.task(fn).options(id="t", **options), *args)
    return px.run(wf, check=False, progress=False)


def test_process_workers_are_reused_across_runs():
    """A second run in the same interpreter reuses the first run's worker processes."""
    first = run_one(pid)["t"]
    second = run_one(pid)["t"]
    assert first == second
    assert first in _pools.process_pool().pids


# The crash matrix: how a task ends -> the error it fails with, and words of its message.
CRASHES = [
    ("os._exit(3)", helpers.crash_exit, px.WorkerCrashed, "exit code 3"),
    ("SIGKILL", helpers.crash_sigkill, px.WorkerCrashed, "SIGKILL(-9)"),
    ("segfault", helpers.crash_segfault, px.WorkerCrashed, "SIGSEGV(-11)"),
    ("MemoryError raised", helpers.raise_memory_error, MemoryError, "simulated allocation"),
    ("unpicklable return", helpers.return_unpicklable, px.PicklingError, "cannot be pickled"),
    ("error class unknown to the parent", helpers.unpicklable_error_class, px.RemoteError,
     "LocalOnlyError"),
]


@pytest.mark.parametrize("name, fn, error, words", CRASHES, ids=[c[0] for c in CRASHES])
def test_crash_matrix(name, fn, error, words):
    """Each crash fails only its task with a clear error; retries apply; the next run works."""
    with px.Workflow("crash", isolation="process") as wf:
        wf.add(px.task(fn).options(id="bad", on_error="ignore",
                                   retry=px.Retry(1, initial_delay=0)))
        wf.add(px.task(sleep_pid).options(id="sibling"), 0.5)
    result = px.run(wf, max_workers=2, progress=False)
    bad = result.tasks["bad"]
    assert bad.status == "failed" and isinstance(bad.error, error), repr(bad.error)
    assert words in str(bad.error)
    if isinstance(bad.error, px.ParexecError):  # parexec's own errors name the task
        assert "'bad'" in str(bad.error), str(bad.error)
    assert bad.attempts == 2  # the retry policy applied
    assert result.tasks["sibling"].status == "succeeded"
    assert result.tasks["sibling"].attempts == 1
    assert run_one(pid).ok  # the next run in this interpreter works


def test_crash_reports_exit_code_attribute():
    """WorkerCrashed carries the exit code (negative for a signal)."""
    result = run_one(helpers.crash_sigkill)
    assert result.errors["t"].exitcode == -signal.SIGKILL


def test_timeout_kills_the_tasks_child_processes_too(tmp_path):
    """A timed-out process task that started a child process: the child dies with it."""
    pidfile = tmp_path / "child.pid"
    # the timeout counts from dispatch, worker start included: leave room under load
    result = run_one(helpers.spawn_child_and_hang, str(pidfile), timeout=4.0)
    assert result.tasks["t"].status == "timed_out"
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the task's child outlived the timeout"
        time.sleep(0.05)


def test_process_function_that_cannot_be_pickled_fails_before_running():
    """A process task whose function cannot be pickled is a PicklingError naming the task."""
    import threading
    lock = threading.Lock()
    with px.Workflow("w", isolation="process") as wf:
        wf.add(px.task(lambda: lock).options(id="holds-lock"))
    with pytest.raises(px.PicklingError, match="'holds-lock'"):
        px.run(wf, progress=False)


def test_process_argument_that_cannot_be_pickled_fails_the_task():
    """An upstream value that cannot be pickled fails the process task receiving it (at
    dispatch) with an error naming that task; a literal one is refused before anything runs."""
    import threading
    with px.Workflow("w") as wf:
        lock = wf.add(px.task(helpers.return_unpicklable).options(id="make-lock"))
        wf.add(px.task(helpers.echo).options(id="bad-arg", isolation="process"), lock)
    result = px.run(wf, check=False, progress=False)
    assert isinstance(result.errors["bad-arg"], px.PicklingError)
    assert "'bad-arg'" in str(result.errors["bad-arg"])
    with px.Workflow("w", isolation="process") as wf:
        wf.add(px.task(helpers.echo).options(id="bad-literal"), threading.Lock())
    with pytest.raises(px.PicklingError, match="'bad-literal'"):
        px.run(wf, progress=False)


def test_functions_defined_in_main_run_in_processes(run_script):
    """Functions and classes defined in __main__ (like notebook cells) work in processes."""
    proc = run_script("""
        import parexec as px
        class Box:
            def __init__(self, v): self.v = v
        def make(v):
            return Box(v * 2)
        with px.Workflow("m", isolation="process") as wf:
            b = wf.add(make, 21)
        print(px.run(wf, progress=False)[b].v)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "42"


def test_stuck_thread_task_does_not_block_interpreter_exit(run_script):
    """A thread task that never returns does not keep the interpreter alive."""
    proc = run_script("""
        import threading, parexec as px
        never = threading.Event()
        with px.Workflow("w") as wf:
            wf.add(px.task(never.wait).options(timeout=0.2, on_error="ignore"))
        r = px.run(wf, progress=False)
        print(r.tasks["wait"].status)
    """, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "timed_out"


def test_workers_ignore_sigint():
    """SIGINT sent to a worker (a notebook interrupt hits the process group) does not kill it."""
    def interrupt_myself():
        import os
        import signal
        # A signal a process sends itself is delivered before kill() returns: a worker that
        # did not ignore SIGINT would die (or raise KeyboardInterrupt) here, not later.
        os.kill(os.getpid(), signal.SIGINT)
        return os.getpid()

    worker = run_one(pid)["t"]
    assert run_one(interrupt_myself)["t"] == worker  # it survived, and no other worker ran it
    assert run_one(pid)["t"] == worker


def test_workers_die_when_the_parent_is_killed(run_script, tmp_path):
    """SIGKILL of the parent while workers run tasks: no worker outlives it."""
    import subprocess
    import sys
    script = tmp_path / "victim.py"
    marker = tmp_path / "running"
    script.write_text(
        "import sys, time, parexec as px\n"
        "def hold(marker):\n"
        "    open(marker, 'a').write('x\\n')\n"
        "    time.sleep(60)\n"
        "with px.Workflow('v', max_workers=2, isolation='process') as wf:\n"
        "    for _ in range(2):\n"
        "        wf.add(hold, sys.argv[1])\n"
        "px.run(wf, progress=False)\n")
    proc = subprocess.Popen([sys.executable, str(script), str(marker)])
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while not marker.exists() or len(marker.read_text().split()) < 2:  # mid-task
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers = parent.children(recursive=True)
        proc.kill()
        proc.wait(10)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        proc.kill()


# Grandchildren never outlive the driver (issue 12 item 2) ----------------------------------

def _alive(pids):
    """The recorded pids still running (a zombie has finished; a reused pid is not ours)."""
    alive = []
    for pid_, created in pids:
        try:
            p = psutil.Process(pid_)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def _record(files, timeout=60):
    """Wait until every pid file is written; return [(pid, create_time)]."""
    deadline = time.monotonic() + timeout
    while not all(f.exists() for f in files):
        assert time.monotonic() < deadline, f"pid files never written: {files}"
        time.sleep(0.05)
    out = []
    for f in files:
        pid_ = int(f.read_text())
        try:
            out.append((pid_, psutil.Process(pid_).create_time()))
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(pids)
    for p in alive:  # leave nothing behind, then fail
        p.kill()
    return alive


def _env_with_tests():
    tests = os.path.dirname(__file__)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(tests), tests, os.environ.get("PYTHONPATH", "")]))


@pytest.mark.timeout(120)
def test_grandchildren_die_with_a_sigkilled_driver(tmp_path):
    """SIGKILL of the driver: sleeps that process tasks started (waited for, in the
    background, or double-forked) are gone too, not re-parented to init."""
    import subprocess
    import sys
    script = tmp_path / "victim.py"
    script.write_text(
        "import sys, parexec as px, helpers\n"
        "d = sys.argv[1]\n"
        "with px.Workflow('v', max_workers=3, isolation='process') as wf:\n"
        "    wf.add(px.task(helpers.run_sleep).options(id='fg'), d + '/fg')\n"
        "    wf.add(px.task(helpers.start_background_sleep).options(id='bg'), d + '/bg')\n"
        "    wf.add(px.task(helpers.start_detached_sleep).options(id='dt'), d + '/dt')\n"
        "px.run(wf, progress=False)\n")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=_env_with_tests(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        pids = _record([tmp_path / "fg", tmp_path / "bg", tmp_path / "dt"])
        assert len(pids) == 3 and not [p for p in pids if not _alive([p])]
        proc.kill()
        proc.wait(10)
        assert not _wait_gone(pids, 15), "a task's child outlived the SIGKILLed driver"
    finally:
        proc.kill()
        proc.wait(10)
        _wait_gone(pids, 0)


@pytest.mark.timeout(120)
def test_background_child_dies_at_normal_interpreter_exit(run_script, tmp_path):
    """A task's background Popen (and a double-forked one) is gone after a normal exit."""
    proc = run_script(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import parexec as px, helpers
        with px.Workflow('v', isolation='process') as wf:
            bg = px.task(helpers.start_background_sleep).options(id='bg')
            dt = px.task(helpers.start_detached_sleep).options(id='dt')
            wf.add(bg, {str(tmp_path / 'bg')!r})
            wf.add(dt, {str(tmp_path / 'dt')!r})
        print(px.run(wf, progress=False).status)
    """)
    pids = _record([tmp_path / "bg", tmp_path / "dt"], timeout=5)
    assert proc.returncode == 0 and proc.stdout.strip() == "succeeded", proc.stderr
    assert not _wait_gone(pids, 15), "a task's background child outlived the interpreter"


def test_killing_a_worker_takes_its_detached_grandchildren(tmp_path):
    """A timeout kill takes the whole tree, double-forked descendants included."""
    def detach_then_hang(path):
        helpers.start_detached_sleep(path)
        time.sleep(120)
    result = run_one(detach_then_hang, str(tmp_path / "dt"), timeout=5.0)
    assert result.tasks["t"].status == "timed_out"
    pids = _record([tmp_path / "dt"], timeout=5)
    assert not _wait_gone(pids, 10), "a double-forked child outlived its killed worker"


# Fork after use (issue 12 item 5) ---------------------------------------------------------

FORK_PRELUDE = """
    import multiprocessing as mp, os, signal, sys, time, parexec as px
    signal.alarm(90)  # a hang fails the test rather than outliving it

    def double(x):
        return 2 * x

    def triple(x):
        time.sleep(0.01)
        return 3 * x

    def numbered(name, fn, n):
        with px.Workflow(name, isolation="process", max_workers=2) as wf:
            for i in range(n):
                wf.add(px.task(fn).options(id=f"t{i}"), i)
        return wf

    assert px.run(numbered("warm", double, 4), progress=False).ok  # the parent used its pool
"""


@pytest.mark.timeout(120)
def test_forked_child_runs_process_tasks_with_a_fresh_pool(run_script):
    """A child forked after the parent ran process tasks runs its own process tasks."""
    proc = run_script(FORK_PRELUDE + """
    def child(conn):
        signal.alarm(60)  # a hang fails the test rather than outliving it
        r = px.run(numbered("child", triple, 6), progress=False)
        conn.send(r.results)
    a, b = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=child, args=(b,))
    p.start()
    assert a.poll(60), "the child's run hung"
    print(a.recv() == {f"t{i}": 3 * i for i in range(6)})
    p.join(30)
    print(p.exitcode)
    """, timeout=100)
    assert proc.stdout.split() == ["True", "0"], proc.stdout + proc.stderr


@pytest.mark.timeout(120)
def test_parent_and_forked_child_runs_at_once_get_their_own_values(run_script):
    """A parent run going on while a forked child runs gets exactly its own values."""
    proc = run_script(FORK_PRELUDE + """
    def child(conn):
        signal.alarm(60)  # a hang fails the test rather than outliving it
        r = px.run(numbered("child", double, 40), progress=False)
        conn.send(r.results)
    run = px.start(numbered("parent", triple, 40), progress=False)
    a, b = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=child, args=(b,))
    p.start()
    parent = run.wait(60)
    assert a.poll(60), "the child's run hung"
    print(a.recv() == {f"t{i}": 2 * i for i in range(40)})
    print(parent.results == {f"t{i}": 3 * i for i in range(40)})
    p.join(30)
    """, timeout=100)
    assert proc.stdout.split() == ["True", "True"], proc.stdout + proc.stderr


@pytest.mark.timeout(120)
def test_forked_child_that_exits_leaves_the_parents_worker_alone(run_script, tmp_path):
    """Forked children that exit (multiprocessing's way, and os.fork + sys.exit running the
    atexit hooks) do not touch the worker running the parent's task."""
    proc = run_script(FORK_PRELUDE + f"""
    def hold(path):
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(path + ".tmp", path)
        time.sleep(3)
        return os.getpid()
    path = {str(tmp_path / "worker.pid")!r}
    with px.Workflow("hold", isolation="process") as wf:
        wf.add(px.task(hold).options(id="hold"), path)
    run = px.start(wf, progress=False)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    worker = int(open(path).read())
    p = mp.get_context("fork").Process(target=print, args=("child",))
    p.start()
    p.join(30)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # runs the child's atexit hooks
    os.waitpid(pid, 0)
    r = run.wait(60)
    print(r.tasks["hold"].status, r["hold"] == worker if r.ok else r.errors)
    """, timeout=100)
    assert proc.stdout.split()[-2:] == ["succeeded", "True"], proc.stdout + proc.stderr


# Process inside process (issue 12 item 15) ------------------------------------------------

def test_process_task_can_run_a_workflow_of_process_tasks():
    """A process task runs its own workflow of process tasks; their workers are its children."""
    outer, inner = run_one(helpers.nested_process_run)["t"]
    assert inner and outer not in inner
    for p in inner:  # idle in the outer worker's own pool, so its children
        assert psutil.Process(p).ppid() == outer


@pytest.mark.timeout(120)
def test_inner_workers_are_gone_after_the_driver_exits(run_script, tmp_path):
    """Workers of a nested run die with the outer worker: after a normal driver exit and
    after the driver is SIGKILLed."""
    import subprocess
    import sys
    source = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import parexec as px, helpers
        with px.Workflow('outer', isolation='process') as wf:
            wf.add(px.task(helpers.nested_process_run).options(id='t'))
        outer, inner = px.run(wf, progress=False)['t']
        print(*inner, flush=True)
        if sys.argv[1:] == ['hang']:
            sys.stdin.read()
    """)
    proc = run_script(source)
    assert proc.returncode == 0, proc.stderr
    pids = [(int(p), psutil.Process(int(p)).create_time()) for p in proc.stdout.split()
            if psutil.pid_exists(int(p))]
    assert not _wait_gone(pids, 15), "inner workers outlived the driver's normal exit"

    script = tmp_path / "hang.py"
    script.write_text(source)
    victim = subprocess.Popen([sys.executable, str(script), "hang"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    pids = []
    try:
        line = victim.stdout.readline()
        pids = [(int(p), psutil.Process(int(p)).create_time()) for p in line.split()]
        assert pids, "the nested run printed no pids"
        victim.kill()
        victim.wait(10)
        assert not _wait_gone(pids, 15), "inner workers outlived the SIGKILLed driver"
    finally:
        victim.kill()
        victim.wait(10)
        victim.stdin.close()
        victim.stdout.close()
        _wait_gone(pids, 0)


# BLAS settings across overlapping runs (issue 12 item 9) -----------------------------------

BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@pytest.mark.parametrize("first_done", ["first-started", "last-started"])
def test_overlapping_runs_give_back_the_blas_environment(monkeypatch, first_done):
    """Two overlapping runs, finishing in either order: the BLAS variables end as they began
    (set ones keep their value, unset ones stay unset)."""
    import threading
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = {k: os.environ.get(k) for k in BLAS_VARS}
    runs, releases = [], []
    for name in ("a", "b"):
        started, release = threading.Event(), threading.Event()
        with px.Workflow(name) as wf:
            wf.add(px.task(helpers.ignore_cancel).options(id="hold"), release, started)
        runs.append(px.start(wf, progress=False))
        assert started.wait(20)
        releases.append(release)
    assert os.environ.get("OMP_NUM_THREADS") == "1"  # capped while the runs go on
    order = [0, 1] if first_done == "first-started" else [1, 0]
    for k in order:
        releases[k].set()
        assert runs[k].wait(20).ok
    assert {k: os.environ.get(k) for k in BLAS_VARS} == before


def test_memory_limit_error_says_what_the_limit_covers():
    """The MemoryLimitExceeded message: readable units, what the limit covers, what to do."""
    text = str(_processpool.memory_limit_error("leak", 170 * 2**20, 100 * 2**20))
    assert "'leak' used 170 MiB" in text and "memory=100 MiB" in text
    assert "whole resident memory" in text and "interpreter" in text and "Raise memory=" in text


def test_memory_limit_message_says_what_the_limit_covers():
    """MemoryLimitExceeded says the limit covers the worker's whole resident memory (the
    interpreter and imports too), in MiB/GiB, and what to change."""
    with px.Workflow("m", isolation="process") as wf:
        wf.add(px.task(helpers.leak_memory).options(id="leak", memory="100MiB"), 20)
    error = px.run(wf, check=False, progress=False).errors["leak"]
    text = str(error)
    assert isinstance(error, px.MemoryLimitExceeded)
    assert "'leak'" in text and "memory=100 MiB" in text
    assert "whole resident memory" in text and "interpreter" in text
    assert "Raise memory=" in text and " MB" not in text


def test_child_forked_during_a_run_gets_the_blas_environment_from_before_it(monkeypatch):
    """A child forked while a thread run caps BLAS starts with the variables as they were
    before the run (the parent's run, which would restore them, is not in the child)."""
    import multiprocessing as mp
    import threading
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    started, release = threading.Event(), threading.Event()
    with px.Workflow("w") as wf:
        wf.add(px.task(helpers.ignore_cancel).options(id="hold"), release, started)
    run = px.start(wf, progress=False)
    try:
        assert started.wait(20) and os.environ.get("OMP_NUM_THREADS") == "1"
        ctx = mp.get_context("fork")
        a, b = ctx.Pipe()
        child = ctx.Process(target=helpers.send_blas_env, args=(b,))
        child.start()
        assert a.poll(30)
        assert a.recv() == {"OMP_NUM_THREADS": None, "OPENBLAS_NUM_THREADS": "3"}
        child.join(30)
    finally:
        release.set()
        run.wait(20)


def test_adopted_orphans_are_reaped_between_tasks():
    """A worker adopts orphans (it is their subreaper): those that exit are reaped after the
    task, so a long-lived worker does not pile up zombies."""
    _pools.shutdown_process_pool()  # one worker in the pool: both runs get the same one
    with px.Workflow("w", isolation="process", max_workers=1) as wf:
        for i in range(5):
            wf.add(px.task(helpers.orphan_quick_child).options(id=f"o{i}"))
    result = px.run(wf, progress=False)
    workers = {result[f"o{i}"] for i in range(5)}
    assert len(workers) == 1
    # The last orphan may exit just after the reap that followed its task: it is reaped
    # after the next task, so the task after that sees none.
    with px.Workflow("w", isolation="process", max_workers=1) as wf:
        first = wf.add(px.task(helpers.zombie_children).options(id="z1"))
        wf.add(px.task(helpers.zombie_children).options(id="z2", after=[first]))
    assert px.run(wf, progress=False)["z2"] == (workers.pop(), [])  # the same worker


def test_reaping_leaves_a_tasks_own_popen_to_it():
    """A child a task keeps a Popen for is not reaped by the worker: a later task on that
    worker still reads its real exit status."""
    with px.Workflow("w", isolation="process", max_workers=1) as wf:
        first = wf.add(px.task(helpers.start_kept_child).options(id="start"), 7)
        wf.add(px.task(helpers.orphan_quick_child).options(id="orphan", after=[first]))
        wf.add(px.task(helpers.wait_kept_child).options(id="wait", after=["orphan"]))
    result = px.run(wf, progress=False)
    assert result["wait"] == (result["start"], 7)


@pytest.mark.timeout(30)
def test_thread_interrupt_lands_in_its_attempt_only():
    """ThreadPool.interrupt raises in the running attempt's Python code; once an attempt
    returned it does nothing, so the next task on that thread is untouched."""
    import threading
    from queue import SimpleQueue

    from parexec._state import Attempt as _Attempt
    pool = _pools.ThreadPool("t", max_threads=1)
    queue = SimpleQueue()
    try:
        started = threading.Event()
        first = _Attempt(0, "spin", 1, queue, pool, 1.0)
        pool.submit(first, helpers.spin_until_interrupted, (started,), {})
        assert started.wait(10)
        assert pool.interrupt(first, cancel=False)
        done = queue.get(timeout=10)
        assert done.attempt is first and not done.ok
        assert isinstance(done.value, px.TaskTimeout) and "'spin'" in str(done.value)
        second = _Attempt(1, "next", 1, queue, pool, 1.0)
        pool.submit(second, helpers.sleep_then, (0.2, "ok"), {})
        done = queue.get(timeout=10)
        assert (done.attempt, done.ok, done.value) == (second, True, "ok")
        assert not pool.interrupt(first, cancel=True)  # returned: nothing is raised
        assert not pool.interrupt(second, cancel=True)
        third = _Attempt(2, "third", 1, queue, pool, 1.0)
        pool.submit(third, helpers.sleep_then, (0.2, "ok"), {})
        done = queue.get(timeout=10)
        assert (done.ok, done.value) == (True, "ok")
    finally:
        pool.shutdown()


# Recycling and px.shutdown() (issue 16 item 3, issue 14) -----------------------------------

def _gone(pids, timeout=10):
    """Whether every pid in ``pids`` (recorded by the test) exited within ``timeout``."""
    procs = []
    for p in pids:
        try:
            procs.append(psutil.Process(p))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


@pytest.mark.timeout(60)
def test_max_tasks_per_worker_replaces_the_worker():
    """With max_tasks_per_worker=2, six tasks in a row on one worker slot run in three
    workers, two each; a retired worker exits after its last reply, and none is left."""
    from queue import SimpleQueue

    from parexec._state import Attempt as _Attempt
    shared = _pools.ProcessPool()  # a pool of its own: no worker with an earlier count
    pool = _pools.RecyclingPool(shared, 2)
    queue = SimpleQueue()
    pids = []
    try:
        for i in range(6):
            attempt = _Attempt(i, f"t{i}", 1, queue, pool, 1.0)
            pool.submit(attempt, helpers.pid, (), {})
            done = queue.get(timeout=30)
            assert (done.attempt, done.ok) == (attempt, True), done
            pids.append(done.value)
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
        assert len(set(pids)) == 3
        assert _gone(pids[:4])  # the retired ones left on their own (EOF)
        assert shared.pids == []  # the third retired after its second task too
    finally:
        shared.shutdown()
    assert _gone(pids)


def test_max_tasks_per_worker_is_checked():
    """A max_tasks_per_worker that is not a positive int is refused, naming the value, by the
    pool, px.run and px.Workflow, before anything runs."""
    with px.Workflow("w", isolation="process") as wf:
        wf.add(pid)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(px.TaskOptionError, match="max_tasks_per_worker"):
            _pools.process_pool(max_tasks_per_worker=bad)
        with pytest.raises(px.TaskOptionError, match=f"max_tasks_per_worker.*{bad!r}"):
            px.run(wf, max_tasks_per_worker=bad, progress=False)
        with pytest.raises(px.TaskOptionError, match="max_tasks_per_worker"):
            px.Workflow("v", max_tasks_per_worker=bad)


@pytest.mark.timeout(60)
def test_run_replaces_a_worker_after_max_tasks_per_worker():
    """px.run(max_tasks_per_worker=2): six process tasks one at a time use three workers in
    turn (two tasks each), and the workflow's setting is the run's default."""
    for run_kw, wf_kw in (({"max_tasks_per_worker": 2}, {}), ({}, {"max_tasks_per_worker": 2})):
        px.shutdown()  # fresh workers: a worker that ran earlier tests' tasks counts them too
        with px.Workflow("recycle", isolation="process", **wf_kw) as wf:
            refs = [wf.add(px.task(pid).options(id=f"t{k}", priority=-k)) for k in range(6)]
        result = px.run(wf, max_workers=1, progress=False, **run_kw)
        pids = [result[r] for r in refs]
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5], pids
        assert len(set(pids)) == 3
        assert _gone(pids[:4])  # the retired ones exited


def test_shutdown_stops_workers_and_is_safe_to_repeat():
    """px.shutdown() stops the reusable workers, can be called twice and with no pool, and
    the next run starts fresh workers."""
    px.shutdown()
    px.shutdown()  # no pool now: nothing to do
    first = run_one(pid)["t"]
    assert first in _pools.process_pool().pids
    px.shutdown()
    assert _pools._process_pool is None
    assert _gone([first])
    second = run_one(pid)["t"]
    assert second != first
    px.shutdown()
    px.shutdown()
    assert _gone([second])


@pytest.mark.timeout(60)
def test_shutdown_reports_a_running_attempt_as_crashed(tmp_path):
    """Stopping the workers while one runs a task reports WorkerCrashed for that attempt,
    so a run waiting on it does not wait forever."""
    from queue import SimpleQueue

    from parexec._state import Attempt as _Attempt
    pool = _pools.ProcessPool()
    queue = SimpleQueue()
    pidfile = tmp_path / "sleep.pid"
    attempt = _Attempt(0, "sleeper", 1, queue, pool, 1.0)
    try:
        pool.submit(attempt, helpers.run_sleep, (str(pidfile), 60), {})
        deadline = time.monotonic() + 30
        while not pidfile.exists():  # the task's own child says it started
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.02)
        worker = attempt.worker
    finally:
        pool.shutdown()
    done = queue.get(timeout=10)
    assert done.attempt is attempt and not done.ok
    assert isinstance(done.value, px.WorkerCrashed) and "'sleeper'" in str(done.value)
    assert _gone([worker, int(pidfile.read_text())])


# Pipelining: an attempt queued behind a running one (its leader) on the leader's worker.

def _pipeline_pool():
    from queue import SimpleQueue

    from parexec._state import Attempt as _Attempt
    pool = _pools.ProcessPool()  # its own workers: the test knows every one of them
    queue = SimpleQueue()

    def attempt(i, leader=None):
        a = _Attempt(i, f"t{i}", 1, queue, pool, 1.0)
        a.leader = leader
        return a
    return pool, queue, attempt


def _held(pool, attempt, tmp_path):
    """Start attempt 0 on a worker, where it runs until the returned file is created."""
    release, started = tmp_path / "release", tmp_path / "started"
    leader = attempt(0)
    pool.submit(leader, helpers.hold_until, (str(release), str(started)), {})
    helpers.wait_file(started)
    return leader, release


@pytest.mark.timeout(60)
def test_a_follower_runs_on_its_leaders_worker_right_after_it(tmp_path):
    """An attempt submitted behind a running one waits on that worker, unsent, and runs
    there once the leader returned; the leader's Done comes first."""
    pool, queue, attempt = _pipeline_pool()
    try:
        leader, release = _held(pool, attempt, tmp_path)
        follower = attempt(1, leader)
        pool.submit(follower, helpers.pid, (), {})
        assert follower.handle is leader.handle and follower.worker == leader.worker
        assert leader.handle.next.attempt is follower  # queued: not the worker's yet
        assert leader.handle.ahead  # but written to its pipe, behind the leader
        assert len(pool.pids) == 1  # no worker was started for it
        release.touch()
        first, second = queue.get(timeout=30), queue.get(timeout=30)
        assert (first.attempt, first.ok) == (leader, True), first
        assert (second.attempt, second.ok) == (follower, True), second
        assert second.value == first.value == leader.worker
        assert second.t_start >= first.t_end
    finally:
        pool.shutdown()


@pytest.mark.timeout(60)
def test_kill_withdraws_a_follower_that_has_not_started(tmp_path):
    """kill() of a queued attempt withdraws it: it never runs, reports nothing, and its
    leader and the worker go on."""
    pool, queue, attempt = _pipeline_pool()
    ran = tmp_path / "ran"
    try:
        leader, release = _held(pool, attempt, tmp_path)
        follower = attempt(1, leader)
        pool.submit(follower, helpers.stamp, (str(ran),), {})
        assert leader.handle.next.attempt is follower
        assert pool.kill(follower) is True
        assert leader.handle.next is None and not leader.handle.killed
        # Its copy is still in the worker's pipe: another follower is not written ahead
        # until the worker skipped it (it would take the new one's token).
        second = attempt(3, leader)
        pool.submit(second, helpers.pid, (), {})
        assert leader.handle.next.attempt is second and not leader.handle.ahead
        release.touch()
        dones = [queue.get(timeout=30) for _ in range(2)]
        assert [(d.attempt, d.ok) for d in dones] == [(leader, True), (second, True)], dones
        after = attempt(2)  # the same, now idle, worker: it would have run the follower first
        pool.submit(after, helpers.pid, (), {})
        done = queue.get(timeout=30)
        assert (done.attempt, done.value) == (after, leader.worker), done
        assert not ran.exists() and queue.empty()
        assert leader.handle.skips == 0  # the worker answered SKIPPED for the copy ahead
    finally:
        pool.shutdown()


def _paused_reader(pool):
    """Hold ``pool``'s reader before it reads a reply, until the returned event is set."""
    go = threading.Event()
    receive = pool._receive

    def held(conn):
        go.wait(30)
        receive(conn)
    pool._receive = held
    return go


def _started_ahead(pool, attempt, tmp_path, fn, args, marker):
    """A leader whose worker has started its follower, ``fn(*args)``, written ahead (the
    follower wrote the file ``marker``), while the reader has not read the leader's reply.

    Returns the leader, the follower and the event that lets the reader go on.
    """
    leader, release = _held(pool, attempt, tmp_path)
    go = _paused_reader(pool)
    follower = attempt(1, leader)
    pool.submit(follower, fn, args, {})
    release.touch()
    helpers.wait_file(marker)
    return leader, follower, go


@pytest.mark.timeout(60)
def test_a_follower_sent_ahead_that_started_is_killed_with_its_worker(tmp_path):
    """The leader returned and its worker started the follower written ahead, but the
    reader has not read the leader's reply: kill(follower) kills that worker, and the
    leader's reply, written before, still counts; nothing is reported for the follower."""
    pool, queue, attempt = _pipeline_pool()
    try:
        started = tmp_path / "started2"
        leader, follower, go = _started_ahead(
            pool, attempt, tmp_path, helpers.hold_until,
            (str(tmp_path / "never"), str(started)), started)
        worker = leader.worker
        assert pool.kill(follower) is True
        assert leader.handle.doomed
        go.set()
        done = queue.get(timeout=30)
        assert (done.attempt, done.ok, done.value) == (leader, True, worker), done
        assert helpers.gone(worker)
        after = attempt(2)
        pool.submit(after, helpers.pid, (), {})
        done = queue.get(timeout=30)
        assert done.attempt is after and done.ok and done.value != worker, done
        assert queue.empty()
    finally:
        pool.shutdown()


@pytest.mark.timeout(60)
def test_killing_a_leader_that_returned_keeps_the_follower_it_started(tmp_path):
    """The leader returned and its worker ran the follower written ahead, the leader's
    reply unread, when the leader is killed (its deadline, a cancel): there is nothing of
    the leader's to kill. Its reply is dropped, the worker kept, and the follower, which
    ran, reports once and runs nowhere else (found by review: it ran twice)."""
    pool, queue, attempt = _pipeline_pool()
    try:
        ran = tmp_path / "ran"
        leader, follower, go = _started_ahead(
            pool, attempt, tmp_path, helpers.append_pid, (str(ran),), ran)
        worker = leader.worker
        assert pool.kill(leader) is True
        go.set()
        done = queue.get(timeout=30)
        assert (done.attempt, done.ok, done.value) == (follower, True, worker), done
        after = attempt(2)
        pool.submit(after, helpers.pid, (), {})
        done = queue.get(timeout=30)
        assert (done.attempt, done.value) == (after, worker), done  # the worker was kept
        assert ran.read_text().split() == [str(worker)] and queue.empty()
    finally:
        pool.shutdown()


@pytest.mark.timeout(60)
def test_restart_leaves_a_follower_sent_ahead_that_started(tmp_path):
    """A follower written ahead that its worker started stays there (restart cannot take
    its token back); the leader, whose reply is unread, takes no new follower: one queued
    behind it starts on another worker."""
    pool, queue, attempt = _pipeline_pool()
    try:
        started = tmp_path / "started2"
        leader, follower, go = _started_ahead(
            pool, attempt, tmp_path, helpers.hold_until,
            (str(tmp_path / "release"), str(started)), started)
        worker = leader.worker
        pool.restart(follower)
        assert leader.handle.next.attempt is follower  # not moved
        third = attempt(2, leader)
        pool.submit(third, helpers.pid, (), {})
        go.set()
        dones = {d.attempt: d for d in (queue.get(timeout=30) for _ in range(3))}
        assert set(dones) == {leader, follower, third} and all(d.ok for d in dones.values())
        assert dones[leader].value == dones[follower].value == worker
        assert dones[third].value != worker
    finally:
        pool.shutdown()


@pytest.mark.timeout(60)
def test_interrupt_takes_back_what_was_sent_ahead(tmp_path):
    """A grace signal for the leader must not reach the follower written ahead: the pool
    takes its token first, the leader raises, and the follower is sent again and runs
    once, after it, on the same worker."""
    pool, queue, attempt = _pipeline_pool()
    ran = tmp_path / "ran"
    try:
        leader, release = _held(pool, attempt, tmp_path)
        follower = attempt(1, leader)
        pool.submit(follower, helpers.append_pid, (str(ran),), {})
        assert leader.handle.ahead
        assert pool.interrupt(leader, cancel=False) is True
        assert not leader.handle.ahead and leader.handle.next.attempt is follower
        first, second = queue.get(timeout=30), queue.get(timeout=30)
        assert first.attempt is leader and isinstance(first.value, px.TaskTimeout), first
        assert (second.attempt, second.ok) == (follower, True), second
        assert ran.read_text().split() == [str(leader.worker)]  # once
        assert leader.handle is follower.handle and follower.handle.skips == 0
    finally:
        release.touch()
        pool.shutdown()


@pytest.mark.timeout(60)
def test_a_follower_moves_when_its_leaders_worker_is_killed(tmp_path):
    """Killing the leader (timeout, cancel) kills its worker alone; the attempt queued
    behind it runs on another worker, and reports once."""
    pool, queue, attempt = _pipeline_pool()
    try:
        leader, release = _held(pool, attempt, tmp_path)
        first_worker = leader.worker
        follower = attempt(1, leader)
        pool.submit(follower, helpers.pid, (), {})
        assert pool.kill(leader) is True
        done = queue.get(timeout=30)
        assert (done.attempt, done.ok) == (follower, True), done  # nothing for the leader
        assert done.value != first_worker and done.value == follower.worker
        assert helpers.gone(first_worker)
        assert queue.empty()
    finally:
        pool.shutdown()


@pytest.mark.timeout(60)
def test_a_follower_of_a_leader_that_returned_starts_at_once():
    """A leader whose reply was read no longer runs: its follower starts like any attempt."""
    pool, queue, attempt = _pipeline_pool()
    try:
        leader = attempt(0)
        pool.submit(leader, helpers.pid, (), {})
        assert queue.get(timeout=30).attempt is leader
        follower = attempt(1, leader)
        pool.submit(follower, helpers.pid, (), {})
        done = queue.get(timeout=30)
        assert (done.attempt, done.ok, done.value) == (follower, True, leader.worker), done
    finally:
        pool.shutdown()


@pytest.mark.timeout(60)
def test_a_follower_of_a_queued_leader_runs_after_it(tmp_path):
    """Behind a leader that is itself still queued, a follower waits for it to be sent,
    then runs after it on the same worker, in order."""
    pool, queue, attempt = _pipeline_pool()
    try:
        first, release = _held(pool, attempt, tmp_path)
        second = attempt(1, first)
        pool.submit(second, helpers.pid, (), {})
        third = attempt(2, second)  # second is queued: third waits for it to be sent
        pool.submit(third, helpers.pid, (), {})
        assert third.handle is None
        release.touch()
        dones = [queue.get(timeout=30) for _ in range(3)]
        assert [d.attempt for d in dones] == [first, second, third]
        assert all(d.ok and d.value == first.worker for d in dones), dones
    finally:
        pool.shutdown()


@pytest.mark.timeout(60)
def test_shutdown_reports_queued_attempts_as_crashed(tmp_path):
    """Stopping the workers reports the running attempt and the one queued behind it."""
    pool, queue, attempt = _pipeline_pool()
    try:
        leader, _ = _held(pool, attempt, tmp_path)
        follower = attempt(1, leader)
        pool.submit(follower, helpers.pid, (), {})
    finally:
        pool.shutdown()
    dones = {d.attempt: d for d in (queue.get(timeout=10), queue.get(timeout=10))}
    assert set(dones) == {leader, follower}
    assert all(isinstance(d.value, px.WorkerCrashed) for d in dones.values())


@pytest.mark.timeout(60)
def test_what_a_worker_wrote_before_dying_is_read(tmp_path):
    """A streamed batch's items each come in their own message. While the reader is held
    (the test holds the pool's lock), the worker writes the outcomes of items 0-4 and dies
    in item 5: all five still reach the run, before the batch's WorkerCrashed."""
    from parexec._worker import run_batch
    pool, queue, attempt = _pipeline_pool()
    try:
        batch = attempt(0)
        started = tmp_path / "started"
        items = [(f"t[{k}]", 1, (k, 5, str(started))) for k in range(8)]
        pool.submit(batch, run_batch, (helpers.wait_then_crash_on, items, {}, True), {})
        helpers.wait_file(started)
        with pool._lock:  # the reader blocks at its first message, the rest stays unread
            worker = psutil.Process(int(started.read_text()))
            deadline = time.monotonic() + 30
            while worker.status() != psutil.STATUS_ZOMBIE:  # died, not yet reaped
                assert time.monotonic() < deadline
                time.sleep(0.01)
        got = [queue.get(timeout=30) for _ in range(6)]
        assert [m.k for m in got[:5]] == [0, 1, 2, 3, 4]
        assert [m.outcome[:2] for m in got[:5]] == [(True, k) for k in range(5)]
        assert isinstance(got[5].value, px.WorkerCrashed)
    finally:
        pool.shutdown()
