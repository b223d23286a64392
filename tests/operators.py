"""Operators that more than one test module deploys (module level, so that workers can unpickle
them), and what a test uses to watch them from outside the worker.

They report through files named by the row's ``s`` column: a worker is another process, and a
file is the one thing both sides see. Each file is written whole (written aside, then renamed),
so a reader never sees it half written.
"""

from __future__ import annotations

import os
import time

import flowkit as fk

from .waiting import DEADLINE_S, wait_until


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def patient(row) -> int:
    """Works until it is cancelled (at most ``DEADLINE_S``). Writes ``<s>.started`` when it
    begins, then how it ended ("cancelled" or "ran to the end") to the file ``s``."""
    _write(f"{row['s']}.started", str(os.getpid()))
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if fk.cancelled():
            _write(row["s"], "cancelled")
            return -1
        time.sleep(0.01)
    _write(row["s"], "ran to the end")
    return row["x"]


def held(row) -> int:
    """Doubles ``x`` once the file ``s`` (the gate) exists: the test decides when it returns (at
    most ``DEADLINE_S``). Writes ``<s>.<pid>`` when it begins, so a test sees which worker runs it."""
    _write(f"{row['s']}.{os.getpid()}", "started")
    deadline = time.monotonic() + DEADLINE_S
    while not os.path.exists(row["s"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return row["x"] * 2


def started(path, seconds: float = DEADLINE_S) -> None:
    """Wait until the ``patient`` reporting to ``path`` has begun."""
    wait_until(lambda: os.path.exists(f"{path}.started"), f"{path} to be started", timeout=seconds)


def has_started(path) -> bool:
    """Whether a ``patient`` reporting to ``path`` began."""
    return os.path.exists(f"{path}.started")


def ended(path, seconds: float = DEADLINE_S) -> str:
    """Wait until the ``patient`` reporting to ``path`` has ended; how it ended."""
    wait_until(lambda: os.path.exists(path), f"{path} to be written", timeout=seconds)
    with open(path) as f:
        return f.read()


def open_gate(gate) -> None:
    """Let every ``held`` waiting on ``gate`` return."""
    _write(str(gate), "open")
