"""YAML pipelines: ``px.load("pipeline.yaml")`` builds an ordinary ``Workflow``.

The format (camelCase keys; README.rst, "Pipelines in YAML", has the full reference)::

    name: build                        # default: the file's stem
    version: 1.0.0
    description: Build and report
    inputs: {target: release, token: null}   # defaults; null = required (--set NAME=VALUE)
    parallel:
      enabled: true                    # false: one step at a time
      defaultMaxConcurrency: 4         # -> max_workers
      resources: {cpu: 2, network: 5}  # -> named pools (name: capacity)
    timeout: 600                       # seconds, the whole run
    grace: 5                           # default grace of every step (see px.task)
    retry: {maxRetries: 2, initialDelay: 1, backoffFactor: 2}   # default of every step
    env: {LANG: C}                     # environment of script steps
    cwd: .                             # relative to the file's folder
    agents: {summarizer: "mypkg.agents:summarize"}   # px.load(agents={...}) wins
    steps:
      - id: compile                    # required, unique, printable, no '[' ']'
        name: Compile                  # display name
        type: script                   # required: script | python | agent
        config: {command: make, args: ["${inputs.target}"], shell: false, env: {}, cwd: src}
        parallel: {resource: cpu, isolateErrors: true, enabled: true, maxConcurrency: 1}
        timeout: 300                   # seconds per attempt
        grace: 10                      # seconds to clean up after a timeout or cancel
        retry: {maxRetries: 3}         # replaces the pipeline's
        priority: 10                   # higher starts first
        env: {CC: gcc}
        cwd: build
      - id: report
        type: python
        config: {call: "mypkg.reports:summarize", args: ["${steps.compile.output}"],
                 kwargs: {fmt: text}, isolation: thread}      # or process
        dependsOn: [compile]
        continueOnError: true
      - id: summary
        type: agent                    # summarize(prompt, input); output = its return value
        isolation: process             # python and agent steps; default thread
        config: {agent: summarizer, prompt: "Summarize ${inputs.target}",
                 input: "${steps.report.output}"}

How keys map onto the engine: ``parallel.resource`` holds one unit of that pool;
``parallel.enabled: false`` on a step makes it run alone (it takes a hidden pool whole);
``isolateErrors: true`` is ``on_error="skip"``; ``continueOnError: true`` is
``on_error="ignore"`` (dependents get an empty output); ``maxConcurrency`` caps the items
of a ``foreach`` step running at once (without ``foreach`` a step runs once). A ``foreach``
step (a YAML list, or exactly one ``${steps.ID.output}`` / ``${inputs.NAME}`` whose value
is a list or text split into non-empty lines) becomes a task ``ID.items`` that lists the
items (``foreach_items``) and a map ``ID`` over them, expanded at run time into ``ID[0]``,
``ID[1]``, ...; each item runs the step with ``${item}`` and ``${index}`` set
(``run_item``). A script step runs ``command`` with ``args`` as its argv (no shell unless
``shell: true``) in its own process group; its output is its stdout (``StepOutput``); a
non-zero exit raises ``ScriptError``. A python step calls ``package.module:function``
(imported at load time) and its output is the return value; an agent step calls its agent
``agent(prompt, input)`` the same way.

Substitution, in config strings and in ``env``/``cwd`` values: ``${inputs.NAME}`` (a
declared input), ``${env.NAME}`` (unset is an error unless written ``${env.NAME:-default}``;
``${env.NAME:-}`` is an explicit empty default) and ``${steps.ID.output}`` (filled in at run
time; implies the dependency). In python args/kwargs and an agent's input (also nested in
lists and mappings), a string that is exactly one ``${steps.ID.output}`` receives the value
itself (``_Template.value``); elsewhere values become text. Strings are kept as
``_Template`` parts, so a value is inserted once and never substituted again. With
``shell: true``, every value is quoted for the place it stands in the command line the file
wrote (``_shell_line``): as one word, or escaped inside the user's quotes; places that
cannot be tracked are refused.

Loading is bounded (``_Loader.parse``): non-UTF-8 bytes, characters YAML refuses, anchors
that contain themselves, and aliases that add more than ``MAX_ALIAS_EXPANSION`` values are
clear errors; positions are recorded visiting each node once; nothing recurses on the
file's depth except PyYAML itself, whose ``RecursionError`` becomes a clear error. Every
problem of a file is collected and reported together, each with its ``file:line:column``.
"""

from __future__ import annotations

import heapq
import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ._errors import ScriptError, TaskOptionError, WorkflowError
from ._options import (
    Retry,
    check_id,
    check_max_concurrent,
    check_max_workers,
)
from ._task import TaskRef, task
from ._workflow import Workflow
from ._yaml_read import (
    _FOREACH_REF,
    MAX_PROBLEMS_SHOWN,
    PARALLEL_KEYS,
    STEP_KEYS,
    STEP_PARALLEL_KEYS,
    STEP_TYPES,
    TOP_KEYS,
    _Reader,
)
from ._yaml_steps import (
    Echo,
    StepOutput,
    _lines,
    call_agent,
    call_python,
    foreach_items,
    run_item,
    run_script,
)
from ._yaml_template import _shell_line, _Template

__all__ = ["Echo", "ScriptError", "StepOutput", "load", "loads"]  # ScriptError: from _errors


def load(path: str | os.PathLike[str], inputs: Mapping[str, str] | None = None, *,
         agents: Mapping[str, Callable[..., Any]] | None = None,
         echo: Callable[[str, str], Any] | None = None) -> Workflow:
    """Read a YAML pipeline and return its ``Workflow``.

    Args:
        path: The file.
        inputs: Values of the file's ``inputs`` (what ``--set NAME=VALUE`` gives).
        agents: Agents of ``type: agent`` steps, name -> callable ``agent(prompt, input)``;
            they win over the file's ``agents:`` entries of the same name.
        echo: Called as ``echo(step_id, line)`` with each line script steps write while
            they run (what ``parexec run --verbose`` prints); None shows nothing. It is a
            setting of this workflow only, and never part of a step's fingerprint.

    Raises:
        WorkflowError: Every problem of the file, each with ``file:line:column``.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise WorkflowError(f"{p}: cannot read the file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # YAML files are UTF-8; a leading BOM is allowed
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise WorkflowError(f"{p}:{line}:{column}: not UTF-8: byte 0x{raw[exc.start]:02x} at "
                            f"offset {exc.start} cannot be decoded; save the file as UTF-8"
                            ) from None
    return loads(text, source=str(p), inputs=inputs, base=p.parent, agents=agents, echo=echo)


def loads(text: str, *, source: str = "<string>", inputs: Mapping[str, str] | None = None,
          base: str | os.PathLike[str] | None = None,
          agents: Mapping[str, Callable[..., Any]] | None = None,
          echo: Callable[[str, str], Any] | None = None) -> Workflow:
    """Build a ``Workflow`` from YAML text; see ``load``."""
    return _Loader(text, source, dict(inputs or {}), Path(base or "."),
                   dict(agents or {}), Echo(echo)).build()


class _Loader(_Reader):
    def __init__(self, text: str, source: str, inputs: dict[str, str], base: Path,
                 agents: dict[str, Any] | None = None, echo: Echo | None = None) -> None:
        self.text, self.source, self.given, self.base = text, source, inputs, base
        self.echo = echo or Echo()
        self.given_agents = agents or {}
        self.file_agents: dict[str, str] = {}  # name -> "package.module:function"
        self.resolved_agents: dict[str, Any] = {}  # name -> callable, or None (reported)
        self.problems: list[str] = []
        self.marks: dict[tuple[Any, ...], tuple[int, int]] = {}
        self.sids: dict[int, str] = {}  # step index -> id, for messages
        self.raw_inputs: dict[str, Any] = {}  # input values as written (a list stays a list)
        self.foreach = False  # the step being read has foreach: ${item}/${index} exist
        self.nsuggested = self.ncompared = 0


    # Building -------------------------------------------------------------------------

    def build(self) -> Workflow:
        data = self.parse()
        if not isinstance(data, dict):
            raise WorkflowError(f"{self.source}: a pipeline is a mapping with at least "
                                "'name' and 'steps'")
        self.check_keys(data, TOP_KEYS, (), "the pipeline")
        name = data.get("name", Path(self.source).stem or "pipeline")
        if self.expect(name, str, ("name",), "name"):
            try:
                check_id(name, "name", brackets=False)
            except TaskOptionError as exc:
                self.problem(("name",), f"the pipeline's {exc}")
                name = "pipeline"
        inputs = self.inputs(data.get("inputs") or {})
        self.agents(data.get("agents") or {})
        par = data.get("parallel") or {}
        max_workers, pools = None, {}
        sequential = False
        if self.expect(par, dict, ("parallel",), "parallel"):
            self.check_keys(par, PARALLEL_KEYS, ("parallel",), "parallel")
            if par.get("enabled", True) is False:
                sequential = True
            if "defaultMaxConcurrency" in par:
                max_workers = self.checked(check_max_workers, par["defaultMaxConcurrency"],
                                           ("parallel", "defaultMaxConcurrency"),
                                           "defaultMaxConcurrency", ">= 1")
            resources = par.get("resources") or {}
            if self.expect(resources, dict, ("parallel", "resources"), "resources"):
                for pool, cap in resources.items():
                    if self.expect(cap, int, ("parallel", "resources", pool),
                                   f"resource {pool!r}") and cap >= 1:
                        pools[str(pool)] = cap
                    elif isinstance(cap, int):
                        self.problem(("parallel", "resources", pool),
                                     f"resource {pool!r} needs a capacity >= 1")
        if sequential:
            max_workers = 1
        timeout = self.seconds(data.get("timeout"), ("timeout",), "timeout")
        retry = self.retry(data.get("retry"), ("retry",))
        env = self.env(data.get("env") or {}, ("env",), inputs)
        cwd = self.cwd(data.get("cwd"), ("cwd",), inputs, self.base)
        steps = data.get("steps")
        if not isinstance(steps, list) or not steps:
            self.problem(("steps",) if "steps" in data else (),
                         "'steps' must be a non-empty list of steps")
            steps = []
        ids: dict[str, int] = {}
        for k, step in enumerate(steps):
            sid = step.get("id") if isinstance(step, dict) else None
            if isinstance(sid, str) and sid:
                self.sids[k] = sid
                if sid in ids:
                    self.problem((("steps", k, "id")), f"duplicate step id {sid!r} (first at "
                                 f"step {ids[sid] + 1}); step ids must be unique")
                else:
                    ids[sid] = k
        wf = Workflow(name if isinstance(name, str) else "pipeline",
                      max_workers=max_workers, pools=pools or None, timeout=timeout,
                      description=str(data.get("description") or ""),
                      grace=self.grace(data.get("grace"), ("grace",)))
        wf.version = str(data.get("version", ""))  # type: ignore[attr-defined]
        plans = [self.step(k, s, ids, inputs, env, cwd, retry, pools)
                 for k, s in enumerate(steps)]
        if self.problems:
            shown = self.problems[:MAX_PROBLEMS_SHOWN]
            more = len(self.problems) - len(shown)
            raise WorkflowError(f"{len(self.problems)} problem(s) in {self.source}:\n  "
                                + "\n  ".join(shown)
                                + (f"\n  ... and {more} more" if more else ""))
        refs: dict[str, TaskRef] = {}
        pending = [p for p in plans if p is not None]
        # Add steps upstream first (a step may name a later step in dependsOn).
        order = _topo([p["id"] for p in pending], {p["id"]: p["deps"] for p in pending})
        by_id = {p["id"]: p for p in pending}
        for sid in order:
            plan = by_id[sid]
            refs[sid] = self.add(wf, plan, refs)
            # parallel.enabled: false -> the exclusive gate: it runs with no other step.
            par = steps[ids[sid]].get("parallel")
            wf[sid].exclusive = isinstance(par, dict) and par.get("enabled", True) is False
        return wf

    def inputs(self, declared: Any) -> dict[str, str]:
        if not self.expect(declared, dict, ("inputs",), "inputs"):
            return {}
        out: dict[str, str] = {}
        for name, default in declared.items():
            if name in self.given:
                out[name] = self.raw_inputs[name] = str(self.given[name])
            elif default is None:
                self.problem(("inputs", name), f"input {name!r} is required: give it with "
                             f"--set {name}=VALUE")
            else:
                out[name] = str(default)
                self.raw_inputs[name] = default
        for name in self.given:
            if name not in declared:
                hint = self.suggest(name, declared)
                self.problem(("inputs",), f"--set {name}=... names an input the pipeline does "
                             f"not declare{hint}")
        return out

    def agents(self, declared: Any) -> None:
        """Check the ``agents:`` mapping and ``agents=``; imports wait for a step's use."""
        for name, fn in self.given_agents.items():
            if not callable(fn):
                self.problems.append(f"{self.source}: agents=: {name!r} is a "
                                     f"{type(fn).__name__}, not callable; give a function "
                                     "called as agent(prompt, input)")
        if not self.expect(declared, dict, ("agents",), "agents"):
            return
        for name, target in declared.items():
            if not isinstance(target, str) or ":" not in target:
                self.problem(("agents", name), f"agent {name!r} must be "
                             f"'package.module:function', got {target!r}")
            else:
                self.file_agents[str(name)] = target

    def resolve_agent(self, name: Any, path: tuple[Any, ...], sid: str) -> Any:
        """The callable of agent ``name`` for step ``sid`` (None, reported, if there is none)."""
        if not isinstance(name, str) or not name:
            self.problem(path[:-1], f"agent step {sid!r} needs config.agent (the name of an "
                         "agent declared under 'agents:' or given to px.load(agents=...))")
            return None
        if name in self.given_agents:
            return self.given_agents[name]
        if name not in self.file_agents:
            known = sorted({*self.given_agents, *self.file_agents})
            if known:
                listed = f"; known agents: {', '.join(known)}{self.suggest(name, known)}"
            else:
                listed = ("; no agents are declared: add one under 'agents:' "
                          "(name: 'package.module:function') or pass px.load(agents=...)")
            self.problem(path, f"step {sid!r} uses unknown agent {name!r}{listed}")
            return None
        if name not in self.resolved_agents:
            target = self.file_agents[name]
            fn, error = _import_target(target)
            if error:
                self.problem(("agents", name), f"agent {name!r} of step {sid!r}: {error}")
            self.resolved_agents[name] = fn
        return self.resolved_agents[name]

    def step(self, k: int, step: Any, ids: Mapping[str, int], inputs: dict[str, str],
             wf_env: dict[str, str], wf_cwd: Path, wf_retry: Retry | None,
             pools: dict[str, int]) -> dict[str, Any] | None:
        path: tuple[Any, ...] = ("steps", k)
        self.foreach = False
        if not self.expect(step, dict, path, f"step {k + 1}"):
            return None
        sid = step.get("id")
        if not isinstance(sid, str) or not sid:
            self.problem(path, f"step {k + 1} needs an 'id' (a non-empty string)")
            return None
        # Ids and names are printed in tables and terminals: no control characters (they
        # could forge rows or move the cursor); '[' ']' in ids are reserved for map items.
        for key, brackets in (("id", True), ("name", False)):
            if isinstance(step.get(key), str):
                try:
                    check_id(step[key], f"step {k + 1} {key}", brackets=brackets)
                except TaskOptionError as exc:
                    self.problem(path + (key,), str(exc))
                    return None
        self.check_keys(step, STEP_KEYS, path, f"step {sid!r}")
        kind = step.get("type")
        if kind is None:
            self.problem(path, f"step {sid!r} has no type; known types: "
                         f"{', '.join(STEP_TYPES)} (add 'type: script' or 'type: python')")
            return None
        if kind not in STEP_TYPES:
            self.problem(path + ("type",) if "type" in step else path,
                         f"step {sid!r} has unknown type {kind!r}; known types: "
                         f"{', '.join(STEP_TYPES)}")
            return None
        config = step.get("config") or {}
        if not self.expect(config, dict, path + ("config",), f"step {sid!r} config"):
            return None
        self.foreach = "foreach" in step
        self.check_keys(config, STEP_TYPES[kind], path + ("config",),
                        f"the config of {kind} step {sid!r}")
        deps: set[str] = set()
        after = step.get("dependsOn") or []
        if isinstance(after, str):
            after = [after]
        if self.expect(after, list, path + ("dependsOn",), "dependsOn"):
            for j, dep in enumerate(after):
                if dep not in ids:
                    hint = self.suggest(str(dep), ids)
                    self.problem(path + ("dependsOn", j),
                                 f"step {sid!r} depends on unknown step {dep!r}{hint}")
                else:
                    deps.add(dep)
        options: dict[str, Any] = {"id": sid, "name": step.get("name") or sid}
        par = step.get("parallel") or {}
        if self.expect(par, dict, path + ("parallel",), "parallel"):
            self.check_keys(par, STEP_PARALLEL_KEYS, path + ("parallel",),
                            f"the parallel settings of step {sid!r}")
            step_pools: dict[str, int] = {}
            resource = par.get("resource")
            if resource is not None:
                if resource not in pools:
                    self.problem(path + ("parallel", "resource"),
                                 f"step {sid!r} uses resource {resource!r}, which "
                                 "parallel.resources does not declare")
                else:
                    step_pools[resource] = 1
            if "maxConcurrency" in par:
                # A step runs once, so at most one execution of it is ever concurrent.
                self.checked(check_max_concurrent, par["maxConcurrency"],
                             path + ("parallel", "maxConcurrency"), "maxConcurrency", ">= 1")
            if step_pools:
                options["pools"] = step_pools
            if par.get("isolateErrors") is True:
                options["on_error"] = "skip"
        if step.get("continueOnError") is True:
            options["on_error"] = "ignore"
        timeout = self.seconds(step.get("timeout"), path + ("timeout",), "timeout")
        if timeout:
            options["timeout"] = timeout
        grace = self.grace(step.get("grace"), path + ("grace",))
        if grace is not None:
            options["grace"] = grace
        retry = self.retry(step.get("retry"), path + ("retry",)) if "retry" in step else wf_retry
        if retry:
            options["retry"] = retry
        if "priority" in step and self.expect(step["priority"], int, path + ("priority",),
                                              "priority"):
            options["priority"] = step["priority"]
        env = {**wf_env, **self.env(step.get("env") or {}, path + ("env",), inputs)}
        cwd = self.cwd(step.get("cwd"), path + ("cwd",), inputs, wf_cwd)
        plan: dict[str, Any] = {"id": sid, "type": kind, "options": options, "env": env,
                                "cwd": str(cwd), "foreach": None, "max_concurrent": None}
        if self.foreach:
            plan["foreach"] = self.foreach_items(step["foreach"], path + ("foreach",), sid,
                                                 inputs, deps, ids)
            if isinstance(par, dict) and isinstance(par.get("maxConcurrency"), int) \
                    and par["maxConcurrency"] >= 1:
                plan["max_concurrent"] = par["maxConcurrency"]
            if f"{sid}.items" in ids:
                self.problem(path + ("foreach",), f"step {sid!r} has foreach:, whose items "
                             f"come from a task named {sid + '.items'!r}; rename the step of "
                             "that id")
        cpath = path + ("config",)
        if kind == "script":
            command = config.get("command")
            if not isinstance(command, str) or not command:
                self.problem(cpath, f"script step {sid!r} needs config.command (a string)")
                return None
            args = config.get("args") or []
            if not self.expect(args, list, cpath + ("args",), "args"):
                args = []
            argv = [self.template(command, cpath + ("command",), inputs, deps, ids)] + [
                self.template(str(a), cpath + ("args", j), inputs, deps, ids)
                for j, a in enumerate(args)]
            plan["shell"] = config.get("shell") is True
            if plan["shell"]:
                # One command line: the file's text is shell code, each substituted value is
                # quoted for the place it stands in (see _shell_line).
                line = _shell_line(argv)
                if line is None:
                    self.problem(cpath + ("command",), f"{self.field(cpath)}: a substitution "
                                 "inside $(...), backquotes, $'...' or after a here-document "
                                 "(<<) cannot be quoted safely for the shell; pass the value "
                                 "through the step's env: and write \"$NAME\" instead")
                    line = _Template(())
                argv = [line]
            plan["argv"] = argv
            env.update(self.env(config.get("env") or {}, cpath + ("env",), inputs))
            if "cwd" in config:
                plan["cwd"] = str(self.cwd(config.get("cwd"), cpath + ("cwd",), inputs, cwd))
        elif kind == "python":
            call = config.get("call")
            fn = self.resolve_call(call, cpath + ("call",), sid)
            args = config.get("args") or []
            kwargs = config.get("kwargs") or {}
            if not self.expect(args, list, cpath + ("args",), "args"):
                args = []
            if not self.expect(kwargs, dict, cpath + ("kwargs",), "kwargs"):
                kwargs = {}
            plan["fn"] = fn
            plan["args"] = self.values(args, cpath + ("args",), inputs, deps, ids)
            plan["kwargs"] = self.values(kwargs, cpath + ("kwargs",), inputs, deps, ids)
        else:
            plan["fn"] = self.resolve_agent(config.get("agent"), cpath + ("agent",), sid)
            prompt = config.get("prompt", "")
            if not isinstance(prompt, str):
                self.problem(cpath + ("prompt",), f"config.prompt of step {sid!r} must be "
                             f"text, got {type(prompt).__name__} {prompt!r}; quote it")
                prompt = ""
            plan["prompt"] = self.template(prompt, cpath + ("prompt",), inputs, deps, ids)
            plan["input"] = self.values(config.get("input"), cpath + ("input",), inputs,
                                        deps, ids)
        if "isolation" in step and kind == "script":
            self.problem(path + ("isolation",), f"step {sid!r}: isolation applies to python and "
                         "agent steps; a script step runs in its own process already (remove "
                         "the key)")
        elif kind != "script":
            ipath = path + ("isolation",) if "isolation" in step else cpath + ("isolation",)
            isolation = step.get("isolation", config.get("isolation", "thread"))
            if isolation not in ("thread", "process"):
                self.problem(ipath, f"step {sid!r}: isolation {isolation!r} is unknown; use "
                             "'thread' or 'process'")
                isolation = "thread"
            options["isolation"] = isolation
        plan["deps"] = sorted(deps)
        return plan

    def foreach_items(self, value: Any, path: tuple[Any, ...], sid: str,
                      inputs: dict[str, str], deps: set[str],
                      ids: Mapping[str, int]) -> tuple[str, Any]:
        """Where a foreach step's items come from: ``("list", values)`` or ``("step", id)``."""
        if isinstance(value, list):
            self.foreach = False  # an item list cannot refer to the items
            items = self.values(value, path, inputs, deps, ids)
            self.foreach = True
            return ("list", items)
        if isinstance(value, str) and _FOREACH_REF.fullmatch(value.strip()):
            ref = value.strip()[2:-1].strip()
            if ref.startswith("inputs."):
                name = ref[len("inputs."):]
                if name not in self.raw_inputs:
                    self.template(value, path, inputs, deps, ids)  # reports it
                    return ("list", [])
                raw = self.raw_inputs[name]
                if isinstance(raw, str):
                    return ("list", _lines(raw))
                if isinstance(raw, list):
                    return ("list", raw)
                self.problem(path, f"foreach of step {sid!r}: input {name!r} is a "
                             f"{type(raw).__name__}; give a list or text (one item per line)")
                return ("list", [])
            parts = self.template(value.strip(), path, inputs, deps, ids).parts
            return ("step", parts[0][1])
        self.problem(path, f"foreach of step {sid!r} must be a list, or exactly one "
                     "${steps.<id>.output} or ${inputs.<name>}, got "
                     f"{type(value).__name__} {value!r}")
        return ("list", [])

    def resolve_call(self, call: Any, path: tuple[Any, ...], sid: str) -> Any:
        if not isinstance(call, str) or ":" not in call:
            self.problem(path, f"python step {sid!r} needs config.call as "
                         "'package.module:function'")
            return None
        obj, error = _import_target(call)
        if error:
            self.problem(path, f"step {sid!r}: {error}")
        return obj

    def values(self, value: Any, path: tuple[Any, ...], inputs: dict[str, str],
               deps: set[str], ids: Mapping[str, int]) -> Any:
        """``value`` with every string, also inside lists and dicts, made a ``_Template``."""
        if isinstance(value, str):
            return self.template(value, path, inputs, deps, ids)
        if isinstance(value, list):
            return [self.values(v, path + (j,), inputs, deps, ids) for j, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.values(v, path + (k,), inputs, deps, ids) for k, v in value.items()}
        return value

    def add(self, wf: Workflow, plan: dict[str, Any], refs: dict[str, TaskRef]) -> TaskRef:
        # Data dependencies: the upstream outputs. A step not built yet can only be part of
        # a cycle; it goes in by id, and Workflow.validate() reports the cycle.
        outputs = {d: refs[d] for d in plan["deps"] if d in refs}
        options = dict(plan["options"], after=[d for d in plan["deps"] if d not in refs])
        if plan["foreach"] is not None:
            return self.add_foreach(wf, plan, options, outputs)
        if plan["type"] == "script":
            return wf.add(task(run_script).options(**options), plan["id"], plan["argv"],
                          plan["shell"], plan["env"], plan["cwd"], outputs, self.echo)
        if plan["type"] == "agent":
            return wf.add(task(call_agent).options(**options), plan["fn"], plan["prompt"],
                          plan["input"], outputs)
        return wf.add(task(call_python).options(**options), plan["fn"], plan["args"],
                      plan["kwargs"], outputs)


    def add_foreach(self, wf: Workflow, plan: dict[str, Any], options: dict[str, Any],
                    outputs: dict[str, TaskRef]) -> TaskRef:
        """A foreach step: a task listing the items, then a map running one task per item.

        The items are known once the upstream outputs are, so the map is expanded at run
        time (``sid[0]``, ``sid[1]``, ...); each item carries the upstream outputs it needs.
        """
        sid, kind = plan["id"], plan["type"]
        on_error = options.get("on_error", "fail")
        source = wf.add(task(foreach_items).options(
            id=f"{sid}.items", name=f"items of {options['name']}", on_error=on_error,
            default=[], after=options["after"]), sid, plan["foreach"], outputs)
        if kind == "script":
            payload: tuple[Any, ...] = (plan["argv"], plan["shell"], plan["env"], plan["cwd"],
                                        self.echo)
        elif kind == "agent":
            payload = (plan["fn"], plan["prompt"], plan["input"])
        else:
            payload = (plan["fn"], plan["args"], plan["kwargs"])
        item_options = {k: v for k, v in options.items() if k not in ("id", "name", "after")}
        return wf.map(task(run_item).options(**item_options), source,
                      max_concurrent=plan["max_concurrent"], id=sid, step=sid, kind=kind,
                      payload=payload)



def _import_target(target: str) -> tuple[Any, str | None]:
    """Import ``package.module:function``: ``(obj, None)``, or ``(None, why not)``."""
    module, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        return None, (f"cannot import module {module!r} ({exc}); install it, or put the "
                      "folder that holds it on PYTHONPATH")
    except ImportError as exc:
        return None, f"cannot import module {module!r} ({exc})"
    except Exception as exc:  # noqa: BLE001 - the module's own code failed on import
        return None, f"cannot import module {module!r} ({type(exc).__name__}: {exc})"
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return None, f"module {module!r} has no {attr!r}"
    if not callable(obj):
        return None, f"{target!r} is a {type(obj).__name__}, not callable; name a function"
    return obj, None


def _topo(ids: list[str], deps: Mapping[str, list[str]]) -> list[str]:
    """Ids with dependencies first, in file order among ready steps (Kahn's algorithm).

    Iterative, so a chain of any length is fine. Steps on a cycle never become ready: they
    come last, in file order, and Workflow.validate reports the cycle.
    """
    known = set(ids)
    npending = {sid: len({d for d in deps.get(sid, ()) if d in known}) for sid in ids}
    dependents: dict[str, list[str]] = {sid: [] for sid in ids}
    for sid in ids:
        for d in set(deps.get(sid, ())):
            if d in known:
                dependents[d].append(sid)
    position = {sid: k for k, sid in enumerate(ids)}
    ready = [(position[sid], sid) for sid in ids if not npending[sid]]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        _, sid = heapq.heappop(ready)
        out.append(sid)
        for child in dependents[sid]:
            npending[child] -= 1
            if not npending[child]:
                heapq.heappush(ready, (position[child], child))
    if len(out) < len(ids):
        placed = set(out)
        out.extend(sid for sid in ids if sid not in placed)
    return out
