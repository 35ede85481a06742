"""``"cluster"`` tasks on a Dask distributed cluster, behind the same pool interface.

``submit(attempt, fn, args, kwargs)``, ``kill(attempt) -> bool`` and ``shutdown()``, as the
thread and process pools in ``_pools``. Each cluster task runs in a child process of the Dask
worker that Dask chose (parexec's own process pool, started inside that worker), so stopping
one task kills that child and its descendants and nothing else: the Dask worker, its other
tasks and the results it holds all survive (issue 21 items 1, 4 and 7)::

    driver                               Dask worker (any machine)
      submit ─ cloudpickle(fn, args) ──►   _cluster_call ──► child process (ProcessPool)
              upstream Dask futures ───►     │ log_event(started)       runs fn(*args)
      client loop ◄── event "started" ───────┘
        └─► run queue: Started (timeout armed now, worker address)
      done-callback ─► fetch thread ─► (value if wanted) ─► run queue: finished
      kill ─► stop thread ─► cancel the future; client.run(_stop_here) on its worker

Why a child process and not the worker itself: Dask cannot interrupt a running task, and the
only other stop (killing the worker process through its nanny) also killed the tasks that
shared it, made Dask re-run them and recompute the results it held, and after a few stops
failed innocent tasks with ``KilledWorker``. A child costs one pipe round trip per task once
the child exists (children are reused; see the README for measured figures), and it works
with and without a nanny, including ``LocalCluster(processes=False)``, where the child is a
child of the driver. Dask worker processes are daemonic, which multiprocessing forbids from
having children: the worker's own flag is cleared; the children exit with their worker.

Nothing here blocks the scheduler thread: results are fetched by helper threads, which put
the finished report on the run queue once the value is local, and only when the scheduler
wants the value (``want_value``); other values stay on the cluster for cluster consumers.
"""

from __future__ import annotations

import io
import logging
import pickle
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from queue import SimpleQueue
from time import monotonic
from typing import Any

from ._errors import Cancelled, ParexecError, PicklingError, TaskOptionError
from ._messages import Done, Started

__all__ = ["ClusterPool"]

logger = logging.getLogger("parexec")

NFETCHERS = 4  # helper threads fetching results: one large value does not hold up the others

# Worker side (runs in the Dask worker process) ------------------------------------------

_STOPPED = object()  # what _stop_here puts on a local queue instead of a Done
_lock = threading.Lock()
_running: dict[str, _Local] = {}  # attempt key -> attempt running in this Dask worker
_tombstones: OrderedDict[str, None] = OrderedDict()  # keys stopped before they started here
MAX_TOMBSTONES = 10_000


class _Local:
    """What parexec's process pool needs of an attempt (see ``_scheduler._Attempt``).

    Attributes the pool may add later read as None, so this stays usable when the pool
    learns new fields.
    """

    def __init__(self, index: int, task_id: str, number: int, cpus: float) -> None:
        self.index = index
        self.task_id = task_id
        self.number = number
        self.cpus = cpus
        self.queue: SimpleQueue[Any] = SimpleQueue()
        self.handle: Any = None
        self.worker: Any = None
        self.monitor: Any = None
        self.memory_limit: int | None = None
        self.peak_memory: int | None = None
        self.t_start = 0.0
        self.t_end = 0.0
        self.prefetched = False
        self.cancel_requested = False
        self.on_cancel: Any = None
        self.stopped = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def _allow_children() -> None:
    """Let this (possibly daemonic) Dask worker process start child processes."""
    import multiprocessing
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    if config.get("daemon"):
        config["daemon"] = False


def _cluster_call(meta: tuple[Any, ...], payload: bytes, *values: Any) -> Any:
    """What a Dask worker runs: say that the task started, then run it in a child process.

    ``values`` are the results of upstream cluster tasks (Dask replaced their futures);
    ``payload`` is the pickled call, in which they appear as persistent ids.
    """
    topic, key, index, number, task_id, cpus = meta
    from ._pools import process_pool
    local = _Local(index, task_id, number, cpus)
    with _lock:
        if _tombstones.pop(key, 0) is None:
            raise Cancelled(f"task {task_id!r} (attempt {number}) was stopped before it started")
        _running[key] = local
    try:
        address = None
        try:
            from distributed import get_worker
            worker = get_worker()
            address = worker.address
            worker.log_event(topic, [index, number, address])
        except Exception:  # noqa: BLE001 - no worker context (not seen in practice): the task
            # then runs without its timeout armed, as the scheduler never hears it started
            logger.debug("task %r could not report its start", task_id, exc_info=True)
        _allow_children()
        pool = process_pool()
        pool.submit(local, _materialize, (payload, values), {})
        if local.stopped:  # stopped while it was being handed to the child
            pool.kill(local)
        msg = local.queue.get()
    finally:
        with _lock:
            _running.pop(key, None)
    if msg is _STOPPED:
        raise Cancelled(f"task {task_id!r} (attempt {number}) was stopped by parexec")
    if msg.ok:
        return msg.value
    raise msg.value


def _materialize(payload: bytes, values: tuple[Any, ...]) -> Any:
    """In the child: rebuild the call (upstream results in place) and run it."""
    unpickler = pickle.Unpickler(io.BytesIO(payload))
    unpickler.persistent_load = values.__getitem__  # type: ignore[method-assign]
    fn, args, kwargs = unpickler.load()
    del payload, unpickler
    return fn(*args, **kwargs)


def _stop_here(keys: list[str]) -> int:
    """Run on a Dask worker: kill the children running ``keys`` (and their descendants).

    A key not running here yet is remembered, so it stops as soon as it starts. Returns how
    many running attempts were found.
    """
    found = []
    with _lock:
        for key in keys:
            local = _running.get(key)
            if local is None:
                _tombstones[key] = None
            else:
                local.stopped = True
                found.append(local)
        while len(_tombstones) > MAX_TOMBSTONES:
            _tombstones.popitem(last=False)
    for local in found:
        if local.handle is not None:
            from ._pools import process_pool
            process_pool().kill(local)
        local.queue.put(_STOPPED)
    return len(found)


def _where(dask_scheduler: Any, keys: list[Any]) -> list[str | None]:
    """Run on the Dask scheduler: the addresses of the workers holding ``keys`` to run."""
    out: list[str | None] = []
    for key in keys:
        ts = dask_scheduler.tasks.get(key)
        out.append(ts.processing_on.address if ts is not None and ts.processing_on else None)
    return out


# Driver side ------------------------------------------------------------------------------

def _always(index: int) -> bool:
    return True


_pickler_class: Any = None


def _dumps_call(call: Any) -> tuple[bytes, list[Any]]:
    """Pickle ``call``, Dask futures replaced by ids: ``(bytes, futures in id order)``.

    cloudpickle, so functions from ``__main__`` or a notebook travel by value. The futures
    are passed to Dask separately, so Dask moves their data between workers and replaces
    them by values; the driver never holds them.
    """
    global _pickler_class
    if _pickler_class is None:
        import cloudpickle
        from distributed import Future

        class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
            futures: list[Any]

            def persistent_id(self, obj: Any) -> int | None:
                if isinstance(obj, Future):
                    self.futures.append(obj)
                    return len(self.futures) - 1
                return None

        _pickler_class = _Pickler
    buffer = io.BytesIO()
    pickler = _pickler_class(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.futures = []
    pickler.dump(call)
    return buffer.getvalue(), pickler.futures


def _connect(cluster: Any) -> tuple[Any, bool]:
    """The client for ``cluster=``, and whether this pool opened it (and must close it)."""
    from distributed import Client
    if isinstance(cluster, Client):
        return cluster, False
    if not isinstance(cluster, str):
        raise TaskOptionError(
            f"cluster={cluster!r} ({type(cluster).__name__}) is not a Dask cluster: pass a "
            "distributed.Client or a scheduler address such as 'tcp://HOST:8786'")
    import dask
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend
    try:
        scheme, location = parse_address(cluster)
        get_backend(scheme)  # an unknown scheme is a ValueError
        if scheme in ("tcp", "tls", "ws", "wss"):
            host, _ = parse_host_port(location, 8786)
            if not host or any(c.isspace() for c in host):
                raise ValueError("no valid host name")
    except ValueError as exc:
        raise TaskOptionError(
            f"cluster={cluster!r} is not a Dask scheduler address ({exc}); write it as "
            "'tcp://HOST:PORT', e.g. 'tcp://10.0.0.5:8786'") from None
    timeout = dask.config.get("distributed.comm.timeouts.connect")
    try:
        return Client(cluster, set_as_default=False), True  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError, ValueError) as exc:
        raise ParexecError(
            f"cannot reach the Dask scheduler at cluster={cluster!r} within the connect "
            f"timeout ({timeout}; set it with dask.config.set({{'distributed.comm.timeouts."
            f"connect': '10s'}})): {type(exc).__name__}: {exc}. Check the address and that "
            "`dask scheduler` runs there") from exc


class ClusterPool:
    """``"cluster"`` tasks on a Dask distributed cluster (see the module docstring).

    Keys are ``(prefix, task index, attempt)``: one prefix per run keeps Dask's scheduler
    linear (it turned quadratic with one prefix per key) and unique keys keep Dask from
    returning results it still holds from an earlier run. A cluster task whose upstream task
    also ran on the cluster receives that task's Dask future, so the data moves between
    workers and not through the driver.

    Attributes:
        reports_start: True: attempts report ``Started`` when they start on a worker, and
            their timeout counts from then.
        want_value: ``want_value(index)`` says whether the driver needs the value of task
            ``index``; values not wanted are reported as None and stay on the cluster.
        futures: task index -> Dask future of its successful attempt.

    Args:
        cluster: A ``distributed.Client``, or a scheduler address for which the pool opens
            (and at shutdown closes) its own client. The connect timeout is Dask's
            ``distributed.comm.timeouts.connect``.
        prefix: The run's key prefix.

    Raises:
        TaskOptionError: ``cluster`` is neither a client nor a well-formed address.
        ParexecError: The scheduler at the address could not be reached in time.
    """

    reports_start = True

    def __init__(self, cluster: Any, prefix: str) -> None:
        self.client, self._own = _connect(cluster)
        self.prefix = prefix
        self.topic = f"{prefix}-started"
        self.want_value: Callable[[int], bool] = _always  # the scheduler sets its own
        self.futures: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._attempts: dict[tuple[int, int], Any] = {}  # (index, number) -> attempt
        self._started: dict[Any, str] = {}  # attempt -> address of the worker running it
        self._t_start: dict[Any, float] = {}  # attempt -> when it started there (monotonic)
        self._killed: set[Any] = set()
        self._stops: SimpleQueue[Any] = SimpleQueue()
        self._stopper: threading.Thread | None = None
        self._done: SimpleQueue[Any] = SimpleQueue()
        self._fetchers: list[threading.Thread] = []
        self.address = getattr(self.client.scheduler, "address", "cluster")
        try:
            info = self.client.scheduler_info().get("workers", {})
            self.client.subscribe_topic(self.topic, self._on_started)
        except Exception as exc:  # noqa: BLE001 - e.g. a closed client
            if self._own:
                self.client.close()
            raise ParexecError(
                f"cluster={cluster!r} cannot be used: its Dask client is "
                f"{getattr(self.client, 'status', 'unusable')!r} ({type(exc).__name__}: "
                f"{exc}); pass a connected distributed.Client") from exc
        self._resources = {name for w in info.values() for name in (w.get("resources") or {})}

    # Scheduler thread ---------------------------------------------------------------

    def submit(self, attempt: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Submit ``fn(*args, **kwargs)`` to Dask.

        Raises:
            PicklingError: The function or an argument cannot be pickled (names the task).
        """
        try:
            payload, futures = _dumps_call((fn, args, kwargs))
        except Exception as exc:  # noqa: BLE001
            raise PicklingError(
                f"task {attempt.task_id!r} runs on the cluster, but its function or arguments "
                f"cannot be pickled ({type(exc).__name__}: {exc}); pass picklable data, or "
                "use isolation='thread'") from exc
        resources = {}
        if "CPU" in self._resources:
            resources["CPU"] = attempt.cpus
        if "MEMORY" in self._resources and attempt.memory_limit:
            resources["MEMORY"] = attempt.memory_limit
        key = (self.prefix, attempt.index, attempt.number)
        meta = (self.topic, f"{self.prefix}/{attempt.index}/{attempt.number}", attempt.index,
                attempt.number, attempt.task_id, attempt.cpus)
        self._attempts[(attempt.index, attempt.number)] = attempt
        future = self.client.submit(_cluster_call, meta, payload, *futures, pure=False,
                                    key=key, resources=resources or None)
        attempt.handle = future
        self._start_fetchers()
        done = self._done
        future.add_done_callback(lambda f, a=attempt: done.put((a, f, monotonic())))

    def kill(self, attempt: Any) -> bool:
        """Stop a cluster task: cancel its future and kill the child process running it.

        The Dask worker, its other tasks and its stored results are not touched. Returns
        True: the attempt's outcome is decided now; the stop itself is sent by a helper
        thread, so this never blocks on the network.
        """
        if attempt.handle is None:
            return True
        with self._lock:
            self._killed.add(attempt)
            if self.futures.get(attempt.index) is attempt.handle:
                del self.futures[attempt.index]
            address = self._started.get(attempt)
        if self._stopper is None:
            self._stopper = threading.Thread(target=self._stop_loop, daemon=True,
                                             name="parexec-cluster-stop")
            self._stopper.start()
        self._stops.put((attempt, address))
        return True

    def release(self, index: int) -> None:
        """Drop task ``index``'s result from the cluster (no consumer needs it any more)."""
        with self._lock:
            self.futures.pop(index, None)

    def shutdown(self) -> None:
        """Deliver pending stops, release the run's futures, close the client if owned."""
        if self._stopper is not None:
            self._stops.put(None)
            self._stopper.join(timeout=30)
        for _ in self._fetchers:
            self._done.put(None)
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:  # noqa: BLE001 - the client may be closed already
            pass
        self.futures.clear()
        self._attempts.clear()
        if self._own:
            self.client.close()

    # Helper threads -------------------------------------------------------------------

    def _on_started(self, event: tuple[float, Any]) -> None:
        """On the client's event loop: an attempt started on a worker."""
        now = monotonic()
        index, number, address = event[1]
        attempt = self._attempts.get((index, number))
        if attempt is None:
            return
        attempt.worker = address  # the pool's hand-off field (see _state.Attempt)
        with self._lock:
            self._t_start[attempt] = now
            self._started[attempt] = address
            killed = attempt in self._killed
        if killed:  # stopped before its start was known: stop it where it runs
            self._stops.put((attempt, address))
            return
        attempt.queue.put(Started(attempt, now, address))

    def _start_fetchers(self) -> None:
        while len(self._fetchers) < NFETCHERS:
            t = threading.Thread(target=self._fetch_loop, daemon=True,
                                 name=f"parexec-cluster-fetch-{len(self._fetchers) + 1}")
            t.start()
            self._fetchers.append(t)

    def _fetch_loop(self) -> None:
        while True:
            item = self._done.get()
            if item is None:
                return
            attempt, future, t_end = item
            del item
            try:
                self._report(attempt, future, t_end)
            except Exception:  # noqa: BLE001 - never lose the report
                logger.exception("parexec: reporting cluster task %r failed", attempt.task_id)
                attempt.queue.put(Done(attempt, False, ParexecError(
                    f"task {attempt.task_id!r}: its outcome could not be read from the "
                    "cluster"), None))
            del attempt, future

    def _report(self, attempt: Any, future: Any, t_end: float) -> None:
        """Read a finished future (off the scheduler thread) and put its report."""
        self._attempts.pop((attempt.index, attempt.number), None)
        with self._lock:
            if attempt in self._killed:
                self._killed.discard(attempt)
                self._started.pop(attempt, None)
                self._t_start.pop(attempt, None)
                return  # the scheduler decided this attempt already
            worker = self._started.pop(attempt, None) or attempt.worker
            t_start = self._t_start.pop(attempt, 0.0)
        if not t_start:
            t_end = 0.0  # its start is unknown: the scheduler's clock stands in for both
        status = future.status
        if status == "finished":
            value = None
            if self.want_value(attempt.index):
                try:
                    value = future.result()
                except Exception as exc:  # noqa: BLE001 - e.g. a value the driver cannot load
                    attempt.queue.put(Done(attempt, False, PicklingError(
                        f"task {attempt.task_id!r} succeeded on the cluster, but its value "
                        f"could not be brought to the driver ({type(exc).__name__}: {exc}); "
                        "return plain data, or make the modules it uses importable here"),
                        worker, None, t_start, t_end))
                    return
            with self._lock:
                if attempt in self._killed:
                    return
                self.futures[attempt.index] = future
            attempt.queue.put(Done(attempt, True, value, worker, None, t_start, t_end))
            return
        if status == "error":
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001 - the remote error, frames included
                text = "".join(traceback.format_exception(exc))
                attempt.queue.put(Done(attempt, False, exc, worker, text, t_start, t_end))
                return
        attempt.queue.put(Done(attempt, False, ParexecError(
            f"task {attempt.task_id!r}: its Dask future ended as {status!r}; the cluster "
            "lost it (a closed client or scheduler)"), worker, None, t_start, t_end))

    def _stop_loop(self) -> None:
        """Deliver stops, batched: the stops of a run that ends come all at once."""
        while True:
            batch = [self._stops.get()]
            while not self._stops.empty() and batch[-1] is not None:
                batch.append(self._stops.get())
            items = [item for item in batch if item is not None]
            if items:
                try:
                    self._stop(items)
                except Exception:  # noqa: BLE001 - workers or tasks may be gone meanwhile
                    logger.debug("stopping cluster tasks failed", exc_info=True)
            if batch[-1] is None:
                return

    def _stop(self, items: list[tuple[Any, str | None]]) -> None:
        unknown = [attempt.handle.key for attempt, address in items if address is None]
        where = iter(self.client.run_on_scheduler(_where, keys=unknown) if unknown else ())
        by_worker: dict[str, list[str]] = {}
        for attempt, address in items:
            if address is None:
                address = next(where)
            if address:
                key = f"{self.prefix}/{attempt.index}/{attempt.number}"
                by_worker.setdefault(address, []).append(key)
        # Cancel first, so Dask never starts them (or starts them again) elsewhere.
        self.client.cancel([attempt.handle for attempt, _ in items], force=True)
        for address, keys in by_worker.items():
            try:
                self.client.run(_stop_here, keys, workers=[address])
            except Exception:  # noqa: BLE001 - that worker may be gone meanwhile
                logger.debug("stopping %s on %s failed", keys, address, exc_info=True)
