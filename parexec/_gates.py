"""Admission gates: the scheduler starts a task only when every gate admits it.

A gate is a capacity and the need of each task: ``admits(i)``, ``acquire(i)``,
``release(i)``. The scheduler asks its gates in order; a task refused by a gate waits
(parked) on that gate until the gate releases units, so a task blocked by one pool never holds
up tasks that do not use it. Adding a resource kind means adding a gate, not editing the loop.

Gates exist only when they can bind: a run of plain tasks has just the slot gate.

* ``slots``    one unit per local task, capacity ``max_workers``; when it refuses, nothing
               else can start either (``blocks_all``)
* ``cpus``     the tasks' ``cpus``, capacity ``cpu_budget``
* ``memory``   declared (or learned) ``memory``, capacity ``memory_budget``, and measured
               memory (see below); present when a task declares memory or runs in a process
* ``pool:X``   units of named pool ``X``
* ``exclusive`` present when a task is ``exclusive`` (YAML ``parallel.enabled: false``):
               such a task needs the whole (huge) capacity, every other local task one unit,
               so it runs with no other local task while the others share freely; it holds
               a reservation like any task refused for lack of units

``cpus``, ``memory`` and ``timeout`` may be callables of the task's resolved arguments: the
scheduler evaluates them when the task reaches the top of the ready heap, before any gate
is asked, and writes the result into the gates' ``needs``; their gates exist from the start.

Reservations (issue 21 item 10). Without them a task that needs a whole pool starves behind
smaller, lower-ranked tasks: each time one unit comes back, a small task takes it. So the
best-ranked task a gate refuses for lack of units holds that gate's *reservation* until it
starts. A lower-ranked task may then take units of that gate only when that cannot delay
the holder (backfilling, as batch schedulers do):

* it fits beside the reservation (``used + need + holder's need <= capacity``), or
* its ``estimate`` says it ends before the holder could start anyway: the *shadow time*,
  when the running tasks' estimates say enough units come back (a running task with no
  estimate may end at any moment, so it brings the shadow time to now).

A better-ranked task takes the reservation over. Gates keep their reservations apart, so a
task waiting on a pool does not hold up tasks that use only the CPU budget, and a task
needing the whole CPU budget is protected the same way as one needing a whole pool.

Measured memory (issue 21 item 11). ``memory_budget`` (default: 90% of the memory psutil
reports available at the start) binds process tasks whether or not they declare
``memory=``, as Dask's worker memory thresholds do. The run's ``Monitor`` sums the resident
memory of the process workers running its tasks, children included (``Monitor.total``, 10
samples a second), and reports to the scheduler, which alone decides:

* **need**: a task's declared ``memory`` (fixed, or computed from its inputs); else, with a
  ``store=``, the peak its last success recorded (capped at the budget; the scheduler puts
  it in ``needs``, so it counts like a declared need but is no limit); else the highest peak
  a task of the same function reached earlier in this run. Needs add up against the budget.
* **probe** (only when the run or workflow sets ``memory_budget``): while a function has no
  measured peak yet, its first task runs without the others until it ends, or until it ran
  ``PROBE_SECONDS`` (1 s) and its measured peak stopped growing for ``PROBE_STABLE``
  (0.5 s); its peak so far is then the need. With the default budget the probe is left out:
  it would delay every first sibling of every process map, and the high-water mark and
  the stop above the budget still hold.
* **high water** (``HIGH_WATER``, 80% of the budget): no process task starts while the
  measured total is above it, nor while the total plus the task's need is above the budget.
  For admission the total also counts the shared-memory segments the driver holds
  (``Monitor.held``: values moved through shared memory, see ``_shm``), touched or not; a
  segment a worker also mapped counts twice, which errs on the safe side.
  Such refusals are re-checked every ``MEMORY_RECHECK`` (0.25 s) and on every release.
* **above the budget**: the scheduler stops the most recently started process task (never
  the only one; at most ``MAX_EVICTIONS``, 3, times per task), with a ``RuntimeWarning``, and
  queues it again without counting an attempt; it starts again when its peak fits.
* a process task above its own declared ``memory`` is killed alone and fails with
  ``MemoryLimitExceeded`` (retried as its policy says).

Thread tasks share the driver's memory, which cannot be told apart per task, so only their
declared ``memory`` counts; with a declaration, psutil's available memory must also cover it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import ResourceError

if TYPE_CHECKING:
    from ._graph import Graph
    from ._task import TaskSpec
    from ._workflow import Workflow

__all__ = ["EXCLUSIVE", "HIGH_WATER", "PROBE_SECONDS", "PROBE_STABLE", "Admit", "CapacityGate",
           "CpuGate", "ExclusiveGate", "Gate", "GroupGate", "MemoryGate", "PoolGate", "SlotGate",
           "build_gates", "check_resources", "exclusive_flags"]

EXCLUSIVE = float(2**40)  # capacity of the exclusive gate: an exclusive task needs all of
# it, any other local task one unit, so an exclusive task runs alone and the others share
HIGH_WATER = 0.8  # no new process task starts while the measured total is above this share
PROBE_SECONDS = 1.0  # the first task of a function runs alone this long for its peak,
PROBE_STABLE = 0.5   # ... and longer while its peak grew in the last PROBE_STABLE seconds


class Admit(enum.Enum):
    """A gate's answer to "may task i start now?" (true only for ``YES``).

    ``RECHECK``: not now, because of a measurement (memory in use) rather than of units the
    gate accounts for. No release may come to wake the task, so the scheduler asks again a
    moment later.
    """

    YES = "yes"
    NO = "no"
    RECHECK = "recheck"

    def __bool__(self) -> bool:
        return self is Admit.YES


YES, NO, RECHECK = Admit.YES, Admit.NO, Admit.RECHECK


class Gate(Protocol):
    """What the scheduler knows of a gate (``CapacityGate`` and its kinds implement it)."""

    name: str
    kind: str
    capacity: float
    used: float
    needs: list[float]
    blocks_all: bool
    parked: list[tuple[Any, ...]]
    holder: int
    holder_key: tuple[object, ...]
    holder_need: float
    shadow: float | None

    def need(self, i: int) -> float:
        """Units task ``i`` needs."""

    def need_of(self, spec: TaskSpec, local: bool, group: int) -> float:
        """Units a task created at run time needs (``group``: the map it belongs to)."""

    def admits(self, i: int) -> Admit:
        """Whether task ``i`` may start now."""

    def acquire(self, i: int) -> None:
        """Task ``i`` started."""

    def release(self, i: int) -> None:
        """Task ``i`` gave its units back."""

    def reserve(self, i: int, key: tuple[object, ...]) -> bool:
        """Make task ``i`` the holder of the reservation, if it ranks best."""

    def unreserve(self) -> None:
        """Nothing is reserved any more."""

    def spares(self, i: int) -> bool:
        """Whether task ``i`` fits beside the reservation."""

    def utilization(self) -> float:
        """Time-weighted share of the capacity in use."""


class CapacityGate:
    """Units in use may not exceed ``capacity``; task ``i`` needs ``needs[i]`` units.

    Args:
        name: Shown in messages and stats.
        capacity: Units available.
        needs: Units per task index (0 for tasks this gate does not concern).
        blocks_all: When this gate refuses, no other task can pass it either (slots).
        track: Keep the time integral of units in use, for utilization stats.
    """

    __slots__ = ("name", "capacity", "needs", "used", "blocks_all", "parked", "_track",
                 "_area", "_since", "_start", "holder", "holder_key", "holder_need", "shadow")
    kind = "capacity"

    def __init__(self, name: str, capacity: float, needs: list[float], *,
                 blocks_all: bool = False, track: bool = False) -> None:
        self.name = name
        self.capacity = capacity
        self.needs = needs
        self.used: float = 0
        self.blocks_all = blocks_all
        self.parked: list[tuple[Any, ...]] = []  # heap of ready keys refused by this gate
        self._track = track
        self._area = 0.0
        self._since = self._start = time.monotonic()
        # The reservation (see "Reservations" in the module docstring): the best task this
        # gate refused for lack of units, or -1. Tasks ranked below it may take units only
        # when that cannot delay it.
        self.holder = -1
        self.holder_key: tuple[object, ...] = ()
        self.holder_need: float = 0
        self.shadow: float | None = None  # cached earliest start of the holder (monotonic)

    def need(self, i: int) -> float:
        """Units task ``i`` needs."""
        return self.needs[i]

    def need_of(self, spec: TaskSpec, local: bool, group: int) -> float:
        """Units a task created at run time needs; each kind of gate says (none here)."""
        return 0.0

    def admits(self, i: int) -> Admit:
        """Whether task ``i`` fits now."""
        need = self.needs[i]
        return YES if not need or self.used + need <= self.capacity else NO

    def acquire(self, i: int) -> None:
        """Task ``i`` started."""
        need = self.needs[i]
        if need:
            if self._track:
                self._tick()
            self.used += need
            self.shadow = None

    def release(self, i: int) -> None:
        """Task ``i`` stopped using its units."""
        need = self.needs[i]
        if need:
            if self._track:
                self._tick()
            self.used -= need
            self.shadow = None

    def reserve(self, i: int, key: tuple[object, ...]) -> bool:
        """Make task ``i`` (ready key ``key``), refused for lack of units, the holder.

        A better-ranked holder keeps the reservation. Returns whether ``i`` took it over
        (False also when it already held it: its need is only brought up to date).
        """
        if self.holder == i:
            self.holder_need = self.need(i)  # a learned memory need may have changed
            return False
        if self.holder >= 0 and self.holder_key <= key:
            return False
        self.holder, self.holder_key, self.holder_need = i, key, self.need(i)
        self.shadow = None
        return True

    def unreserve(self) -> None:
        """The holder started, or no longer waits: nothing is reserved."""
        self.holder = -1
        self.holder_key = ()
        self.holder_need = 0
        self.shadow = None

    def spares(self, i: int) -> bool:
        """Whether task ``i`` fits beside the reservation.

        Then the units it takes are not among those the holder waits for, whatever happens.
        """
        return self.used + self.need(i) + self.holder_need <= self.capacity

    def _tick(self) -> None:
        now = time.monotonic()
        self._area += self.used * (now - self._since)
        self._since = now

    def utilization(self) -> float:
        """Time-weighted units in use / capacity since the gate was made (0..1)."""
        self._tick()
        span = self._since - self._start
        return self._area / (span * self.capacity) if span > 0 and self.capacity else 0.0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.used:g}/{self.capacity:g}>"


class SlotGate(CapacityGate):
    """One unit per local task, ``max_workers`` of them; when it refuses, nothing can start."""

    __slots__ = ()
    kind = "slots"

    def __init__(self, capacity: float, needs: list[float]) -> None:
        super().__init__("slots", capacity, needs, blocks_all=True)

    def need_of(self, spec: TaskSpec, local: bool, group: int) -> float:  # noqa: D102
        return 1.0 if local else 0.0


class CpuGate(CapacityGate):
    """The tasks' ``cpus`` within ``cpu_budget``."""

    __slots__ = ()
    kind = "cpus"

    def __init__(self, capacity: float, needs: list[float]) -> None:
        super().__init__("cpus", capacity, needs)

    def need_of(self, spec: TaskSpec, local: bool, group: int) -> float:  # noqa: D102
        return float(spec.cpus) if local else 0.0


class PoolGate(CapacityGate):
    """Units of the named pool ``pool`` (``pools=`` of the workflow)."""

    __slots__ = ("pool",)
    kind = "pool"

    def __init__(self, pool: str, capacity: float, needs: list[float]) -> None:
        super().__init__(f"pool:{pool}", capacity, needs, track=True)
        self.pool = pool

    def need_of(self, spec: TaskSpec, local: bool, group: int) -> float:  # noqa: D102
        return float(spec.pools.get(self.pool, 0))


class ExclusiveGate(CapacityGate):
    """An ``exclusive`` task needs the whole capacity, any other local task one unit."""

    __slots__ = ()
    kind = "exclusive"

    def __init__(self, needs: list[float]) -> None:
        super().__init__("exclusive", EXCLUSIVE, needs)

    def need_of(self, spec: TaskSpec, local: bool, group: int) -> float:  # noqa: D102
        return (EXCLUSIVE if spec.exclusive else 1.0) if local else 0.0


class GroupGate(CapacityGate):
    """A group's or map's ``max_concurrent``: one unit per running member."""

    __slots__ = ("group",)
    kind = "group"

    def __init__(self, group: int, group_id: str, capacity: float, needs: list[float]) -> None:
        super().__init__(f"group:{group_id}", capacity, needs)
        self.group = group

    def need_of(self, spec: TaskSpec, local: bool, group: int) -> float:  # noqa: D102
        return 1.0 if group == self.group else 0.0


class MemoryGate(CapacityGate):
    """Declared and learned memory within the budget, and measured memory under it.

    See "Measured memory" in the module docstring. The scheduler wires ``monitor`` (the
    run's ``Monitor``) and ``measured`` (whether task ``i`` runs in a process worker the
    monitor measures) when the run begins. A task refused by a measurement, not by the
    accounting, is answered ``RECHECK``: the scheduler then re-checks it
    ``MEMORY_RECHECK`` seconds later, since no release may come to wake it.
    """

    __slots__ = ("specs", "monitor", "measured", "learned", "probing",
                 "held", "attempts", "high_water", "probe")

    def __init__(self, capacity: float, needs: list[float],
                 specs: Sequence[TaskSpec] = ()) -> None:
        super().__init__("memory", capacity, needs, track=False)
        self.specs = specs  # the run's list (map items are appended to it)
        self.monitor: Any = None
        self.measured: Callable[[int], bool] = _never
        self.learned: dict[Any, float] = {}  # function -> highest peak measured in this run
        # function -> [task, started at, its peak when last seen, when that peak was new]
        self.probing: dict[Any, list[Any]] = {}
        self.held: dict[int, float] = {}  # undeclared process task -> bytes it was admitted with
        self.attempts: dict[int, Any] = {}  # process task -> its running attempt
        self.high_water = HIGH_WATER * capacity
        self.probe = True  # measure a function's first task alone (see "probe" above)

    def need(self, i: int) -> float:
        """Declared memory of task ``i``, else the peak its function reached in this run."""
        declared = self.needs[i]
        if declared or not self.learned:
            return declared
        return self.learned.get(_fn_key(self.specs[i].fn), 0.0)

    def need_of(self, spec: TaskSpec, local: bool, group: int) -> float:  # noqa: D102
        return float(spec.memory or 0) if local else 0.0

    def admits(self, i: int) -> Admit:  # noqa: D102 - see class docstring
        declared = self.needs[i]
        measured = self.measured(i)
        if not declared and not measured:
            return YES
        need = declared
        if not need:
            fn = _fn_key(self.specs[i].fn)
            need = self.learned.get(fn, 0.0)
            if not need and self.probe and fn in self.probing and not self._end_probe(fn):
                return RECHECK  # its first task still runs: wait for its peak
        if self.used + need > self.capacity:
            return NO
        monitor = self.monitor
        if measured and monitor is not None:
            total = monitor.total + monitor.held
            if total > self.high_water or total + need > self.capacity:
                return RECHECK
        if declared:
            import psutil
            if psutil.virtual_memory().available < declared:
                return RECHECK
        return YES

    def acquire(self, i: int) -> None:  # noqa: D102 - see class docstring
        declared = self.needs[i]
        if declared:
            self.used += declared
        elif self.measured(i):
            fn = _fn_key(self.specs[i].fn)
            need = self.learned.get(fn, 0.0)
            if not need and self.probe and fn not in self.probing:
                now = time.monotonic()  # this task measures the function
                self.probing[fn] = [i, now, 0, now]
            self.held[i] = need
            self.used += need
        self.shadow = None

    def release(self, i: int) -> None:  # noqa: D102 - see class docstring
        declared = self.needs[i]
        self.used -= declared if declared else self.held.pop(i, 0.0)
        self.shadow = None
        attempt = self.attempts.pop(i, None)
        if attempt is None:
            return
        fn = _fn_key(self.specs[i].fn)
        peak = attempt.peak_memory
        if peak and peak > self.learned.get(fn, 0.0):
            self.learned[fn] = float(peak)
        probe = self.probing.get(fn)
        if probe is not None and probe[0] == i:
            del self.probing[fn]

    def started(self, i: int, attempt: Any) -> None:
        """Process task ``i`` runs ``attempt``: its measured peak teaches its function's need."""
        self.attempts[i] = attempt

    def _end_probe(self, fn: Any) -> bool:
        """Whether the first task of ``fn`` ran long enough, ending its probe.

        That is ``PROBE_SECONDS``, the last ``PROBE_STABLE`` of them without a higher peak
        (a task still allocating, or a worker still starting under load, is waited for). Its
        peak so far then serves as its function's need, and it counts with that need.
        """
        probe = self.probing[fn]
        i, since, seen, seen_at = probe
        attempt = self.attempts.get(i)
        peak = self.monitor.peak_of(attempt) if attempt is not None and self.monitor else None
        now = time.monotonic()
        if not peak:
            return False
        if peak != seen:
            probe[2], probe[3] = peak, now
            return False
        if now - since < PROBE_SECONDS or now - seen_at < PROBE_STABLE:
            return False
        del self.probing[fn]
        self.learned[fn] = max(self.learned.get(fn, 0.0), float(peak))
        if i in self.held:
            self.used += self.learned[fn] - self.held[i]
            self.held[i] = self.learned[fn]
        return True


def _never(i: int) -> bool:
    return False


def _fn_key(fn: Any) -> Any:
    """The key under which a function's measured peaks are kept (any callable)."""
    try:
        hash(fn)
    except TypeError:
        return id(fn)
    return fn


def check_resources(wf: Workflow, graph: Graph, *, cpu_budget: float | None,
                    memory_budget: int | None,
                    specs: Sequence[TaskSpec] | None = None) -> None:
    """Raise ``ResourceError`` for the first task that could never be admitted.

    Args:
        wf: The workflow (its pools are the capacities).
        graph: Its compiled graph.
        cpu_budget: Cores available to the run, or None when unknown.
        memory_budget: Bytes available to the run, or None when unknown.
        specs: The specs in index order (default: the workflow's).
    """
    specs = list(wf.tasks.values()) if specs is None else specs
    for spec in specs:
        local = (spec.isolation or wf.isolation) != "cluster"  # Dask places cluster tasks
        for pool, units in spec.pools.items():
            capacity = wf.pools.get(pool)
            if capacity is None:
                raise ResourceError(spec.id, pool, units, None)
            if units > capacity:
                raise ResourceError(spec.id, f"pools[{pool!r}]", units, capacity)
        if not local:
            continue
        if cpu_budget is not None and spec.cpus > cpu_budget:
            raise ResourceError(spec.id, "cpus", spec.cpus, cpu_budget,
                                "the CPU budget defaults to max_workers")
        if memory_budget is not None and spec.memory is not None and spec.memory > memory_budget:
            raise ResourceError(spec.id, "memory", spec.memory, memory_budget,
                                "memory_budget defaults to 90% of the memory available at "
                                "the start")


def build_gates(specs: Sequence[TaskSpec], local: Sequence[bool], *, max_workers: int,
                cpu_budget: float, memory_budget: int, pools: Mapping[str, int],
                force_cpu_gate: bool = False, process: Sequence[bool] = (),
                force_memory_gate: bool = False) -> list[Gate]:
    """The gates a run needs, slots first; gates that could never bind are left out.

    ``process[i]`` says task ``i`` (or the items of map ``i``) runs in process workers: the
    memory gate then measures it, declared or not. A ``cpus`` or ``memory`` callable (also
    on the items of a map over a task's result) makes its gate exist, as ``force_memory_gate``
    does (needs learned from a store); an ``exclusive`` task adds the ``exclusive`` gate.
    """
    gates: list[Gate] = [SlotGate(max_workers, [1.0 if x else 0.0 for x in local])]
    cpus = [s.cpus if loc else 0 for s, loc in zip(specs, local, strict=True)]
    items = [_item_options(s) for s in specs if s.group is not None and s.group.dynamic]
    sized = {k for s, loc in zip(specs, local, strict=True) if loc and s.sizers for k in s.sizers}
    for options in items:
        cpu, mem = options.get("cpus", 1), options.get("memory")
        if callable(cpu) or cpu != 1:
            sized.add("cpus")
        if callable(mem) or mem:
            sized.add("memory")
    if force_cpu_gate or cpu_budget < max_workers or any(c not in (0, 1) for c in cpus) \
            or "cpus" in sized:
        gates.append(CpuGate(cpu_budget, cpus))
    memory = [float(s.memory or 0) if loc else 0.0 for s, loc in zip(specs, local, strict=True)]
    if any(memory) or any(process) or "memory" in sized or force_memory_gate:
        gates.append(MemoryGate(memory_budget, memory, specs))
    for pool, capacity in pools.items():
        needs = [float(s.pools.get(pool, 0)) for s in specs]
        if any(needs):
            gates.append(PoolGate(pool, capacity, needs))
    exclusive = exclusive_flags(specs)
    if any(exclusive):
        gates.append(ExclusiveGate([
            (EXCLUSIVE if alone else 1.0) if loc else 0.0
            for alone, loc in zip(exclusive, local, strict=True)]))
    return gates


def exclusive_flags(specs: Sequence[TaskSpec]) -> list[bool]:
    """Per task, whether it runs alone (its spec, or the static map it is an item of, is exclusive).

    Items of a map over a task's result learn it when they are created.
    """
    flags = [s.exclusive for s in specs]
    if not any(flags):
        return flags
    index = {s.id: k for k, s in enumerate(specs)}
    for s in specs:
        if s.exclusive and s.group is not None and s.group.dynamic is None \
                and s.group.output == "list":
            for member in s.group.members:
                flags[index[member]] = True
    return flags


def _item_options(spec: TaskSpec) -> Mapping[str, Any]:
    """The options of the items of a map over a task's result."""
    assert spec.group is not None and spec.group.dynamic is not None
    options: Mapping[str, Any] = spec.group.dynamic[1]
    return options
