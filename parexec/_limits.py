"""A worker's resource controls: BLAS/OpenMP thread caps and the per-task peak memory.

``BlasCap`` caps the thread pools of numerical libraries at a task's ``cpus``; thread pools
(``_pools``) hold one per run, a process worker (``_worker``) one for the process. The state
they save and restore is shared in ``_saved_limits``. ``PeakMeter`` measures the peak RSS
of one task in a process worker.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _SavedLimits:
    """What the first cap of this interpreter found, shared by every ``BlasCap``.

    Overlapping runs each have a ``BlasCap`` (one per thread pool); saving and restoring per
    run interleaves, and the run that saved second would put back the first one's cap for
    good (issue 12 item 9). So the state is saved once, counted, and restored by the last
    user to leave. Guarded by ``lock``.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nusers = 0
        self.env: dict[str, str | None] = {}
        self.first: Any = None  # the threadpoolctl limiter holding the original limits
        self.known: set[str] | None = None  # libraries loaded before the first cap
        self.nmodules = 0  # len(sys.modules) at the first cap

    def join(self, env_names: tuple[str, ...]) -> None:
        with self.lock:
            if self.nusers == 0:
                self.env = {k: os.environ.get(k) for k in env_names}
                self.nmodules = len(sys.modules)
                self.first = None
                self.known = None
            self.nusers += 1

    def leave(self) -> None:
        with self.lock:
            self.nusers -= 1
            if self.nusers == 0:
                self._restore()

    def _restore(self) -> None:
        if self.first is not None:
            try:
                self.first.restore_original_limits()
            except Exception:  # noqa: BLE001
                pass
            self.first = None
        if len(sys.modules) != self.nmodules:
            saved = self.env.get("OPENBLAS_NUM_THREADS") or self.env.get("OMP_NUM_THREADS")
            default = int(saved) if saved and saved.isdigit() else len(os.sched_getaffinity(0))
            try:
                from threadpoolctl import ThreadpoolController
                known = self.known or set()
                for lib in ThreadpoolController().lib_controllers:
                    if lib.filepath not in known:
                        lib.set_num_threads(default)
            except Exception:  # noqa: BLE001
                pass
        self.known = None
        for k, v in self.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.env = {}


_saved_limits = _SavedLimits()


def _reset_limits_after_fork() -> None:
    """In a forked child: the parent's runs (the users of the saved limits) are not here.

    The lock may have been held by a parent thread at the fork, and a count left above zero
    would keep the child's environment capped for good: give the child the variables found
    before the parent's first cap, and a fresh count.
    """
    saved = _saved_limits
    saved.lock = threading.Lock()
    if saved.nusers:
        for k, v in saved.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    saved.nusers = 0
    saved.env = {}
    saved.first = None
    saved.known = None


os.register_at_fork(after_in_child=_reset_limits_after_fork)


class BlasCap:
    """Cap BLAS/OpenMP thread pools (threadpoolctl) at a task's ``cpus``.

    Libraries loaded during the task (its first ``import numpy``) read their thread count
    from the environment, so the variables of ``ENV`` are set too; libraries already loaded
    are capped through threadpoolctl. That costs milliseconds (it scans the loaded
    libraries), so it is re-applied only when the wanted count changes or modules were
    imported since. BLAS pools are process-wide: in a process worker the cap is exactly the
    task's; thread tasks share the driver's pools, so concurrent thread tasks with different
    ``cpus`` get the cap of the one that started last. ``restore()`` gives up this cap; once
    every ``BlasCap`` of the interpreter has (overlapping runs), the limits and variables
    found before the first cap are put back.
    """

    ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
           "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

    def __init__(self) -> None:
        self.current = 0
        self._nmodules = -1
        self._joined = False
        self._lock = threading.Lock()  # thread workers of one pool apply concurrently

    def apply(self, cpus: float) -> None:
        """Cap the thread pools at ``max(1, int(cpus))`` threads."""
        want = max(1, int(cpus))
        nmodules = len(sys.modules)
        if want == self.current and nmodules == self._nmodules:
            return
        saved = _saved_limits
        with self._lock:
            if not self._joined:
                self._joined = True
                saved.join(self.ENV)
        if want != self.current:
            for k in self.ENV:
                os.environ[k] = str(want)
        self.current, self._nmodules = want, nmodules
        try:
            from threadpoolctl import ThreadpoolController
            controller = ThreadpoolController()
            with saved.lock:
                if saved.known is None:
                    saved.known = {c.filepath for c in controller.lib_controllers}
            if controller.lib_controllers:
                limiter = controller.limit(limits=want)
                with saved.lock:
                    if saved.first is None:
                        saved.first = limiter
        except Exception:  # noqa: BLE001 - a missing or odd library must not fail the task
            pass
        self._nmodules = len(sys.modules)  # threadpoolctl's own imports do not count

    def restore(self) -> None:
        """Give up this cap; the last cap of the interpreter to go puts back the limits.

        Libraries loaded since the first cap get the thread count they would have chosen
        themselves.
        """
        with self._lock:
            joined, self._joined = self._joined, False
        if joined:
            _saved_limits.leave()
        self.current = 0


# A task shorter than this reports its resident size at its end as its peak (see PeakMeter).
EXACT_PEAK_AFTER = 200e-6


class PeakMeter:
    """The exact peak RSS of this process during one task (Linux: VmHWM, reset per task).

    Writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark, so a reused worker
    reports each task's own peak; elsewhere it reports None. Reading it back costs about
    7 us (the kernel formats all of ``/proc/self/status``), a fifth of a no-op process
    task's time in its worker: for a task shorter than ``EXACT_PEAK_AFTER`` the resident
    size at its end is read instead (``/proc/self/statm``, under 1 us). That misses only
    memory both taken and given back within those 200 us: a few MiB at most, the pace at
    which the kernel can hand a process new pages.
    """

    def __init__(self) -> None:
        try:
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
            self._status = os.open("/proc/self/status", os.O_RDONLY)
            self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._clear = self._status = self._statm = -1

    def reset(self) -> None:
        """Start measuring a new task."""
        if self._clear >= 0:
            try:
                os.write(self._clear, b"5")
            except OSError:
                self._clear = -1

    def peak(self, elapsed: float | None = None) -> int | None:
        """Peak RSS in bytes since the last ``reset()``, ``elapsed`` seconds ago if known."""
        if self._status < 0:
            return None
        if elapsed is not None and elapsed < EXACT_PEAK_AFTER:
            try:
                return int(os.pread(self._statm, 64, 0).split()[1]) * _PAGE
            except (OSError, ValueError, IndexError):
                return None
        try:
            data = os.pread(self._status, 4096, 0)
            i = data.index(b"VmHWM:")
            return int(data[i + 6:data.index(b"kB", i)]) * 1024
        except (OSError, ValueError):
            return None
