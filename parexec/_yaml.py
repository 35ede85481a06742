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

The code: this module builds the ``Workflow`` (``_Loader.build``, ``add``); ``_Loader``
inherits the reading of one step from ``_yaml_plan`` and the bounded parsing, positions and
field checks from ``_yaml_read``. Substitution and shell quoting are in ``_yaml_template``,
and what the steps run (``run_script``, ``call_python``, ``foreach_items``, ...) in
``_yaml_steps``.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ._errors import ScriptError, TaskOptionError, WorkflowError
from ._options import check_id, check_max_workers
from ._task import TaskRef, task
from ._workflow import Workflow
from ._yaml_plan import _StepReader
from ._yaml_read import MAX_PROBLEMS_SHOWN, PARALLEL_KEYS, TOP_KEYS
from ._yaml_steps import (
    Echo,
    StepOutput,
    call_agent,
    call_python,
    foreach_items,
    run_item,
    run_script,
)

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


class _Loader(_StepReader):
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
