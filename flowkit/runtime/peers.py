"""The other workers, as seen from one: their resources, and sessions to them for running
stages there (a ``Router`` with the worker's own security). Who holds which stored object is
the store's to know (``WorkerStore.holders``)."""

from __future__ import annotations

import asyncio
import time

from .compat import scheduler_workers

__all__ = ["Peers"]


class Peers:
    """The other workers, as seen from this one: their resources and sessions to them (a
    ``Router`` with this worker's security)."""

    def __init__(self, deployment: str, worker, ttl: float = 1.0):
        from .router import Router

        self.worker = worker
        self.ttl = ttl
        # A peer that cannot be reached is not waited for: the stage runs here instead (WorkerGone).
        self.router = Router(deployment, worker.security.get_connection_args("worker"), retries=0,
                             wait_for_workers=5.0, connect_timeout=2.0, connect_attempts=1)
        self._identity: dict = {}
        self._identity_at = 0.0

    async def workers(self) -> dict:
        if time.monotonic() - self._identity_at > self.ttl:
            self._identity = await scheduler_workers(self.worker)
            self._identity_at = time.monotonic()
        return self._identity

    async def others(self) -> list[str]:
        return [a for a in await self.workers() if a != self.worker.address]

    async def call(self, target: str, kind: str, payload: bytes):
        return await asyncio.wrap_future(self.router.submit(kind, payload, worker=target))

    def close(self) -> None:
        self.router.close()
