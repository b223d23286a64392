"""Client: batch windows resized live, on every worker of a deployment and on each that joins.

A re-plan (``replanner``) may give a batching stage another ``(max_batch, max_wait_ms)``. The
deployed plan stays; each worker's ``Batcher`` takes the new window (``executor``'s
``resize_batches``). Each resize carries a version, so a worker that hears two (a newcomer sent
the windows as it joined while a resize went out) keeps the later one.
"""

from __future__ import annotations

import logging
import threading

from .wire import dumps

__all__ = ["BatchWindows"]

logger = logging.getLogger("flowkit.windows")


class BatchWindows:
    """The windows set live (``{stage: (max_batch, max_wait_ms)}``) and the workers to tell."""

    def __init__(self, router):
        self.router = router
        self.windows: dict[str, tuple[int, float]] = {}
        self.version = 0
        self.workers: set[str] = set()
        self.lock = threading.RLock()   # (a done callback may run at once, in the thread holding it)

    def joined(self, address: str) -> None:
        """A worker that took the deployment: it gets the windows set so far."""
        with self.lock:
            self.workers.add(address)
            if self.windows:
                self._send(address)

    def resize(self, windows: dict[str, tuple[int, float]]) -> None:
        """Set these windows on every worker (not waiting for their answers)."""
        with self.lock:
            self.windows.update(windows)
            self.version += 1
            for address in self.workers | set(self.router.workers):
                self._send(address)

    def _send(self, address: str) -> None:
        fut = self.router.submit("window", dumps((self.version, dict(self.windows))), worker=address)
        fut.add_done_callback(lambda f: f.exception() is not None and self._gone(address, f.exception()))

    def _gone(self, address: str, error: BaseException) -> None:
        """A worker that could not be told is forgotten (one that comes back joins again)."""
        logger.debug("windows for %s: %s", address, error)
        with self.lock:
            self.workers.discard(address)
