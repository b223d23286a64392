"""The router's channel to one worker: the requests in flight on it, the abandoned ones still
running there, and the task that reads its answers.

A ``Session`` belongs to its ``Router`` (``router``), which decides where requests go; the
session counts them against its worker, writes them in order and hands each answer, a leaving
worker's refusal or a broken connection back to the router (``_resolve``, ``_drain``, ``_lost``).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from . import protocol as p

__all__ = ["Request", "Session"]


@dataclass(eq=False)
class Request:
    kind: str
    payload: bytes | None
    future: Future
    id: int = 0
    attempts: int = 0
    started: float = field(default_factory=time.perf_counter)
    workers: list = field(default_factory=list)
    waited_since: float | None = None
    target: str | None = None     # a request for one particular worker (not re-routed if it is lost)
    prefer: str | None = None     # a worker to send it to unless that one is busier than the others


class Session:
    def __init__(self, router: "Router", address: str, comm, nthreads: int):
        self.router = router
        self.address = address
        self.comm = comm
        self.nthreads = nthreads
        self.inflight: dict[int, Request] = {}
        self.abandoned: set[int] = set()   # ids of abandoned requests whose threads are still busy
        self.lock = asyncio.Lock()
        self.closed = False     # closed by the router on purpose
        self.accepting = True   # False once its connection broke or its worker is leaving

    @property
    def busy(self) -> int:
        """Requests occupying the worker: in flight, or abandoned but still running there."""
        return len(self.inflight) + len(self.abandoned)

    @property
    def load(self) -> float:
        """Requests occupying the worker, per worker thread."""
        return self.busy / self.nthreads

    def assign(self, req: Request) -> None:
        """Count ``req`` against this worker now (so the next routing decision, even in the same
        pass of the loop, sees it) and send it: at once where the connection can take it without
        waiting (``framed``'s ``write_now``), else from a task of its own (``send``)."""
        self.inflight[req.id] = req
        if not (self.accepting and not req.future.cancelled() and not self.lock.locked() and self._write_now(req)):
            self.router._spawn(self.send(req))

    def _write_now(self, req: Request) -> bool:
        """Whether ``req`` is dealt with here: written now, or its connection found broken (the
        router then sends it again elsewhere, with everything else in flight on it)."""
        write_now = getattr(self.comm, "write_now", None)
        if write_now is None:
            return False
        try:
            return write_now(p.encode(p.Call(req.kind, req.id, req.payload)))
        except Exception:
            self.router._spawn(self.router._lost(self))
            return True

    async def send(self, req: Request) -> None:
        if req.future.cancelled():   # abandoned before it left: it never reaches the worker
            if self.inflight.get(req.id) is req:
                del self.inflight[req.id]
            self.abandoned.discard(req.id)
            return
        if self.inflight.get(req.id) is not req:   # its connection broke meanwhile: re-sent elsewhere
            return
        if not self.accepting:   # its worker is leaving
            del self.inflight[req.id]
            self.router._dispatch(req)
            return
        try:
            async with self.lock:
                await self.comm.write(p.encode(p.Call(req.kind, req.id, req.payload)))
        except Exception:
            await self.router._lost(self)

    async def tell(self, msg) -> None:
        """Send a protocol message (``Abandon``, ``Close``) that is not answered as a call is."""
        try:
            async with self.lock:
                await self.comm.write(p.encode(msg))
        except Exception:
            pass   # a broken connection is noticed by its reader

    async def read_forever(self) -> None:
        try:
            while True:
                msg = p.decode(await self.comm.read())
                req = self.inflight.pop(msg.id, None)
                if req is None:   # an abandoned request's last word: its threads are free
                    self.abandoned.discard(msg.id)
                    continue
                if msg.leaving:   # its worker is retiring: no more requests go there
                    self.router._drain(self, req)
                else:
                    self.router._resolve(req, msg)
                if self.router._close_if_drained(self):   # a leaving worker's last answer
                    return
        except Exception:
            await self.router._lost(self)
