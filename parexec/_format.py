"""How results print: durations, byte counts, worker names and escaped text.

Summaries (``_results``) and HTML tables and charts (``_display``) share these helpers. This
module is a leaf (it imports nothing of parexec), so the two can use it without importing
each other (issue 14: ``_results`` <-> ``_display`` was a runtime import cycle).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["fmt_bytes", "fmt_secs", "memory_need_label", "printable", "worker_label"]


class _NeedsMemory(Protocol):
    """What ``memory_need_label`` reads of a ``TaskRun``."""

    @property
    def memory_need(self) -> int | None: ...

    @property
    def memory_source(self) -> str | None: ...


def printable(text: str) -> str:
    """``text`` with control characters escaped.

    An id or an error message printed in a table or a terminal cannot forge rows or move
    the cursor.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def worker_label(worker: int | str | None) -> str:
    """How summaries, tables and charts name a worker.

    ``process 20596``, ``thread 2``, or a cluster worker's address.
    """
    if worker is None:
        return ""
    if isinstance(worker, int) or (isinstance(worker, str) and worker.isdigit()):
        return f"process {worker}"
    head, sep, number = worker.rpartition("-")
    if sep and number.isdigit() and head.startswith("parexec"):
        return f"thread {number}"
    return printable(worker)


def memory_need_label(tr: _NeedsMemory) -> str:
    """``1.0GiB learned``: the memory a task was admitted with and its source, or ''."""
    if tr.memory_need is None or tr.memory_source is None:
        return ""
    return f"{fmt_bytes(tr.memory_need)} {tr.memory_source}"


def fmt_secs(x: float | None) -> str:
    """``12.3ms`` below a second, ``4.56s`` from one second on; '' for None."""
    if x is None:
        return ""
    return f"{x * 1000:.1f}ms" if x < 1 else f"{x:.2f}s"


def fmt_bytes(n: float | None) -> str:
    """``512B``, ``1.5KiB``, ``2.0MiB``, ``3.1GiB`` (GiB is the largest unit); '' for None."""
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"
