"""Tests of parexec._store: records, resume across interpreters, fingerprints, durations,
unusable stores, crashes."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
import warnings

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


# Write failures are never silent (issue 12 item 11) ------------------------------------------

def three_tasks(name="w"):
    with px.Workflow(name) as wf:
        for i in range(3):
            wf.add(px.task(abs).options(id=f"t{i}"), -i)
    return wf


def hold_write_lock(path):
    """Another program's connection holding the store's write lock until closed."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_lock_held_past_the_timeout_loses_records_and_the_run_says_so(tmp_path):
    """Another program holds the write lock longer than the store waits: every record is
    counted lost, the run raises StoreError naming the count, and warns."""
    path = tmp_path / "s.db"
    store = Store(path, timeout=0.5)
    holder = hold_write_lock(path)
    try:
        with pytest.warns(RuntimeWarning, match="3 record"), \
                pytest.raises(px.StoreError, match=r"3 record\(s\).*on_write_error='warn'"):
            px.run(three_tasks(), store=store, progress=False)
    finally:
        holder.close()
    assert store.lost == 3
    assert isinstance(store.write_error, px.StoreError)
    assert "locked" in str(store.write_error) and str(path) in str(store.write_error)
    store.close()


def test_lost_records_only_warn_when_the_store_says_so(tmp_path):
    """on_write_error='warn': the run returns its result and warns with the count."""
    path = tmp_path / "s.db"
    store = Store(path, timeout=0.5, on_write_error="warn")
    holder = hold_write_lock(path)
    try:
        with pytest.warns(RuntimeWarning, match="3 record"):
            result = px.run(three_tasks(), store=store, progress=False)
    finally:
        holder.close()
    assert result.ok and store.lost == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next run lost nothing: it warns of nothing
        assert px.run(three_tasks(), store=store, progress=False).ok
    assert store.lost == 3
    store.close()


@pytest.mark.timeout(60)
def test_a_write_waits_for_a_lock_shorter_than_the_timeout(tmp_path):
    """A lock released before the store's timeout costs no record: the run waits for it."""
    path = tmp_path / "s.db"
    store = Store(path, timeout=30)
    holder = hold_write_lock(path)
    try:
        run = px.start(three_tasks(), store=store, progress=False)
        with pytest.raises(px.WaitTimeout):
            run.wait(timeout=1.0)  # the run ends by flushing its records: it waits for us
    finally:
        holder.close()
    assert run.wait(timeout=30).ok
    assert store.lost == 0
    rows = sqlite3.connect(path).execute("SELECT count(*) FROM records").fetchone()
    assert rows == (3,)
    store.close()


def test_read_only_store_loses_every_record_and_counts_them(tmp_path):
    """A store SQLite refuses to write (read-only) loses every record; all are counted."""
    path = tmp_path / "s.db"
    store = Store(path)
    store._writer.db.execute("PRAGMA query_only=1")  # what a read-only file does, also as root
    with pytest.warns(RuntimeWarning), pytest.raises(px.StoreError, match="3 record"):
        px.run(three_tasks(), store=store, progress=False)
    assert store.lost == 3 and "read-only" in str(store.write_error)
    store.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_read_only_file_is_a_store_error_before_anything_runs(tmp_path):
    """A store file without write permission is refused before any task runs."""
    path = tmp_path / "s.db"
    Store(path).close()
    path.chmod(0o400)
    with pytest.raises(px.StoreError, match="read-only"):
        px.run(three_tasks(), store=path, progress=False)


# Every sqlite3 error is a StoreError (issue 12 items 12 and 19) -------------------------------

def test_damaged_store_is_a_store_error_naming_the_file(tmp_path):
    """A store whose pages were overwritten after it was written (its schema still readable)
    is a StoreError naming the file, from the run and from each reading method, never a raw
    sqlite3 error."""
    path = tmp_path / "s.db"
    with px.Workflow("w") as wf:
        for i in range(300):
            wf.add(px.task(str).options(id=f"task-{i}"), "x" * 200)
    px.run(wf, store=path, progress=False)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(4096)  # keep the first page (the schema), damage every table
        f.write(b"\xff" * (size - 4096))
    with pytest.raises(px.StoreError, match="damaged") as info:
        px.run(wf, store=path, resume=True, progress=False)
    assert str(path) in str(info.value)
    store = Store(path)
    for call in (lambda: store.durations("w"), lambda: store.cached("w", {"task-1": "ab"}),
                 lambda: store.peak_memory("w"), lambda: store.prune(keep_last=1)):
        with pytest.raises(px.StoreError, match="damaged"):
            call()
    store.close()


def test_store_path_that_is_a_directory(tmp_path):
    """A directory given as the store says so, and suggests a file inside it."""
    with pytest.raises(px.StoreError, match="is a directory") as info:
        px.run(three_tasks(), store=tmp_path, progress=False)
    assert "runs.db" in str(info.value)


@pytest.mark.parametrize("value", [5, 2.5, ["a.db"], "", ":memory:"])
def test_store_of_the_wrong_kind_names_the_value(value):
    """store=5 (or a list, an empty path, ':memory:') is a TaskOptionError naming it."""
    with pytest.raises(px.TaskOptionError, match=re.escape(repr(value))):
        px.run(three_tasks(), store=value, progress=False)
    with pytest.raises(px.TaskOptionError, match=re.escape(repr(value))):
        Store(value)


# Resume does not load history (issue 12 item 10) ---------------------------------------------

LOADS: list[str] = []


class Counted:
    """A value that notes in LOADS each time it is unpickled."""

    def __init__(self, payload):
        self.payload = payload

    def __reduce__(self):
        return (load_counted, (self.payload,))


def load_counted(payload):
    LOADS.append(payload)
    return Counted(payload)


def make_counted(payload):
    return Counted(payload)


def counted_workflow(version):
    with px.Workflow("h") as wf:
        wf.add(px.task(make_counted).options(id="big"), version)
        wf.add(px.task(make_counted).options(id="other"), "o")
    return wf


def test_resume_loads_only_the_values_it_serves(tmp_path):
    """History of one task (three versions, the last recorded three times) keeps one record
    per version; cached() loads nothing, and a resume loads each served value once."""
    from parexec._fingerprint import fingerprints
    db = tmp_path / "s.db"
    for version in ("a", "b", "c", "c", "c"):
        px.run(counted_workflow(version), store=db, progress=False)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM records WHERE task_id = 'big'").fetchone() == (3,)
    wf = counted_workflow("c")
    g = wf.graph()
    fps = fingerprints(list(wf.tasks.values()), g.order, g.deps)
    LOADS.clear()
    with Store(db) as store:
        cached = store.cached("h", dict(zip(wf.tasks, fps, strict=True)))
        assert len(cached) == 2 and "big" in cached and LOADS == []
        assert cached.get("big").payload == "c" and LOADS == ["c"]
        assert cached.get("missing", 7) == 7
    LOADS.clear()
    result = px.run(wf, store=db, resume=True, progress=False)
    assert {t.status for t in result.tasks.values()} == {"cached"}
    assert sorted(LOADS) == ["c", "o"]


def test_store_lookups_use_indexes(tmp_path):
    """Every statement that durations(), peak_memory(), cached() and a served value run
    reads the store through an index (no full scan of records, vals or latest)."""
    from parexec._fingerprint import fingerprints
    db = tmp_path / "s.db"
    for version in ("a", "b"):
        px.run(counted_workflow(version), store=db, progress=False)
    wf = counted_workflow("b")
    g = wf.graph()
    wanted = dict(zip(wf.tasks, fingerprints(list(wf.tasks.values()), g.order, g.deps),
                      strict=True))
    with Store(db) as store:
        statements: list[str] = []
        store._rdb.set_trace_callback(statements.append)
        assert set(store.durations("h")) == {"big", "other"}
        store.peak_memory("h")
        assert store.cached("h", wanted).get("big").payload == "b"
        store._rdb.set_trace_callback(None)
    conn = sqlite3.connect(db)
    plans = {sql: [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
             for sql in statements if sql.lstrip().upper().startswith("SELECT")}
    assert len(plans) == 4, statements  # durations, peak_memory, cached, one value
    for sql, plan in plans.items():
        scans = [step for step in plan if step.startswith("SCAN")
                 and "VIRTUAL TABLE" not in step]
        assert not scans, (sql, plan)
        # History is reached per task (records_key), never as a range over a workflow's
        # whole history; the latest table holds one row per task.
        ranges = [step for step in plan if "records" in step and "task_id=?" not in step]
        assert not ranges, (sql, plan)


def versions_workflow(version):
    with px.Workflow("p") as wf:
        a = wf.add(px.task(abs).options(id="a"), version)
        wf.add(px.task(abs).options(id="b"), a)
    return wf


def test_prune_keeps_the_newest_records_of_each_task(tmp_path):
    """prune(keep_last=2) keeps the two newest records of each task (resume still serves
    them, not the pruned ones); older_than= deletes by age, for one workflow or all; the
    latest durations follow what is left."""
    db = tmp_path / "s.db"
    for version in range(1, 5):
        px.run(versions_workflow(-version), store=db, progress=False)
    px.run(three_tasks("other"), store=db, progress=False)
    with Store(db) as store:
        assert store.prune("p", keep_last=2) == 4
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT task_id, count(*) FROM records WHERE workflow = 'p' "
                            "GROUP BY task_id").fetchall() == [("a", 2), ("b", 2)]
        assert conn.execute("SELECT count(*) FROM vals").fetchone() == (4 + 3,)
        kept = px.run(versions_workflow(-4), store=store, resume=True, progress=False)
        gone = px.run(versions_workflow(-1), store=store, resume=True, progress=False)
        assert {t.status for t in kept.tasks.values()} == {"cached"}
        assert {t.status for t in gone.tasks.values()} == {"succeeded"}
        assert set(store.durations("p")) == {"a", "b"}
        conn.execute("UPDATE records SET recorded = recorded - 10 * 86400")
        conn.commit()
        assert store.prune("nothing-here", older_than=5 * 86400) == 0
        assert store.prune("p", keep_last=1, older_than=5 * 86400) == 4  # 3 versions each
        assert store.prune(older_than=5 * 86400) == 2 + 3
        assert store.durations("p") == {} and store.durations("other") == {}
        assert conn.execute("SELECT count(*) FROM vals").fetchone() == (0,)
        with pytest.raises(px.TaskOptionError, match="keep_last"):
            store.prune()
        with pytest.raises(px.TaskOptionError, match="-1"):
            store.prune(keep_last=-1)


def parexec_command(*args):
    """Run the ``parexec`` command in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "parexec", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_cli_store_prune(tmp_path):
    """`parexec store prune DB --keep-last N [--workflow W] [--older-than DAYS]` deletes old
    records and says how many; bad options and a missing file exit 2 with a message."""
    db = tmp_path / "s.db"
    for version in range(1, 4):
        px.run(versions_workflow(-version), store=db, progress=False)
    proc = parexec_command("store", "prune", db, "--workflow", "p", "--keep-last", "1")
    assert proc.returncode == 0 and "4 record(s) deleted" in proc.stdout, proc.stderr
    proc = parexec_command("store", "prune", db, "--older-than", "1")
    assert proc.returncode == 0 and "0 record(s) deleted" in proc.stdout, proc.stderr
    proc = parexec_command("store", "prune", db)
    assert proc.returncode == 2 and "--keep-last N and/or --older-than DAYS" in proc.stderr
    proc = parexec_command("store", "prune", db, "--keep-last", "-3")
    assert proc.returncode == 2 and "-3" in proc.stderr
    proc = parexec_command("store", "prune", tmp_path / "nope.db", "--keep-last", "1")
    assert proc.returncode == 2 and "nope.db" in proc.stderr
    assert "Traceback" not in proc.stderr


# Records are not lost at exit (issue 21 item 3) ----------------------------------------------

EXIT_SCRIPT = """
    import os, sys, threading, parexec as px
    def big(i):
        return bytes([i]) * 80_000_000
    def small(i):
        return i
    def forever():
        threading.Event().wait()  # still running when the driver goes away
    completed = []
    def on_event(e):
        if e.kind == "task:completed":
            completed.append(e.task_id)
            if len(completed) == NBIG + NSMALL:
                open("finished", "w").close()
                finished.set()
    finished = threading.Event()
    NBIG, NSMALL = int(sys.argv[1]), int(sys.argv[2])
    with px.Workflow("exit") as wf:
        bigs = [wf.add(px.task(big).options(id=f"big{i}"), i) for i in range(NBIG)]
        for i in range(NSMALL):  # finish after the big ones: their records queue behind
            wf.add(px.task(small).options(id=f"small{i}", after=bigs), i)
        wf.add(px.task(forever).options(id="forever"))
    run = px.start(wf, store="exit.db", progress=False, on_event=on_event,
                   max_workers=NBIG + 2)
    finished.wait(120)
    if sys.argv[3] == "exit":
        sys.exit(0)  # a normal exit, with the run still active
    threading.Event().wait()  # until killed
"""


def records_in(path):
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT task_id, has_value FROM records"))
    finally:
        conn.close()


@pytest.mark.timeout(180)
def test_records_of_large_values_survive_a_normal_exit(tmp_path):
    """Ten 80 MB results, then the interpreter exits at once with a px.start run still
    active: all ten records, with their values, are in the store (flushed at exit)."""
    (tmp_path / "exit.py").write_text(textwrap.dedent(EXIT_SCRIPT))
    proc = subprocess.run([sys.executable, "exit.py", "10", "0", "exit"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr
    assert records_in(tmp_path / "exit.db") == {f"big{i}": 1 for i in range(10)}
    conn = sqlite3.connect(tmp_path / "exit.db")
    assert conn.execute("SELECT max(length(value)) FROM vals").fetchone()[0] > 80_000_000


@pytest.mark.timeout(180)
def test_records_of_finished_tasks_survive_sigkill(tmp_path):
    """SIGKILL of the driver one second after its tasks finished: every finished task has
    its record, and the small values queued behind four 80 MB ones have theirs."""
    (tmp_path / "exit.py").write_text(textwrap.dedent(EXIT_SCRIPT))
    proc = subprocess.Popen([sys.executable, "exit.py", "4", "10", "wait"], cwd=tmp_path,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "finished").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(1.0)  # the promise under test: records of tasks finished 1 s ago are safe
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    records = records_in(tmp_path / "exit.db")
    assert set(records) == {f"big{i}" for i in range(4)} | {f"small{i}" for i in range(10)}
    assert all(records[f"small{i}"] == 1 for i in range(10)), records


# Code reached through a module (issue 12 item 7) ---------------------------------------------

MODULE_PIPELINE = """
    import json, sys
    import mylib, pkg.sub
    import parexec as px
    @px.task
    def through_module(x):
        return mylib.transform(x)
    @px.task
    def through_submodule(x):
        return pkg.sub.scale(x)
    @px.task
    def through_stdlib(x):
        return json.dumps(x)
    with px.Workflow("m") as wf:
        a = through_module(2)
        b = through_submodule(3)
        c = through_stdlib([1])
    r = px.run(wf, store="m.db", resume=True, progress=False)
    print(r[a], r[b], sorted(k for k, v in r.tasks.items() if v.status == "cached"))
"""


def test_code_reached_through_a_module_is_part_of_the_fingerprint(tmp_path):
    """mylib.transform(x) and pkg.sub.scale(x) changed in their own files: exactly the
    tasks calling them run again; json.dumps (standard library) counts by name."""
    (tmp_path / "pipe.py").write_text(textwrap.dedent(MODULE_PIPELINE))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")

    def write(transform, scale):
        (tmp_path / "mylib.py").write_text(f"def transform(x):\n    return {transform}\n")
        (tmp_path / "pkg" / "sub.py").write_text(
            f"def helper(x):\n    return {scale}\n\ndef scale(x):\n    return helper(x)\n")

    def run():
        proc = subprocess.run([sys.executable, "-B", "pipe.py"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    write("x * 10", "x + 1")
    assert run() == "20 4 []"
    everything = "['through_module', 'through_stdlib', 'through_submodule']"
    assert run() == f"20 4 {everything}"
    write("x * 1000", "x + 1")
    assert run() == "2000 4 ['through_stdlib', 'through_submodule']"
    write("x * 1000", "x + 2")  # changed in a function the submodule's function calls
    assert run() == "2000 5 ['through_module', 'through_stdlib']"
    assert run() == f"2000 5 {everything}"


# One Store, several runs (issue 13) ----------------------------------------------------------

def test_one_store_serves_several_runs_and_closes_once(tmp_path):
    """A Store passed in by the caller serves runs one after another and at once, before
    and after flush(); close() is idempotent, and a closed store says so."""
    store = Store(tmp_path / "s.db")
    assert px.run(three_tasks(), store=store, progress=False).ok
    assert store.flush(timeout=30)
    again = px.run(three_tasks(), store=store, resume=True, progress=False)
    assert {t.status for t in again.tasks.values()} == {"cached"}
    runs = [px.start(three_tasks(f"w{k}"), store=store, progress=False) for k in range(2)]
    assert all(r.wait(timeout=60).ok for r in runs)
    assert store.flush() and store.lost == 0
    assert set(store.durations("w1")) == {"t0", "t1", "t2"}
    store.close()
    store.close()
    with pytest.raises(px.StoreError, match="closed"):
        store.durations("w")
    with pytest.raises(px.StoreError, match="closed"):
        px.run(three_tasks(), store=store, progress=False)


def finished(task_id, status="succeeded", peak=None, duration=1.0):
    """A TaskRun-like record for Store.record."""
    import types
    return types.SimpleNamespace(
        id=task_id, status=status, attempts=1, started_at=0.0, finished_at=duration,
        duration=duration, worker="w", peak_memory=peak, value=task_id, error=None)


def test_peak_memory_of_the_latest_success(tmp_path):
    """peak_memory() gives each task's peak from its latest success (as durations() does):
    later failures do not change it, and a success that measured nothing is left out."""
    with Store(tmp_path / "s.db") as store:
        store.record("w", finished("a", peak=100), "fp1")
        store.record("w", finished("a", peak=300, duration=2.0), "fp2")
        store.record("w", finished("a", status="failed", peak=999), "fp3")
        store.record("w", finished("b", peak=None), "fp1")
        store.record("other", finished("a", peak=5), "fp1")
        assert store.flush(timeout=30)
        assert store.peak_memory("w") == {"a": 300}
        assert store.durations("w") == {"a": 2.0, "b": 1.0}


def test_a_forked_child_leaves_the_parents_store_alone(tmp_path):
    """A child forked while a store is open does not write to it, says so when asked to
    read, and exits without waiting for the parent's records."""
    store = Store(tmp_path / "s.db")
    px.run(three_tasks(), store=store, progress=False)
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            store.record("w", finished("child"), "fp")
            code |= store.lost != 1
            try:
                store.durations("w")
                code |= 2
            except px.StoreError as exc:
                code |= 4 * ("forked" not in str(exc))
            store.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert set(store.durations("w")) == {"t0", "t1", "t2"} and store.lost == 0
    store.close()


V1_SCHEMA = """
CREATE TABLE records (
    workflow TEXT NOT NULL, task_id TEXT NOT NULL, fingerprint TEXT,
    status TEXT NOT NULL, attempts INTEGER, started REAL, finished REAL, duration REAL,
    worker TEXT, peak_memory INTEGER, value BLOB, has_value INTEGER NOT NULL DEFAULT 0,
    error TEXT, recorded REAL NOT NULL
);
CREATE INDEX records_lookup ON records (workflow, task_id, fingerprint, status);
"""


def test_a_version_1_store_is_migrated(tmp_path):
    """A store written by the previous layout (every record kept, values inline) opens:
    the latest record of each key is kept with its value, and durations carry over."""
    import pickle
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    rows = [("w", "a", "fp", "succeeded", 1.0, pickle.dumps("old"), 1, 1.0),
            ("w", "a", "fp", "succeeded", 2.0, pickle.dumps("new"), 1, 2.0),
            ("w", "a", None, "failed", 3.0, None, 0, 3.0),
            ("w", "b", "fb", "succeeded", 4.0, pickle.dumps("b"), 1, 4.0)]
    conn.executemany("INSERT INTO records (workflow, task_id, fingerprint, status, duration, "
                     "value, has_value, recorded) VALUES (?,?,?,?,?,?,?,?)", rows)
    conn.commit()
    conn.close()
    with Store(path) as store:
        assert store.durations("w") == {"a": 2.0, "b": 4.0}
        cached = store.cached("w", {"a": "fp", "b": "fb"})
        assert (cached["a"], cached["b"]) == ("new", "b")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM records").fetchone() == (3,)
    assert conn.execute("PRAGMA user_version").fetchone() == (2,)


def test_damaged_store_from_the_command_line_exits_2(tmp_path):
    """`parexec run --store` on a damaged store prints one message naming the file and
    exits 2 (it was a raw sqlite3.DatabaseError traceback and exit 1)."""
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nsteps:\n" + "".join(
        f"  - id: s{i}\n    type: script\n    config: {{command: 'true'}}\n" for i in range(60)))
    db = tmp_path / "s.db"
    proc = parexec_command("run", f, "--store", db, "--quiet")
    assert proc.returncode == 0, proc.stderr
    size = db.stat().st_size
    with open(db, "r+b") as fh:
        fh.seek(4096)
        fh.write(b"\xff" * (size - 4096))
    proc = parexec_command("run", f, "--store", db, "--resume", "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert "damaged" in proc.stderr and str(db) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_statuses_are_written_as_text_and_read_back_as_task_status(tmp_path):
    """Store.record writes a status (TaskStatus or its plain text) as its text; a
    version-1 file's statuses are read back as TaskStatus, and one that is no task
    status is a StoreError naming the file, the task and the value."""
    from parexec._status import TaskStatus
    with Store(tmp_path / "s.db") as store:
        store.record("w", finished("a", status=TaskStatus.FAILED), "fp")
        store.record("w", finished("b", status="succeeded"), "fp")
        assert store.flush(timeout=30)
    rows = sqlite3.connect(tmp_path / "s.db").execute(
        "SELECT task_id, status, typeof(status), ok FROM records ORDER BY task_id").fetchall()
    assert rows == [("a", "failed", "text", 0), ("b", "succeeded", "text", 1)]
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.execute("INSERT INTO records (workflow, task_id, status, recorded) VALUES "
                 "('w', 'x', 'exploded', 1.0)")
    conn.commit()
    conn.close()
    with pytest.raises(px.StoreError, match=r"v1\.db.*task 'x'.*status 'exploded'"):
        Store(path)
