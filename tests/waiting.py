"""Waiting in tests: poll until a condition holds, never sleep as synchronization.

A loaded 2-core machine can make anything slow, so every wait has one generous deadline and
says what it was waiting for when that deadline passes.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

DEADLINE_S = 60.0


def wait_until(predicate: Callable[[], T], what: str | Callable[[], str] = "the condition",
               timeout: float = DEADLINE_S, interval: float = 0.01) -> T:
    """Call ``predicate`` until it returns something true and return that; fail the test with
    ``what`` (or what ``what()`` says then) if it has not within ``timeout`` seconds. Exceptions
    from ``predicate`` propagate."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what() if callable(what) else what}; it never held")
        time.sleep(interval)
