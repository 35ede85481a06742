"""``px.Executor.map``: items in chunks, one task per chunk, results in order.

The executor (``_executor``) submits chunks through ``Feeder``: the first chunks hold one
item each, which tells the cost of an item; later chunks hold about ``CHUNK_SECONDS`` of
items (or a fixed ``chunksize``), and at most two chunks per worker wait at once, so a long
map does not submit everything up front. ``one_by_one`` serves a map of one item per task.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._task import TaskTemplate, _fn_name

if TYPE_CHECKING:
    from ._executor import Executor, Future

__all__ = ["CHUNK_SECONDS", "Feeder", "one_by_one"]

CHUNK_SECONDS = 0.05


def one_by_one(futures: list[Future[Any]], end: float | None) -> Iterator[Any]:
    try:
        futures.reverse()  # pop from the end: each result is released once yielded
        while futures:
            future = futures.pop()
            try:
                value = future.result(None if end is None else end - time.monotonic())
            except BaseException:
                future.cancel()  # timed out or interrupted: as the stdlib's map does
                raise
            yield value
    finally:
        for future in futures:
            future.cancel()


def _run_chunk(fn: Callable[..., Any], items: list[tuple[Any, ...]]) -> tuple[float, list[Any]]:
    """Run a map's chunk in one task: ``(seconds, [(ok, value or pickled error), ...])``.

    An item's exception travels with its traceback (``_worker._error_outcome``) and is
    raised when the caller reaches that item; the chunk goes on.
    """
    from ._worker import _error_outcome
    out: list[Any] = []
    t0 = time.perf_counter()
    for args in items:
        try:
            out.append((True, fn(*args)))
        except Exception as exc:  # noqa: BLE001 - this item's outcome; the chunk goes on
            out.append((False, _error_outcome(_fn_name(fn), exc)))
    return time.perf_counter() - t0, out


class Feeder:
    """A map's chunks, submitted as earlier ones return, so their size follows their cost.

    The first chunks hold one item each (one per slot, twice over); each chunk that returns
    tells the cost of an item, and the next chunks hold ``CHUNK_SECONDS`` of items, but
    never more than an even share of what is left per slot, so every worker gets work.
    ``fill`` runs on the caller's thread, then on the scheduler thread (done-callbacks).
    """

    def __init__(self, executor: Executor, fn: Any, items: list[tuple[Any, ...]],
                 chunksize: int | None) -> None:
        self.executor = executor
        self.fn = fn.fn if isinstance(fn, TaskTemplate) else fn
        # Chunks carry the function's name (events, errors) and a template's options.
        options = fn._options if isinstance(fn, TaskTemplate) else {}
        self.target = TaskTemplate(_run_chunk, {**options, "id": _fn_name(self.fn)})
        self.items = items
        self.fixed = chunksize
        self.pos = 0
        self.size = chunksize or 1
        self.slots = executor._max_workers
        self.inflight = 0
        self.stopped = False
        self.submitting = True  # until every item went out in a chunk (or stop())
        self.error: Exception | None = None
        self.chunks: list[tuple[int, Future[Any]]] = []
        self.cond = threading.Condition(threading.RLock())
        with executor._lock:
            if executor._closed:
                raise RuntimeError("cannot map on a px.Executor after shutdown()")
            executor._nfeeders += 1
            executor._feeders.add(self)
        self.fill()

    def fill(self) -> None:
        done = False
        with self.cond:
            limit = 2 * self.slots if self.fixed is None else len(self.items)
            while not self.stopped and self.pos < len(self.items) and self.inflight < limit:
                size = self.size
                if self.fixed is None and self.chunks:
                    share = -(-(len(self.items) - self.pos) // (2 * self.slots))
                    size = max(1, min(size, share))
                chunk = self.items[self.pos:self.pos + size]
                start = self.pos
                self.pos += len(chunk)
                try:
                    future = self.executor._submit(self.target, (self.fn, chunk), {},
                                                   internal=True)
                except Exception as exc:  # noqa: BLE001 - the executor's run ended
                    self.error = exc  # raised by results() after the chunks it has
                    self.stopped = True
                    break
                self.chunks.append((start, future))
                self.inflight += 1
                self.cond.notify_all()
                future.add_done_callback(self.chunk_done)  # type: ignore[arg-type]
            if (self.stopped or self.pos >= len(self.items)) and self.submitting:
                self.submitting = False
                done = True
                self.cond.notify_all()
        if done:
            with self.executor._lock:
                self.executor._nfeeders -= 1
            self.executor._maybe_close()

    def chunk_done(self, future: Future[Any]) -> None:
        with self.cond:
            self.inflight -= 1
            if self.fixed is None and not future.cancelled() and future.exception() is None:
                seconds, out = future.result()
                if out:
                    per_item = max(seconds / len(out), 1e-7)
                    self.size = max(1, int(CHUNK_SECONDS / per_item))
        self.fill()

    def stop(self) -> None:
        """Submit nothing more (shutdown with cancel_futures, Ctrl-C, an abandoned loop)."""
        with self.cond:
            self.stopped = True
        self.fill()

    def results(self, end: float | None) -> Iterator[Any]:
        from ._worker import decode_outcome
        k = 0
        future: Future[Any] | None = None
        try:
            while True:
                with self.cond:
                    while k >= len(self.chunks) and self.submitting:
                        wait = None if end is None else end - time.monotonic()
                        if wait is not None and wait <= 0:
                            raise TimeoutError("px.Executor.map: results not ready within "
                                               "its timeout")
                        self.cond.wait(wait)
                    if k >= len(self.chunks):
                        if self.error is not None:
                            raise self.error
                        return
                    _, future = self.chunks[k]
                    self.chunks[k] = (0, None)  # type: ignore[assignment] # drop it once read
                k += 1
                assert future is not None
                _, out = future.result(None if end is None else end - time.monotonic())
                future = None
                for ok, value in out:
                    if ok:
                        yield value
                    else:
                        raise decode_outcome(_fn_name(self.fn), value)[1]
        finally:
            self.stop()
            with self.cond:
                rest = [f for _, f in self.chunks[k:] if f is not None]
            if future is not None:  # its wait timed out or was interrupted
                rest.append(future)
            for f in rest:
                f.cancel()
