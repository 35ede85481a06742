"""The ``parexec`` command: run, validate and draw YAML pipelines.

::

    parexec run FILE [--max-workers N] [--sequential] [--set NAME=VALUE]...
                     [--store DB] [--resume] [--keep all|leaves]
                     [--trace OUT.json] [--quiet] [--verbose]
    parexec validate FILE
    parexec graph FILE [--format dot|levels|critical-path]

Exit status: 0 succeeded, 1 the workflow failed or was partial, 2 invalid file, usage or
unusable store, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM and 129 by SIGHUP (128 +
the signal: the run is cancelled and its steps stopped, as for Ctrl-C). A user's mistake is
reported in one clear message, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
# Signals that stop a run the way Ctrl-C does: `timeout`, `docker stop`, a cancelled CI job
# and a closed terminal send these, and a run that ignored them would leave its steps running.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM/SIGHUP during `parexec run`.

    A KeyboardInterrupt, so ``px.run`` takes the same cleanup path as for Ctrl-C: the run is
    cancelled, script steps' process groups and process workers are killed.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals(program: bool = False) -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``_Stopped`` inside the block, then restore the old handlers.

    Only the first signal raises; later ones are ignored while the block runs (cleanup, the
    partial summary), so the command still exits 128 + the first signal. A library user's
    own handlers are never replaced for longer than the CLI's run. With ``program`` (the
    ``parexec`` command itself, whose process ends right after), a stopped run ignores
    repeats until the process exits: with the default handler back (or a Python handler,
    which the interpreter resets while it shuts down), a second SIGTERM sent during the
    interpreter's shutdown killed it with -15 instead of the promised 143. Outside the main
    thread (main() called from a thread) Python cannot install handlers, and nothing is
    changed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if stopped:
            return  # the run is already stopping: its cleanup must not be cut short
        stopped.append(signum)
        raise _Stopped(signum)

    previous = {}
    try:
        for signum in _STOP_SIGNALS:
            previous[signum] = signal.signal(signum, stop)
        yield
    finally:
        for signum, handler in previous.items():
            # SIG_IGN, not a Python handler: the interpreter resets Python handlers to the
            # default while it shuts down, which is when a repeat would then kill us.
            signal.signal(signum, signal.SIG_IGN if stopped and program else handler)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors: exit 2, as argparse does
        self.print_usage(sys.stderr)
        self.exit(EXIT_INVALID, f"parexec: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="parexec", description="Run a pipeline of steps as a task graph.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run", help="run a YAML pipeline",
        description="Run a YAML pipeline and print a summary table. Step output is shown only "
                    "with --verbose; when a step fails, the last lines of its stderr (or, if "
                    "it wrote none, of its stdout) are printed under the summary. Exit status: "
                    "0 succeeded, 1 failed or partial, 2 invalid file, usage or unusable store "
                    "or trace, 130 Ctrl-C, 128+N stopped by signal N (143 SIGTERM).")
    run.add_argument("file")
    run.add_argument("--max-workers", type=int, metavar="N", help="steps running at once")
    run.add_argument("--sequential", action="store_true", help="one step at a time")
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="value of an input declared under 'inputs:' (repeatable)")
    run.add_argument("--trace", metavar="OUT.json", help="write a Chrome/Perfetto trace")
    run.add_argument("--store", metavar="DB", help="record finished steps in this SQLite file")
    run.add_argument("--resume", action="store_true",
                     help="skip steps recorded as succeeded in --store with the same inputs")
    run.add_argument("--keep", choices=("all", "leaves"), default="all",
                     help="which step outputs the run keeps in memory: all (default), or "
                          "leaves (only steps nothing depends on; an output other steps use is "
                          "released once they have finished, for pipelines of large outputs)")
    run.add_argument("--quiet", action="store_true", help="no progress and no summary")
    run.add_argument("--verbose", action="store_true",
                     help="stream each step's output (stdout and stderr), prefixed by its id; "
                          "without it, step output is not shown")
    val = sub.add_parser("validate", help="check a YAML pipeline without running it")
    val.add_argument("file")
    val.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    graph = sub.add_parser("graph", help="print the pipeline's graph")
    graph.add_argument("file")
    graph.add_argument("--format", choices=("dot", "levels", "critical-path"), default="dot")
    graph.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    store = sub.add_parser("store", help="maintain a --store file").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    prune = store.add_parser("prune", help="delete old records of a store (with both rules, "
                             "a record goes only when both allow it)")
    prune.add_argument("db")
    prune.add_argument("--workflow", metavar="W", help="only this workflow's records")
    prune.add_argument("--keep-last", type=int, metavar="N",
                       help="keep the newest N records of each task")
    prune.add_argument("--older-than", type=float, metavar="DAYS",
                       help="delete records written more than DAYS days ago")
    return parser


def _store_prune(args: argparse.Namespace) -> int:
    """``parexec store prune``: exit 0, or 2 for a bad option or an unusable store."""
    import os

    from ._errors import ParexecError
    from ._store import Store
    problem = None
    if args.keep_last is None and args.older_than is None:
        problem = "store prune needs --keep-last N and/or --older-than DAYS"
    elif args.keep_last is not None and args.keep_last < 0:
        problem = f"--keep-last must be >= 0, got {args.keep_last}"
    elif args.older_than is not None and not 0 <= args.older_than < float("inf"):
        problem = f"--older-than must be a number of days >= 0, got {args.older_than}"
    elif not os.path.isfile(args.db):
        problem = f"store {args.db!r} does not exist; give the file given to --store"
    if problem:
        _error(problem)
        return EXIT_INVALID
    try:
        with Store(args.db) as store:
            n = store.prune(args.workflow, keep_last=args.keep_last,
                            older_than=None if args.older_than is None
                            else args.older_than * 86400)
    except ParexecError as exc:  # StoreError: the file cannot be used
        _error(str(exc))
        return EXIT_INVALID
    print(f"{_printable(args.db)}: {n} record(s) deleted")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``parexec`` command; returns the exit status.

    Without ``argv`` (the command itself: arguments from ``sys.argv``), a run stopped by
    SIGTERM or SIGHUP keeps ignoring those signals until the process exits, so it exits
    128 + the first signal; with ``argv`` (a library call), the caller's handlers are
    restored when the run ends.
    """
    try:
        status = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``parexec ... | head``). Point stdout at /dev/null so the
        # interpreter's own flush at exit cannot fail again, and exit as a shell would.
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    return status


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "store":
        return _store_prune(args)
    from ._errors import ParexecError, TaskOptionError
    from ._options import check_max_workers, check_resume
    from ._yaml import load
    if args.command == "run":
        # The library's own checks, worded for the command line.
        try:
            check_resume(args.resume, args.store)
        except TaskOptionError:
            _error("--resume needs --store DB (the file that recorded the earlier run)")
            return EXIT_INVALID
        try:
            check_max_workers(args.max_workers, "")
        except TaskOptionError:
            _error(f"--max-workers must be an integer >= 1, got {args.max_workers}")
            return EXIT_INVALID
    inputs = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"parexec: --set needs NAME=VALUE, got {item!r}", file=sys.stderr)
            return EXIT_INVALID
        inputs[name] = value
    try:
        wf = load(args.file, inputs=inputs, echo=_echo() if args.command == "run" and
                  args.verbose else None)
        wf.validate()
    except ParexecError as exc:
        _error(str(exc))
        return EXIT_INVALID
    if args.command == "validate":
        from ._yaml_steps import foreach_items
        steps = sum(1 for spec in wf.tasks.values() if spec.fn is not foreach_items)
        print(f"{_printable(args.file)}: ok ({steps} steps in {len(wf.levels())} levels)")
        return EXIT_OK
    if args.command == "graph":
        if args.format == "dot":
            sys.stdout.write(wf.to_dot())
        elif args.format == "levels":
            for k, level in enumerate(wf.levels()):
                print(f"{k}: {' '.join(level)}")
        else:
            print(" -> ".join(wf.critical_path()))
        return EXIT_OK
    return _run(wf, args, program=argv is None)


def _echo() -> Any:
    """The ``--verbose`` printer of step output: ``[step] line``, one line at a time."""
    lock = threading.Lock()  # lines of steps running at once must not interleave

    def echo(step: str, line: str) -> None:
        with lock:
            try:
                print(f"[{_printable(step)}] {_printable(line)}", flush=True)
            except (BrokenPipeError, ValueError):
                pass  # nobody reads the output any more; that must not fail the step
    return echo


def _run(wf: Any, args: argparse.Namespace, program: bool = False) -> int:
    import parexec as px
    if args.trace:
        problem = _unwritable(args.trace)
        if problem:
            _error(f"cannot write the trace to {args.trace}: {problem}; nothing ran")
            return EXIT_INVALID
    with _stop_on_signals(program):  # also around the summary: a late signal must not kill us
        return _run_and_report(wf, args, px)


def _run_and_report(wf: Any, args: argparse.Namespace, px: Any) -> int:
    try:
        result = px.run(wf, max_workers=args.max_workers, parallel=not args.sequential,
                        progress=False if args.quiet else "auto", check=False,
                        store=args.store, resume=args.resume, keep=args.keep)
    except KeyboardInterrupt as exc:
        partial = px.last_result()
        if partial is not None and not args.quiet:
            print(partial.summary(), file=sys.stderr)
        if isinstance(exc, _Stopped):
            name = signal.Signals(exc.signum).name
            print(f"parexec: stopped by {name}; every step was stopped", file=sys.stderr)
            return 128 + exc.signum
        print("parexec: interrupted; every step was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except px.ParexecError as exc:  # WorkflowError, StoreError: the user's to fix
        _error(str(exc))
        return EXIT_INVALID
    status = EXIT_OK if result.status == "succeeded" else EXIT_FAILED
    if not args.quiet:
        print(result.summary())
    for tid, err in result.errors.items():
        _error(f"step {tid!r} failed: {err}")
    if args.trace:
        try:
            result.to_chrome_trace(args.trace)
        except OSError as exc:
            # Checked before the run, so something changed meanwhile; the run's outcome is
            # above, but a caller that asked for the trace must not take the exit as success.
            _error(f"cannot write the trace to {args.trace}: {exc.strerror or exc}")
            status = max(status, EXIT_INVALID)
    return status


def _printable(text: str, *, newlines: bool = False) -> str:
    r"""``text`` with control characters escaped (``\x1b``, ``\r``, ...), tabs kept.

    Step ids, error messages and step output come from the file and from the steps: printed
    raw, a carriage return or an escape sequence could rewrite a terminal line or forge a
    row of the summary. With ``newlines``, line breaks are kept (multi-line error text).
    """
    if text.isprintable():
        return text
    keep = "\t\n" if newlines else "\t"
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def _error(message: str) -> None:
    """Print ``parexec: message`` on stderr, with control characters escaped.

    Later lines of a multi-line message are indented, so none can pass for a line of
    parexec's own.
    """
    first, *rest = _printable(message, newlines=True).split("\n")
    print("\n".join([f"parexec: {first}"] + [f"  {line}" for line in rest]), file=sys.stderr)


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written (None if it can), found by trying, as root too.

    Opening for append creates the file if needed (removed again, so a failed run leaves no
    empty trace behind) and never truncates an existing one.
    """
    import os
    existed = os.path.lexists(path)
    try:
        # O_NONBLOCK: a FIFO without a reader is refused (ENXIO) instead of hanging here.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    if not existed:
        os.unlink(path)
    return None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
