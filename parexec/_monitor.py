"""Measuring a run: memory of process workers, of the driver process, and CPU use.

One ``Monitor`` per run samples, ``SAMPLES_PER_SECOND`` times a second on its own thread
(never the scheduler's):

* the RSS of every process worker running one of the run's tasks, children included: its
  maximum becomes the task's ``peak_memory``; their sum is ``total``, the memory the run's
  process tasks hold, which the memory gate reads (see ``_gates``: Measured memory);
* the RSS of this process, from which thread tasks get their ``peak_memory`` (the
  process-wide peak during their run) and the run its ``peak_memory``;
* the bytes of the shared-memory segments the driver holds (``held``: large values moved
  between processes live there, in no process's RSS until one touches them), which the
  memory gate adds to ``total`` when it admits a task;
* system CPU use, for ``RunStats.cpu_utilization``.

The monitor decides nothing and writes no attempt (one owner of state): it keeps each
watched attempt's peak itself (``unwatch`` hands it to the pool, which reports it in the
attempt's ``Done``), and it puts ``OverLimit`` on the run's queue when a task exceeds its
declared ``memory`` and ``OverBudget`` when ``total`` goes above the run's budget (at most
one unhandled at a time). The scheduler kills.

Sampling every 0.1 s caught a task leaking memory long before it reached 4 GB on the test
machine. The exact peak of a process task that ended between two samples comes from the
worker itself (``VmHWM`` after resetting it with ``/proc/self/clear_refs``, see
``_limits.PeakMeter``); the task's peak is the larger of the two.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any

from ._messages import OverBudget, OverLimit

__all__ = ["Monitor", "SAMPLES_PER_SECOND"]

SAMPLES_PER_SECOND = 10


class Monitor:
    """Samples memory and CPU while a run is going on (see the module docstring)."""

    def __init__(self, interval: float = 1 / SAMPLES_PER_SECOND, *, queue: Any = None,
                 budget: float | None = None) -> None:
        """Start sampling.

        Args:
            interval: Seconds between samples.
            queue: The run's queue, where reports are announced (None: no reports).
            budget: Bytes the run's process tasks may hold together (None: no limit).
        """
        import psutil
        self._psutil = psutil
        self._interval = interval
        self._me = psutil.Process()
        self._lock = threading.Lock()
        self._watched: dict[Any, tuple[int, Any]] = {}  # attempt -> (pid, psutil.Process)
        self._procs: dict[int, Any] = {}  # pid -> psutil.Process, reused across tasks
        self._stop = threading.Event()
        self.times: list[float] = []  # monotonic time of each sample of this process
        self.rss: list[int] = []      # ... and its RSS then
        self.peak = 0                 # highest memory seen: this process or one worker
        self.total = 0                # memory of the watched workers at the last sample
        self.held = 0                 # bytes of shared-memory segments the driver holds
        self.peak_total = 0           # ... and its highest value
        self._peaks: dict[Any, int] = {}  # attempt -> its worker's highest memory (and children)
        self.budget_reported = False  # an OverBudget report waits for the scheduler
        self._queue = queue
        self.budget = budget
        self._cpu_start = psutil.cpu_times()
        self._t_start = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="parexec-monitor", daemon=True)
        self._thread.start()

    # Called from the scheduler thread or the process pool ----------------------------------

    def watch(self, attempt: Any, pid: int) -> None:
        """Sample the worker ``pid`` while it runs ``attempt``."""
        proc = self._procs.get(pid)
        if proc is None:  # psutil.Process() costs ~30 us: once per worker, not per task
            try:
                proc = self._procs[pid] = self._psutil.Process(pid)
            except self._psutil.Error:
                return
        with self._lock:
            self._watched[attempt] = (pid, proc)

    def unwatch(self, attempt: Any, keep_peak: bool = False) -> int | None:
        """Stop sampling for ``attempt``; return its peak memory (None: none seen).

        The peak is forgotten unless ``keep_peak`` (a script step's process ended, and its
        thread task reports the peak when it returns).
        """
        with self._lock:
            self._watched.pop(attempt, None)
            if keep_peak:
                return self._peaks.get(attempt)
            return self._peaks.pop(attempt, None)

    def peak_of(self, attempt: Any) -> int | None:
        """The highest memory sampled so far for ``attempt`` (None: none yet)."""
        with self._lock:
            return self._peaks.get(attempt)

    def note_peak(self, attempt: Any, peak: int) -> None:
        """Raise ``attempt``'s peak to ``peak`` bytes, measured elsewhere (a script step)."""
        with self._lock:
            if peak > self._peaks.get(attempt, 0):
                self._peaks[attempt] = peak

    def stop(self) -> float | None:
        """Stop sampling; return the CPU utilization of the machine during the run (%)."""
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            end = self._psutil.cpu_times()
            start = self._cpu_start
            busy = (sum(end) - end.idle - getattr(end, "iowait", 0.0)) - \
                (sum(start) - start.idle - getattr(start, "iowait", 0.0))
            total = sum(end) - sum(self._cpu_start)
            return 100.0 * busy / total if total > 0 else None
        except Exception:  # noqa: BLE001 - stats are best effort
            return None

    def peak_between(self, start: float, end: float) -> int | None:
        """Highest RSS of this process sampled in ``[start, end]`` (monotonic seconds).

        Without a sample inside, the last one before ``start``; None when nothing was sampled.
        """
        times = self.times
        if not times:
            return None
        lo = bisect.bisect_left(times, start)
        hi = bisect.bisect_right(times, end)
        if lo < hi:
            return max(self.rss[lo:hi])
        return self.rss[lo - 1] if lo else self.rss[0]

    # The sampling thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self._interval):
                self._sample()
                return

    def _sample(self) -> None:
        psutil = self._psutil
        try:
            rss = self._me.memory_info().rss
        except psutil.Error:
            return
        self.times.append(time.monotonic())
        self.rss.append(rss)
        self.peak = max(self.peak, rss)
        with self._lock:
            watched = list(self._watched.items())
        total_all = 0
        for attempt, (_, proc) in watched:
            try:
                total = proc.memory_info().rss
                for child in proc.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                continue  # the worker is gone; its pool reports why
            with self._lock:
                if attempt in self._watched and total > self._peaks.get(attempt, 0):
                    self._peaks[attempt] = total
            self.peak = max(self.peak, total)
            limit = attempt.memory_limit
            if limit is not None and total > limit:
                with self._lock:  # reported once; the scheduler stops it
                    self._watched.pop(attempt, None)
                self._report(OverLimit(attempt, total, limit))
            else:
                total_all += total
        self.total = total_all
        self.peak_total = max(self.peak_total, total_all)
        from . import _shm
        self.held = _shm.live_bytes()
        budget = self.budget
        if budget is not None and total_all > budget and not self.budget_reported:
            self.budget_reported = True
            self._report(OverBudget(total_all))

    def _report(self, report: OverLimit | OverBudget) -> None:
        if self._queue is not None:
            self._queue.put(report)
