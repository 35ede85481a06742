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

import difflib
import heapq
import importlib
import os
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from ._errors import ParexecError, ScriptError, TaskOptionError, WorkflowError
from ._options import (
    Retry,
    check_grace,
    check_id,
    check_max_concurrent,
    check_max_workers,
    check_timeout,
)
from ._task import TaskRef, task
from ._workflow import Workflow
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

TOP_KEYS = ("name", "version", "description", "parallel", "steps", "timeout", "retry", "env",
            "cwd", "inputs", "agents", "grace")
PARALLEL_KEYS = ("enabled", "defaultMaxConcurrency", "resources")
STEP_KEYS = ("id", "name", "type", "config", "dependsOn", "parallel", "continueOnError",
             "timeout", "retry", "env", "cwd", "priority", "isolation", "foreach", "grace")
STEP_PARALLEL_KEYS = ("enabled", "maxConcurrency", "resource", "isolateErrors")
RETRY_KEYS = ("maxRetries", "initialDelay", "backoffFactor")
STEP_TYPES = {"script": ("command", "args", "shell", "env", "cwd"),
              "python": ("call", "args", "kwargs", "isolation"),
              "agent": ("agent", "prompt", "input")}
_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# How many values aliases may add to a file once expanded. Reusing a config block through
# an alias adds tens or thousands; a million Python values cost about 100 MB at worst, and a
# file without aliases is never refused, whatever its size (its cost is what it holds).
MAX_ALIAS_EXPANSION = 1_000_000
# Messages stay readable and cheap however broken a file is: the first problems are shown
# (all are counted) and only the first ones get a "did you mean" suggestion.
MAX_PROBLEMS_SHOWN = 50
MAX_SUGGESTIONS = 20
MAX_COMPARISONS = 20_000  # about 1 s of difflib at worst
_SIZE_CAP = 1 << 62  # sizes stop growing here, so a deep bomb never builds huge integers
_FOREACH_REF = re.compile(r"\$\{\s*(?:steps\.[^}]*\.output|inputs\.[^}]*)\s*\}")


def _SafeLoader(text: str) -> Any:  # noqa: N802 - stands for the class it picks
    """PyYAML's safe loader for ``text``: the C one (libyaml) when PyYAML was built with it.

    libyaml parses several times faster, and refuses nesting deeper than 1,000 levels itself.
    """
    import yaml
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)


_TOO_DEEP = "nested too deeply for YAML to read; a pipeline needs only a few levels of nesting"
_ANCHOR = re.compile(r"&([^\s,\[\]{}]+)")


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


class _Loader:
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

    # Errors with positions ------------------------------------------------------------

    def problem(self, path: tuple[Any, ...], message: str) -> None:
        where = self.marks.get(path)
        while where is None and path:
            path = path[:-1]
            where = self.marks.get(path)
        pos = f":{where[0]}:{where[1]}" if where else ""
        self.problems.append(f"{self.source}{pos}: {message}")

    def suggest(self, word: str, choices: Collection[Any]) -> str:
        """``"; did you mean 'x'?"`` for a close match among ``choices``, else ``""``.

        Each suggestion compares ``word`` with every choice (about 50 us each), so only the
        first ``MAX_SUGGESTIONS`` problems get one, within ``MAX_COMPARISONS`` comparisons in
        all: a file with thousands of unknown ids among thousands of steps must not take
        minutes to refuse (5,000 of each took 400 s before this bound).
        """
        if self.nsuggested >= MAX_SUGGESTIONS or self.ncompared + len(choices) > MAX_COMPARISONS:
            return ""
        self.nsuggested += 1
        self.ncompared += len(choices)
        close = difflib.get_close_matches(word, [str(c) for c in choices], n=1)
        return f"; did you mean {close[0]!r}?" if close else ""

    def check_keys(self, data: Mapping[str, Any], allowed: tuple[str, ...],
                   path: tuple[Any, ...], what: str) -> None:
        for key in data:
            if key not in allowed:
                hint = self.suggest(str(key), allowed) or f"; known keys: {', '.join(allowed)}"
                self.problem(path + (key,), f"unknown key {key!r} in {what}{hint}")

    def expect(self, value: Any, types: type | tuple[type, ...], path: tuple[Any, ...],
               what: str) -> bool:
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                    else (types,)):
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple)
                                                     else (types,)))
            self.problem(path, f"{what} must be {names}, got {type(value).__name__} {value!r}")
        return ok

    # Parsing --------------------------------------------------------------------------

    def parse(self) -> Any:
        """Parse the text: syntax, bounded alias expansion, then the data and positions."""
        import yaml
        loader = None
        try:
            loader = _SafeLoader(self.text)
            node = loader.get_single_node()
            if node is None:
                return None
            self.check_expansion(node)
            data = loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            lines = self.text.splitlines()
            line = lines[mark.line] if mark and mark.line < len(lines) else ""
            if "\t" in line[:len(line) - len(line.lstrip())] or "'\\t'" in str(exc):
                msg = "tab character used for indentation; YAML allows only spaces"
            elif "nesting depth" in str(exc.problem):
                msg = _TOO_DEEP
            else:
                msg = f"YAML syntax error: {exc.problem or exc}"
            raise WorkflowError(f"{self.source}{pos}: {msg}") from None
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow
            before = self.text[:exc.position]
            pos = f":{before.count(chr(10)) + 1}:{len(before) - before.rfind(chr(10))}"
            raise WorkflowError(f"{self.source}{pos}: character {chr(exc.character)!r} is not "
                                "allowed in YAML; remove it or write it as an escape inside "
                                "a double-quoted string") from None
        except RecursionError:
            # PyYAML composes and constructs recursively; a pipeline needs a few levels.
            pos = f":{loader.line + 1}:{loader.column + 1}" if loader is not None else ""
            raise WorkflowError(f"{self.source}{pos}: {_TOO_DEEP}") from None
        finally:
            if loader is not None:
                loader.dispose()
        self._marks(node)
        return data

    def check_expansion(self, root: Any) -> None:
        """Refuse a self-containing anchor, and aliases that expand the file beyond reason.

        PyYAML shares an aliased node, so parsing costs what the file holds; but whatever
        walks the data (and the old position walk) pays for every expanded copy: nine
        levels of nine aliases are 387 million values (a "billion laughs"). Sizes are
        counted per node, once (iterative, memoized), so this check costs what the file holds.
        """
        import yaml
        size: dict[int, int] = {}
        expanding: set[int] = set()  # the nodes on the current path (a cycle returns to one)
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            node, finished = stack.pop()
            key = id(node)
            children: list[Any] = []
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = node.value
            if finished:
                expanding.discard(key)
                size[key] = min(1 + sum(size[id(c)] for c in children), _SIZE_CAP)
                continue
            if key in size:
                continue
            if key in expanding:
                mark = node.start_mark  # an anchored node starts at its '&name'
                found = _ANCHOR.match(self.text, mark.index)
                name = found.group(1) if found else None
                raise WorkflowError(
                    f"{self.source}:{mark.line + 1}:{mark.column + 1}: anchor "
                    f"{'&' + name if name else ''} contains itself (an alias inside it refers "
                    "back to it), which would be infinitely deep; refer to it only from "
                    "outside")
            expanding.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children)
        added = size[id(root)] - len(size)  # what aliases add to the file's own values
        if added > MAX_ALIAS_EXPANSION:
            raise WorkflowError(
                f"{self.source}: aliases expand it to more than {MAX_ALIAS_EXPANSION:,} values "
                f"(it holds {len(size):,} of its own); refusing it, as an alias bomb would "
                "exhaust time and memory; write the repeated parts out or reuse fewer aliases")

    def _marks(self, root: Any) -> None:
        """Record the line and column of every path, visiting each node once.

        A node reached again through an alias keeps its first path's marks: a problem under
        it is reported at the alias (or the anchor) rather than walked again.
        """
        import yaml
        seen: set[int] = set()
        stack: list[tuple[Any, tuple[Any, ...]]] = [(root, ())]
        while stack:
            node, path = stack.pop()
            self.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode):
                        sub = path + (key.value,)
                        self.marks[sub] = (key.start_mark.line + 1, key.start_mark.column + 1)
                        stack.append((value, sub))
            elif isinstance(node, yaml.SequenceNode):
                stack.extend((item, path + (k,)) for k, item in enumerate(node.value))

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

    def checked(self, check: Callable[[Any, str], Any], value: Any, path: tuple[Any, ...],
                what: str, must: str, types: type | tuple[type, ...] = int) -> Any:
        """``check(value, "")`` (a checker of ``_options``), or None with a problem noted.

        The rule is the one ``px.task`` and ``px.Workflow`` apply; the message is worded for
        the file (``timeout must be ...`` at its position) rather than as a Python option.
        """
        if not self.expect(value, types, path, what):
            return None
        try:
            return check(value, "")
        except TaskOptionError:
            self.problem(path, f"{what} must be {must}")
            return None

    def seconds(self, value: Any, path: tuple[Any, ...], what: str) -> float | None:
        """A timeout (seconds > 0), or None when absent or wrong (a problem noted)."""
        if value is None:
            return None
        return self.checked(check_timeout, value, path, what,  # type: ignore[no-any-return]
                            "a positive number of seconds", (int, float))

    def grace(self, value: Any, path: tuple[Any, ...]) -> float | None:
        """A ``grace`` (seconds >= 0), or None when absent or wrong (a problem noted)."""
        if value is None:
            return None
        return self.checked(check_grace, value, path, "grace",  # type: ignore[no-any-return]
                            "a number of seconds >= 0", (int, float))

    def retry(self, value: Any, path: tuple[Any, ...]) -> Retry | None:
        if value is None:
            return None
        if not self.expect(value, dict, path, "retry"):
            return None
        self.check_keys(value, RETRY_KEYS, path, "retry")
        try:
            return Retry(int(value.get("maxRetries", 0)),
                         initial_delay=float(value.get("initialDelay", 1.0)),
                         backoff=float(value.get("backoffFactor", 2.0)))
        except (TypeError, ValueError, ParexecError) as exc:
            self.problem(path, f"retry: {exc}")
            return None

    def env(self, value: Any, path: tuple[Any, ...], inputs: dict[str, str]) -> dict[str, str]:
        if not self.expect(value, dict, path, "env"):
            return {}
        out: dict[str, str] = {}
        for k, v in value.items():
            name, text = str(k), self.subst(str(v), path + (k,), inputs)
            if not name or "=" in name or "\0" in name:
                self.problem(path + (k,), f"{self.field(path)}: {name!r} cannot name an "
                             "environment variable (it must be non-empty, without '=')")
            elif "\0" in text:
                self.problem(path + (k,), f"{self.field(path + (k,))}: an environment "
                             "variable cannot hold a NUL character")
            else:
                out[name] = text
        return out

    def cwd(self, value: Any, path: tuple[Any, ...], inputs: dict[str, str],
            default: Path) -> Path:
        if value is None:
            return default
        if not self.expect(value, str, path, "cwd"):
            return default
        return (self.base / self.subst(value, path, inputs)).resolve()

    def field(self, path: tuple[Any, ...]) -> str:
        """Name a place in the file for a message: ``step 'build' field config.args[1]``."""
        if len(path) >= 2 and path[0] == "steps" and isinstance(path[1], int):
            sid = self.sids.get(path[1])
            head = f"step {sid!r}" if sid else f"step {path[1] + 1}"
            rest = path[2:]
        else:
            head, rest = "the pipeline", path
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest).lstrip(".")
        return f"{head} field {where}" if where else head

    def subst(self, text: str, path: tuple[Any, ...], inputs: dict[str, str]) -> str:
        """Substitute ${inputs.X} and ${env.X} in a value that cannot name a step."""
        return self.template(text, path, inputs, None).render({})

    def template(self, text: str, path: tuple[Any, ...], inputs: dict[str, str],
                 steps: set[str] | None, ids: Mapping[str, int] | None = None) -> _Template:
        """Split ``text`` into literal text, load-time values and step references.

        ``${inputs.X}`` and ``${env.X}`` become values now; ``${steps.X.output}`` is checked,
        added to ``steps`` (the implied dependencies) and filled in when the step runs.
        """
        parts: list[tuple[str, str, str]] = []
        at = 0
        for m in _REF.finditer(text):
            if m.start() > at:
                parts.append(("text", text[at:m.start()], ""))
            at = m.end()
            ref = m.group(1).strip()
            kind, _, rest = ref.partition(".")
            if ref in ("item", "index"):
                if steps is None or not self.foreach:
                    self.problem(path, f"${{{ref}}} can only be used in a step with foreach:, "
                                 "inside its config")
                parts.append((ref, "", ""))
            elif kind == "inputs" and rest and "." not in rest:
                if rest not in inputs:
                    self.problem(path, f"${{{ref}}} refers to an input the pipeline does not "
                                 "declare; add it under 'inputs:'")
                    continue
                parts.append(("value", inputs[rest], ""))
            elif kind == "env" and rest:
                name, has_default, default = rest.partition(":-")
                if not _ENV_NAME.fullmatch(name):
                    self.problem(path, f"${{{ref}}}: {name!r} is not an environment variable "
                                 "name (letters, digits and '_')")
                    continue
                value = os.environ.get(name)
                if value is None and not has_default:
                    self.problem(path, f"{self.field(path)}: ${{env.{name}}} is not set; set "
                                 f"{name} in the environment, or give a default: "
                                 f"${{env.{name}:-default}} (${{env.{name}:-}} for empty)")
                    continue
                parts.append(("value", default if value is None else value, ""))
            elif kind == "steps" and rest.endswith(".output") and rest.count(".") == 1:
                sid = rest[:-len(".output")]
                if steps is None:
                    self.problem(path, f"${{{ref}}} can only be used inside a step's config")
                elif ids is not None and sid not in ids:
                    hint = self.suggest(sid, ids)
                    self.problem(path, f"${{{ref}}} refers to unknown step {sid!r}{hint}")
                else:
                    steps.add(sid)
                parts.append(("step", sid, ""))
            else:
                self.problem(path, f"${{{ref}}} is not a known substitution; use "
                             "${steps.<id>.output}, ${inputs.<name>}, ${env.<NAME>}, "
                             "${env.<NAME>:-default}, or ${item} and ${index} with foreach:")
                parts.append(("text", m.group(0), ""))
        if at < len(text):
            parts.append(("text", text[at:], ""))
        return _Template(tuple(parts))

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
