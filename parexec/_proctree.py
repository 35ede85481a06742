"""Process trees of workers: nothing a task starts outlives its worker.

A process worker (``_worker.worker_main``) becomes the child subreaper of its descendants
(``_become_subreaper``), reaps adopted orphans between tasks (``_reaper``), watches its
parent (``_watch_parent``) and kills its whole tree when it goes (``kill_tree``); the
process pool (``_pools``) uses ``kill_tree`` to stop a worker. See issue 12 item 2.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any


class _OrphanReaper:
    """Reap, between tasks, the adopted orphans that exited.

    A subreaper must, or zombies pile up in a long-lived worker whose tasks start daemons.

    Only zombies that no ``subprocess.Popen`` or multiprocessing process of this worker owns
    are reaped: reaping an owned one would make its ``wait()`` report 0 instead of the real
    exit status. The common case (no zombie child at all) costs one ``waitid`` call.
    """

    def __init__(self) -> None:
        self.owned_zombies: set[int] = set()  # zombies left to their owners, not rescanned

    def reap(self) -> None:
        try:
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except (ChildProcessError, AttributeError, OSError):
            return
        if found is None:  # no child has exited: the common case
            self.owned_zombies.clear()
            return
        children = _child_pids()
        self.owned_zombies.intersection_update(children)  # owners reaped the others
        zombies = [pid for pid in children if pid not in self.owned_zombies
                   and _is_zombie(pid)]
        if not zombies:
            return
        owned = _owned_pids()
        for pid in zombies:
            if pid in owned:
                self.owned_zombies.add(pid)
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


_reaper = _OrphanReaper()


def _child_pids() -> list[int]:
    """Pids of this process's children (Linux /proc; empty elsewhere)."""
    pids: list[int] = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            pass
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] == b"Z"
    except (OSError, ValueError):
        return False


def _owned_pids() -> set[int]:
    """Pids that a live ``subprocess.Popen`` or multiprocessing process of ours will wait for."""
    import gc
    import multiprocessing.process as mp_process
    import subprocess
    owned = {p.pid for p in gc.get_objects()
             if isinstance(p, subprocess.Popen) and p.returncode is None}
    owned.update(p.pid for p in getattr(subprocess, "_active", None) or ())
    for p in getattr(mp_process, "_children", ()):
        popen = getattr(p, "_popen", None)
        if popen is not None:
            owned.add(popen.pid)
    return owned


def _allow_children() -> None:
    """Let tasks start processes of their own, a nested run's process workers included.

    multiprocessing refuses children to a daemonic process (its atexit hook would orphan
    them); a worker is started daemonic so the driver never waits for it at exit. Inside the
    worker the flag is cleared: what the worker starts is killed with it anyway (see
    ``kill_tree``), and a nested pool's workers watch the worker as their parent. See issue
    12 item 15.
    """
    import multiprocessing
    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def _become_subreaper() -> None:
    """Make this worker the reaper of its orphaned descendants (Linux).

    Without it, a process a task started that double-forks (a daemon, ``sh -c 'x &'``) is
    re-parented to init at once and escapes every kill of this worker's tree; with it, the
    orphan becomes this worker's child and ``kill_tree`` finds it. Elsewhere this does
    nothing: such daemons can escape there.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl: keep the plain behaviour
        pass


# How many times kill_tree looks again for processes forked while it was stopping the tree.
# Each pass is one /proc scan; a tree that keeps forking faster than that is still killed,
# except for what it forked during the last pass.
_KILL_PASSES = 8


def kill_tree(pid: int, include_root: bool = True) -> None:
    """SIGKILL process ``pid`` (unless ``include_root`` is False) and all its descendants.

    The tree is frozen first (SIGSTOP, root included) and looked at again until no new
    process appears, so a process forked while the tree was being killed is not missed; a
    stopped process cannot fork. Orphans of a worker are its children (see
    ``_become_subreaper``), so the frozen root still holds them.
    """
    try:
        import psutil
        root = psutil.Process(pid)
    except Exception:  # noqa: BLE001 - gone already, or psutil cannot see it (yet)
        if include_root and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)  # whatever psutil says, the root must die
            except OSError:
                pass
        return
    me = os.getpid()
    stopped: dict[int, Any] = {}
    if include_root and pid != me:
        _signal(root, signal.SIGSTOP)
    for _ in range(_KILL_PASSES):
        try:
            found = [p for p in root.children(recursive=True)
                     if p.pid not in stopped and p.pid != me]
        except Exception:  # noqa: BLE001 - the root is gone
            found = []
        if not found:
            break
        for p in found:
            _signal(p, signal.SIGSTOP)
            stopped[p.pid] = p
    for p in stopped.values():
        _signal(p, signal.SIGKILL)
    if include_root and pid != me:
        _signal(root, signal.SIGKILL)
        if root.is_running():  # psutil refused (e.g. it judged the pid reused): be plain
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _signal(process: Any, signum: int) -> None:
    try:
        process.send_signal(signum)  # psutil checks the pid was not reused
    except Exception:  # noqa: BLE001 - already gone
        pass


def _watch_parent() -> None:
    """Exit this process as soon as the parent dies, even while a task runs.

    Every process its tasks started dies with it.

    A pidfd becomes readable when the process exits (Linux >= 5.3); elsewhere the watcher
    falls back to noticing that it was re-parented.
    """
    parent = os.getppid()

    def watch() -> None:
        try:
            import select
            fd = os.pidfd_open(parent)
            select.select([fd], [], [])
        except (AttributeError, OSError):
            import time
            # No pidfd: re-parenting is the only signal left. Checked once a second in this
            # worker's own thread; the scheduler never polls.
            while os.getppid() == parent:
                time.sleep(1.0)
        kill_tree(os.getpid(), include_root=False)  # what our tasks started dies with us
        os._exit(70)

    threading.Thread(target=watch, name="parexec-parent-watch", daemon=True).start()
