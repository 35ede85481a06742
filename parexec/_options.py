"""Checks of every option a user gives: task options, workflow settings, run arguments.

One module, so every front end (``px.task``, ``px.Workflow``, ``px.run``, the YAML loader
and the CLI) refuses a bad value the same way. A message names where the option was given,
the option, the value and what to write instead::

    task 'fit': timeout=0 must be a positive number of seconds
    run: max_workers=0 must be an integer >= 1

Every checker raises ``TaskOptionError`` (a ``WorkflowError`` and a ``ValueError``) and
returns the normalised value (seconds as float, sizes as int bytes, ...). ``where`` is the
prefix of the message, e.g. ``"task 'fit'"``, ``"Workflow 'etl'"`` or ``"run"``.

This module is a leaf: it imports nothing of parexec but ``_errors``, so any module may use
it without an import cycle. Checks that need a parexec class (``after=``, ``keep=``) take it
as an argument.
"""

from __future__ import annotations

import difflib
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import TaskOptionError

__all__ = ["ISOLATIONS", "ON_ERRORS", "OPTIONS", "WAITS", "Retry", "check_after",
           "check_capacities", "check_cpu_budget", "check_cpus", "check_estimate",
           "check_grace", "check_id", "check_isolation", "check_keep", "check_max_concurrent",
           "check_max_workers", "check_memory", "check_on_error", "check_on_event",
           "check_options", "check_parallel", "check_pools", "check_positive",
           "check_priority", "check_resume", "check_timeout", "check_wait", "parse_size",
           "sized_value"]

ISOLATIONS = ("thread", "process", "cluster")
ON_ERRORS = ("fail", "skip", "ignore")
WAITS = ("all", "any", "all_settled", "race")
OPTIONS = ("id", "name", "isolation", "priority", "estimate", "timeout", "retry", "on_error",
           "cpus", "memory", "pools", "after", "default", "grace")


def _refuse(where: str, option: str, value: Any, must: str) -> TaskOptionError:
    """The one message shape: ``"<where>: <option>=<value> must be <must>"``."""
    prefix = f"{where}: " if where else ""
    return TaskOptionError(f"{prefix}{option}={value!r} must be {must}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(where: str, option: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        prefix = f"{where}: " if where else ""
        raise TaskOptionError(f"{prefix}{option}={value!r} is unknown; use one of "
                              f"{', '.join(map(repr, choices))}")
    return str(value)


# Sizes ------------------------------------------------------------------------------------

# Decimal and binary units, as dask.utils.parse_bytes reads them; single letters are decimal.
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: int | float | str, *, what: str = "memory") -> int:
    """Parse a memory size: bytes as a number, or a string like ``"512MB"`` or ``"2GiB"``.

    Args:
        value: A positive number of bytes, or a number followed by a unit (B, KB, MB, GB,
            TB decimal; KiB, MiB, GiB, TiB binary; case-insensitive).
        what: The name of the field, used in the error message.

    Returns:
        The size in bytes.

    Raises:
        TaskOptionError: The value is not a positive size.
    """
    if isinstance(value, bool):
        raise TaskOptionError(f"{what}={value!r} is not a size; give bytes or a string like '2GB'")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit not in _UNITS:
            raise TaskOptionError(
                f"{what}={value!r} has an unknown unit {m.group(2)!r}; use one of "
                "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '512MB' or '2GiB')")
    else:
        raise TaskOptionError(
            f"{what}={value!r} is not a size; give bytes or a string like '512MB' or '2GiB'")
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise TaskOptionError(f"{what}={value!r} must be a positive size")
    if size < 1:
        raise TaskOptionError(
            f"{what}={value!r} is less than one byte; a bare number counts bytes, so write the "
            f"unit (e.g. '{value}GB')")
    return int(size)


def check_memory(value: Any, where: str, option: str = "memory") -> int | None:
    """Validate an optional memory size (None passes); return bytes."""
    if value is None:
        return None
    return parse_size(value, what=f"{where}: {option}" if where else option)


# Numbers ----------------------------------------------------------------------------------

def check_positive(value: Any, where: str, field: str,
                   meaning: str = "a positive number of seconds") -> float | None:
    """Validate an optional positive finite number (None passes); return it as a float."""
    if value is None:
        return None
    if not _is_number(value) or not (value > 0 and math.isfinite(value)):
        raise _refuse(where, field, value, meaning)
    return float(value)


def check_timeout(value: Any, where: str) -> float | None:
    """Validate a ``timeout`` (seconds > 0, or None for no limit)."""
    return check_positive(value, where, "timeout")


def check_grace(value: Any, where: str) -> float | None:
    """Validate a ``grace`` (seconds >= 0, or None for "not given")."""
    if value is None:
        return None
    if not _is_number(value) or not (value >= 0 and math.isfinite(value)):
        raise _refuse(where, "grace", value, "a number of seconds >= 0")
    return float(value)


def check_estimate(value: Any, where: str) -> float | None:
    """Validate an ``estimate`` (seconds >= 0, or None for unknown)."""
    if value is None:
        return None
    if not _is_number(value) or not (value >= 0 and math.isfinite(value)):
        raise _refuse(where, "estimate", value, "a number of seconds >= 0")
    return float(value)


def check_cpus(value: Any, where: str) -> float:
    """Validate ``cpus`` (a finite number of cores > 0); return it unchanged."""
    if not _is_number(value) or not (value > 0 and math.isfinite(value)):
        raise _refuse(where, "cpus", value, "a number > 0")
    return value  # type: ignore[no-any-return]


def check_priority(value: Any, where: str) -> int:
    """Validate a ``priority`` (any integer; higher starts first)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(where, "priority", value, "an integer")
    return value


def _check_count(value: Any, where: str, option: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(where, option, value, "an integer >= 1")
    return value


def check_max_workers(value: Any, where: str) -> int | None:
    """Validate a ``max_workers`` setting (an integer >= 1, or None for the default)."""
    return _check_count(value, where, "max_workers")


def check_max_tasks_per_worker(value: Any, where: str) -> int | None:
    """Validate ``max_tasks_per_worker`` (an integer >= 1, or None: never replace workers)."""
    return _check_count(value, where, "max_tasks_per_worker")


def check_batch(value: Any, where: str) -> int | str:
    """Validate a map's ``batch``: ``"auto"`` or an integer >= 1 (items per message)."""
    if value == "auto" and isinstance(value, str):
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(where, "batch", value, "'auto' or an integer >= 1 (items sent to a worker "
                      "at once; 1 sends one item per message)")
    return value


def check_max_concurrent(value: Any, where: str) -> int | None:
    """Validate the ``max_concurrent`` of a group or map (an integer >= 1, or None)."""
    return _check_count(value, where, "max_concurrent")


def check_cpu_budget(value: Any, where: str) -> float | None:
    """Validate a ``cpu_budget`` setting (cores > 0, or None for the default)."""
    return check_positive(value, where, "cpu_budget", "a number of cores > 0")


# Names and choices ------------------------------------------------------------------------

def check_id(value: Any, where: str, *, brackets: bool = True) -> str:
    """Validate a task, group or workflow id (or display name); return it.

    Ids are printed in summaries, progress bars and terminals, so control characters (which
    could forge table rows or rewrite lines) are refused; ``[`` and ``]`` are reserved for
    map items (``name[0]``), whose ids must never collide with a user's. ``where`` names the
    field, e.g. ``"task 'fit': id"``.

    Raises:
        TaskOptionError: The value is not a non-empty printable string.
    """
    if not isinstance(value, str) or not value:
        raise TaskOptionError(f"{where}={value!r} must be a non-empty string")
    if not value.isprintable():
        raise TaskOptionError(f"{where}={value!r} contains control or non-printable characters; "
                              "use printable text")
    if brackets and ("[" in value or "]" in value):
        raise TaskOptionError(f"{where}={value!r} contains '[' or ']', which are reserved for "
                              "the items of maps (name[0], name[1], ...); choose another id")
    return value


def check_isolation(value: Any, where: str) -> str:
    """Validate an ``isolation``: ``"thread"``, ``"process"`` or ``"cluster"``."""
    return _choice(where, "isolation", value, ISOLATIONS)


def check_on_error(value: Any, where: str) -> str:
    """Validate an ``on_error``: ``"fail"``, ``"skip"`` or ``"ignore"``."""
    return _choice(where, "on_error", value, ON_ERRORS)


def check_wait(value: Any, where: str) -> str:
    """Validate a group's ``wait`` strategy."""
    return _choice(where, "wait", value, WAITS)


# Pools ------------------------------------------------------------------------------------

def check_pools(value: Any, where: str) -> dict[str, int]:
    """Validate a task's ``pools``: ``{"name": units}``, a name (1 unit), or names."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {value: 1}
    if isinstance(value, Mapping):
        pools: dict[str, int] = {}
        for name, units in value.items():
            if not isinstance(name, str) or isinstance(units, bool) \
                    or not isinstance(units, int) or units < 1:
                raise _refuse(where, "pools", dict(value), "a mapping of pool names to whole "
                              "numbers of units >= 1, e.g. {'database': 1}")
            pools[name] = units
        return pools
    if isinstance(value, Iterable):
        names = list(value)
        if all(isinstance(n, str) for n in names):
            return {n: 1 for n in names}
    raise _refuse(where, "pools", value, "a pool name or a mapping like {'database': 1}")


def check_capacities(value: Any, where: str) -> dict[str, int]:
    """Validate a workflow's ``pools``: pool name -> whole capacity >= 1."""
    pools: dict[str, int] = {}
    items = value.items() if isinstance(value, Mapping) else None
    for pool, capacity in items if items is not None else [(None, None)]:
        if not isinstance(pool, str) or isinstance(capacity, bool) \
                or not isinstance(capacity, int) or capacity < 1:
            shown = dict(value) if isinstance(value, Mapping) else value
            raise _refuse(where, "pools", shown, "a mapping of pool names to whole capacities "
                          ">= 1, e.g. {'database': 2}")
        pools[pool] = capacity
    return pools


# Retry ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Retry:
    """How a failed attempt is retried.

    The delay before attempt ``n + 1`` is ``min(max_delay, initial_delay * backoff**(n - 1))``
    plus a uniform random offset in ``[-jitter, +jitter]`` seconds (never below zero). Only
    exceptions that are instances of ``on`` are retried. Waiting for a retry holds no slot.

    Usage::

        @px.task(retry=px.Retry(3, initial_delay=0.5, on=(OSError,)))
        def fetch(url): ...

    Args:
        max_retries: How many times to retry after the first attempt (>= 0).
        initial_delay: Seconds before the first retry.
        backoff: Factor applied to the delay after each retry (>= 1).
        max_delay: Upper bound of a delay, in seconds.
        jitter: Largest random offset added to or removed from a delay, in seconds.
        on: Exception types that are retried.
        memory_factor: With a factor (>= 1), an attempt stopped by ``MemoryLimitExceeded``
            is retried with its memory limit and its need multiplied by it, never above the
            run's memory budget (``Retry(2, memory_factor=2)`` doubles the memory each time).
    """

    max_retries: int
    initial_delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.0
    on: tuple[type[BaseException], ...] = (Exception,)
    memory_factor: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) \
                or self.max_retries < 0:
            raise TaskOptionError(
                f"Retry(max_retries={self.max_retries!r}) must be an integer >= 0")
        for field, low in (("initial_delay", 0.0), ("backoff", 1.0), ("max_delay", 0.0),
                           ("jitter", 0.0)):
            value = getattr(self, field)
            if not _is_number(value) or not value >= low or not math.isfinite(value):
                raise TaskOptionError(f"Retry({field}={value!r}) must be a number >= {low:g}")
        factor = self.memory_factor
        if factor is not None and (not _is_number(factor) or not factor >= 1
                                   or not math.isfinite(factor)):
            raise TaskOptionError(
                f"Retry(memory_factor={factor!r}) must be a number >= 1 (how much the memory of "
                "an attempt stopped by MemoryLimitExceeded grows), or None")
        on = self.on
        if isinstance(on, type):
            on = (on,)
        if not isinstance(on, tuple) or not on or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise TaskOptionError(
                f"Retry(on={self.on!r}) must be an exception type or a tuple of them")
        object.__setattr__(self, "on", on)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_delay, self.initial_delay * self.backoff ** (attempt - 1))
        if self.jitter:
            base += (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base)

    def retries(self, error: BaseException) -> bool:
        """Whether ``error`` is of a type this policy retries."""
        return isinstance(error, self.on)


def check_retry(value: Any, where: str) -> Retry | None:
    """Validate a ``retry``: ``px.Retry(...)``, an int (= max_retries), or None/0 for none."""
    if value is None or value == 0:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return Retry(max_retries=value)
        except TaskOptionError as exc:
            raise TaskOptionError(f"{where}: {exc}") from None
    if not isinstance(value, Retry):
        raise _refuse(where, "retry", value, "px.Retry(...) or an int (the number of retries)")
    return value


# Task options -----------------------------------------------------------------------------

def check_after(value: Any, where: str, ref_type: type) -> tuple[Any, ...]:
    """Validate ``after=``: refs (instances of ``ref_type``) or ids; return them as a tuple."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, (str, ref_type)) else tuple(value)
    for item in items:
        if not isinstance(item, (str, ref_type)):
            raise TaskOptionError(
                f"{where}: after= entries must be task refs or ids, got {item!r}")
    return items


def check_options(task: str, options: Mapping[str, Any], ref_type: type) -> dict[str, Any]:
    """Validate and normalise the options of ``px.task``; return them as a new dict.

    Args:
        task: The task id or function name, for messages.
        options: Options as given to ``px.task``.
        ref_type: The class of task references (``TaskRef``), accepted in ``after=``.

    Raises:
        TaskOptionError: An option is unknown or has an unusable value.
    """
    where = f"task {task!r}"
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f"; known options: {', '.join(OPTIONS)}"
            raise TaskOptionError(f"{where}: unknown option {key!r}{hint}")
        if key in ("id", "name"):
            if value is not None:
                check_id(value, f"{where}: {key}", brackets=key == "id")
        elif key == "isolation":
            if value is not None:
                check_isolation(value, where)
        elif key == "priority":
            check_priority(value, where)
        elif key == "estimate":
            value = check_estimate(value, where)
        elif key in ("timeout", "cpus", "memory") and callable(value):
            pass  # evaluated on the task's resolved arguments when it becomes ready
        elif key == "timeout":
            value = check_timeout(value, where)
        elif key == "grace":
            value = check_grace(value, where)
        elif key == "retry":
            value = check_retry(value, where)
        elif key == "on_error":
            check_on_error(value, where)
        elif key == "cpus":
            check_cpus(value, where)
        elif key == "memory":
            if value is not None:
                try:
                    value = parse_size(value)
                except TaskOptionError as exc:
                    raise TaskOptionError(f"{where}: {exc}") from None
        elif key == "pools":
            value = check_pools(value, where)
        elif key == "after":
            value = check_after(value, where, ref_type)
        out[key] = value
    return out


_RETURNS = {"memory": "bytes or a size like '512MB' (or None)",
            "cpus": "a number of cores > 0",
            "timeout": "a number of seconds > 0 (or None)"}


def sized_value(task: str, key: str, fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: Mapping[str, Any]) -> Any:
    """Evaluate the callable option ``key`` (memory, cpus, timeout) on resolved arguments.

    Returns the value normalised like a fixed option (bytes, cores, seconds; None for no
    memory or no timeout).

    Raises:
        TaskOptionError: The callable raised, or returned a value of the wrong type; the
            message names the task and the option.
    """
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported as the task's failure
        raise TaskOptionError(
            f"task {task!r}: the {key}= callable raised {type(exc).__name__}: {exc}; fix it "
            f"(it receives the task's resolved arguments) or give a fixed {key}=") from exc
    if value is None and key != "cpus":
        return None
    try:
        if key == "memory":
            return parse_size(value, what="memory")
        if key == "cpus":
            return check_cpus(value, "")
        return check_timeout(value, "")
    except TaskOptionError as exc:
        raise TaskOptionError(
            f"task {task!r}: the {key}= callable returned {value!r}, unusable: {exc}; make "
            f"it return {_RETURNS[key]}") from None


# Run arguments ----------------------------------------------------------------------------

def check_parallel(value: Any) -> bool:
    """Validate ``run(parallel=)``: True or False."""
    if not isinstance(value, bool):
        raise _refuse("run", "parallel", value, "True or False")
    return value


def check_on_event(value: Any) -> Callable[..., Any] | None:
    """Validate ``run(on_event=)``: a callable taking an ``Event``, or None."""
    if value is None:
        return None
    if not callable(value):
        raise _refuse("run", "on_event", value, "a callable taking an Event, or None")
    return value  # type: ignore[no-any-return]


def check_resume(resume: Any, store: Any) -> None:
    """Refuse ``resume=True`` without a ``store=`` to resume from."""
    if resume and store is None:
        raise TaskOptionError("run: resume=True needs store='path.db' (the store to resume "
                              "from); give store= or drop resume=True")


def check_keep(keep: Any, task_ids: Iterable[str], workflow: str,
               ref_type: type) -> str | tuple[str, ...]:
    """Normalise ``run(keep=)``: ``"all"``, ``"leaves"``, or a tuple of task ids.

    Args:
        keep: As given: ``"all"``, ``"leaves"``, a ref or id, or a list of refs or ids.
        task_ids: The ids of the workflow's tasks.
        workflow: The workflow's name, for messages.
        ref_type: The class of task references (``TaskRef``); a ref counts by its ``id``.

    Raises:
        TaskOptionError: ``keep`` is none of these, or names a task the workflow lacks.
    """
    if keep in ("all", "leaves"):
        return keep  # type: ignore[no-any-return]
    if isinstance(keep, (str, ref_type)):
        keep = [keep]
    try:
        items = list(keep)
    except TypeError:
        items = None
    if items is None or not all(isinstance(k, (str, ref_type)) for k in items):
        raise TaskOptionError(f"run: keep={keep!r} must be 'all', 'leaves' or a list of task "
                              "refs or ids")
    ids = tuple(k if isinstance(k, str) else k.id for k in items)
    known = task_ids if isinstance(task_ids, (dict, set, frozenset, Mapping)) \
        else set(task_ids)
    for tid in ids:
        if tid not in known:
            close = difflib.get_close_matches(tid, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TaskOptionError(f"run: keep= names {tid!r}, which is not a task of "
                                  f"workflow {workflow!r}{hint}")
    return ids
