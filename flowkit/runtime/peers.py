"""The other workers, as seen from one: their resources, who holds which stored object, and
sessions to them for running stages there (a ``Router`` with the worker's own security)."""

from __future__ import annotations

import asyncio
import time

__all__ = ["Peers"]


class Peers:
    """The other workers, as seen from this one: their resources, who holds which stored
    object, and sessions to them (a ``Router`` with this worker's security)."""

    def __init__(self, deployment: str, worker, ttl: float = 1.0):
        from .router import Router

        self.worker = worker
        self.ttl = ttl
        self.router = Router(deployment, worker.security.get_connection_args("worker"), retries=0,
                             wait_for_workers=5.0)
        self._identity: dict = {}
        self._identity_at = 0.0
        self._holders: dict[str, tuple[float, list]] = {}

    async def workers(self) -> dict:
        if time.monotonic() - self._identity_at > self.ttl:
            ident = await self.worker.scheduler.identity()
            self._identity = {a: w for a, w in ident.get("workers", {}).items()
                              if w.get("status", "running") in ("running", "Status.running")}
            self._identity_at = time.monotonic()
        return self._identity

    async def others(self) -> list[str]:
        return [a for a in await self.workers() if a != self.worker.address]

    async def holders(self, dkeys: list[str]) -> dict[str, list]:
        now = time.monotonic()
        missing = [k for k in dkeys if now - self._holders.get(k, (-1e9, None))[0] > self.ttl]
        if missing:
            who = await self.worker.scheduler.who_has(keys=missing)
            for k in missing:
                self._holders[k] = (now, list(who.get(k, [])))
        return {k: self._holders[k][1] for k in dkeys}

    def forget(self, dkey: str) -> None:
        """``dkey`` was stored again: ask the scheduler where it lives next time."""
        self._holders.pop(dkey, None)

    async def call(self, target: str, kind: str, payload: bytes):
        return await asyncio.wrap_future(self.router.submit(kind, payload, worker=target))

    def close(self) -> None:
        self.router.close()
