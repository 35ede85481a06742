"""Step runners of YAML pipelines: what a loaded pipeline's tasks call when they run.

``_yaml`` (the loader) builds a ``Workflow`` whose tasks are these functions: ``run_script``
(a script step: its own process group, output capture, cancel flag, peak memory),
``call_python`` and ``call_agent``, and for a ``foreach`` step ``foreach_items`` (lists the
items) and ``run_item`` (runs one). They fill in the ``_Template`` values of
``_yaml_template`` with the upstream outputs. ``StepOutput`` is a script step's output and
``Echo`` where its lines go while it runs.
"""

from __future__ import annotations

import atexit
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ._errors import ParexecError, ScriptError
from ._yaml_template import _fill, _Template

_ITEM, _INDEX = "[item]", "[index]"  # keys of a foreach item's values (never step ids)


class StepOutput(str):
    """The output of a script step: its stdout text, without the final newline.

    What it wrote to stderr and its exit status are kept alongside.

    Attributes:
        stderr: Everything the step wrote to stderr.
        returncode: Its exit status (0 for a step that succeeded).
    """

    stderr: str
    returncode: int

    def __new__(cls, stdout: str, stderr: str = "", returncode: int = 0) -> StepOutput:
        self = super().__new__(cls, stdout)
        self.stderr = stderr
        self.returncode = returncode
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (StepOutput, (str(self), self.stderr, self.returncode))


def _lines(text: str) -> list[str]:
    """The non-empty lines of ``text`` (lines of only spaces count as empty)."""
    return [line for line in text.splitlines() if line.strip()]


def foreach_items(step: str, source: tuple[str, Any],
                  outputs: Mapping[str, Any]) -> list[tuple[int, Any, Mapping[str, Any]]]:
    """The items of a foreach step, each as ``(index, item, upstream outputs)``."""
    kind, value = source
    if kind == "step":
        value = outputs.get(value)
        if value is None:  # an upstream failure let through (continueOnError): no items
            value = []
        elif isinstance(value, str):
            value = _lines(value)
        elif not isinstance(value, (list, tuple)):
            raise ParexecError(
                f"foreach of step {step!r}: the output of step {source[1]!r} is a "
                f"{type(value).__name__}, not a list or text; make that step return a list, "
                "or print one item per line")
    else:
        value = _fill(value, outputs)
    return [(k, item, outputs) for k, item in enumerate(value)]


def run_item(entry: tuple[int, Any, Mapping[str, Any]], *, step: str, kind: str,
             payload: tuple[Any, ...]) -> Any:
    """Run one item of a foreach step, with ``${item}`` and ``${index}`` set."""
    index, item, outputs = entry
    values = {**outputs, _ITEM: item, _INDEX: index}
    if kind == "script":
        argv, shell, env, cwd, echo = payload
        return run_script(f"{step}[{index}]", argv, shell, env, cwd, values, echo)
    fn, first, second = payload
    if kind == "agent":
        return call_agent(fn, first, second, values)
    return call_python(fn, first, second, values)


def call_python(fn: Any, args: list[Any], kwargs: dict[str, Any],
                outputs: Mapping[str, Any]) -> Any:
    """Run a python step: substitute upstream outputs into its arguments (typed), call."""
    return fn(*_fill(args, outputs), **_fill(kwargs, outputs))


def call_agent(fn: Any, prompt: _Template, input: Any, outputs: Mapping[str, Any]) -> Any:
    """Run an agent step: ``fn(prompt, input)``, the prompt as text, the input typed."""
    return fn(prompt.render(outputs), _fill(input, outputs))


class Echo:
    """Where the lines script steps write go while they run (``parexec run --verbose``).

    ``Echo(write)`` calls ``write(step_id, line)`` for each line of stdout and stderr;
    ``Echo()`` shows nothing. ``load(..., echo=write)`` gives one to every script step of the
    workflow it builds, as an argument: the setting belongs to that workflow, so two loads
    (two CLI runs in one interpreter) with different settings never affect each other.

    It is how a step's output is shown, not an input of the step: it pickles as ``Echo()``,
    so whether output is shown never changes a step's fingerprint (``--verbose`` still
    resumes from a store) and nothing of the driver's terminal crosses into a process.
    """

    __slots__ = ("write",)

    def __init__(self, write: Callable[[str, str], Any] | None = None) -> None:
        self.write = write

    def __bool__(self) -> bool:
        return self.write is not None

    def __call__(self, step: str, line: str) -> None:
        if self.write is not None:
            self.write(step, line)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Echo, ())


def run_script(step: str, template: list[_Template], shell: bool, env: Mapping[str, str],
               cwd: str, outputs: Mapping[str, Any], echo: Echo | None = None) -> StepOutput:
    """Run a script step in its own process group and return its stdout as a ``StepOutput``.

    The ``StepOutput``'s ``.stderr`` keeps what the step wrote there.

    The step's cancel flag (set on timeout, cancellation or Ctrl-C) kills the whole process
    group, so no grandchild survives. A non-zero exit raises ``ScriptError`` with the last
    lines of stderr.

    The step's ``peak_memory`` is its own: the process's memory once started, then the run's
    monitor samples the process and its children while it runs (``attempt.sampler``), and
    at its end its exact high-water mark (see ``_wait_peak``).
    """
    from ._context import _local, current
    ctx = current()
    attempt = getattr(_local, "attempt", None)
    sampler = getattr(attempt, "sampler", None)
    argv = [t.render(outputs) for t in template]  # a shell step has one: its command line
    full_env = {**os.environ, **env}
    try:
        proc = subprocess.Popen(argv[0] if shell else argv, shell=shell, cwd=cwd,
                                env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as exc:
        hint = ""
        if not shell and len(argv[0].split()) > 1:
            hint = ("; config.command names one program and runs without a shell: put its "
                    "arguments in config.args, or set config.shell: true to run it as a "
                    "shell command line")
        raise ScriptError(step, 127, f"cannot start {argv[0]!r}: {exc.strerror}{hint}"
                          ) from None
    _live_steps.add(proc)
    if attempt is not None:
        _note_peak(attempt, _rss(proc.pid))
    if sampler is not None:
        sampler.watch(attempt, proc.pid)
    out: list[bytes] = []
    err: list[bytes] = []
    partial = {"stdout": b"", "stderr": b""}
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, ("stdout", out))
    sel.register(proc.stderr, selectors.EVENT_READ, ("stderr", err))
    try:
        while sel.get_map():
            # Wake up at least every 0.1 s to honour the cancel flag: a thread task cannot be
            # interrupted, so this loop is what stops the step's processes.
            for key, _ in sel.select(timeout=0.1):
                chunk = os.read(key.fd, 65536)
                name, sink = key.data
                if not chunk:
                    sel.unregister(key.fileobj)
                    if echo and partial[name]:
                        echo(step, partial[name].decode(errors="replace"))
                    continue
                sink.append(chunk)
                if echo:
                    lines = (partial[name] + chunk).split(b"\n")
                    partial[name] = lines.pop()
                    for line in lines:
                        echo(step, line.decode(errors="replace"))
            if ctx.cancelled():
                _kill_group(proc)
                ctx.check()
        peak = _wait_peak(proc)
        if attempt is not None:
            _note_peak(attempt, peak)
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        _live_steps.discard(proc)
        if sampler is not None:
            sampler.unwatch(attempt, keep_peak=True)
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    stdout = b"".join(out).decode(errors="replace")
    stderr = b"".join(err).decode(errors="replace")
    if proc.returncode != 0:
        raise ScriptError(step, proc.returncode, _tail(stderr), _tail(stdout))
    return StepOutput(stdout[:-1] if stdout.endswith("\n") else stdout, stderr, 0)


def _tail(text: str, n: int = 10) -> str:
    """The last ``n`` lines of ``text``, split at line feeds only.

    A carriage return is not a line break: it stays in the text, and printing escapes it.
    """
    lines = text.rstrip("\n").split("\n")[-n:]
    return "\n".join(line.removesuffix("\r") for line in lines)


def _note_peak(attempt: Any, peak: int) -> None:
    """Raise the step's peak memory to ``peak`` bytes (kept by the run's monitor)."""
    sampler = getattr(attempt, "sampler", None)
    if sampler is not None:
        sampler.note_peak(attempt, peak)


def _rss(pid: int) -> int:
    """The resident memory of process ``pid`` now, in bytes (0 if it is gone)."""
    import psutil
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def _wait_peak(proc: subprocess.Popen[bytes]) -> int:
    """Wait for ``proc`` to end; set its ``returncode`` and return its peak RSS in bytes.

    ``os.wait4`` reports the process's ``ru_maxrss``: the largest of its own and of the
    children it waited for (kilobytes on Linux, bytes on macOS). That figure also counts
    this process's memory at the moment the child was started (the kernel keeps the
    high-water mark of the memory the child had before ``exec``, which was ours), so it is
    the step's own only when it exceeds this process's own high-water mark; otherwise 0
    is returned and the monitor's samples stand.
    """
    wait4 = getattr(os, "wait4", None)
    if wait4 is None:
        proc.wait()
        return 0
    while True:
        try:
            _, status, usage = wait4(proc.pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:  # reaped elsewhere; Popen knows its status
            proc.wait()
            return 0
    proc.returncode = os.waitstatus_to_exitcode(status)
    import resource
    unit = 1 if sys.platform == "darwin" else 1024
    peak = int(usage.ru_maxrss) * unit
    return peak if peak > resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit else 0


# Script steps still running, so that none outlives the interpreter: when it exits before
# their thread task saw the cancel flag (a second Ctrl-C or SIGTERM during cleanup, an
# exception in the caller), this exit hook kills their process groups.
_live_steps: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_live_steps() -> None:
    for proc in list(_live_steps):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
