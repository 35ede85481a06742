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


def touch(gib: float) -> int:
    """Allocate and touch ``gib`` GiB, hold it briefly, and return the number of bytes."""
    block = bytearray(int(gib * 2**30))
    for k in range(0, len(block), 4096):
        block[k] = 1
    time.sleep(0.2)
    return len(block)


def sleep_ms(ms: float, *deps: Any) -> None:
    """Sleep ``ms`` milliseconds: a task of known cost that needs no CPU."""
    time.sleep(ms / 1000)
