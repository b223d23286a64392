"""Cooperative cancellation: how a losing replica stops.

A running Python thread cannot be killed, so work is cancelled by asking it to stop: each unit
of work runs under a ``Token``; executors check it between operators and between rows
(``checkpoint``), and user code that loops for long can call ``flowkit.cancelled()`` itself.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import CancelledError

__all__ = ["Token", "Cancelled", "cancelled", "checkpoint", "running_under", "wait_from_thread"]

_local = threading.local()


class Cancelled(BaseException):
    """The work was cancelled (a competing replica won, or the request was abandoned).

    Like ``asyncio.CancelledError`` it derives from ``BaseException``, so user code's
    ``except Exception`` does not swallow it."""


class Token:
    """A cancellation flag shared by one unit of work and whoever may cancel it."""

    __slots__ = ("event", "reason")

    def __init__(self):
        self.event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self.event.set()

    @property
    def is_cancelled(self) -> bool:
        return self.event.is_set()


class running_under:
    """Context manager: run the enclosed code under ``token`` (in this thread)."""

    __slots__ = ("token", "previous")

    def __init__(self, token: Token | None):
        self.token = token

    def __enter__(self):
        self.previous = getattr(_local, "token", None)
        _local.token = self.token
        return self.token

    def __exit__(self, *exc):
        _local.token = self.previous


def cancelled() -> bool:
    """True when the work running in this thread has been cancelled (call it in long loops)."""
    token = getattr(_local, "token", None)
    return token is not None and token.event.is_set()


def checkpoint() -> None:
    """Raise ``Cancelled`` if the work running in this thread has been cancelled."""
    token = getattr(_local, "token", None)
    if token is not None and token.event.is_set():
        raise Cancelled(token.reason or "cancelled")


def wait_from_thread(loop: asyncio.AbstractEventLoop, coro, pending: set, token: Token):
    """``coro``'s result, run on the event ``loop`` and waited for in this (another) thread;
    ``pending`` holds its future meanwhile, for whoever abandons the work: they set ``token``,
    then cancel what ``pending`` holds (this then raises ``Cancelled``). A loop that stops (its
    worker is closing) ends the wait too."""
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    pending.add(fut)
    if token.is_cancelled:   # abandoned before it was held: nobody else will cancel it
        fut.cancel()
    try:
        while True:
            try:
                return fut.result(timeout=1.0)
            except TimeoutError:
                if not loop.is_running():
                    fut.cancel()
    except CancelledError:
        raise Cancelled(token.reason or "the request was cancelled") from None
    finally:
        pending.discard(fut)
