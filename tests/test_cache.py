"""Tests of parexec._cache: px.worker_cache computes once per worker and key."""

from __future__ import annotations

import os
import threading
import types

import cloudpickle
import pytest

import parexec as px
from parexec import _cache


@pytest.fixture
def cache():
    """A fresh cache, so tests do not see each other's values."""
    return _cache.WorkerCache()


def _counted(log_path, value):
    """Append one line to ``log_path`` (one computation) and return (pid, value)."""
    with open(log_path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return (os.getpid(), value)


def _task_using_cache(log_path, value):
    """A task: the cached (pid, value) of this worker, plus this worker's pid."""
    return px.worker_cache(_counted, log_path, value), os.getpid()


def test_thread_tasks_compute_once(tmp_path):
    """Many thread tasks of one run share one computation per key (once per interpreter)."""
    log = str(tmp_path / "log")
    px.worker_cache.clear()
    with px.Workflow("cache-threads") as wf:
        refs = [px.task(_task_using_cache).options(id=f"t{i}")(log, "model") for i in range(8)]
    result = px.run(wf, max_workers=4, progress=False)
    values = {result[r][0] for r in refs}
    assert values == {(os.getpid(), "model")}
    with open(log) as f:
        assert f.read().splitlines() == [str(os.getpid())]
    px.worker_cache.clear()


@pytest.mark.timeout(120)
def test_process_tasks_compute_once_per_worker_across_runs(tmp_path):
    """Process tasks reuse a worker's value in later tasks and runs; each worker computes once."""
    log = str(tmp_path / "log")
    seen: set[int] = set()
    for run in range(2):
        with px.Workflow(f"cache-procs-{run}", isolation="process") as wf:
            refs = [px.task(_task_using_cache).options(id=f"t{i}")(log, "model")
                    for i in range(6)]
        result = px.run(wf, max_workers=2, progress=False)
        for r in refs:
            (computed_in, value), ran_in = result[r]
            assert value == "model"
            assert computed_in == ran_in  # the worker's own value, not the driver's
            seen.add(ran_in)
    with open(log) as f:
        computations = f.read().splitlines()
    # One computation per worker that ran a task, however many tasks and runs it served.
    assert sorted(computations) == sorted(str(p) for p in seen)


def test_function_sent_by_value_hits(cache):
    """Two function objects with the same code (a __main__-like function rebuilt by
    cloudpickle for each task) share one value."""
    namespace = {"__name__": "__fake_main__"}
    exec("calls = []\ndef load(path, scale=2):\n    calls.append(path)\n"  # noqa: S102
         "    return [path] * scale\n", namespace)
    calls = namespace["calls"]
    first = namespace["load"]
    second = cloudpickle.loads(cloudpickle.dumps(first))  # by value: a new object
    assert second is not first and isinstance(second, types.FunctionType)
    assert first.__module__ == "__fake_main__"
    value = cache(first, "a.bin")
    assert value == ["a.bin", "a.bin"]
    assert cache(second, "a.bin") is value  # the second object did not run: same key
    assert calls == ["a.bin"]
    # The same name with different code is another key.
    namespace2 = {"__name__": "__fake_main__"}
    exec("def load(path, scale=2):\n    return path\n", namespace2)  # noqa: S102
    assert cache(namespace2["load"], "a.bin") == "a.bin"


# What the functions below did. Globals, as a loader would use: globals a function reads are
# not part of the key, while a mutable closure variable would change the key as it changes.
CALLS: list[object] = []
SYNC: dict[str, threading.Event] = {}


@pytest.fixture(autouse=True)
def _fresh_calls():
    CALLS.clear()
    SYNC.clear()


def _slow_upper(name):
    CALLS.append(name)
    SYNC["inside"].set()
    assert SYNC["release"].wait(30)
    return name.upper()


def test_concurrent_first_calls_compute_once(cache):
    """Threads asking for the same key at once compute it once; another key is not blocked."""
    nthreads = 8
    barrier = threading.Barrier(nthreads)
    SYNC["inside"], SYNC["release"] = threading.Event(), threading.Event()
    results = []

    def call():
        barrier.wait(timeout=30)
        results.append(cache(_slow_upper, "model"))

    threads = [threading.Thread(target=call) for _ in range(nthreads)]
    for t in threads:
        t.start()
    assert SYNC["inside"].wait(30)
    # While "model" is being computed, another key computes without waiting for it.
    assert cache(str.lower, "OTHER") == "other"
    SYNC["release"].set()
    for t in threads:
        t.join(30)
    assert results == ["MODEL"] * nthreads
    assert CALLS == ["model"]


def _make_loader(offset):
    def load(x, *, scale=1):
        CALLS.append((offset, x, scale))
        return offset + x * scale
    return load


def test_different_arguments_and_closures_miss(cache):
    """Different arguments, keyword arguments or closure values are different keys."""
    assert cache(_make_loader(0), 1) == 1
    assert cache(_make_loader(0), 1) == 1  # another function object, same code and closure
    assert cache(_make_loader(0), 2) == 2
    assert cache(_make_loader(0), 2, scale=3) == 6
    assert cache(_make_loader(10), 1) == 11
    assert cache(_make_loader(0), True) == 1  # True is not the key 1
    assert CALLS == [(0, 1, 1), (0, 2, 1), (0, 2, 3), (10, 1, 1), (0, True, 1)]
    assert len(cache) == 5


def _total(items, weights):
    CALLS.append(1)
    return sum(items) * weights["w"]


def test_unhashable_arguments_are_keyed_by_pickle(cache):
    """Lists and dicts as arguments work: equal contents hit, other contents miss."""
    assert cache(_total, [1, 2], {"w": 2}) == 6
    assert cache(_total, [1, 2], {"w": 2}) == 6
    assert cache(_total, [1, 3], {"w": 2}) == 8
    assert len(CALLS) == 2


def _flaky():
    CALLS.append(1)
    if len(CALLS) == 1:
        raise OSError("disk not ready")
    return "ok"


def test_exception_is_not_cached(cache):
    """A call that raises caches nothing: the next call computes again."""
    with pytest.raises(OSError, match="disk not ready"):
        cache(_flaky)
    assert cache(_flaky) == "ok"
    assert cache(_flaky) == "ok"
    assert len(CALLS) == 2


def test_self_call_raises_instead_of_deadlocking(cache):
    """A function asking for its own value gets a RuntimeError naming it, not a hang."""
    def recursive():
        return cache(recursive)

    with pytest.raises(RuntimeError, match="recursive"):
        cache(recursive)
    with pytest.raises(RuntimeError):  # nothing was left held: it fails the same way again
        cache(recursive)


def test_unpicklable_argument_names_the_argument(cache):
    """An argument that can be neither pickled nor hashed fails with a message naming it."""
    with pytest.raises(TypeError, match=r"argument 0 of type list"):
        cache(len, [threading.Lock()])
    lock = threading.Lock()  # hashable: keyed as itself
    assert cache(id, lock) == id(lock)


def _load_counted():
    CALLS.append(1)
    return len(CALLS)


def test_clear_drops_values(cache):
    """clear() empties this process's cache: the next call computes again."""
    assert cache(_load_counted) == 1
    assert cache(_load_counted) == 1
    cache.clear()
    assert len(cache) == 0
    assert cache(_load_counted) == 2


def test_deeply_nested_code_is_keyed_without_recursion():
    """A code object nested deeper than the recursion limit is digested (no RecursionError)."""
    code = compile("pass", "<x>", "exec")
    for _ in range(3000):
        code = code.replace(co_consts=(code,))
    assert len(_cache._code_digest(code)) == _cache._DIGEST_SIZE


@pytest.mark.timeout(120)
def test_main_function_in_process_tasks_hits(run_script):
    """A loader defined in a script's __main__ (sent by value with every process task) is
    computed once per worker, across tasks and runs, and its value reused."""
    proc = run_script("""
        import os
        import parexec as px

        def load(path):
            with open(path, "a") as f:
                f.write(f"{os.getpid()}\\n")
            return object()  # a new object per computation

        def work(i, path):
            model = px.worker_cache(load, path)
            return os.getpid(), id(model)

        ran = set()
        for r in range(2):
            with px.Workflow("main-cache", isolation="process") as wf:
                m = px.task(work).map(range(8), path="log")
            for pid, model_id in px.run(wf, max_workers=2, progress=False)[m]:
                ran.add((pid, model_id))
        px.shutdown()
        computed = open("log").read().split()
        pids = {pid for pid, _ in ran}
        assert len(ran) == len(pids), ran  # one model object per worker
        assert sorted(computed) == sorted(str(p) for p in pids), (computed, pids)
        print("ok", len(pids))
    """, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_task_template_is_keyed_by_its_function(cache):
    """A px.task template (its function sent by value) is keyed like its plain function."""
    template = px.task(_load_counted)
    assert cache(template) == 1
    assert cache(cloudpickle.loads(cloudpickle.dumps(px.task(_load_counted)))) == 1
    assert cache(_load_counted) == 1
    assert len(CALLS) == 1
