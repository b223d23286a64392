"""What a deployment served lately, as the client's re-planner and serving autoscaler measure
it: the requests sent from this process (``Deployment.submit``) and — while the workers serve
HTTP themselves (``endpoints.WorkerEndpoints``) — those their endpoints served, as the workers
report them (``ServedByWorkers``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .endpoints import WorkerEndpoints
from .scaling import Load, load_of
from .wire import dumps

__all__ = ["RecentRequests", "ServedByWorkers"]

logger = logging.getLogger("flowkit.http")


class RecentRequests:
    """The requests ``dep`` finished lately, each as ``(finish time on this process's
    ``time.perf_counter()``, latency s)``: ``record`` adds one sent from this process; those
    the workers' endpoints served come from them (``ServedByWorkers``), from arrival at the
    endpoint to the answer."""

    def __init__(self, dep, keep: int = 8192):
        self.dep = dep
        self.here: deque = deque(maxlen=keep)
        self.by_workers = ServedByWorkers(dep)

    def record(self, finished: float, seconds: float) -> None:
        self.here.append((finished, seconds))

    def _workers_serve(self) -> bool:
        return any(isinstance(s, WorkerEndpoints) and not s.stopped for s in self.dep._servers)

    def _from_workers(self) -> list[tuple[float, float]]:
        """Ask the workers for what their endpoints served (answers arrive later), when they
        serve; what has arrived."""
        if self._workers_serve():
            self.by_workers.ask()
        return self.by_workers.finished

    def within(self, seconds: float) -> list[tuple[float, float]]:
        """Those finished in the last ``seconds``."""
        now = time.perf_counter()
        return [(t, s) for t, s in list(self.here) + self._from_workers() if now - t <= seconds]

    def until(self) -> float:
        """The time up to which every request finished is recorded: now, unless the workers serve
        HTTP themselves — then when their last reports arrived, about a second ago
        (``ServedByWorkers.complete_until``)."""
        now = time.perf_counter()
        until = self.by_workers.complete_until() if self._workers_serve() else None
        return now if until is None else min(now, until)

    def load(self, mean_inflight: float, threads_per_worker: int) -> Load:
        """The serving autoscaler's measure (``scaling.load_of``), over a window that ends at
        ``until``."""
        served = self._from_workers()
        return load_of(self.until(), list(self.here), served, mean_inflight, self.by_workers.inflight,
                       threads_per_worker)


class ServedByWorkers:
    """What the workers' own HTTP endpoints served, as the client's re-planner and autoscaler
    need it (``Deployment.recent``, ``Deployment._load``): each call of ``ask`` sends every
    worker of the deployment a ``recent`` call with its cursor (the worker's monotonic clock
    when it last answered) and returns at once; each answer, when it comes, adds the requests
    that worker finished since — their finish times turned into this process's
    ``perf_counter`` — and its requests in flight now. Nothing waits on the caller's thread,
    which may be dask's event loop (``Adaptive.target``): what is read is what has arrived,
    about one asking interval behind (``complete_until``). Requests older than ``keep_s`` are
    dropped."""

    def __init__(self, dep, keep_s: float = 30.0):
        self.dep = dep
        self.keep_s = keep_s
        self._lock = threading.Lock()
        self._finished: dict[str, deque] = {}   # worker -> (perf_counter here, seconds), oldest first
        self._since: dict[str, float] = {}      # worker -> its clock when it last answered
        self._inflight: dict[str, int] = {}     # worker -> its endpoints' requests in flight then
        self._answered_at: dict[str, float] = {}   # worker -> perf_counter here when its answer arrived
        self._asking: set[str] = set()

    def ask(self) -> None:
        live = set(self.dep.workers)
        with self._lock:
            for gone in set(self._since) - live:   # a worker that left (what it served stays until old)
                del self._since[gone]
                self._inflight.pop(gone, None)
                self._answered_at.pop(gone, None)
            todo = [a for a in live if a not in self._asking]
            self._asking.update(todo)
            asked = time.perf_counter()
            for a in todo:   # a worker not heard from yet: complete only until it was first asked
                self._answered_at.setdefault(a, asked)
        for a in todo:
            try:
                fut = self.dep._router.submit("recent", dumps(self._since.get(a, -1.0)), worker=a)
            except Exception as e:   # a closing deployment
                logger.debug("recent requests: %s", e)
                with self._lock:
                    self._asking.discard(a)
                continue
            fut.add_done_callback(lambda f, a=a: self._answered(a, f))

    def _answered(self, address: str, fut) -> None:
        here = time.perf_counter()
        with self._lock:
            self._asking.discard(address)
            if fut.cancelled() or fut.exception() is not None:   # a worker that left answers nothing
                self._answered_at.pop(address, None)
                return
            there, served, inflight = fut.result()
            self._since[address] = there
            self._inflight[address] = inflight
            self._answered_at[address] = here
            kept = self._finished.setdefault(address, deque())
            kept.extend((here - (there - t), s) for t, s in served)
            for q in self._finished.values():
                while q and here - q[0][0] > self.keep_s:
                    q.popleft()

    @property
    def finished(self) -> list[tuple[float, float]]:
        """(finish time on this process's ``perf_counter``, seconds) of the requests served."""
        with self._lock:
            return [r for q in self._finished.values() for r in q]

    def complete_until(self, fresh_s: float = 3.0) -> float | None:
        """The time (this process's ``perf_counter``) up to which ``finished`` holds every request
        the workers served: the oldest of their last answers' arrivals (a worker not heard from
        yet: when it was first asked). A request finished later may not have been reported yet.
        Workers last heard from more than ``fresh_s`` ago are left out (one that stopped
        answering must not hold the time back for good); None when none is left."""
        now = time.perf_counter()
        with self._lock:
            return min((t for t in self._answered_at.values() if now - t <= fresh_s), default=None)

    @property
    def inflight(self) -> int:
        """The workers' endpoints' requests in flight, as they last said."""
        with self._lock:
            return sum(self._inflight.values())
