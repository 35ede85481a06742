"""Task functions of the benchmarks (a module, so worker processes import them by name)."""

from __future__ import annotations

import time
from typing import Any


def noop(*args: Any) -> None:
    """Do nothing: measures pure scheduling overhead."""
    return None


def burn(n: int) -> int:
    """Pure-Python CPU work that holds the GIL."""
    s = 0
    for i in range(n):
        s += i * i % 7
    return s


def sleep_ms(ms: float, *deps: Any) -> None:
    """Sleep ``ms`` milliseconds: a task of known cost that needs no CPU."""
    time.sleep(ms / 1000)
