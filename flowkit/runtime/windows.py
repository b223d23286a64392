"""Client: batch windows and race widths set live, on every worker of a deployment and on each
that joins.

A re-plan (``replanner``) may give a batching stage another ``(max_batch, max_wait_ms)``, and a
race another width (how many of its deployed replicas race). The deployed plan stays; each
worker's ``Batcher`` takes the new window, its races the new width (``executor``'s
``set_live``). Each change carries a version, so a worker that hears two (a newcomer sent the
settings as it joined while a change went out) keeps the later one.
"""

from __future__ import annotations

import logging
import threading

from .wire import dumps

__all__ = ["BatchWindows"]

logger = logging.getLogger("flowkit.windows")


class BatchWindows:
    """The windows (``{stage: (max_batch, max_wait_ms)}``) and race widths (``{race: replicas}``)
    set live, and the workers to tell."""

    def __init__(self, router):
        self.router = router
        self.windows: dict[str, tuple[int, float]] = {}
        self.widths: dict[str, int] = {}
        self.version = 0
        self.workers: set[str] = set()
        self.lock = threading.RLock()   # (a done callback may run at once, in the thread holding it)

    def joined(self, address: str) -> None:
        """A worker that took the deployment: it gets the settings made so far."""
        with self.lock:
            self.workers.add(address)
            if self.windows or self.widths:
                self._send(address)

    def resize(self, windows: dict[str, tuple[int, float]], widths: dict[str, int] | None = None) -> None:
        """Set these windows and race widths on every worker (not waiting for their answers)."""
        with self.lock:
            self.windows.update(windows)
            self.widths.update(widths or {})
            self.version += 1
            for address in self.workers | set(self.router.workers):
                self._send(address)

    def _send(self, address: str) -> None:
        fut = self.router.submit("window", dumps((self.version, dict(self.windows), dict(self.widths))), worker=address)
        fut.add_done_callback(lambda f: f.exception() is not None and self._gone(address, f.exception()))

    def _gone(self, address: str, error: BaseException) -> None:
        """A worker that could not be told is forgotten (one that comes back joins again)."""
        logger.debug("windows for %s: %s", address, error)
        with self.lock:
            self.workers.discard(address)
