"""``"cluster"`` tasks on a Dask distributed cluster, behind the same pool interface.

``submit(attempt, fn, args, kwargs)``, ``kill(attempt) -> bool`` and ``shutdown()``, as the
thread and process pools in ``_pools``. Dask's done-callbacks only enqueue the future; the
scheduler thread reads it (``decode``).
"""

from __future__ import annotations

import os
import signal
import threading
from queue import SimpleQueue
from typing import Any

__all__ = ["ClusterPool"]


def _cluster_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What a Dask worker runs (Dask has already replaced upstream futures by their values)."""
    return fn(*args, **kwargs)


def _kill_worker_process(dask_worker: Any) -> bool:
    """Run by a worker's nanny: kill the worker process (the nanny starts a fresh one)."""
    os.kill(dask_worker.process.process.pid, signal.SIGKILL)
    return True


class ClusterPool:
    """``"cluster"`` tasks on a Dask distributed cluster.

    Keys are ``(prefix, task index, attempt)``: one prefix per run keeps Dask's scheduler
    linear (it turned quadratic with one prefix per key) and unique keys keep Dask from
    returning results it still holds from an earlier run. Done-callbacks run on Dask's thread
    and only enqueue the future; the scheduler reads it. A cluster task whose upstream task
    also ran on the cluster receives that task's Dask future, so the data moves between
    workers and not through the driver. Dask cannot interrupt a running task: to stop one
    (timeout, cancellation), a helper thread finds its worker, cancels the future, then has
    the worker's nanny kill the worker process, which the nanny replaces.

    Args:
        cluster: A ``distributed.Client``, or a scheduler address for which the pool opens
            (and at shutdown closes) its own client.
        prefix: The run's key prefix.
    """

    def __init__(self, cluster: Any, prefix: str) -> None:
        from distributed import Client
        self._own = isinstance(cluster, str)
        self.client = Client(cluster) if self._own else cluster  # type: ignore[no-untyped-call]
        self.prefix = prefix
        self.futures: dict[int, Any] = {}  # task index -> future of its successful attempt
        info = self.client.scheduler_info().get("workers", {})
        self._resources = {name for w in info.values() for name in (w.get("resources") or {})}
        self._stops: SimpleQueue[Any] = SimpleQueue()
        self._stopper: threading.Thread | None = None
        self.address = getattr(self.client.scheduler, "address", "cluster")

    def submit(self, attempt: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Submit ``fn(*args, **kwargs)``; report through the future's done-callback."""
        resources = {}
        if "CPU" in self._resources:
            resources["CPU"] = attempt.cpus
        if "MEMORY" in self._resources and attempt.memory_limit:
            resources["MEMORY"] = attempt.memory_limit
        future = self.client.submit(_cluster_call, fn, args, kwargs, pure=False,
                                    key=(self.prefix, attempt.index, attempt.number),
                                    resources=resources or None)
        attempt.handle = future
        queue = attempt.queue
        future.add_done_callback(lambda f, a=attempt: queue.put((a, None, f, None, None)))

    def decode(self, attempt: Any, future: Any) -> tuple[bool, Any, str | None]:
        """On the scheduler thread: ``(ok, value or error, traceback text)`` of a future."""
        if future.status == "finished":
            self.futures[attempt.index] = future
            return True, future.result(), None
        try:
            future.result()
        except BaseException as exc:  # noqa: BLE001 - the remote error, frames included
            import traceback
            return False, exc, "".join(traceback.format_exception(exc))
        return False, RuntimeError(f"task {attempt.task_id!r}: Dask future ended as "
                                   f"{future.status!r}"), None

    def kill(self, attempt: Any) -> bool:
        """Stop a running cluster task: cancel it, then restart the worker running it."""
        if attempt.handle is None:
            return True
        if self._stopper is None:
            self._stopper = threading.Thread(target=self._stop_loop, daemon=True,
                                             name="parexec-cluster-stop")
            self._stopper.start()
        self._stops.put(attempt.handle)
        return True

    def _stop_loop(self) -> None:
        while True:
            future = self._stops.get()
            if future is None:
                return
            key = future.key
            try:
                address = self.client.run_on_scheduler(_where, key=key)
                # Cancel first, or Dask reruns the task elsewhere when the worker dies.
                self.client.cancel([future], force=True)
                if address:
                    self.client.run(_kill_worker_process, workers=[address], nanny=True)
            except Exception:  # noqa: BLE001 - the task may have ended meanwhile
                pass

    def shutdown(self) -> None:
        """Release the run's futures; close the client if the pool opened it."""
        if self._stopper is not None:
            self._stops.put(None)
            self._stopper.join(timeout=30)
        self.futures.clear()
        if self._own:
            self.client.close()


def _where(dask_scheduler: Any, key: Any) -> str | None:
    """Run on the Dask scheduler: the address of the worker processing ``key``."""
    ts = dask_scheduler.tasks.get(key)
    return ts.processing_on.address if ts is not None and ts.processing_on else None
