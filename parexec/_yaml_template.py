"""Substitution in YAML pipelines: ``_Template`` strings and their shell quoting.

``_yaml`` (the loader) turns every config string into a ``_Template``: the text the file
wrote, with each ``${...}`` kept apart as a part. ``_yaml_steps`` (the step runners) fills
them in when a step runs (``_Template.render`` for text, ``_fill`` for typed values). For a
``shell: true`` step, ``_shell_line`` marks where each value stands in the command line, and
``_shell_quote`` quotes it for that place, so a value is always data, never shell syntax.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any, NamedTuple


class _Template(NamedTuple):
    """A string of the file with its substitutions, kept apart until the step runs.

    Each part is ``(kind, text, context)``: ``"text"`` is written in the file, ``"value"`` a
    value known at load time (an input, an environment variable), ``"step"`` the id of an
    upstream step whose output goes there. Values are inserted once, when rendered, so a
    value that looks like ``${...}`` is never substituted again. ``context`` is where a value
    stands in a shell command line (see ``_shell_line``); empty when no shell is involved.
    """

    parts: tuple[tuple[str, str, str], ...]

    def render(self, outputs: Mapping[str, Any]) -> str:
        """The text with every value (quoted for its shell context, if any) in its place."""
        out: list[str] = []
        for kind, text, context in self.parts:
            if kind == "text":
                out.append(text)
                continue
            if kind != "value":
                key = text if kind == "step" else f"[{kind}]"
                if key not in outputs:  # only in messages of a file already refused
                    out.append(f"${{steps.{text}.output}}" if kind == "step" else f"${{{kind}}}")
                    continue
                value = outputs[key]
                text = "" if value is None else str(value)
            out.append(_shell_quote(text, context) if context else text)
        return "".join(out)

    def value(self, outputs: Mapping[str, Any]) -> Any:
        """Typed substitution: exactly one reference gives the value itself, else the text."""
        if len(self.parts) == 1:
            kind, text, _ = self.parts[0]
            key = text if kind == "step" else f"[{kind}]"
            if kind != "text" and kind != "value" and key in outputs:
                return outputs[key]
        return self.render(outputs)


def _fill(value: Any, outputs: Mapping[str, Any]) -> Any:
    """``value`` with its ``_Template`` strings (also in lists and dicts) substituted, typed."""
    if isinstance(value, _Template):
        return value.value(outputs)
    if isinstance(value, list):
        return [_fill(v, outputs) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, outputs) for k, v in value.items()}
    return value


def _shell_quote(value: str, context: str) -> str:
    r"""Quote ``value`` so that a POSIX shell reads it as data where it stands.

    Unquoted, it becomes one word (``shlex.quote``); inside the user's single quotes, each
    ``'`` closes, escapes and reopens them; inside double quotes, ``\ " $ ` `` are escaped; in
    a comment, line breaks (which would end the comment) become spaces. A backslash written
    just before the substitution would escape the quoting's first character, so a
    line continuation (backslash-newline, removed by the shell) absorbs it first.
    """
    state, escaped = context[0], context.endswith("\\")
    prefix = "\n" if escaped else ""
    if state == "'":
        return value.replace("'", "'\\''")
    if state == '"':
        return prefix + re.sub(r'([\\"$`])', r"\\\1", value)
    if state == "#":
        return value.replace("\n", " ").replace("\r", " ")
    return prefix + shlex.quote(value)


def _shell_line(argv: list[_Template]) -> _Template | None:
    r"""Join a shell step's command and args into one line, marking each value's context.

    The context is where the file's text puts the value: ``-`` unquoted, ``'`` or ``"``
    inside those quotes, ``#`` in a comment, plus ``\`` right after a backslash.

    Returns None when a value stands where quoting cannot be tracked without a full shell
    parser (inside ``$(...)``, backquotes, ``$'...'``, or after ``<<``): the loader refuses
    that file rather than guess.
    """
    joined: list[tuple[str, str, str]] = []
    for k, t in enumerate(argv):
        if k:
            joined.append(("text", " ", ""))
        joined.extend(t.parts)
    state, escaped, opaque, prev = "-", False, False, " "
    out: list[tuple[str, str, str]] = []
    for kind, text, _ in joined:
        if kind != "text":
            if opaque:
                return None
            out.append((kind, text, state + ("\\" if escaped else "")))
            escaped, prev = False, "x"
            continue
        out.append((kind, text, ""))
        for ch in text:
            if escaped:
                escaped = False
            elif state == "'":
                if ch == "'":
                    state = "-"
            elif state == "#":
                if ch == "\n":
                    state = "-"
            elif ch == "\\":
                escaped = True
            elif ch == "`" or (prev == "$" and ch == "("):
                opaque = True
            elif state == '"':
                if ch == '"':
                    state = "-"
            elif prev == "$" and ch == "'" or prev == "<" and ch == "<":
                opaque = True
            elif ch in "'\"":
                state = ch
            elif ch == "#" and prev in " \t\n;&|()<>":
                state = "#"
            prev = ch
    return _Template(tuple(out))
