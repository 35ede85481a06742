"""Tests of parexec._yaml: loading pipelines, errors with positions, script and python steps."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest
from helpers import overlap_by_events

import parexec as px

EXAMPLES = Path(__file__).parent.parent / "examples" / "pipelines"
PY = "python3"


def test_complex_example_respects_order_and_pools():
    """The seed's complex pipeline runs; dependencies, pools and overlap hold in the records."""
    wf = px.load(EXAMPLES / "complex.yaml")
    assert wf.max_workers == 6 and wf.pools == {"cpu": 2, "network": 4, "database": 1}
    result = px.run(wf, progress=False)
    assert result.ok
    t = result.tasks
    for step, deps in [("build-frontend", ["setup-env", "validate-config"]),
                       ("test-backend", ["build-backend", "prepare-database"]),
                       ("deploy", ["test-frontend", "test-backend", "integration-tests"])]:
        for dep in deps:
            assert t[step].started_at >= t[dep].finished_at
    first = [t[s] for s in ("setup-env", "validate-config", "check-dependencies")]
    assert max(r.started_at for r in first) < min(r.finished_at for r in first)  # overlap
    assert result["deploy"] == "deployed: frontend tests passed backend tests passed"
    assert result.stats.max_concurrency >= 3


def test_all_problems_are_reported_together_with_positions(tmp_path):
    """Unknown keys (with a suggestion), unknown type, unknown dependency, duplicate id and an
    undeclared input are all reported at once, each with file:line:column."""
    f = tmp_path / "bad.yaml"
    f.write_text(
        "name: bad\n"
        "steps:\n"
        "  - id: a\n"
        "    type: script\n"
        "    config: {command: echo}\n"
        "    dependOn: [b]\n"
        "  - id: a\n"
        "    type: agnt\n"
        "  - id: c\n"
        "    type: script\n"
        "    config: {command: echo, args: ['${inputs.missing}']}\n"
        "    dependsOn: [zz]\n")
    with pytest.raises(px.WorkflowError) as info:
        px.load(f)
    msg = str(info.value)
    assert f"{f}:6:5: unknown key 'dependOn' in step 'a'; did you mean 'dependsOn'?" in msg
    assert "duplicate step id 'a'" in msg
    assert "unknown type 'agnt'; known types: script, python, agent" in msg
    assert "depends on unknown step 'zz'" in msg
    assert "${inputs.missing} refers to an input the pipeline does not declare" in msg
    assert msg.startswith("5 problem(s)")


def test_tabs_are_named_with_their_position(tmp_path):
    """Tab indentation gets a plain explanation and a position."""
    f = tmp_path / "tabs.yaml"
    f.write_text("name: t\nsteps:\n\t- id: a\n")
    with pytest.raises(px.WorkflowError, match=r"tabs.yaml:3:1: tab character used for "
                                               r"indentation"):
        px.load(f)


def test_cycle_is_reported_at_validate():
    """A dependency cycle between steps is a CycleError naming the path."""
    wf = px.loads("name: c\nsteps:\n"
                  "  - {id: a, type: script, config: {command: echo}, dependsOn: [b]}\n"
                  "  - {id: b, type: script, config: {command: echo}, dependsOn: [a]}\n")
    with pytest.raises(px.CycleError, match="a -> b -> a|b -> a -> b"):
        wf.validate()


def test_inputs_defaults_required_and_substitution(tmp_path):
    """Inputs have defaults, required ones must be set, values land inside arguments."""
    text = ("name: i\ninputs: {who: world, count: null}\nenv: {GREETING: hello}\nsteps:\n"
            "  - id: greet\n    type: script\n"
            f"    config: {{command: {PY}, args: ['-c', 'import os,sys; "
            "print(os.environ[\"GREETING\"], *sys.argv[1:])', '${inputs.who}', "
            "'${inputs.count}']}\n")
    with pytest.raises(px.WorkflowError, match="input 'count' is required"):
        px.loads(text)
    with pytest.raises(px.WorkflowError, match="did you mean 'count'"):
        px.loads(text, inputs={"count": "1", "cuont": "2"})
    wf = px.loads(text, inputs={"count": "3"})
    assert px.run(wf, progress=False)["greet"] == "hello world 3"


def test_step_output_flows_without_a_shell():
    """${steps.X.output} implies the dependency and is substituted as one argument."""
    wf = px.loads(
        "name: s\nsteps:\n"
        f"  - id: make\n    type: script\n    config: {{command: {PY}, args: ['-c', "
        "'print(\"a; rm -rf / b\")']}\n"
        f"  - id: use\n    type: script\n    config: {{command: {PY}, args: ['-c', "
        "'import sys; print(len(sys.argv) - 1, sys.argv[1])', '${steps.make.output}']}\n")
    assert wf["use"].deps == ("make",)
    assert px.run(wf, progress=False)["use"] == "1 a; rm -rf / b"


def test_failing_script_reports_status_and_stderr_tail():
    """A non-zero exit fails the step with its exit status and the end of its stderr."""
    wf = px.loads(f"name: f\nsteps:\n  - id: bad\n    type: script\n    config: {{command: "
                  f"{PY}, args: ['-c', 'import sys; sys.stderr.write(\"disk full\\\\n\"); "
                  "sys.exit(4)']}\n")
    err = px.run(wf, check=False, progress=False).errors["bad"]
    assert isinstance(err, px.ScriptError) and err.returncode == 4
    assert "disk full" in str(err)


def test_script_timeout_kills_the_whole_process_group(tmp_path):
    """A timed-out script step is stopped with its children: no grandchild survives."""
    pidfile = tmp_path / "grandchild.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
              f"'import time; time.sleep(60)']); open({str(pidfile)!r}, 'w').write(str(p.pid));"
              " time.sleep(60)")
    wf = px.loads(f"name: t\nsteps:\n  - id: slow\n    type: script\n    timeout: 3.0\n"
                  f"    continueOnError: true\n    config: {{command: {PY}, args: ['-c', "
                  f"{script!r}]}}\n")
    t0 = time.monotonic()
    result = px.run(wf, progress=False)
    assert result.tasks["slow"].status == "timed_out" and time.monotonic() - t0 < 10
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(grandchild) and \
            psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "a grandchild outlived its step"
        time.sleep(0.05)


def test_python_steps_and_error_settings():
    """python steps call package.module:function; isolateErrors/continueOnError map to
    on_error skip/ignore; resource maps to one pool unit."""
    wf = px.loads(
        "name: p\nparallel: {resources: {db: 1}}\nsteps:\n"
        "  - id: join\n    type: python\n    config: {call: 'os.path:join', args: [a, b]}\n"
        "    parallel: {resource: db}\n"
        "  - id: soft\n    type: python\n    config: {call: 'json:loads', args: ['{bad']}\n"
        "    continueOnError: true\n"
        "  - id: iso\n    type: python\n    config: {call: 'json:loads', args: ['{bad']}\n"
        "    parallel: {isolateErrors: true}\n")
    assert wf["join"].pools == {"db": 1}
    assert wf["soft"].on_error == "ignore" and wf["iso"].on_error == "skip"
    result = px.run(wf, progress=False)
    assert result["join"] == os.path.join("a", "b") and result.status == "partial"


def test_parallel_disabled_runs_alone():
    """A step with parallel.enabled: false never overlaps another step."""
    step = "    type: script\n    config: {command: " + PY + ", args: ['-c', 'import time; " \
        "time.sleep(0.3)']}\n"
    wf = px.loads("name: a\nsteps:\n" + "".join(
        f"  - id: s{k}\n{step}" for k in range(3)) +
        f"  - id: alone\n{step}    parallel: {{enabled: false}}\n")
    result = px.run(wf, max_workers=4, progress=False)
    alone = result.tasks["alone"]
    for k in range(3):
        other = result.tasks[f"s{k}"]
        assert other.finished_at <= alone.started_at or other.started_at >= alone.finished_at
    assert result.stats.pool_utilization == {}  # a gate of its own, not a fake pool


PIPELINES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("name", PIPELINES)
def test_example_pipelines_keep_order_overlap_and_pools(name, monkeypatch):
    """Each example pipeline runs; every step starts after its dependencies end; no pool holds
    more steps than its capacity; parallel.enabled false means no overlap at all."""
    import yaml
    monkeypatch.syspath_prepend(str(EXAMPLES.parent / "agents"))  # agent.yaml's agent
    raw = yaml.safe_load((EXAMPLES / name).read_text())
    wf = px.load(EXAMPLES / name)
    result = px.run(wf, check=False, progress=False)
    t = result.tasks
    assert result.status in ("succeeded", "partial")
    for step in raw["steps"]:
        for dep in step.get("dependsOn", []):
            assert t[step["id"]].started_at >= t[dep].finished_at - 1e-3, (step["id"], dep)
    spans = {k: (v.started_at, v.finished_at) for k, v in t.items() if v.started_at}
    for pool, capacity in (raw.get("parallel", {}).get("resources") or {}).items():
        users = [s["id"] for s in raw["steps"] if s.get("parallel", {}).get("resource") == pool]
        assert overlap_by_events([spans[u] for u in users]) <= capacity, pool
    if raw.get("parallel", {}).get("enabled") is False:
        assert overlap_by_events(list(spans.values())) == 1
    elif name == "auto-parallel.yaml":
        assert overlap_by_events([spans["lint"], spans["type-check"]]) == 2
    if name == "resources.yaml":
        db = [spans[f"db-migration-{k}"] for k in (1, 2, 3)]
        assert overlap_by_events(db) == 2  # the database pool is full, never over
    if name == "error-handling.yaml":
        assert result.status == "partial"
        assert result["report"] == "report: critical done | no optional data"
        assert "optional service unavailable" in str(result.errors["optional-step"])


def test_step_output_keeps_stderr():
    """A script step's output is its stdout; what it wrote to stderr stays reachable."""
    wf = px.loads(f"name: e\nsteps:\n  - id: talk\n    type: script\n    config: {{command: "
                  f"{PY}, args: ['-c', 'import sys; print(\"out\"); "
                  "sys.stderr.write(\"note\")']}\n")
    out = px.run(wf, progress=False)["talk"]
    assert out == "out" and isinstance(out, px.StepOutput)
    assert out.stderr == "note" and out.returncode == 0


HOSTILE = "hi; touch PWNED $(touch PWNED) `touch PWNED` it's \"$HOME\" \\ end"


@pytest.mark.parametrize("command", [
    "printf %s ${inputs.x}",            # unquoted: the value is one shell word
    "printf %s \"${inputs.x}\"",        # inside double quotes the user wrote
    "printf %s '${inputs.x}'",          # inside single quotes the user wrote
    "printf %s pre${inputs.x}post",     # glued to literal text
])
def test_shell_true_quotes_substituted_inputs(tmp_path, command):
    """With shell: true an input's value reaches the shell as data, wherever it is written in
    the command: nothing it contains runs, and it arrives intact."""
    f = tmp_path / "p.yaml"
    f.write_text("name: s\ninputs: {x: null}\nsteps:\n  - id: say\n    type: script\n"
                 f"    config: {{command: {json.dumps(command)}, shell: true}}\n")
    result = px.run(px.load(f, inputs={"x": HOSTILE}), progress=False)
    expected = HOSTILE if "pre" not in command else f"pre{HOSTILE}post"
    assert result["say"] == expected
    assert not (tmp_path / "PWNED").exists()


def test_shell_true_quotes_upstream_output_and_env(tmp_path, monkeypatch):
    """An upstream step's output and an environment variable are quoted too, at run time."""
    monkeypatch.setenv("PX_HOSTILE", "x; touch PWNED")
    f = tmp_path / "p.yaml"
    f.write_text(
        "name: s\nsteps:\n"
        f"  - id: make\n    type: script\n    config: {{command: {PY}, args: ['-c', "
        "'print(\"report.txt; touch PWNED\")']}\n"
        "  - id: use\n    type: script\n"
        "    config: {command: 'echo ${steps.make.output} ${env.PX_HOSTILE}', shell: true}\n")
    result = px.run(px.load(f), progress=False)
    assert result["use"] == "report.txt; touch PWNED x; touch PWNED"
    assert not (tmp_path / "PWNED").exists()


def test_shell_true_keeps_the_literal_command_text(tmp_path):
    """The command text written in the file is the user's shell code: pipes still work."""
    f = tmp_path / "p.yaml"
    f.write_text("name: s\ninputs: {who: world}\nsteps:\n  - id: up\n    type: script\n"
                 "    config: {command: 'echo hello ${inputs.who} | tr a-z A-Z', shell: true}\n")
    assert px.run(px.load(f), progress=False)["up"] == "HELLO WORLD"


def test_substituted_values_are_not_substituted_again(tmp_path):
    """An input whose value looks like a step reference arrives as written, not expanded."""
    f = tmp_path / "p.yaml"
    f.write_text(
        "name: s\ninputs: {x: null}\nsteps:\n"
        f"  - id: a\n    type: script\n    config: {{command: {PY}, args: ['-c', 'print(1)']}}\n"
        f"  - id: b\n    type: script\n    dependsOn: [a]\n    config: {{command: {PY}, "
        "args: ['-c', 'import sys; print(sys.argv[1])', '${inputs.x}']}\n")
    result = px.run(px.load(f, inputs={"x": "${steps.a.output}"}), progress=False)
    assert result["b"] == "${steps.a.output}"


def test_shell_substitution_where_quoting_cannot_be_tracked_is_refused(tmp_path):
    """A value inside $(...) or after a here-document is refused at load time, not guessed."""
    for command in ("echo $(basename ${inputs.x})", "cat <<EOF\n${inputs.x}\nEOF"):
        f = tmp_path / "p.yaml"
        f.write_text("name: s\ninputs: {x: a}\nsteps:\n  - id: say\n    type: script\n"
                     f"    config: {{command: {json.dumps(command)}, shell: true}}\n")
        with pytest.raises(px.WorkflowError, match=r"p.yaml:\d+:\d+: step 'say' field config: "
                                                   r"a substitution inside \$\(\.\.\.\)"):
            px.load(f)


def test_unset_env_variable_is_a_validation_error(tmp_path, monkeypatch):
    """${env.UNSET} is refused, naming the variable, the step and the field, with the fix."""
    monkeypatch.delenv("PX_UNSET_DIR", raising=False)
    f = tmp_path / "p.yaml"
    f.write_text("name: s\nsteps:\n  - id: clean\n    type: script\n"
                 "    config: {command: rm, args: ['-rf', '${env.PX_UNSET_DIR}/']}\n")
    with pytest.raises(px.WorkflowError) as info:
        px.load(f)
    msg = str(info.value)
    assert "p.yaml:5:" in msg and "step 'clean' field config.args[1]" in msg
    assert "${env.PX_UNSET_DIR} is not set" in msg and "${env.PX_UNSET_DIR:-default}" in msg


def test_env_defaults(tmp_path, monkeypatch):
    """${env.NAME:-default} gives the default when NAME is unset (an empty default is
    allowed), and the variable's value when it is set."""
    monkeypatch.delenv("PX_UNSET", raising=False)
    monkeypatch.setenv("PX_SET", "from-env")
    f = tmp_path / "p.yaml"
    f.write_text("name: s\nsteps:\n  - id: say\n    type: script\n"
                 f"    config: {{command: {PY}, args: ['-c', 'import sys; print(sys.argv[1:])', "
                 "'${env.PX_UNSET:-build/out}', '[${env.PX_UNSET:-}]', '${env.PX_SET:-x}']}\n")
    result = px.run(px.load(f), progress=False)
    assert result["say"] == "['build/out', '[]', 'from-env']"


def _laughs(levels: int = 9) -> str:
    """The classic "billion laughs" file: each level lists the previous one nine times."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in range(1, levels):
        prev, cur = chr(ord("a") + k - 1), chr(ord("a") + k)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(60)
def test_alias_bomb_fails_fast_with_bounded_memory(tmp_path):
    """A billion-laughs file (under 519 bytes) is refused in under 2 s of CPU, in a process
    that stays small."""
    import subprocess
    import sys
    f = tmp_path / "bomb.yaml"
    f.write_text(_laughs() + "name: bomb\nsteps:\n  - id: s\n    type: script\n"
                 "    config: {command: echo, args: *i}\n")
    assert len(f.read_bytes()) <= 519  # 9**9 (387 million) strings once expanded
    t0 = time.monotonic()
    # The child reports its own peak (VmHWM, reset at exec): rusage's ru_maxrss would carry
    # this (large) test process's peak across the fork and exec.
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys, parexec as px\n"
                             "try:\n    px.load(sys.argv[1])\n"
                             "except px.WorkflowError as exc:\n    print(exc)\n"
                             "print([l for l in open('/proc/self/status')"
                             " if l.startswith('VmHWM')][0])\n", str(f)],
                            stdout=subprocess.PIPE, text=True)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        proc.kill()
    out = proc.stdout.read()
    proc.stdout.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert "aliases expand it to more than 1,000,000 values" in out, out
    assert usage.ru_utime + usage.ru_stime < 2, "loading the bomb took too long"
    peak_kib = int(out.split("VmHWM:")[1].split()[0])
    assert peak_kib < 300 * 1024, f"peak RSS {peak_kib} KiB"
    assert time.monotonic() - t0 < 30


def test_aliases_that_expand_modestly_are_fine(tmp_path):
    """Anchors and aliases used the normal way (a shared config) still load."""
    f = tmp_path / "p.yaml"
    f.write_text("name: s\nsteps:\n"
                 f"  - id: a\n    type: script\n    config: &c {{command: {PY}, args: ['-c', "
                 "'print(7)']}\n"
                 "  - id: b\n    type: script\n    config: *c\n")
    result = px.run(px.load(f), progress=False)
    assert result["a"] == result["b"] == "7"


@pytest.mark.parametrize("text, words", [
    ("name: x\nsteps: &a [*a]\n", r"x.yaml:2:8: anchor &a contains itself"),
    ("name: x\nsteps: &a {k: [*a]}\n", r"x.yaml:2:8: anchor &a contains itself"),
    ("name: x\nsteps: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
])
def test_self_referencing_anchor_and_deep_nesting_are_clear_errors(tmp_path, text, words):
    """A recursive anchor or absurd nesting is a WorkflowError with a position, not a
    RecursionError."""
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(px.WorkflowError, match=words):
        px.load(f)


def test_file_that_is_not_utf8_names_the_byte(tmp_path):
    """Bytes that are not UTF-8 give a WorkflowError naming the file, position and byte."""
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\u00e9\nsteps: []\n".encode("latin-1"))
    with pytest.raises(px.WorkflowError) as info:
        px.load(f)
    assert str(info.value).startswith(f"{f}:1:10: not UTF-8: byte 0xe9 at offset 9")


def test_control_characters_yaml_refuses_are_clear_errors(tmp_path):
    """A character YAML does not allow (here BEL) is a WorkflowError with its position."""
    f = tmp_path / "bel.yaml"
    f.write_text("name: a\x07b\nsteps: []\n")
    with pytest.raises(px.WorkflowError, match=r"bel.yaml:1:8: .*'\\x07'"):
        px.load(f)


@pytest.mark.timeout(120)
def test_long_chain_listed_downstream_first_validates_and_runs(tmp_path):
    """1,200 steps in a chain, each listed before the step it depends on, load, validate and
    run in order (the ordering is iterative: no RecursionError)."""
    n = 1200
    f = tmp_path / "chain.yaml"
    f.write_text("name: chain\nsteps:\n" + "".join(
        f"  - id: s{k}\n    type: python\n    config: {{call: 'os.path:join', args: "
        + (f"['${{steps.s{k + 1}.output}}', '{k}']" if k + 1 < n else "['start']") + "}\n"
        for k in range(n)))
    wf = px.load(f)
    wf.validate()
    assert wf["s0"].deps == ("s1",)
    result = px.run(wf, progress=False)
    assert result["s0"] == os.path.join("start", *[str(k) for k in reversed(range(n - 1))])


@pytest.mark.parametrize("field, value", [
    ("id", "a\\x1b[2Kb"), ("id", "a\\nb"), ("id", "sq[0]"), ("name", "x\\rforged"),
])
def test_step_ids_and_names_with_control_characters_are_refused(tmp_path, field, value):
    """Control characters in a step id or name (and '[' ']' in an id, reserved for map items)
    are refused with file:line:col, before anything runs."""
    f = tmp_path / "p.yaml"
    other = "" if field == "id" else "    id: ok\n"
    f.write_text(f"name: x\nsteps:\n  - {field}: \"{value}\"\n{other}    type: script\n"
                 "    config: {command: echo}\n")
    with pytest.raises(px.WorkflowError, match=rf"p.yaml:3:5: step 1 {field}=.* contains"):
        px.load(f)


def test_command_with_spaces_that_cannot_start_gets_a_hint():
    """A command line written in config.command without a shell fails with status 127 and a
    hint to use config.args or config.shell: true."""
    wf = px.loads("name: h\nsteps:\n  - id: up\n    type: script\n"
                  "    config: {command: 'echo hello | tr a-z A-Z'}\n")
    err = px.run(wf, check=False, progress=False).errors["up"]
    assert isinstance(err, px.ScriptError) and err.returncode == 127
    msg = str(err)
    assert "cannot start 'echo hello | tr a-z A-Z'" in msg
    assert "config.args" in msg and "shell: true" in msg


def test_missing_type_says_so():
    """A step without 'type' is told it has no type, with the known types."""
    with pytest.raises(px.WorkflowError) as info:
        px.loads("name: t\nsteps:\n  - id: wait\n    config: {command: sleep}\n")
    msg = str(info.value)
    assert "step 'wait' has no type; known types: script, python" in msg
    assert "None" not in msg


def test_failing_step_without_stderr_reports_its_stdout_tail():
    """A step that fails having written only to stdout shows the end of its stdout."""
    wf = px.loads(f"name: f\nsteps:\n  - id: bad\n    type: script\n    config: {{command: "
                  f"{PY}, args: ['-c', 'print(*range(30), sep=chr(10)); raise SystemExit(2)']}}\n")
    err = px.run(wf, check=False, progress=False).errors["bad"]
    assert isinstance(err, px.ScriptError) and err.returncode == 2 and err.stderr == ""
    assert err.stdout.splitlines() == [str(k) for k in range(20, 30)]
    assert str(err).endswith("last lines of stdout:\n" + "\n".join(map(str, range(20, 30))))


def test_every_key_the_loader_accepts_is_documented_in_the_readme():
    """README's "Pipelines in YAML" section names every key and step type the loader knows;
    the module docstring stands on its own."""
    from parexec import _yaml, _yaml_read
    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    section = readme.split("Pipelines in YAML\n=================\n", 1)[1]
    section = section.split("\nA first workflow\n", 1)[0]
    keys = {*_yaml_read.TOP_KEYS, *_yaml_read.PARALLEL_KEYS, *_yaml_read.STEP_KEYS,
            *_yaml_read.STEP_PARALLEL_KEYS, *_yaml_read.RETRY_KEYS, *_yaml_read.STEP_TYPES}
    for config_keys in _yaml_read.STEP_TYPES.values():
        keys.update(config_keys)
    missing = sorted(k for k in keys if f"``{k}``" not in section and f"``config.{k}``"
                     not in section and f"{k}:" not in section)
    assert not missing, f"undocumented keys: {missing}"
    for text in ("${env.NAME:-default}", "shlex.quote", "143"):
        assert text in section
    assert "seed" not in (_yaml.__doc__ or "")


@pytest.mark.timeout(60)
def test_thousands_of_problems_are_refused_quickly_and_listed_briefly(tmp_path):
    """5,000 steps each naming an unknown step: refused in seconds (suggestions are bounded),
    with the first 50 problems listed and the rest counted."""
    n = 5000
    f = tmp_path / "many.yaml"
    f.write_text("name: m\nsteps:\n" + "".join(
        f"  - id: step-number-{k}\n    type: script\n    config: {{command: echo}}\n"
        f"    dependsOn: [stepnumber{k}x]\n" for k in range(n)))
    t0 = time.process_time()
    with pytest.raises(px.WorkflowError) as info:
        px.load(f)
    assert time.process_time() - t0 < 8
    msg = str(info.value)
    assert msg.startswith(f"{n} problem(s) in {f}") and msg.endswith(f"... and {n - 50} more")
    assert "did you mean 'step-number-0'?" in msg


@pytest.mark.parametrize("env", ["{'A=B': x}", "{'': x}", "{A: \"x\\0y\"}"])
def test_environment_names_and_values_the_os_refuses_are_load_errors(env):
    """An env name with '=' or an empty one, or a value with a NUL byte, is refused at load
    time with its position, instead of failing the step when it starts."""
    with pytest.raises(px.WorkflowError, match=r"<string>:3:\d+: .*environment"):
        px.loads("name: e\nsteps:\n  - {id: s, type: script, config: {command: echo}, "
                 f"env: {env}}}\n")


# Agent steps and typed substitution (API section 10) ----------------------------------


def _probe(prompt, input):
    """An agent that returns what it was given."""
    return {"prompt": prompt, "input": input}


AGENT_TEXT = (
    "name: ag\n"
    "agents: {concat: 'operator:concat'}\n"
    "steps:\n"
    "  - id: nums\n    type: python\n    config: {call: 'builtins:sorted', args: [[3, 1, 2]]}\n"
    "  - id: greet\n    type: agent\n"
    "    config: {agent: concat, prompt: 'Hello ', input: world}\n"
    "  - id: probe\n    type: agent\n"
    "    config:\n"
    "      agent: probe\n"
    "      prompt: 'Sum of ${steps.nums.output}'\n"
    "      input: {values: '${steps.nums.output}', greeting: '${steps.greet.output}', n: 2}\n"
    "  - id: bare\n    type: agent\n    config: {agent: probe, prompt: hi}\n")


def test_agent_steps_call_agent_prompt_input():
    """Agents come from the file's agents: mapping or from agents=; each is called
    agent(prompt, input) with both substituted, and input is None when absent."""
    result = px.run(px.loads(AGENT_TEXT, agents={"probe": _probe}), progress=False)
    assert result["greet"] == "Hello world"
    assert result["probe"] == {"prompt": "Sum of [1, 2, 3]",
                               "input": {"values": [1, 2, 3], "greeting": "Hello world",
                                         "n": 2}}
    assert result["bare"] == {"prompt": "hi", "input": None}
    assert set(result.tasks["probe"].value["input"]) == {"values", "greeting", "n"}


def test_agents_given_to_load_win_over_the_file():
    """px.load(path, agents=...) replaces a file's agent of the same name."""
    text = ("name: w\nagents: {a: 'operator:concat'}\nsteps:\n"
            "  - {id: s, type: agent, config: {agent: a, prompt: x, input: y}}\n")
    assert px.run(px.loads(text), progress=False)["s"] == "xy"
    result = px.run(px.loads(text, agents={"a": _probe}), progress=False)
    assert result["s"] == {"prompt": "x", "input": "y"}


def test_load_from_a_file_takes_agents(tmp_path):
    """px.load accepts agents= too."""
    f = tmp_path / "a.yaml"
    f.write_text("name: f\nsteps:\n  - {id: s, type: agent, config: {agent: p, prompt: q}}\n")
    assert px.run(px.load(f, agents={"p": _probe}), progress=False)["s"]["prompt"] == "q"


def test_agent_step_in_a_process():
    """isolation: process runs the agent in a worker process."""
    text = ("name: w\nagents: {a: 'operator:concat'}\nsteps:\n"
            "  - {id: s, type: agent, isolation: process, config: {agent: a, prompt: x, "
            "input: y}}\n")
    wf = px.loads(text)
    assert wf["s"].isolation == "process"
    result = px.run(wf, progress=False)
    assert result["s"] == "xy"
    assert isinstance(result.tasks["s"].worker, int) and result.tasks["s"].worker != os.getpid()


@pytest.mark.parametrize("agents, config, words", [
    ("{summarizer: 'operator:concat'}", "{agent: sumarizer, prompt: p}",
     ["<string>:4:35: step 's' uses unknown agent 'sumarizer'", "known agents: given, "
      "summarizer", "did you mean 'summarizer'?"]),
    ("{a: 'no_such_module_xyz:f'}", "{agent: a, prompt: p}",
     ["<string>:2:10: agent 'a' of step 's': cannot import module 'no_such_module_xyz'"]),
    ("{a: 'math:pi'}", "{agent: a, prompt: p}",
     ["<string>:2:10: agent 'a' of step 's': 'math:pi' is a float, not callable"]),
    ("{a: 'operator'}", "{agent: a, prompt: p}",
     ["<string>:2:10: agent 'a' must be 'package.module:function', got 'operator'"]),
    ("{a: 'operator:concat'}", "{prompt: p}",
     ["<string>:4:26: agent step 's' needs config.agent (the name of an agent declared"]),
    ("{a: 'operator:concat'}", "{agent: a, prompt: [p]}",
     ["<string>:4:45: config.prompt of step 's' must be text"]),
])
def test_agent_problems_are_load_errors(agents, config, words):
    """An unknown agent (known names listed, close match suggested), an import that fails,
    a target that is not callable: load errors naming the step, with their position."""
    text = (f"name: w\nagents: {agents}\nsteps:\n"
            f"  - {{id: s, type: agent, config: {config}}}\n")
    with pytest.raises(px.WorkflowError) as info:
        px.loads(text, agents={"given": _probe})
    for w in words:
        assert w in str(info.value)


def test_agents_given_must_be_callable():
    """agents= with a value that is not callable is refused, naming the agent."""
    with pytest.raises(px.WorkflowError, match="agents=: 'x' is a str, not callable"):
        px.loads("name: w\nsteps:\n  - {id: s, type: agent, config: {agent: x}}\n",
                 agents={"x": "operator:concat"})


def test_typed_substitution_in_python_steps():
    """A value that is exactly one ${steps.X.output} receives the value itself (a list stays
    a list, also nested in args and kwargs); inside longer text it becomes str(value)."""
    wf = px.loads(
        "name: t\nsteps:\n"
        "  - {id: nums, type: python, config: {call: 'builtins:sorted', args: [[3, 1, 2]]}}\n"
        "  - {id: n, type: python, config: {call: 'builtins:len', "
        "args: ['${steps.nums.output}']}}\n"
        "  - {id: text, type: python, config: {call: 'builtins:len', "
        "args: ['x${steps.nums.output}']}}\n"
        "  - {id: nested, type: python, config: {call: 'builtins:dict', "
        "kwargs: {a: ['${steps.nums.output}', ' ${steps.n.output}']}}}\n")
    result = px.run(wf, progress=False)
    assert result["n"] == 3
    assert result["text"] == len("x[1, 2, 3]")
    assert result["nested"] == {"a": [[1, 2, 3], " 3"]}


def test_script_arguments_stay_text():
    """A script argument that is exactly ${steps.X.output} gets the text of the value."""
    wf = px.loads(
        "name: t\nsteps:\n"
        "  - {id: nums, type: python, config: {call: 'builtins:sorted', args: [[2, 1]]}}\n"
        "  - {id: echo, type: script, config: {command: echo, args: ['${steps.nums.output}']}}\n")
    assert px.run(wf, progress=False)["echo"] == "[1, 2]"


def test_isolation_is_a_step_key_but_not_for_scripts():
    """isolation: process on a python step runs it in a worker; on a script step (which runs
    in its own process already) it is refused with a hint."""
    wf = px.loads("name: t\nsteps:\n  - {id: p, type: python, isolation: process, "
                  "config: {call: 'os:getpid'}}\n")
    assert px.run(wf, progress=False)["p"] != os.getpid()
    with pytest.raises(px.WorkflowError, match="<string>:3:27: step 's': isolation applies to "
                       "python and agent steps"):
        px.loads("name: t\nsteps:\n  - {id: s, type: script, isolation: process, "
                 "config: {command: echo}}\n")


# foreach (API section 10) -----------------------------------------------------------------


def test_foreach_over_a_yaml_list_runs_one_task_per_item():
    """foreach: [list] runs the step once per item (ids step[0], step[1], ...), with ${item}
    and ${index} substituted; its output is the list of outputs in order, which a dependent
    step receives as a list."""
    wf = px.loads(
        "name: f\ninputs: {who: there}\nsteps:\n"
        "  - id: greet\n    type: script\n    foreach: [a, 'b c', '${inputs.who}']\n"
        "    config: {command: echo, args: ['${index}:${item}']}\n"
        "  - id: n\n    type: python\n"
        "    config: {call: 'builtins:len', args: ['${steps.greet.output}']}\n")
    result = px.run(wf, progress=False)
    assert result["greet"] == ["0:a", "1:b c", "2:there"]
    assert [result[f"greet[{k}]"] for k in range(3)] == ["0:a", "1:b c", "2:there"]
    assert result["n"] == 3


def test_foreach_over_step_output_text_splits_non_empty_lines():
    """foreach: ${steps.X.output} over text runs one item per non-empty line."""
    wf = px.loads(
        "name: f\nsteps:\n"
        "  - {id: ls, type: script, config: {command: printf, args: ['x\\n\\n  \\ny z\\n']}}\n"
        "  - id: up\n    type: python\n    foreach: '${steps.ls.output}'\n"
        "    config: {call: 'builtins:str.upper', args: ['${item}']}\n")
    result = px.run(wf, progress=False)
    assert result["up"] == ["X", "Y Z"]
    assert result.tasks["up[1]"].level == result.tasks["up[0]"].level


def test_foreach_over_a_list_output_gives_typed_items():
    """Items of a list output keep their type: an exact ${item} is the item itself, ${index}
    the index as a number."""
    wf = px.loads(
        "name: f\nsteps:\n"
        "  - {id: src, type: python, config: {call: 'json:loads', "
        "args: ['[{\"a\": 1}, {\"a\": 2}]']}}\n"
        "  - id: each\n    type: agent\n    foreach: '${steps.src.output}'\n"
        "    config: {agent: probe, prompt: 'item ${index}', input: ['${item}', '${index}']}\n",
        agents={"probe": _probe})
    result = px.run(wf, progress=False)
    assert result["each"] == [{"prompt": "item 0", "input": [{"a": 1}, 0]},
                              {"prompt": "item 1", "input": [{"a": 2}, 1]}]


def test_foreach_over_an_input_list_or_text(tmp_path):
    """foreach: ${inputs.X} takes a list default as is, and text given with --set as lines."""
    text = ("name: f\ninputs: {names: [ann, bob]}\nsteps:\n"
            "  - id: hi\n    type: script\n    foreach: '${inputs.names}'\n"
            "    config: {command: echo, args: ['hi ${item}']}\n")
    assert px.run(px.loads(text), progress=False)["hi"] == ["hi ann", "hi bob"]
    wf = px.loads(text, inputs={"names": "cy\n\ndee\n"})
    assert px.run(wf, progress=False)["hi"] == ["hi cy", "hi dee"]


def test_foreach_empty_list_gives_an_empty_output():
    """No items: the step's output is [] and dependents run."""
    wf = px.loads("name: f\nsteps:\n"
                  "  - {id: e, type: script, foreach: [], config: {command: echo}}\n"
                  "  - {id: n, type: python, config: {call: 'builtins:len', "
                  "args: ['${steps.e.output}']}}\n")
    result = px.run(wf, progress=False)
    assert result["e"] == [] and result["n"] == 0


def test_foreach_max_concurrency_caps_the_items_running():
    """parallel.maxConcurrency caps how many items run at once (here 2 of 5, 4 workers)."""
    wf = px.loads(
        "name: f\nparallel: {defaultMaxConcurrency: 4}\nsteps:\n"
        "  - id: s\n    type: script\n    foreach: [1, 2, 3, 4, 5]\n"
        f"    config: {{command: {PY}, args: ['-c', 'import time; time.sleep(0.3)']}}\n"
        "    parallel: {maxConcurrency: 2}\n")
    result = px.run(wf, progress=False)
    spans = [(result.tasks[f"s[{k}]"].started_at, result.tasks[f"s[{k}]"].finished_at)
             for k in range(5)]
    assert overlap_by_events(spans) == 2


def test_foreach_items_are_quoted_for_the_shell(tmp_path):
    """Under shell: true, ${item} and ${index} are quoted like any substituted value."""
    wf = px.loads(
        "name: f\nsteps:\n"
        "  - id: s\n    type: script\n    foreach: ['x; touch PWNED', \"it's\"]\n"
        "    config: {command: 'echo ${index} ${item}', shell: true}\n", base=tmp_path)
    assert px.run(wf, progress=False)["s"] == ["0 x; touch PWNED", "1 it's"]
    assert not (tmp_path / "PWNED").exists()


ITEM_FAILS = (f"    config: {{command: {PY}, args: ['-c', 'import sys; "
              "sys.exit(int(sys.argv[1]))', '${item}']}\n")


def test_foreach_continue_on_error_applies_per_item():
    """continueOnError: a failing item is recorded, the other items and the dependents run;
    the failed item's place in the output is empty (None)."""
    wf = px.loads(
        "name: f\nsteps:\n"
        "  - id: s\n    type: script\n    foreach: [0, 3, 0]\n    continueOnError: true\n"
        + ITEM_FAILS
        + "  - {id: n, type: python, config: {call: 'builtins:len', "
          "args: ['${steps.s.output}']}}\n")
    result = px.run(wf, progress=False, check=False)
    t = result.tasks
    assert [t[f"s[{k}]"].status for k in range(3)] == ["succeeded", "failed", "succeeded"]
    assert "exited with status 3" in str(t["s[1]"].error)
    assert result["s"] == ["", None, ""] and result["n"] == 3


def test_foreach_isolate_errors_applies_per_item():
    """isolateErrors: a failing item fails the step, its dependents are skipped and an
    independent step still runs; the run is partial."""
    wf = px.loads(
        "name: f\nsteps:\n"
        "  - id: s\n    type: script\n    foreach: [0, 3]\n"
        "    parallel: {isolateErrors: true}\n" + ITEM_FAILS
        + "  - {id: after, type: script, config: {command: echo, args: ['${steps.s.output}']}}\n"
          "  - {id: other, type: script, config: {command: echo, args: [ok]}}\n")
    result = px.run(wf, progress=False, check=False)
    assert result.status == "partial"
    assert result.tasks["s[1]"].status == "failed"
    assert result.tasks["after"].status == "skipped" and result["other"] == "ok"


def test_foreach_over_a_value_that_is_not_a_list_fails_the_step_clearly():
    """An upstream output that is neither a list nor text fails the step, saying so."""
    wf = px.loads("name: f\nsteps:\n"
                  "  - {id: d, type: python, config: {call: 'builtins:dict'}}\n"
                  "  - {id: s, type: script, foreach: '${steps.d.output}', "
                  "config: {command: echo}}\n")
    result = px.run(wf, progress=False, check=False)
    assert result.status == "failed"
    msg = str(result.errors["s.items"])
    assert "foreach of step 's'" in msg and "a dict" in msg and "list or text" in msg


@pytest.mark.parametrize("foreach, words", [
    ("3", "<string>:3:52: foreach of step 's' must be a list, or exactly one "
          "${steps.<id>.output} or ${inputs.<name>}, got int 3"),
    ("'a ${steps.x.output}'", "foreach of step 's' must be a list, or exactly one"),
    ("'${steps.zz.output}'", "refers to unknown step 'zz'"),
    ("'${inputs.nope}'", "refers to an input the pipeline does not declare"),
])
def test_foreach_problems_are_load_errors(foreach, words):
    """A foreach that is not a list or a single reference is refused with its position."""
    with pytest.raises(px.WorkflowError) as info:
        px.loads("name: f\nsteps:\n"
                 f"  - {{id: s, type: script, config: {{command: echo}}, foreach: {foreach}}}\n"
                 "  - {id: x, type: script, config: {command: echo}}\n")
    assert words in str(info.value)


def test_item_outside_foreach_is_a_load_error():
    """${item} and ${index} only exist in a step with foreach."""
    with pytest.raises(px.WorkflowError, match=r"<string>:3:\d+: \$\{item\} can only be "
                       "used in a step with foreach"):
        px.loads("name: f\nsteps:\n"
                 "  - {id: s, type: script, config: {command: echo, args: ['${item}']}}\n")


# Peak memory of script steps ----------------------------------------------------------------


PEAK_PROBE = ("import sys, parexec as px; r = px.run(px.load(sys.argv[1]), progress=False); "
              "print(r.tasks['big'].peak_memory, r.tasks['small'].peak_memory)")


@pytest.mark.parametrize("shell", [False, True])
def test_script_steps_report_their_own_peak_memory(shell, tmp_path):
    """A script step's peak_memory is its own process tree's (here a child allocating ~200 MB,
    under a shell too), not the driver's; a trivial step reports far less. (A fresh driver,
    so its own memory is small, as in `parexec run`.)"""
    import subprocess
    import sys
    big = "b = b'x' * (200 << 20)"
    if shell:
        config = f"{{command: \"{PY} -c \\\"{big}\\\"; true\", shell: true}}"
    else:
        config = f"{{command: {PY}, args: ['-c', \"{big}\"]}}"
    f = tmp_path / "m.yaml"
    f.write_text("name: m\nsteps:\n"
                 f"  - {{id: big, type: script, config: {config}}}\n"
                 f"  - {{id: small, type: script, config: {{command: {PY}, "
                 "args: ['-c', 'pass']}}\n")
    # Through a small shell that forks it: Linux keeps a process's peak RSS across exec, so a
    # driver exec'd straight from this (large) test process would start with its peak.
    proc = subprocess.run(["sh", "-c", '"$@"; true', "sh", sys.executable, "-c", PEAK_PROBE,
                           str(f)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    big_peak, small_peak = map(int, proc.stdout.split())
    mib = 1 << 20
    assert big_peak > 150 * mib
    assert small_peak < 50 * mib


def test_foreach_list_items_may_refer_to_step_outputs():
    """Strings of a foreach list are substituted (typed when exact) and imply the dependency."""
    wf = px.loads(
        "name: f\nsteps:\n"
        "  - {id: a, type: python, config: {call: 'builtins:sorted', args: [[2, 1]]}}\n"
        "  - {id: b, type: python, foreach: ['${steps.a.output}', 'x ${steps.a.output}'], "
        "config: {call: 'builtins:repr', args: ['${item}']}}\n")
    assert px.run(wf, progress=False)["b"] == ["[1, 2]", "'x [1, 2]'"]


@pytest.mark.timeout(30)
def test_foreach_isolate_errors_stops_the_steps_other_items():
    """isolateErrors: when an item fails, the step's items still running are stopped (their
    processes killed) and reported cancelled, as the README says."""
    wf = px.loads(
        "name: f\nparallel: {defaultMaxConcurrency: 2}\nsteps:\n"
        "  - id: s\n    type: script\n    foreach: [fail, wait]\n"
        "    parallel: {isolateErrors: true}\n"
        f"    config: {{command: {PY}, args: ['-c', 'import sys, time; "
        "sys.exit(3) if sys.argv[1] == \"fail\" else time.sleep(60)', '${item}']}\n")
    result = px.run(wf, progress=False, check=False)
    assert result.tasks["s[0]"].status == "failed"
    assert result.tasks["s[1]"].status == "cancelled"
    assert result.stats.makespan < 20


def test_grace_is_a_step_key_and_a_pipeline_default():
    """``grace`` sets a step's grace; the top-level one is the workflow default."""
    text = """
grace: 2
steps:
  - {id: a, type: python, config: {call: "os:getcwd"}, grace: 0.5}
  - {id: b, type: python, config: {call: "os:getcwd"}}
"""
    wf = px.loads(text)
    assert wf.grace == 2.0
    assert wf["a"].grace == 0.5 and wf["b"].grace is None
    with pytest.raises(px.WorkflowError, match="grace must be a number of seconds >= 0"):
        px.loads(text.replace("grace: 0.5", "grace: -1"))


def test_echo_is_a_setting_of_each_loaded_workflow(tmp_path):
    """load(echo=) streams step lines to that workflow's callable only; none means silent."""
    text = ("name: e\nsteps:\n  - {id: s, type: script, config: {command: echo, args: [hi]}}\n"
            "  - {id: f, type: script, foreach: [x, y], config: {command: echo, "
            "args: ['${item}']}}\n")
    seen_a, seen_b = [], []
    wf_a = px.loads(text, echo=lambda step, line: seen_a.append((step, line)))
    wf_b = px.loads(text, echo=lambda step, line: seen_b.append((step, line)))
    wf_silent = px.loads(text)
    assert px.run(wf_silent, progress=False).ok and not seen_a and not seen_b
    assert px.run(wf_a, progress=False).ok
    assert sorted(seen_a) == [("f[0]", "x"), ("f[1]", "y"), ("s", "hi")] and not seen_b
    assert px.run(wf_b, progress=False).ok
    assert sorted(seen_b) == sorted(seen_a) and len(seen_a) == 3


def test_echo_does_not_change_a_steps_fingerprint(tmp_path):
    """A run with echo resumes from a store written without it: showing output is no input."""
    import pickle

    from parexec._yaml import Echo
    text = "name: e\nsteps:\n  - {id: s, type: script, config: {command: echo, args: [hi]}}\n"
    db = tmp_path / "s.db"
    assert px.run(px.loads(text), store=db, progress=False).ok
    lines = []
    result = px.run(px.loads(text, echo=lambda s, line: lines.append(line)), store=db,
                    resume=True, progress=False)
    assert result.tasks["s"].status == "cached" and result["s"] == "hi"
    assert not pickle.loads(pickle.dumps(Echo(print)))  # pickles as the silent Echo()


@pytest.mark.parametrize("line, words", [
    ("timeout: 0", "timeout must be a positive number of seconds"),
    ("timeout: .inf", "timeout must be a positive number of seconds"),
    ("grace: -1", "grace must be a number of seconds >= 0"),
    ("parallel: {defaultMaxConcurrency: 0}", "defaultMaxConcurrency must be >= 1"),
])
def test_file_settings_follow_the_python_options_rules(line, words):
    """Timeouts, grace and concurrency in a file obey the same checks as px.task/px.Workflow."""
    with pytest.raises(px.WorkflowError, match=words):
        px.loads(f"name: r\n{line}\nsteps:\n"
                 "  - {id: s, type: script, config: {command: echo}}\n")
