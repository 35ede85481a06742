"""The task context: what a running task knows about itself, in a thread or a process.

``px.current()`` returns the ``TaskContext`` of the task running in this thread, found in
``_local``: thread workers (``_pools``) set ``_local.attempt`` to the scheduler's attempt
record, process workers (``_worker``) set ``_local.context``. ``run_coroutine`` runs an
``async def`` task's coroutine in either, and ``user_frames`` trims a task's traceback to
the user's frames.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from ._errors import Cancelled, ParexecError

__all__ = ["TaskContext", "current"]


class TaskContext:
    """What a running task knows about itself; returned by ``px.current()``.

    Attributes:
        task_id: The id of the running task.
        attempt: The attempt number, 1 for the first try.
    """

    __slots__ = ("task_id", "attempt", "_flag")

    def __init__(self, task_id: str, attempt: int, flag: Any = None) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self._flag = flag  # an object whose ``cancel_requested`` the scheduler sets

    def cancelled(self) -> bool:
        """Whether the run asked this task to stop (cancellation, timeout, a failed run).

        A thread task cannot be interrupted: it should call this (or ``check()``) between
        steps of long work and return early (with ``grace=``, ``px.TaskTimeout`` or
        ``px.Cancelled`` is also raised in its Python code). A process task is killed
        instead (with ``grace=``, first interrupted by the same exception), so in a process
        this is always False.
        """
        flag = self._flag
        return flag is not None and flag.cancel_requested

    def check(self) -> None:
        """Raise ``px.Cancelled`` if this task was asked to stop."""
        if self.cancelled():
            raise Cancelled(f"task {self.task_id!r} (attempt {self.attempt}) was cancelled")

    def __repr__(self) -> str:
        return f"<TaskContext {self.task_id!r} attempt={self.attempt}>"


# The running task of this thread: thread workers set ``attempt`` (the scheduler's attempt
# record, which has task_id / number / cancel_requested); process workers set ``context``.
_local = threading.local()


def current() -> TaskContext:
    """The context of the task running in this thread.

    Raises:
        ParexecError: Called outside a running task.
    """
    ctx = getattr(_local, "context", None)
    if ctx is not None:
        return ctx  # type: ignore[no-any-return]
    attempt = getattr(_local, "attempt", None)
    if attempt is None:
        raise ParexecError("px.current() can only be called inside a running task")
    return TaskContext(attempt.task_id, attempt.number, attempt)


def run_coroutine(coro: Any, attempt: Any = None) -> Any:
    """Run an ``async def`` task's coroutine to completion on a new event loop; return its result.

    In a thread worker, ``attempt`` is the scheduler's attempt record: a timeout or cancel
    (``attempt.request_cancel()``) cancels the coroutine's task from the scheduler thread, so
    an awaiting task really stops and frees its slot, unlike a plain thread task. It then
    raises ``px.Cancelled`` (never ``asyncio.CancelledError``, which would look like a
    cancellation of the worker itself). A process worker passes no attempt: it is killed.
    """
    import asyncio
    task_id = getattr(attempt, "task_id", "?")

    async def main() -> Any:
        if attempt is not None:
            task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            assert task is not None
            attempt.on_cancel = lambda: loop.call_soon_threadsafe(task.cancel)
            if attempt.cancel_requested:  # asked before the hook was in place
                coro.close()
                raise Cancelled(f"task {task_id!r} was cancelled before it started")
        return await coro

    try:
        with asyncio.Runner() as runner:
            return runner.run(main())
    except asyncio.CancelledError:
        if attempt is None or not attempt.cancel_requested:
            raise  # cancelled by the task's own code: its error, as it raised it
        raise Cancelled(f"task {task_id!r} (attempt {attempt.number}) was cancelled while "
                        "awaiting") from None
    finally:
        if attempt is not None:
            attempt.on_cancel = None


def user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The frames of ``tb`` below the worker's: from the task's function down.

    ``tb`` starts at the worker frame that caught the error; for an ``async def`` task the
    frames of ``run_coroutine`` and asyncio's loop come next, down to the coroutine.
    """
    user = tb.tb_next if tb is not None else None
    if user is not None and user.tb_frame.f_code is run_coroutine.__code__:
        inner: TracebackType | None = user
        while inner is not None and not _is_coroutine_main(inner):
            inner = inner.tb_next
        if inner is not None:
            user = inner.tb_next
    return user


def _is_coroutine_main(tb: TracebackType) -> bool:
    """Whether ``tb`` is the frame of ``main`` inside ``run_coroutine``."""
    frame = tb.tb_frame
    return frame.f_code.co_name == "main" and frame.f_globals is globals()
