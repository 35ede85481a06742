"""Reading one step of a YAML pipeline into its plan: a dict of what ``_Loader.add`` adds.

``_yaml._Loader`` inherits ``step`` from ``_StepReader``: it checks the step's keys, type,
config, options and ``foreach`` (through ``_yaml_read._Reader``'s field checks), resolves
its python callable or agent (``_import_target``) and returns the plan, or notes each
problem with its position.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._errors import TaskOptionError
from ._options import Retry, check_id, check_max_concurrent
from ._yaml_read import _FOREACH_REF, STEP_KEYS, STEP_PARALLEL_KEYS, STEP_TYPES, _Reader
from ._yaml_steps import _lines
from ._yaml_template import _shell_line, _Template


class _StepReader(_Reader):
    """Reads one step (``step``); its state is set by ``_Loader.__init__``."""

    given_agents: dict[str, Any]
    file_agents: dict[str, str]
    resolved_agents: dict[str, Any]
    raw_inputs: dict[str, Any]

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
