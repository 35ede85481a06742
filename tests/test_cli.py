"""Tests of parexec.cli: commands, exit statuses, messages without tracebacks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "examples" / "pipelines" / "complex.yaml"


def parexec(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "parexec", *map(str, args)],
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_run_prints_summary_and_writes_trace(tmp_path):
    """`parexec run` succeeds (exit 0), prints the summary and writes a loadable trace."""
    trace = tmp_path / "t.json"
    proc = parexec("run", EXAMPLE, "--trace", trace)
    assert proc.returncode == 0, proc.stderr
    assert "Complex Parallel Workflow: succeeded (10 succeeded)" in proc.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    assert len([e for e in events if e["ph"] == "X"]) == 10
    assert any(e["ph"] == "M" and e["name"] == "thread_name" for e in events)


def test_validate_and_graph_formats():
    """validate says ok; graph prints dot, levels and the critical path."""
    assert "ok (10 steps in 4 levels)" in parexec("validate", EXAMPLE).stdout
    assert parexec("graph", EXAMPLE).stdout.startswith('digraph "Complex Parallel Workflow"')
    levels = parexec("graph", EXAMPLE, "--format", "levels").stdout.splitlines()
    assert levels[0] == "0: setup-env validate-config check-dependencies"
    path = parexec("graph", EXAMPLE, "--format", "critical-path").stdout.strip()
    assert path.endswith("-> deploy")


@pytest.mark.parametrize("content, words", [
    ("name: x\nsteps:\n\t- id: a\n", "tab character"),
    ("name: x\nsteps:\n  - id: a\n    type: nope\n", "unknown type 'nope'"),
    ("name: [unclosed\n", "YAML syntax error"),
    ("name: x\nsteps: &a [*a]\n", "anchor &a contains itself"),
    ("name: a\x07b\n", "character '\\x07' is not allowed"),
])
def test_invalid_file_exits_2_without_traceback(tmp_path, content, words):
    """A bad file: exit status 2, one clear message, no Python traceback."""
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    proc = parexec("run", f)
    assert proc.returncode == 2 and words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_usage_errors_exit_2():
    """Unknown options and a missing file exit with status 2."""
    assert parexec("run").returncode == 2
    proc = parexec("run", "/nonexistent.yaml")
    assert proc.returncode == 2 and "cannot read" in proc.stderr
    assert parexec("run", EXAMPLE, "--set", "novalue").returncode == 2


def test_failed_pipeline_exits_1_and_verbose_streams_output(tmp_path):
    """A failing step: exit 1 with the error; --verbose prefixes lines with the step id."""
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nsteps:\n"
                 "  - id: talk\n    type: script\n    config: {command: python3, args: ['-c', "
                 "'print(\"hello\")']}\n"
                 "  - id: fail\n    type: script\n    config: {command: python3, args: ['-c', "
                 "'import sys; sys.exit(3)']}\n    dependsOn: [talk]\n")
    proc = parexec("run", f, "--verbose", "--quiet")
    assert proc.returncode == 1
    assert "[talk] hello" in proc.stdout
    assert "step 'fail' failed: step 'fail' exited with status 3" in proc.stderr


def test_ctrl_c_exits_130_and_stops_steps(tmp_path):
    """SIGINT during a run: exit 130, and the step's process is gone."""
    f = tmp_path / "slow.yaml"
    f.write_text("name: slow\nsteps:\n  - id: wait\n    type: script\n"
                 "    config: {command: python3, args: ['-c', 'import time; print(1, flush=True);"
                 " time.sleep(60)']}\n")
    proc = subprocess.Popen([sys.executable, "-m", "parexec", "run", str(f), "--verbose",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "[wait] 1"  # the step is running
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


def test_store_and_resume_from_the_command_line(tmp_path):
    """--store records steps; --resume skips the ones that succeeded; a bad store exits 2."""
    f = tmp_path / "p.yaml"
    marker = tmp_path / "count"
    step = tmp_path / "step.py"
    step.write_text(f"open({str(marker)!r}, 'a').write('x')\nprint('counted')\n")
    f.write_text("name: p\nsteps:\n  - id: count\n    type: script\n"
                 f"    config: {{command: python3, args: [{str(step)!r}]}}\n")
    db = tmp_path / "s.db"
    assert parexec("run", f, "--store", db, "--quiet").returncode == 0
    proc = parexec("run", f, "--store", db, "--resume")
    assert proc.returncode == 0 and " cached " in proc.stdout
    assert marker.read_text() == "x"
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"junk" * 1000)
    proc = parexec("run", f, "--store", junk)
    assert proc.returncode == 2 and "not a parexec store" in proc.stderr
    assert "Traceback" not in proc.stderr


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting for its reaper counts as gone)."""
    import psutil
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGHUP,),
                                     (signal.SIGTERM, signal.SIGTERM)],
                         ids=["SIGTERM", "SIGHUP", "SIGTERM-twice"])
def test_stop_signals_cancel_the_run_like_ctrl_c(tmp_path, signals):
    """SIGTERM/SIGHUP to `parexec run`: the steps' processes are killed, the partial summary
    is printed, and the exit status is 128 + the first signal; a second signal 10 ms later,
    during the cleanup, changes none of that."""
    import os
    import time
    f = tmp_path / "slow.yaml"
    f.write_text("name: slow\nsteps:\n  - id: wait\n    type: script\n"
                 "    config: {command: sh, args: ['-c', 'sleep 4321 & echo $!; wait']}\n")
    proc = subprocess.Popen([sys.executable, "-m", "parexec", "run", str(f), "--verbose"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sleeper = None
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("[wait] "), line  # the step is running; its sleep's pid
        sleeper = int(line.split()[1])
        for k, signum in enumerate(signals):
            if k:
                time.sleep(0.01)  # a second signal while the run cleans up
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signals[0], err
        assert "Traceback" not in err
        assert "slow: cancelled" in out + err and "wait" in out + err  # the partial summary
        deadline = time.monotonic() + 10
        while not _gone(sleeper):
            assert time.monotonic() < deadline, "the step's sleep outlived the command"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        if sleeper is not None and not _gone(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def test_cli_restores_the_callers_signal_handlers(tmp_path):
    """main() installs its SIGTERM/SIGHUP handlers only for the run and puts back the caller's."""
    from parexec.cli import main
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nsteps:\n  - id: j\n    type: python\n"
                 "    config: {call: 'os.path:join', args: [a, b]}\n")

    def mine(signum, frame):  # pragma: no cover - never called
        pass
    before = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        assert main(["run", str(f), "--quiet"]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGHUP) is mine
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@pytest.mark.parametrize("command", ["validate", "run", "graph"])
def test_file_not_utf8_exits_2_naming_the_byte(tmp_path, command):
    """A file that is not UTF-8: exit 2, one line naming the file and the byte, no traceback."""
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\u00e9\nsteps: []\n".encode("latin-1"))
    proc = parexec(command, f)
    assert proc.returncode == 2, proc.stderr
    assert f"{f}:1:10: not UTF-8: byte 0xe9 at offset 9" in proc.stderr
    assert "Traceback" not in proc.stderr


def _marker_pipeline(tmp_path):
    """A pipeline whose only step creates ``ran``; returns (file, marker)."""
    f = tmp_path / "p.yaml"
    marker = tmp_path / "ran"
    f.write_text("name: p\nsteps:\n  - id: touch\n    type: script\n"
                 "    config: {command: python3, args: ['-c', "
                 f"\"open({str(marker)!r}, 'w')\"]}}\n")
    return f, marker


def test_resume_without_store_names_the_flags(tmp_path):
    """--resume without --store: exit 2 with a message naming both flags; nothing runs."""
    f, marker = _marker_pipeline(tmp_path)
    proc = parexec("run", f, "--resume")
    assert proc.returncode == 2
    assert "--resume needs --store DB" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("where", ["missing-dir/t.json", "adir", "afile/t.json"])
def test_unwritable_trace_is_refused_before_anything_runs(tmp_path, where):
    """--trace to a path that cannot be written: exit 2 naming it, and no step ran."""
    f, marker = _marker_pipeline(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    proc = parexec("run", f, "--trace", tmp_path / where)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot write the trace to {tmp_path / where}" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    assert not (tmp_path / "adir" / "t.json").exists()


def test_trace_that_fails_after_the_run_gives_a_non_zero_exit(tmp_path):
    """If the trace cannot be written once the run is over, the exit status says so."""
    out = tmp_path / "out"
    out.mkdir()
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nsteps:\n  - id: rm\n    type: script\n"
                 f"    config: {{command: rm, args: ['-rf', {str(out)!r}]}}\n")
    proc = parexec("run", f, "--trace", out / "t.json")
    assert proc.returncode == 2, proc.stderr
    assert "p: succeeded" in proc.stdout
    assert f"cannot write the trace to {out / 't.json'}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_module_that_fails_to_import_is_one_clear_line(tmp_path):
    """A python step whose module raises on import: exit 2, the error named, no traceback."""
    (tmp_path / "badmod.py").write_text("raise RuntimeError('no config here')\n")
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nsteps:\n  - id: s\n    type: python\n"
                 "    config: {call: 'badmod:main'}\n")
    import os
    proc = parexec("validate", f, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2
    assert "step 's': cannot import module 'badmod' (RuntimeError: no config here)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_printed_step_output_and_errors_cannot_forge_lines(tmp_path):
    """Step output (--verbose) and error text are printed with control characters escaped;
    a line break inside an error is indented, so it cannot pass for a line of parexec's own."""
    script = tmp_path / "evil.py"
    script.write_text(
        "import sys\n"
        "print('out\\x1b[2K\\rforged-out\\x1b]0;title\\x07')\n"
        "sys.stderr.write('bad\\x1b[1A\\rthing\\nparexec: step \\'x\\' failed: forged\\n')\n"
        "sys.exit(3)\n")
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nsteps:\n  - id: evil\n    type: script\n"
                 f"    config: {{command: python3, args: [{str(script)!r}]}}\n")
    proc = parexec("run", f, "--verbose")
    assert proc.returncode == 1
    for text in (proc.stdout, proc.stderr):
        assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert "[evil] out\\x1b[2K\\rforged-out\\x1b]0;title\\x07" in proc.stdout
    assert "bad\\x1b[1A\\rthing" in proc.stderr
    assert not any(line.startswith("parexec: step 'x'") for line in proc.stderr.splitlines())


def test_run_help_says_output_needs_verbose():
    """`parexec run --help` says that step output is shown only with --verbose."""
    out = " ".join(parexec("run", "--help").stdout.split())
    assert "Step output is shown only with --verbose" in out


def test_failing_step_output_tail_is_printed_under_the_summary(tmp_path):
    """Without --verbose, a failing step's last output lines are printed after the summary."""
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nsteps:\n  - id: build\n    type: script\n    config: {command: "
                 "python3, args: ['-c', 'print(\"compiling\"); print(\"error: x.h missing\"); "
                 "raise SystemExit(1)']}\n")
    proc = parexec("run", f)
    assert proc.returncode == 1
    assert "p: failed" in proc.stdout
    assert "last lines of stdout:\n  compiling\n  error: x.h missing" in proc.stderr


def test_closed_stdout_is_not_a_traceback():
    """`parexec ... | head` closing the pipe early: no traceback, exit 141 (128 + SIGPIPE)."""
    proc = subprocess.Popen([sys.executable, "-m", "parexec", "validate", str(EXAMPLE)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the child can write: its write fails with EPIPE
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 128 + signal.SIGPIPE


def test_foreach_items_show_in_the_summary(tmp_path):
    """A foreach step's items appear in the summary as step[0], step[1], ... with the step."""
    f = tmp_path / "each.yaml"
    f.write_text("name: each\nsteps:\n"
                 "  - {id: hi, type: script, foreach: [ann, bob], "
                 "config: {command: echo, args: ['${item}']}}\n")
    proc = parexec("run", f)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()
            if line.startswith("hi")}
    assert rows == {"hi.items": "succeeded", "hi": "succeeded", "hi[0]": "succeeded",
                    "hi[1]": "succeeded"}
    assert "each: succeeded (4 succeeded)" in proc.stdout


@pytest.mark.parametrize("keep, kept", [("all", {"a": "A", "b": "A B"}),
                                        ("leaves", {"a": None, "b": "A B"})])
def test_keep_option_passes_keep_to_the_run(tmp_path, keep, kept):
    """--keep leaves releases the values of steps something depends on; --keep all (the
    default) keeps every value."""
    import parexec as px
    from parexec.cli import main
    f = tmp_path / "k.yaml"
    f.write_text("name: k\nsteps:\n"
                 "  - {id: a, type: script, config: {command: echo, args: [A]}}\n"
                 "  - {id: b, type: script, config: {command: echo, "
                 "args: ['${steps.a.output} B']}}\n")
    assert main(["run", str(f), "--quiet", "--keep", keep]) == 0
    result = px.last_result()
    assert {k: result.tasks[k].value for k in ("a", "b")} == kept
    assert result.tasks["a"].status == "succeeded"


def test_keep_option_is_documented_and_checked():
    """--help describes --keep; a value other than all or leaves is a usage error (exit 2)."""
    help_text = parexec("run", "--help").stdout
    assert "--keep {all,leaves}" in help_text and "leaves" in help_text
    proc = parexec("run", EXAMPLE, "--keep", "some")
    assert proc.returncode == 2 and "invalid choice: 'some'" in proc.stderr


def test_validate_counts_foreach_steps_once(tmp_path):
    """validate counts the file's steps: a foreach step is one step (its item list is not)."""
    f = tmp_path / "v.yaml"
    f.write_text("name: v\nsteps:\n"
                 "  - {id: a, type: script, config: {command: echo}}\n"
                 "  - {id: b, type: script, foreach: [1, 2], config: {command: echo}}\n")
    assert "ok (2 steps in " in parexec("validate", f).stdout


@pytest.mark.timeout(60)
def test_two_runs_in_one_interpreter_keep_their_own_output_setting(tmp_path, capsys):
    """A --verbose run and a quiet run at once in one interpreter: only the verbose run echoes.

    Output settings travel with each loaded workflow, not through a module global, so the
    quiet run's step (which prints while the verbose run is still going) stays silent.
    """
    import threading

    from parexec.cli import main

    def wait_for(name):  # a shell loop waiting (at most 60 s) for a file of the test
        return f"i=0; while [ ! -e {tmp_path / name} ] && [ $i -lt 6000 ]; do sleep 0.01; " \
               "i=$((i+1)); done"
    loud, quiet = tmp_path / "loud.yaml", tmp_path / "quiet.yaml"
    loud.write_text("name: loud\nsteps:\n  - id: loud-step\n    type: script\n    config: "
                    "{command: sh, args: ['-c', " + repr(
                        f"echo from-loud; touch {tmp_path / 'loud-started'}; "
                        + wait_for("quiet-done")) + "]}\n")
    quiet.write_text("name: quiet\nsteps:\n  - id: quiet-step\n    type: script\n    config: "
                     "{command: sh, args: ['-c', " + repr(
                         wait_for("loud-started") + "; echo from-quiet; "
                         f"touch {tmp_path / 'quiet-done'}") + "]}\n")
    codes = {}
    runs = [threading.Thread(target=lambda n=n, a=a: codes.__setitem__(n, main(a)))
            for n, a in (("loud", ["run", str(loud), "--quiet", "--verbose"]),
                         ("quiet", ["run", str(quiet), "--quiet"]))]
    for t in runs:
        t.start()
    for t in runs:
        t.join(50)
    assert codes == {"loud": 0, "quiet": 0}
    out = capsys.readouterr().out
    assert "[loud-step] from-loud" in out
    assert "from-quiet" not in out


@pytest.mark.parametrize("program", [True, False])
def test_a_stopped_command_ignores_repeats_until_it_exits(program):
    """After a stop signal the command leaves SIGTERM/SIGHUP ignored (SIG_IGN, which survives
    the interpreter's shutdown, unlike a Python handler); a library call restores the caller's."""
    import os

    from parexec.cli import _stop_on_signals, _Stopped

    def mine(signum, frame):  # pragma: no cover - never called
        pass
    before = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(_Stopped), _stop_on_signals(program):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**6):  # the handler runs between bytecodes, at once
                pass
        expected = signal.SIG_IGN if program else mine
        assert signal.getsignal(signal.SIGTERM) is expected
        assert signal.getsignal(signal.SIGHUP) is expected
    finally:
        for s, h in before.items():
            signal.signal(s, h)
