"""How a group or map decides: pure functions of its members' outcomes.

One strategy per wait mode. ``Group.member_done(m, ok, members)`` is called once per member
that reached a final state and returns a ``Resolution`` when the group is decided, else
None. It reads the members' values and errors through ``members`` (the scheduler) and
changes nothing but the group's own count: applying the decision (finalizing the group,
cancelling its other members, releasing its dependents) is the scheduler's
(``_groups``). ``map_items`` is the pure half of expanding a map over a task's result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ._errors import TaskOptionError
from ._task import Outcome, TaskSpec

if TYPE_CHECKING:
    from ._status import WaitMode

__all__ = ["STRATEGIES", "Group", "Members", "Resolution", "map_items"]


class Resolution(NamedTuple):
    """A group's decision: its value, or the error it fails with."""

    ok: bool
    value: Any = None
    error: BaseException | None = None


class Members(Protocol):
    """What a strategy may read about the members of group ``g``."""

    def member_value(self, m: int) -> Any:
        """Member ``m``'s value (its default, for a map item ignored on failure)."""

    def member_error(self, g: int, m: int) -> Exception:
        """Why member ``m`` of group ``g`` has no value."""

    def member_outcome(self, g: int, m: int) -> Outcome:
        """Member ``m``'s ``Outcome`` (for ``"all_settled"``)."""

    def collect(self, group: Group) -> Any:
        """The group's value from all its members: a list (maps) or a dict by id."""

    def task_id(self, i: int) -> str:
        """Task ``i``'s id."""


Strategy = Callable[["Group", int, bool, Members], Resolution | None]


def _all(group: Group, m: int, ok: bool, members: Members) -> Resolution | None:
    """Every member must succeed: the first failure decides, else the last success."""
    if not ok:
        return Resolution(False, error=members.member_error(group.index, m))
    if not group.pending:
        return Resolution(True, members.collect(group))
    return None


def _any(group: Group, m: int, ok: bool, members: Members) -> Resolution | None:
    """The first success decides; the group fails only when every member failed."""
    if ok:
        return Resolution(True, members.member_value(m))
    if not group.pending:
        errors = [members.member_error(group.index, k) for k in group.members]
        return Resolution(False, error=ExceptionGroup(
            f"group {members.task_id(group.index)!r}: every member failed", errors))
    return None


def _race(group: Group, m: int, ok: bool, members: Members) -> Resolution:
    """The first member to end decides, success or failure."""
    if ok:
        return Resolution(True, members.member_value(m))
    return Resolution(False, error=members.member_error(group.index, m))


def _all_settled(group: Group, m: int, ok: bool, members: Members) -> Resolution | None:
    """Wait for every member; never fails: the value maps ids to ``Outcome``."""
    if group.pending:
        return None
    return Resolution(True, {members.task_id(k): members.member_outcome(group.index, k)
                             for k in group.members})


STRATEGIES: dict[str, Strategy] = {"all": _all, "any": _any, "race": _race,
                                   "all_settled": _all_settled}


class Group:
    """Run state of one group or map: its members (task indices) and how it decides."""

    __slots__ = ("index", "members", "wait", "output", "pending", "resolved", "started",
                 "timeout", "_strategy")

    def __init__(self, index: int, members: list[int], wait: WaitMode, output: str,
                 timeout: float | None) -> None:
        self.index = index
        self.members = members
        self.wait = wait
        self.output = output  # "list" (maps) or "dict"
        self.pending = len(members)
        self.resolved = False
        self.started = False
        self.timeout = timeout
        self._strategy = STRATEGIES[wait]

    def member_done(self, m: int, ok: bool, members: Members) -> Resolution | None:
        """Member ``m`` ended (``ok``: it has a value); the decision, if this makes one."""
        self.pending -= 1
        return self._strategy(self, m, ok, members)


def map_items(spec: TaskSpec, source: Any) -> list[TaskSpec] | Resolution:
    """The tasks of a map over ``source`` (its upstream task's value), one per item.

    A ``source`` that is not iterable gives the map's failure instead.
    """
    info = spec.group
    assert info is not None and info.dynamic is not None
    fn, options, kwargs, base = info.dynamic
    try:
        items = list(source)
    except TypeError:
        return Resolution(False, error=TaskOptionError(
            f"map {spec.id!r}: the value of {info.members[0]!r} is a "
            f"{type(source).__name__}, not an iterable of items"))
    return [TaskSpec(f"{base}[{k}]", fn, (item,), kwargs, (), False, options)
            for k, item in enumerate(items)]
