"""Reading a YAML pipeline: bounded parsing, errors with positions, checked fields.

``_yaml._Loader`` (which builds the ``Workflow``) inherits these steps from ``_Reader``:
``parse`` reads the text within the bounds of ``MAX_ALIAS_EXPANSION`` and records each
node's position (``_marks``); ``problem`` collects every problem with its
``file:line:column``; ``checked``, ``seconds``, ``grace``, ``retry``, ``env`` and ``cwd``
check one field; ``subst`` and ``template`` turn a string into a ``_Template``
(``_yaml_template``). The loader's ``__init__`` sets the state these methods share.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from ._errors import ParexecError, TaskOptionError, WorkflowError
from ._options import Retry, check_grace, check_timeout
from ._yaml_template import _Template

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


class _Reader:
    """The reading half of ``_Loader``: its state is set by ``_Loader.__init__``."""

    text: str
    source: str
    base: Path
    problems: list[str]
    marks: dict[tuple[Any, ...], tuple[int, int]]
    sids: dict[int, str]
    foreach: bool
    nsuggested: int
    ncompared: int

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

    # Fields: checks and substitution -------------------------------------------------

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
