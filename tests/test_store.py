"""Tests of parexec._store: records, resume across interpreters, fingerprints, durations,
unusable stores, crashes."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import parexec as px
from parexec._store import Store

PIPELINE = """
    import sys, parexec as px
    LOG = "runs.log"
    SETTINGS = {"names": {"x", "y", "z"}}          # a set: hash order differs per process
    def note(tid):
        with open(LOG, "a") as f:
            f.write(tid + "\\n")
    @px.task
    def load(n):
        note(f"load{n}")
        return list(range(n))
    @px.task
    def scale(xs, factor):
        note("scale")
        return [x * factor + OFFSET for x in xs]
    @px.task
    def total(*parts):
        note("total")
        return sum(sum(p) for p in parts)
    OFFSET = int(sys.argv[3])
    factor, resume = int(sys.argv[1]), sys.argv[2] == "1"
    with px.Workflow("st") as wf:
        a = load(10)
        b = load(5)
        t = total(scale(a, factor), b)
    r = px.run(wf, store="store.db", resume=resume, progress=False)
    print(r[t], sorted(k for k, v in r.tasks.items() if v.status == "cached"))
"""


@pytest.fixture
def pipeline(tmp_path):
    (tmp_path / "pipe.py").write_text(textwrap.dedent(PIPELINE))

    def run(factor, resume, offset=0):
        proc = subprocess.run([sys.executable, "pipe.py", str(factor), str(int(resume)),
                               str(offset)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        logfile = tmp_path / "runs.log"
        log = logfile.read_text().split() if logfile.exists() else []
        logfile.unlink(missing_ok=True)
        return proc.stdout.strip(), log
    return run


def test_resume_across_interpreters_reruns_exactly_what_changed(pipeline, tmp_path):
    """Same inputs in a new interpreter: everything cached. A changed argument or a changed
    global constant reruns exactly the affected tasks."""
    out, log = pipeline(2, False)
    assert out.startswith("100 []") and sorted(log) == ["load10", "load5", "scale", "total"]
    out, log = pipeline(2, True)
    assert out == "100 ['load', 'load-2', 'scale', 'total']" and log == []
    out, log = pipeline(3, True)
    assert out.startswith("145 ") and sorted(log) == ["scale", "total"]
    out, log = pipeline(3, True, offset=1)  # a global the function reads changed
    assert out.startswith("155 ") and sorted(log) == ["scale", "total"]
    mode = stat.S_IMODE(os.stat(tmp_path / "store.db").st_mode)
    assert mode == 0o600


def test_code_constants_are_part_of_the_fingerprint(tmp_path):
    """x + 1 and x + 100 compile to the same bytecode; the constant still changes the fp."""
    from parexec._store import fingerprints

    def fps(fn):
        with px.Workflow("w") as wf:
            wf.add(fn, 1)
        g = wf.graph()
        return fingerprints(list(wf.tasks.values()), g.order, g.deps)[0]

    assert fps(lambda x: x + 1) != fps(lambda x: x + 100)
    assert fps(lambda x: x + 1) == fps(lambda x: x + 1)


def test_failed_tasks_are_never_served(tmp_path):
    """A task that failed runs again on resume; the ones that succeeded do not."""
    from helpers import flaky
    db = tmp_path / "s.db"
    with px.Workflow("f") as wf:
        wf.add(px.task(flaky).options(id="ok"), str(tmp_path / "ok.count"), 0)
        wf.add(px.task(flaky).options(id="bad", on_error="ignore"),
               str(tmp_path / "bad.count"), 5)
    px.run(wf, store=db, progress=False)
    result = px.run(wf, store=db, resume=True, progress=False)
    assert result.tasks["ok"].status == "cached" and result.tasks["bad"].status == "failed"
    assert (tmp_path / "ok.count").read_text() == "1"
    assert (tmp_path / "bad.count").read_text() == "2"


def test_unpicklable_value_is_recorded_without_value(tmp_path):
    """A value that cannot be pickled is recorded without it, with a warning naming the task."""
    import threading
    db = tmp_path / "s.db"
    with px.Workflow("u") as wf:
        wf.add(px.task(threading.Lock).options(id="lock"))
    with pytest.warns(RuntimeWarning, match="'lock'"):
        px.run(wf, store=db, progress=False)
    rows = sqlite3.connect(db).execute("SELECT status, has_value FROM records").fetchall()
    assert rows == [("succeeded", 0)]
    with pytest.warns(RuntimeWarning, match="'lock'"):
        result = px.run(wf, store=db, resume=True, progress=False)
    assert result.tasks["lock"].status == "succeeded"  # ran again


def test_learned_durations_change_which_branch_starts_first(tmp_path):
    """Without estimates the first branch created starts first; after one recorded run, the
    branch that took longer starts first."""
    from helpers import sleep_then
    db = tmp_path / "s.db"
    with px.Workflow("d") as wf:
        a1 = wf.add(px.task(sleep_then).options(id="a1"), 0.01)
        wf.add(px.task(sleep_then).options(id="a2"), 0.01, a1)
        b1 = wf.add(px.task(sleep_then).options(id="b1"), 0.3)
        wf.add(px.task(sleep_then).options(id="b2"), 0.3, b1)

    def first(**kw):
        starts = []
        px.run(wf, max_workers=1, progress=False,
               on_event=lambda e: starts.append(e.task_id) if e.kind == "task:started" else 0,
               **kw)
        return starts[0]

    assert first() == "a1"
    assert first(store=db) == "a1"  # recording run: no durations known yet
    assert first(store=db) == "b1"


@pytest.mark.parametrize("case", ["garbage", "folder", "locked"])
def test_unusable_store_is_a_store_error_before_anything_runs(tmp_path, case):
    """Garbage file, unwritable folder, locked database: StoreError naming the file."""
    ran = []
    with px.Workflow("x") as wf:
        wf.add(ran.append, 1)
    if case == "garbage":
        path = tmp_path / "junk.db"
        path.write_bytes(b"this is not a database" * 100)
        store: object = str(path)
        words = "not a parexec store"
    elif case == "folder":
        store = str(tmp_path / "missing-folder" / "s.db")
        words = "folder exists and is writable"
    else:
        path = tmp_path / "busy.db"
        Store(path).close()
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("PRAGMA journal_mode=DELETE")
        holder.execute("BEGIN EXCLUSIVE")
        words = "locked by another writer"
        try:
            with pytest.raises(px.StoreError, match=words):
                px.run(wf, store=Store(path, timeout=0.3), progress=False)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert ran == []
        return
    with pytest.raises(px.StoreError, match=words) as info:
        px.run(wf, store=store, progress=False)
    assert str(store) in str(info.value)
    assert ran == []


def test_resume_needs_a_store():
    """resume=True without store= is an error."""
    with pytest.raises(px.TaskOptionError, match="resume=True needs store="):
        px.run(px.Workflow("w"), resume=True, progress=False)


def test_two_runs_writing_one_store_at_once(tmp_path):
    """Concurrent writers do not corrupt the store and every record lands."""
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import sys, parexec as px
        with px.Workflow(sys.argv[1]) as wf:
            for i in range(200):
                wf.add(px.task(abs).options(id=f"t{i}"), -i)
        px.run(wf, store="shared.db", progress=False)
    """))
    procs = [subprocess.Popen([sys.executable, str(script), f"wf{k}"], cwd=tmp_path)
             for k in range(2)]
    assert all(p.wait(60) == 0 for p in procs)
    db = sqlite3.connect(tmp_path / "shared.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT count(*) FROM records").fetchone() == (400,)


def test_sigkill_of_the_driver_loses_nothing_finished(tmp_path):
    """Kill the driver (and its workers) with SIGKILL mid-run, resume: no task that had
    finished runs again (at most those finishing at the kill), and the result is complete."""
    script = tmp_path / "long.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time, parexec as px
        def step(i, *prev):
            time.sleep(0.1)
            with open("done.log", "a") as f:
                f.write(f"{i}\\n")
            return i
        with px.Workflow("long", isolation="process") as wf:
            refs = [wf.add(px.task(step).options(id=f"s{i}"), i) for i in range(30)]
            total = wf.add(px.task(lambda *xs: sum(xs)).options(isolation="thread"), *refs)
        r = px.run(wf, max_workers=2, store="long.db", resume=len(sys.argv) > 1,
                   progress=False)
        print("TOTAL", r[total], flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path,
                            start_new_session=True)
    log = tmp_path / "done.log"
    deadline = time.monotonic() + 30
    while not log.exists() or len(log.read_text().split()) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    done_before = log.read_text().split()
    log.unlink()
    out = subprocess.run([sys.executable, str(script), "resume"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "TOTAL 435" in out.stdout
    again = set(log.read_text().split()) & set(done_before)
    assert len(again) <= 2, again  # only tasks finishing at the instant of the kill
