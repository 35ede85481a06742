"""Events: records of what the scheduler did, delivered to subscribers.

The scheduler emits an ``Event`` after it changed state; it never waits on a subscriber's
decision. Progress bars, logging and user callbacks are all subscribers. Callbacks run on the
run's event thread (``parexec-events-<workflow>``), one at a time and in the order the events
happened, never on the scheduler thread: a slow or blocking callback cannot delay a timeout,
a retry or Ctrl-C. ``run()`` returns once every event was delivered, or after
``DRAIN_TIMEOUT`` seconds with a warning naming the callback still running. One that raises is
logged once on the ``parexec`` logger and keeps being called. At most ``MAX_PENDING`` events
wait for delivery; beyond that, events are dropped with one warning (a callback that slow
would otherwise hold the whole history in memory).

Per task, the order is ``task:queued`` → ``task:started`` → (``task:timeout``)
→ ``task:retrying`` → ``task:started`` … → ``task:completed`` | ``task:failed``.
A task skipped because an upstream task failed gets only ``task:skipped``; a task that never
started because the run stopped gets only ``task:cancelled``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

from ._errors import TaskOptionError
from ._status import EVENT_KINDS, EventKind

__all__ = ["DRAIN_TIMEOUT", "EVENT_KINDS", "Emitter", "Event", "EventKind", "ProgressBar",
           "check_kind", "logger"]

DRAIN_TIMEOUT = 5.0  # seconds run() waits for callbacks to take the last events
MAX_PENDING = 100_000  # events waiting for a slow callback before new ones are dropped

logger = logging.getLogger("parexec")


def check_kind(kind: str) -> None:
    """Raise ``TaskOptionError`` unless ``kind`` is an event kind or ``"*"``."""
    if kind != "*" and kind not in EVENT_KINDS:
        import difflib
        close = difflib.get_close_matches(kind, EVENT_KINDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known kinds: {', '.join(EVENT_KINDS)}"
        raise TaskOptionError(f"unknown event kind {kind!r}; {hint} (or '*' for all)")


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened in a run.

    Attributes:
        kind: One of ``EVENT_KINDS``, e.g. ``"task:completed"``.
        workflow: The workflow's name.
        task_id: The task concerned (None for ``workflow:*`` events).
        time: Wall-clock time (seconds since the epoch).
        attempt: The attempt number (task events; 0 before the first start).
        duration: Seconds the attempt (or the run, for ``workflow:*``) took, when it ended.
        error: The exception, for failures, retries and timeouts.
    """

    kind: EventKind
    workflow: str
    task_id: str | None = None
    time: float = 0.0
    attempt: int = 0
    duration: float | None = None
    error: BaseException | None = None


class Emitter:
    """Deliver events to ``(kind, callback)`` subscribers on a thread of their own.

    ``"*"`` matches every kind.

    ``emit`` only enqueues (the scheduler thread never runs a callback); ``close`` marks the
    end of the run's events and ``drain`` waits for their delivery.
    """

    def __init__(self, subscribers: Sequence[tuple[str, Callable[[Event], Any]]],
                 name: str = "run") -> None:
        self._by_kind: dict[str, list[Callable[[Event], Any]]] = {}
        for kind in EVENT_KINDS:
            self._by_kind[kind] = [cb for k, cb in subscribers if k in (kind, "*")]
        self._failed: set[int] = set()
        self.active = bool(subscribers)
        self._queue: SimpleQueue[Event | None] = SimpleQueue()
        self._pending = 0  # approximate: read without a lock, only to bound memory
        self._dropped = 0
        self._thread: threading.Thread | None = None
        self._name = name
        self.current: Callable[[Event], Any] | None = None  # the callback being called

    def wants(self, kind: str) -> bool:
        """Whether anyone listens to ``kind`` (so the event need not even be built)."""
        return bool(self._by_kind.get(kind))

    def emit(self, event: Event) -> None:
        """Queue ``event`` for its subscribers (called by the scheduler thread)."""
        if self._pending >= MAX_PENDING:
            if not self._dropped:
                logger.warning("event callbacks of run %r are more than %d events behind; "
                               "dropping events until they catch up", self._name, MAX_PENDING)
            self._dropped += 1
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._deliver, daemon=True,
                                            name=f"parexec-events-{self._name}")
            self._thread.start()
        self._pending += 1
        self._queue.put(event)

    def close(self) -> None:
        """No more events: the delivery thread ends once it delivered the queued ones."""
        if self._thread is not None:
            self._queue.put(None)

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        """Wait until every queued event was delivered; False if a callback is still busy."""
        thread = self._thread
        if thread is None or threading.current_thread() is thread:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _deliver(self) -> None:
        get = self._queue.get
        while True:
            event = get()
            if event is None:
                return
            self._pending -= 1
            for callback in self._by_kind.get(event.kind, ()):
                self.current = callback
                try:
                    callback(event)
                except Exception:  # noqa: BLE001 - a subscriber never breaks the run
                    key = id(callback)
                    if key not in self._failed:
                        self._failed.add(key)
                        logger.exception(
                            "event callback %r raised on %s (logged once per callback; it "
                            "will still be called)", callback, event.kind)
            self.current = None


def want_progress(progress: bool | str) -> bool:
    """Resolve ``progress=`` (``True``, ``False`` or ``"auto"``)."""
    if progress == "auto":
        return _in_notebook() or bool(getattr(sys.stderr, "isatty", lambda: False)())
    if isinstance(progress, bool):
        return progress
    raise TaskOptionError(f"progress={progress!r} must be True, False or 'auto'")


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:  # noqa: BLE001
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class _Lines:
    """A stream for tqdm that turns each redraw (carriage return, bar) into a line."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        text = text.replace("\x1b[A", "")  # no cursor movement outside a terminal
        parts = [p.strip() for p in text.split("\r")]
        lines = [p for p in parts if p]
        if lines:
            self._stream.write("\n".join(lines) + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


class ProgressBar:
    """A ``tqdm.auto`` bar of finished tasks, with running / failed / retrying counts.

    It is a widget in notebooks and text on terminals, and it closes on the run's final
    event, whatever the outcome.
    """

    _FINAL = ("task:completed", "task:failed", "task:skipped", "task:cancelled")

    def __init__(self, total: int, name: str) -> None:
        import importlib
        module = "tqdm.std"
        if _in_notebook():
            try:  # a widget needs ipywidgets; without it, text (tqdm.auto would warn)
                importlib.import_module("ipywidgets")
                module = "tqdm.notebook"
            except ImportError:
                pass
        bar_type: Any = importlib.import_module(module).tqdm
        extra: dict[str, Any] = {}
        if module == "tqdm.std" and not getattr(sys.stderr, "isatty", lambda: False)():
            # Not a terminal (a CI log, a file): "\r" cannot redraw a line there, so log
            # lines would glue onto the bar. Write whole lines, at most one a second.
            extra = {"file": _Lines(sys.stderr), "mininterval": 1.0, "ncols": 100}
        self._bar = bar_type(total=total, desc=name, unit="task", dynamic_ncols=not extra,
                             leave=True, **extra)
        self._running: set[str | None] = set()
        self._retrying: set[str | None] = set()
        self._seen: set[str | None] = set()  # maps add tasks at run time: grow the total
        self.failed = 0
        self._closed = False

    def __call__(self, event: Event) -> None:
        """Update the bar from one event."""
        kind, tid = event.kind, event.task_id
        if tid is not None and tid not in self._seen:
            self._seen.add(tid)
            if len(self._seen) > self._bar.total:
                self._bar.total = len(self._seen)
        if kind == "task:started":
            self._running.add(tid)
            self._retrying.discard(tid)
        elif kind == "task:retrying":
            self._running.discard(tid)
            self._retrying.add(tid)
        elif kind in self._FINAL:
            self._running.discard(tid)
            self._retrying.discard(tid)
            self.failed += kind == "task:failed"
            self._bar.update(1)
        elif kind.startswith("workflow:") and kind not in (
                "workflow:started", "workflow:paused", "workflow:resumed"):
            self.close()
            return
        else:
            return
        self._bar.set_postfix(running=len(self._running), failed=self.failed,
                              retrying=len(self._retrying), refresh=False)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if not self._closed:
            self._closed = True
            self._bar.set_postfix(running=0, failed=self.failed, retrying=0, refresh=False)
            self._bar.close()
