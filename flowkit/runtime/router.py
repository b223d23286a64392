"""The client side of the request path: one session per worker, straight to the worker.

A background thread runs an asyncio loop holding one connection per worker: a dask comm (so
TLS applies), or on a plain-TCP cluster the worker's ``framed`` listener, which is lighter.
``submit`` hands a request to that loop, which sends it on the least-loaded session;
the answer resolves a ``concurrent.futures.Future``. When a connection is lost (a worker died or
was retired), every request in flight on it is sent again elsewhere, up to ``retries`` times,
then fails with ``WorkerLost``: no request is left hanging. A request abandoned by its caller
(a timeout, a cancelled future) still counts as its worker's load until the worker answers that
the threads it held are free: routing never sends new work to a worker still busy with it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import Callable

from ..errors import DeploymentClosed, FlowError, NoWorkers, WorkerLost
from . import protocol as p
from .dial import dial
from .protocol import CANCELLABLE
from .scaling import LOAD_WINDOW_S, InflightSamples
from .wire import loads

__all__ = ["Router", "Request", "WorkerGone"]

logger = logging.getLogger("flowkit.router")



class WorkerGone(WorkerLost):
    """A request for one particular worker could not run there: the worker is unreachable,
    was lost, or is leaving. The sender may run the work elsewhere."""


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


class Router:
    """Routes requests to worker sessions from a background event loop."""

    def __init__(self, deployment: str, connection_args: dict | None = None, retries: int = 2,
                 wait_for_workers: float = 60.0, on_done: Callable[[Request, bool], None] | None = None,
                 framed: bool | None = None, connect_timeout: float = 10.0, connect_attempts: int = 3):
        self.deployment = deployment
        self.connect_timeout = connect_timeout    # per dial of a worker (a dead one refuses until then)
        self.connect_attempts = connect_attempts  # dials of a worker a request is meant for
        self.connection_args = connection_args or {}
        # sessions over the workers' framed TCP listeners where the cluster is plain TCP (see framed.py)
        self.framed = os.environ.get("FLOWKIT_FRAMED", "1") != "0" if framed is None else framed
        self.retries = retries
        self.wait_for_workers = wait_for_workers
        self.on_done = on_done
        self.sessions: dict[str, Session] = {}
        self.connecting: dict[str, asyncio.Future] = {}
        self.waiting: list[Request] = []
        self.draining: set[Session] = set()   # sessions of leaving workers, open for answers still due
        self._tasks: set = set()
        self.ids = itertools.count(1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"flowkit-router-{deployment}", daemon=True)
        self.thread.start()
        self.ready = threading.Event()
        self.load = InflightSamples(lambda: sum(s.busy for s in self.sessions.values()) + len(self.waiting))
        self._timer = asyncio.run_coroutine_threadsafe(self._expire_waiting(), self.loop)
        self._sampler = asyncio.run_coroutine_threadsafe(self.load.sample(), self.loop)

    # -- called from any thread -------------------------------------------------------------
    def add_worker(self, address: str) -> None:
        self.loop.call_soon_threadsafe(self._spawn_connect, address)

    def submit(self, kind: str, payload: bytes | None = None, worker: str | None = None,
               prefer: str | None = None) -> Future:
        """Send a request to the least-loaded worker (or to ``worker``; or to ``prefer`` unless it
        has more than one request per thread more in flight than the least-loaded); a Future of
        the answer.

        A ``run``'s or ``stage``'s Future can be cancelled until it is done: the request is then
        abandoned (its worker is told to stop it, and nothing is sent if it was not yet)."""
        fut: Future = Future()
        req = Request(kind, payload, fut, target=worker, prefer=prefer)
        if kind in CANCELLABLE:   # (a weak reference: a future holding its request in a callback made a
            # reference cycle per request, and the garbage collector's pauses stalled serving)
            ref = weakref.ref(req)
            fut.add_done_callback(lambda f: f.cancelled() and (r := ref()) is not None
                                  and self.loop.call_soon_threadsafe(self._abandon, r))
        else:
            fut.set_running_or_notify_cancel()
        self.loop.call_soon_threadsafe(self._dispatch, req)
        return fut

    def broadcast(self, kind: str, payload: bytes | None = None, timeout: float = 10.0) -> list:
        """Send one request to every connected worker and wait for all the answers."""
        async def gather():
            futs = []
            for s in list(self.sessions.values()):
                fut: Future = Future()
                fut.set_running_or_notify_cancel()
                req = Request(kind, payload, fut, id=next(self.ids), attempts=self.retries)
                futs.append(fut)
                s.assign(req)
            return futs

        futs = asyncio.run_coroutine_threadsafe(gather(), self.loop).result(timeout)
        out = []
        for f in futs:
            try:
                out.append(f.result(timeout))
            except Exception as e:  # a worker that went away answers nothing
                logger.debug("broadcast %s: %s", kind, e)
        return out

    @property
    def workers(self) -> list[str]:
        return list(self.sessions)

    def inflight(self) -> int:
        """Requests occupying workers (abandoned ones still running included) or waiting for one."""
        sessions = list(self.sessions.values()) + list(self.draining)
        return sum(s.busy for s in sessions) + len(self.waiting)

    def mean_inflight(self, seconds: float = LOAD_WINDOW_S) -> float:
        """Mean requests in flight over the last ``seconds`` (``scaling.InflightSamples``); none
        sampled there: those in flight now."""
        return self.load.mean(seconds, self.inflight)

    def threads_per_worker(self) -> int:
        sessions = list(self.sessions.values())
        return max(1, round(sum(s.nthreads for s in sessions) / len(sessions))) if sessions else 1

    def close(self) -> None:
        async def shutdown():
            closed = DeploymentClosed("the deployment was closed before this request finished")
            sessions = list(self.sessions.values()) + list(self.draining)
            for req in [r for s in sessions for r in s.inflight.values()] + self.waiting:   # answered first
                self._fail(req, closed)
            self.sessions.clear()
            self.draining.clear()
            self.waiting.clear()
            for s in sessions:
                s.closed = True
                try:
                    await asyncio.wait_for(s.tell(p.Close()), 1)
                    await asyncio.wait_for(s.comm.close(), 1)
                except Exception:
                    s.comm.abort()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            if others:   # let them end here, not be destroyed pending with the loop
                await asyncio.wait(others, timeout=1)

        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    # -- on the loop ------------------------------------------------------------------------
    def _spawn(self, coro) -> asyncio.Task:
        """A task the router holds until it ends. asyncio keeps tasks only weakly, and a session's
        reader waiting on a plain asyncio stream is reachable from nothing else (the stream's
        protocol holds its reader weakly): unheld, a drained session's reader was garbage-collected
        with the answers it was still waiting for."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_connect(self, address: str) -> None:
        if address not in self.sessions and address not in self.connecting:
            self.connecting[address] = self._spawn(self._connect(address))

    async def _session_for(self, address: str, attempts: int = 3) -> "Session | None":
        if address in self.sessions:
            return self.sessions[address]
        if address not in self.connecting:
            self.connecting[address] = self._spawn(self._connect(address, attempts))
        await asyncio.shield(self.connecting[address])
        return self.sessions.get(address)

    async def _connect(self, address: str, attempts: int = 20) -> None:
        try:
            for i in range(attempts):
                comm, welcome = await dial(address, self.deployment, self.connection_args, self.connect_timeout,
                                           self.framed)
                if welcome.ok:
                    session = Session(self, address, comm, welcome.nthreads)
                    self.sessions[address] = session
                    self._spawn(session.read_forever())
                    self.ready.set()
                    waiting, self.waiting = self.waiting, []
                    for req in waiting:
                        self._dispatch(req)
                    return
                if "is not set up" not in welcome.error and i >= 2:
                    return  # the worker is gone
                await asyncio.sleep(min(0.05 * 2 ** i, 1.0))
        finally:
            self.connecting.pop(address, None)

    def _dispatch(self, req: Request) -> None:
        if req.future.cancelled():
            return
        self.load.wake()
        if req.id == 0:
            req.id = next(self.ids)
        if req.target is not None:
            self._spawn(self._send_to(req))
            return
        if not self.sessions:
            req.waited_since = req.waited_since or time.monotonic()
            self.waiting.append(req)
            return
        session = min(self.sessions.values(), key=lambda s: (s.load, s.address in req.workers))
        preferred = self.sessions.get(req.prefer) if req.prefer and not req.workers else None
        if preferred is not None and preferred.load <= session.load + 1:
            session = preferred
        req.workers.append(session.address)
        session.assign(req)

    async def _send_to(self, req: Request) -> None:
        session = await self._session_for(req.target, self.connect_attempts)
        if session is None:
            self._fail(req, WorkerGone(f"worker {req.target} is not reachable"))
        else:
            req.workers.append(session.address)
            session.assign(req)

    def _resolve(self, req: Request, answer: p.Answer) -> None:
        try:
            if answer.ok:
                outcome = loads(answer.payload) if answer.payload is not None else \
                    (answer.stats if answer.stats is not None else True)
            else:
                err = answer.error
                outcome = loads(err) if isinstance(err, bytes) else FlowError(str(err))
        except BaseException as e:   # an answer that cannot be read fails its request
            outcome, answer = e, replace(answer, ok=False)
        self._settle(req, outcome, answer.ok)

    def _settle(self, req: Request, outcome, ok: bool) -> None:
        """Give ``req``'s Future its result (``ok``) or exception, unless it is already done —
        its caller may cancel it at any moment, also between a check and the setting, from
        another thread: then its abandonment (``_abandon``) accounts for it instead."""
        try:
            if ok:
                req.future.set_result(outcome)
            else:
                req.future.set_exception(outcome)
        except InvalidStateError:
            return
        if self.on_done is not None:
            self.on_done(req, ok)

    def _abandon(self, req: Request) -> None:
        """``req``'s Future was cancelled: its worker, if it has it, stops it."""
        if req in self.waiting:
            self.waiting.remove(req)
        for session in list(self.sessions.values()) + list(self.draining):
            if session.inflight.get(req.id) is req:
                del session.inflight[req.id]
                session.abandoned.add(req.id)
                self._spawn(session.tell(p.Abandon(req.id)))
                self._close_if_drained(session)
                break
        if self.on_done is not None:
            self.on_done(req, False)

    def _close_if_drained(self, session: Session) -> bool:
        """Close a leaving worker's session once it owes no more answers; whether it did."""
        if session.inflight or session not in self.draining:
            return False
        self.draining.discard(session)
        session.closed = True
        self._spawn(session.comm.close())
        return True

    def _fail(self, req: Request, exc: BaseException) -> None:
        self._settle(req, exc, False)

    async def _lost(self, session: Session) -> None:
        """Drop a broken session and send its requests again elsewhere.

        Safe to call more than once: a send that was waiting on the session when it broke
        comes here too, and its request must not be forgotten."""
        if self.sessions.get(session.address) is session:
            del self.sessions[session.address]
        self.draining.discard(session)
        session.accepting = False
        session.comm.abort()
        inflight, session.inflight = list(session.inflight.values()), {}
        session.abandoned.clear()
        if session.closed:
            return
        if inflight:
            logger.warning("lost worker %s with %d requests in flight; re-sending them", session.address, len(inflight))
        for req in inflight:
            self._retry(req, "lost with its worker")

    def _drain(self, session: Session, req: Request) -> None:
        """The worker answered that it is leaving the deployment (retired, scaled down, shut
        down): route nothing more to it and send ``req`` again elsewhere. Its connection stays
        open for the answers of requests it is still running."""
        if self.sessions.get(session.address) is session:
            del self.sessions[session.address]
            logger.info("worker %s is leaving deployment %s", session.address, self.deployment)
        session.accepting = False
        self.draining.add(session)
        self._retry(req, "turned away by its leaving worker")

    def _retry(self, req: Request, what: str) -> None:
        req.attempts += 1
        if req.target is not None:
            self._fail(req, WorkerGone(f"worker {req.target} went away while running request {req.id}"))
        elif req.attempts > self.retries:
            self._fail(req, WorkerLost(f"request {req.id} was {what} {req.attempts} times "
                                       f"({', '.join(req.workers)}); giving up"))
        else:
            self._dispatch(req)

    async def _expire_waiting(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            keep = []
            for req in self.waiting:
                if now - (req.waited_since or now) > self.wait_for_workers:
                    self._fail(req, NoWorkers(f"no worker became available within {self.wait_for_workers:g} s"))
                else:
                    keep.append(req)
            self.waiting = keep


