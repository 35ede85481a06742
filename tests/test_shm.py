"""Tests of parexec._shm: large values through shared memory, their lifetimes and fallbacks."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile

import helpers
import pytest

import parexec as px
from parexec import _shm

np = pytest.importorskip("numpy")

N = 1 << 20  # 8 MiB of float64: above the 1 MiB threshold


@pytest.fixture
def shm_dir(monkeypatch):
    """A private segment directory on tmpfs; it must be empty when the test ends."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="pxtest-", dir=base)
    monkeypatch.setattr(_shm, "directory", path)
    yield path
    gc.collect()
    left = os.listdir(path)
    shutil.rmtree(path, ignore_errors=True)
    assert not left, f"segments left behind: {left}"


def segments(path):
    gc.collect()
    return sorted(os.listdir(path))


def run(*tasks, **options):
    """Run the (fn, id, args, isolation) tasks; args may name earlier tasks by id."""
    with px.Workflow("shm", isolation="process") as wf:
        refs = {}
        for fn, tid, args, iso in tasks:
            args = [refs.get(a, a) if isinstance(a, str) else a for a in args]
            refs[tid] = wf.add(px.task(fn).options(id=tid, isolation=iso), *args)
    return px.run(wf, progress=False, **options)


def forget_last_result():
    """Replace px.last_result() (which holds the last run's values) by an empty run."""
    with px.Workflow("empty") as wf:
        wf.add(px.task(helpers.noop).options(id="n"))
    px.run(wf, progress=False)


def test_result_arrives_mapped_writable_and_private(shm_dir):
    """A process task's array comes through a segment; writes stay in the writing process."""
    result = run((helpers.make_array, "p", (N, 1.0), "process"),
                 (helpers.bump_first, "bump", ("p",), "process"),
                 (helpers.first_item, "read", ("p", "bump"), "process"))
    a = result["p"]
    assert a.flags.writeable and a.shape == (N,) and float(a.sum()) == N
    assert result["bump"] == 2.0 and result["read"] == 1.0 and a[0] == 1.0
    a[0] = 99.0  # private to the driver: the segment is unchanged
    again = run((helpers.first_item, "read", (a,), "process"))
    assert again["read"] == 99.0  # a written value is sent as it is now, not as mapped
    tr = result.tasks["p"]
    assert tr.result_bytes >= 8 * N and tr.shm_bytes == 8 * N and tr.pipe_bytes < 4096
    assert result.stats.shm_bytes >= 3 * 8 * N
    assert len(segments(shm_dir)) == 1  # p's result; the copy sent to the 2nd run is gone
    del a, result, again, tr
    forget_last_result()
    assert segments(shm_dir) == []


def test_process_to_process_names_the_same_segment(shm_dir):
    """A value passed on unchanged between process tasks is never copied into a new segment."""
    result = run((helpers.make_array, "p", (N,), "process"),
                 (helpers.identity, "same", ("p",), "process"),
                 (helpers.array_sum, "sum", ("same",), "process"))
    assert result["sum"] == 0.0 and result["same"].shape == (N,)
    assert len(segments(shm_dir)) == 1
    assert result.tasks["same"].shm_bytes == 2 * 8 * N  # in and out, through one segment
    del result
    forget_last_result()
    assert segments(shm_dir) == []


def test_arguments_from_thread_tasks_go_through_shared_memory(shm_dir):
    """A thread task's array reaches a process task through a segment that dies after it."""
    result = run((helpers.make_array, "t", (N, 2.0), "thread"),
                 (helpers.array_sum, "sum", ("t",), "process"))
    assert result["sum"] == 2.0 * N
    assert result.tasks["sum"].shm_bytes == 8 * N
    assert result.tasks["t"].shm_bytes == 0  # thread tasks share the driver's objects
    assert segments(shm_dir) == []  # the consumer replied: its argument's segment went


@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
def test_bytes_and_bytearray_go_out_of_band(shm_dir, kind):
    """bytes and bytearray values of 1 MiB or more travel through shared memory too."""
    result = run((helpers.make_bytes, "b", (2 * N, kind), "process"),
                 (len, "n", ("b",), "process"))
    value = result["b"]
    assert type(value).__name__ == kind and value == b"\x07" * (2 * N)
    assert result["n"] == 2 * N and result.tasks["b"].shm_bytes == 2 * N
    del value, result
    forget_last_result()
    assert segments(shm_dir) == []


def test_keep_leaves_releases_segments_during_the_run(shm_dir):
    """With keep="leaves", an intermediate's segment goes once its consumer finished."""
    result = run((helpers.make_array, "p", (N, 1.0), "process"),
                 (helpers.array_sum, "sum", ("p",), "process"), keep="leaves")
    assert result["sum"] == N and result.tasks["p"].value is None
    assert segments(shm_dir) == []


def test_missing_directory_falls_back_to_the_pipe(monkeypatch, caplog):
    """Without a segment directory, large values go through the pipe, and a debug line says so."""
    monkeypatch.setattr(_shm, "directory", "/nonexistent/parexec-shm")
    with caplog.at_level(logging.DEBUG, logger="parexec"):
        result = run((helpers.make_array, "p", (N, 3.0), "thread"),
                     (helpers.identity, "back", ("p",), "process"))
    back = result["back"]
    assert back.flags.writeable and float(back.sum()) == 3.0 * N
    tr = result.tasks["back"]
    assert tr.shm_bytes == 0 and tr.pipe_bytes >= 2 * 8 * N
    assert "through the pipe" in caplog.text


def test_small_directory_falls_back_to_the_pipe(monkeypatch, shm_dir):
    """When statvfs shows too little room, nothing is written and the pipe is used."""
    class Tiny:
        f_bavail = f_blocks = 100
        f_frsize = 4096
    monkeypatch.setattr(_shm.os, "statvfs", lambda path: Tiny)
    assert _shm.write(memoryview(bytearray(N)), os.getpid(), shm_dir) is None
    assert segments(shm_dir) == []


def test_written_pages_are_not_reused():
    """A mapped buffer is named again only while none of its pages was written here."""
    path = _shm.write(memoryview(bytearray(3 * N)), os.getpid(), _shm.segment_dir())
    assert path is not None
    seg = _shm.own(_shm.Segment(path, 3 * N))
    m = _shm.open_map(path, seg)
    del seg
    view = memoryview(m)
    assert view[N:2 * N][0] == 0  # read: still the file's page
    assert _shm.find(view[N:2 * N])[:2] == (path, N)
    view[2 * N] = 1
    assert _shm.find(view[N:2 * N]) is not None  # another page was written
    assert _shm.find(view[2 * N:]) is None
    del view, m
    gc.collect()
    assert not os.path.exists(path)  # the last mapping went: unlinked


def test_worker_killed_mid_write_leaves_no_segment(shm_dir):
    """A worker SIGKILLed while writing its result: the driver removes the partial segment."""
    with px.Workflow("w", isolation="process") as wf:
        wf.add(px.task(helpers.die_while_writing).options(id="dies"), N)
    result = px.run(wf, check=False, progress=False)
    assert isinstance(result.errors["dies"], px.WorkerCrashed)
    assert segments(shm_dir) == []


def test_segments_of_a_killed_driver_are_swept_by_the_next_run(run_script, shm_dir):
    """A driver SIGKILLed while it holds values leaves segments; the next run removes them."""
    script = f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import helpers, parexec as px
        from parexec import _shm
        _shm.directory = {shm_dir!r}
        with px.Workflow("w", isolation="process") as wf:
            wf.add(px.task(helpers.make_array).options(id="p"), {N})
        result = px.run(wf, progress=False)
        assert os.listdir({shm_dir!r}), "no segment was written"
        os.kill(os.getpid(), signal.SIGKILL)
    """
    first = run_script(script)
    assert first.returncode == -9, first.stderr
    assert len(os.listdir(shm_dir)) == 1
    second = run_script(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import helpers, parexec as px
        from parexec import _shm
        _shm.directory = {shm_dir!r}
        with px.Workflow("w", isolation="process") as wf:
            wf.add(px.task(helpers.noop).options(id="n"))
        px.run(wf, progress=False)
    """)
    assert second.returncode == 0, second.stderr
    assert os.listdir(shm_dir) == []


def test_sweep_removes_only_dead_drivers_of_this_pid_namespace(shm_dir):
    """The sweep removes segments of dead drivers here; live ones and other namespaces stay."""
    import subprocess
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    names = {"dead": f"parexec-{dead_pid.pid}-1-{_shm._NS}-x",
             "live": f"parexec-{os.getpid()}-1-{_shm._NS}-x",
             "elsewhere": f"parexec-{dead_pid.pid}-1-{_shm._NS}0-x",
             "other": "unrelated-file"}
    for name in names.values():
        open(os.path.join(shm_dir, name), "wb").close()
    assert _shm.sweep_dead_drivers(shm_dir) == 1
    assert sorted(os.listdir(shm_dir)) == sorted(v for k, v in names.items() if k != "dead")
    for name in os.listdir(shm_dir):
        os.unlink(os.path.join(shm_dir, name))


def test_a_forked_child_never_unlinks_the_drivers_segments(run_script, shm_dir):
    """A child forked by the driver drops its copies of mapped values; the segments stay."""
    result = run_script(f"""
        import gc, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import helpers, parexec as px
        from parexec import _shm
        _shm.directory = {shm_dir!r}
        with px.Workflow("w", isolation="process") as wf:
            wf.add(px.task(helpers.make_array).options(id="p"), {N}, 5.0)
        result = px.run(wf, progress=False)
        value = result["p"]
        pid = os.fork()
        if pid == 0:
            del value, result
            px._run._last_result = None
            gc.collect()
            sys.exit(0)
        os.waitpid(pid, 0)
        assert len(os.listdir({shm_dir!r})) == 1, "the child unlinked the segment"
        assert float(value.sum()) == 5.0 * {N}
        del value, result
        px._run._last_result = None
        gc.collect()
        print(os.listdir({shm_dir!r}))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_mapped_pages_a_process_task_reads_count_in_its_peak_memory(shm_dir):
    """A consumer that reads a 32 MiB segment shows it in its measured peak memory."""
    big = 4 << 20
    result = run((helpers.make_array, "big", (big,), "process"),
                 (helpers.make_array, "small", (1,), "process"),
                 (helpers.array_sum, "read_big", ("big",), "process"),
                 (helpers.array_sum, "read_small", ("small",), "process"), keep="leaves")
    grown = result.tasks["read_big"].peak_memory - result.tasks["read_small"].peak_memory
    assert grown >= 0.9 * 8 * big, grown


def test_discard_unlinks_only_what_nothing_holds(shm_dir):
    """A reply the driver drops loses its segments, but not those its values still use."""
    held = _shm.write(memoryview(bytearray(N)), os.getpid(), shm_dir)
    dropped = _shm.write(memoryview(bytearray(N)), os.getpid(), shm_dir)
    seg = _shm.own(_shm.Segment(held, N))
    _shm.discard([(held, 0, N), (dropped, 0, N), (None, 0, N)])
    assert segments(shm_dir) == [os.path.basename(held)]
    del seg
    assert segments(shm_dir) == []


def test_mixed_thread_and_process_values_leave_nothing_behind(shm_dir):
    """Values crossing thread and process tasks both ways arrive intact; no segment is left."""
    tasks = []
    for i in range(4):
        iso = ("thread", "process")[i % 2]
        tasks += [(helpers.make_array, f"p{i}", (N // 4, float(i)), iso),
                  (helpers.identity, f"i{i}", (f"p{i}",), ("process", "thread")[i % 2]),
                  (helpers.array_sum, f"s{i}", (f"i{i}",), "process")]
    result = run(*tasks, keep="leaves")
    assert [result[f"s{i}"] for i in range(4)] == [i * (N // 4) for i in range(4)]
    del result
    forget_last_result()
    assert segments(shm_dir) == []


def test_segments_go_when_the_driver_exits_holding_values(run_script, shm_dir):
    """A driver that exits normally while it still holds mapped values leaves no segment."""
    result = run_script(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import helpers, parexec as px
        from parexec import _shm
        _shm.directory = {shm_dir!r}
        with px.Workflow("w", isolation="process") as wf:
            wf.add(px.task(helpers.make_array).options(id="p"), {N})
        value = px.run(wf, progress=False)["p"]
        assert len(os.listdir({shm_dir!r})) == 1
    """)
    assert result.returncode == 0, result.stderr
    assert os.listdir(shm_dir) == []
