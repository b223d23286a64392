"""The stage executor: one deployment's plan on one worker.

``WorkerDeployment`` runs a request stage by stage, always in the deployment's threads (never on
the worker's event loop: one deployment's slow request must not delay another's), and places
each stage where it belongs: a batching stage joins this worker's batch queue, a
``lookup_split`` stage goes to the worker holding most of its keys, a GPU stage to a worker with
a ``GPU`` resource, and the replicas of a high-variance stage race on distinct workers
(``execution``, deciding with ``racing``). The session (``session``) hands it calls.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..plan import AnyOf, Plan, Stage
from ..table import Table
from . import protocol as p
from .batcher import Batcher
from .execution import Execution
from .cancel import Cancelled, Token, running_under, wait_from_thread
from .ingress import http_counts, limit_http, serve_http, unserve_http
from .compat import worker_resources, worker_threads
from .peers import Peers
from .router import WorkerGone
from .reference import evaluate
from .semantics import apply, callable_for, run_batched
from .stats import SERVED, STORE, StageStats
from .store_worker import RequestStore, WorkerStore, holder_of_most, store_key
from .wire import dumps, dumps_error, dumps_table, loads

__all__ = ["WorkerDeployment", "request_threads", "stuck", "until_stuck", "usual_time"]

logger = logging.getLogger("flowkit.worker")

#: a worker is stuck (``WorkerDeployment.stuck``) when its oldest work has taken this many times
#: as long as its work usually takes, and at least this many seconds
STUCK, STUCK_FLOOR_S = 4.0, 0.005

#: the pool threads a request's work occupies, shared by the tasks the request starts (the
#: session's task for the request sets it; the tasks it creates inherit it)
request_threads: contextvars.ContextVar[set] = contextvars.ContextVar("flowkit_request_threads")


def stuck(work, threads: int, typical: float, now: float) -> bool:
    """Whether ``work`` submitted to ``threads`` threads and not finished by ``now`` (for each,
    when it was submitted, in monotonic seconds, and its rows: a batch's, else 1) holds them
    stuck: every thread is busy and some work has taken ``STUCK`` times as long as work there
    usually takes a row (``typical`` seconds), and at least ``STUCK_FLOOR_S``, per row of its
    own (a batch of four rows may take four times a row's time). A worker merely busy is not
    stuck: a request reaching it waits for a thread (or joins a batch) rather than paying a hop
    to another worker that may be as busy; one held by a slow or abandoned request sends it on
    (``WorkerDeployment.run_elsewhere``), and rows waiting for an eager batch go on a thread of
    their own (``batcher.batch_wait``)."""
    return until_stuck(work, threads, typical, now) < 0


def until_stuck(work, threads: int, typical: float, now: float) -> float:
    """Seconds from ``now`` until that ``work`` holds the threads ``stuck`` (negative: it does;
    inf: a thread is free).

    >>> until_stuck([(0.0, 1)], 1, 0.010, 0.015), until_stuck([(0.0, 2)], 1, 0.010, 0.045)
    (0.025, 0.035)
    >>> until_stuck([], 1, 0.010, 9.0)
    inf
    """
    if len(work) < threads:
        return math.inf
    limit = max(STUCK_FLOOR_S, STUCK * typical)
    return min(t + rows * limit for t, rows in work) - now


def usual_time(typical: float, took: float) -> float:
    """The moving average of how long work takes a row (``typical`` seconds) after work that
    took ``took`` a row. Work that overstayed (``stuck``) counts as the limit it passed: one
    abandoned request must not make its worker slow to call itself stuck the next time; a
    worker whose work really grows slower still adapts, the limit rising with each such sample."""
    return typical + 0.05 * (min(took, max(STUCK_FLOOR_S, STUCK * typical)) - typical)


class WorkerDeployment:
    """One deployment's plan on one worker: its threads, batchers, peers and statistics.

    A request runs here stage by stage. A plan with nothing to place or race runs in one hop to
    the deployment's threads; so does one whose only placed stages are ``lookup_split`` ones (the
    thread waits for such a stage run elsewhere). Otherwise each stage is placed: a batching stage
    joins this worker's batch queue; a ``lookup_split`` stage goes to the worker holding most of
    its keys; a GPU stage goes to a worker with a ``GPU`` resource when this one has none;
    replicas of a high-variance stage run on distinct workers, the first result wins and the
    others are cancelled (their tokens are set; remote ones are abandoned, as a client abandons
    a request).
    """

    def __init__(self, deployment: str, plan: Plan, worker, options: dict):
        self.id = deployment
        self.plan = plan
        self.worker = worker
        self.ops = plan.nodes[1:]
        self.by_name = {op.name: op for op in self.ops}
        self.source = plan.source.name
        self.stats = {op.name: StageStats() for op in self.ops}
        self.served = StageStats()   # requests this worker's own HTTP endpoint served, end to end
        self.served_recent: deque = deque(maxlen=8192)   # and each one's (time.monotonic() finished, seconds)
        self.simple = not any(isinstance(op, AnyOf) or op.is_gpu or
                              (isinstance(op, Stage) and (op.batching or op.lookup_split)) for op in self.ops)
        # whether only lookup_split stages are placed: then a request runs in one of the threads,
        # which waits for a stage that belongs on another worker (see _run_placed)
        self.one_thread = not self.simple and not any(isinstance(op, AnyOf) or op.is_gpu or
                                                      (isinstance(op, Stage) and op.batching) for op in self.ops)
        threads = self.threads = max(1, worker_threads(worker))
        self.busy = 0     # stage executions running or queued in this deployment's threads
        self.racing = 0   # races this worker coordinates whose first replica has not started (execution._race)
        self.hedge_wins = {op.name: deque(maxlen=50) for op in self.ops if isinstance(op, AnyOf)}   # recent hedges: won?
        self.hedges_held = {op.name: 0 for op in self.ops if isinstance(op, AnyOf)}
        # Racing replicas, remote stages and batches must not queue behind each other.
        self.pool = ThreadPoolExecutor(threads if self.simple else threads * 8, thread_name_prefix=f"flowkit-{deployment}")
        # A one_thread request may wait in its thread for a stage on another worker; such stages
        # run in ``pool``, whose threads never wait for another worker: two workers' requests
        # cannot end up waiting for each other's threads.
        self.requests = ThreadPoolExecutor(threads * 8, thread_name_prefix=f"flowkit-{deployment}-requests") \
            if self.one_thread else self.pool
        self.store = WorkerStore(deployment, worker)
        self._peers: Peers | None = None
        # pool work submitted and not finished (abandoned requests' included): when each was
        # submitted, and its rows (a batch's; 1 for other work)
        self.working: dict = {}
        self.typical = 0.0   # a moving average of the seconds pool work takes a row, submitted to finished
        self._turn = 0
        self.batchers = {op.name: Batcher(self, op) for op in self.ops if isinstance(op, Stage) and op.batching}
        self.windows_version = 0   # of the batch windows and race widths last set live (set_live)
        # replicas racing per race whose width a latency plan set (each on a worker of its own, up to
        # those deployed: execution._race); a race not listed races every replica deployed
        self.race_widths: dict[str, int] = dict(options.get("race_widths", {}))
        self.tuned = False         # whether its set-up froze the worker's heap (plugin.freeze_heap)
        self.closed = False

    @property
    def peers(self) -> Peers:
        """The other workers, and sessions to them (made on first use: a plain plan on a worker
        that is never saturated needs none)."""
        if self._peers is None:
            self._peers = Peers(self.id, self.worker)
        return self._peers

    def stuck(self, now: float) -> bool:
        """Whether a request reaching this worker now would wait behind stuck work (``stuck``)."""
        return self.until_stuck(now) < 0

    def until_stuck(self, now: float) -> float:
        """Seconds until this worker's work holds its threads stuck (``until_stuck``)."""
        return until_stuck(tuple(self.working.values()), self.threads, self.typical, now)

    def _finished(self, work) -> None:
        """(A done callback, in the thread that ran ``work``.)"""
        t0, rows = self.working.pop(work, (None, 1))
        if t0 is not None:
            self.typical = usual_time(self.typical, (time.monotonic() - t0) / rows)

    async def run_elsewhere(self, table):
        """``table``'s request run by another worker (turn by turn over the others), or None
        when there is no other: what a worker serving HTTP does while it is ``stuck``."""
        others = await self.peers.others()
        if not others:
            return None
        self._turn += 1
        target = others[self._turn % len(others)]
        self.served.count("sent to another worker")
        return await self.peers.call(target, "run", dumps(table))

    @property
    def has_gpu(self) -> bool:
        """Whether this worker declares a ``GPU`` resource now (the GPU plugin declares it, also
        after this deployment was set up)."""
        return worker_resources(self.worker).get("GPU", 0) > 0

    def load_models(self) -> None:
        """Create the one instance per process of every class operator this worker may run
        (GPU ones only on a worker with a GPU). A constructor that fails is logged here and
        raised again, as an ``OperatorError``, by the first request that needs it."""
        for op in self.ops:
            for m in op.operators:
                fn = getattr(m, "fn", None)
                if isinstance(fn, type) and (self.has_gpu or not m.is_gpu):
                    try:
                        callable_for(fn)
                    except Exception as e:
                        logger.warning("deployment %s: creating %s for operator %r failed: %r",
                                       self.id, fn.__name__, m.name, e)

    def set_live(self, version: int, windows: dict, widths: dict) -> None:
        """Set batch windows (``{stage: (max_batch, max_wait_ms)}``) and race widths (``{race:
        replicas}``) unless a later version was set already."""
        if version <= self.windows_version:
            return
        self.windows_version = version
        for name, (b, w) in windows.items():
            if name in self.batchers:
                self.batchers[name].resize(b, w)
        self.race_widths.update({name: k for name, k in widths.items() if isinstance(self.by_name.get(name), AnyOf)})

    def close(self) -> None:
        self.closed = True
        unserve_http(self)
        for b in self.batchers.values():
            b.close()
        if self._peers is not None:
            self._peers.close()
        for pool in {self.pool, self.requests}:
            pool.shutdown(wait=False, cancel_futures=True)

    def served_since(self, since: float) -> tuple[float, list[tuple[float, float]], int]:
        """(now, the requests its HTTP endpoints finished after ``since`` and by now, their
        requests in flight now), on this process's monotonic clock; read from the newest back
        (they were kept in the order they finished)."""
        now, out = time.monotonic(), []
        for t, s in reversed(self.served_recent):
            if t <= since:
                break
            if t <= now:
                out.append((t, s))
        return now, out[::-1], http_counts(self)["inflight"]

    # -- the session protocol ----------------------------------------------------------------
    async def handle(self, call: p.Call, token: Token | None = None) -> p.Answer:
        """Answer one call of the session protocol; a ``run`` or ``stage`` runs under ``token``,
        which the session sets when its sender abandons it."""
        kind, rid = call.kind, call.id
        if self.closed:
            return self._leaving(rid)
        try:
            if kind == "run":
                out = await self.run(loads(call.payload), token)
                return p.Answer(rid, True, payload=dumps_table(out))
            if kind == "stage":   # a peer placed this stage here: batched here if it batches
                name, inputs = loads(call.payload)
                out = await (self.batchers[name].submit(inputs[0]) if name in self.batchers
                             else self.local(self.by_name[name], inputs, token))
                return p.Answer(rid, True, payload=dumps(out))
            if kind == "stats":
                return p.Answer(rid, True, stats=self.snapshot())
            if kind == "serve":   # serve HTTP here too (see ingress)
                return p.Answer(rid, True, payload=dumps(await serve_http(self, loads(call.payload))))
            if kind == "http":   # what this worker's HTTP endpoint answered
                return p.Answer(rid, True, payload=dumps(http_counts(self)))
            if kind == "recent":   # the requests its HTTP endpoints finished since (payload) its monotonic time
                return p.Answer(rid, True, payload=dumps(self.served_since(loads(call.payload))))
            if kind == "unserve":
                unserve_http(self, loads(call.payload))
                return p.Answer(rid, True)
            if kind == "limit":    # the deployment's max_inflight changed (a live re-plan sheds earlier)
                limit_http(self, loads(call.payload))
                return p.Answer(rid, True)
            if kind == "window":   # a live re-plan set batch windows and race widths (see windows)
                self.set_live(*loads(call.payload))
                return p.Answer(rid, True)
            if kind == "forget":   # dep.put stored this key again: drop where it was remembered
                self.store.forget(*loads(call.payload))
                return p.Answer(rid, True)
            if kind == "keep":     # dep.put(..., broadcast=True): a copy for this worker (unpickled off the loop)
                self.store.keep(*await asyncio.to_thread(loads, call.payload))
                return p.Answer(rid, True)
            raise ValueError(f"unknown request kind {kind!r}")
        except asyncio.CancelledError:
            if self.closed and not asyncio.current_task().cancelling():
                return self._leaving(rid)   # its queued work was dropped as the worker left
            raise
        except BaseException as e:  # every failure goes back to the requester; the session lives on
            if self.closed:         # it failed because this worker is leaving: not the request's fault
                return self._leaving(rid)
            return p.Answer(rid, False, error=dumps_error(e))

    def _leaving(self, rid) -> p.Answer:
        """The answer of a worker leaving the deployment: the router sends the request elsewhere."""
        return p.Answer(rid, False, leaving=True, error=f"worker {self.worker.address} is leaving deployment {self.id!r}")

    # -- running a request -------------------------------------------------------------------
    async def run(self, table, token: Token | None = None):
        if self.simple:
            return await self.in_thread(self._run_all, table, token)
        if self.one_thread:
            token = token or Token()
            elsewhere: set = set()   # the stage running on another worker for this request, if any
            try:
                return await self.in_thread(self._run_placed, table, token, asyncio.get_running_loop(), elsewhere,
                                            pool=self.requests)
            except asyncio.CancelledError:   # abandoned: so is that stage (the thread stops at its token)
                token.cancel("the request was cancelled")   # (first: see wait_from_thread)
                for fut in list(elsewhere):
                    fut.cancel()
                raise
        return await Execution(self, table, token).value(self.plan.output)

    async def in_thread(self, fn, *args, pool: ThreadPoolExecutor | None = None, rows: int = 1):
        """``fn(*args)`` in the deployment's threads (``pool``), counted among the threads its
        request holds (see ``session``): user code never runs on the worker's event loop, whose
        other sessions, deployments and heartbeats it would hold up for as long as it ran.
        ``rows``: a batch's (how long the work may take before it is ``stuck``)."""
        work = (pool or self.pool).submit(fn, *args)
        self.working[work] = (time.monotonic(), rows)
        work.add_done_callback(self._finished)
        held = request_threads.get(None)
        if held is not None:
            held.add(work)
            work.add_done_callback(held.discard)
        return await asyncio.wrap_future(work)

    def _run_all(self, table, token: Token | None = None):
        """The whole plan in this thread, by the reference executor's own evaluation."""
        return evaluate(self.ops, {self.source: table}, self.plan.output, RequestStore(self.store),
                        apply=lambda op, inputs, ctx: self.apply(op, inputs, ctx, token))

    def _run_placed(self, table, token: Token, loop, elsewhere: set):
        """The whole plan in this thread, like ``_run_all``, except that a ``lookup_split`` stage
        whose keys another worker holds runs there (one hop for the request, not one per stage):
        this thread waits for it, and runs it here after all when that worker has gone."""
        def apply(op, inputs, ctx):
            if token.is_cancelled:   # (before sending a stage elsewhere)
                raise Cancelled(token.reason)
            if not self._here_for_sure(op, inputs):
                target = wait_from_thread(loop, self.place(op, inputs), elsewhere, token)
                if target is not None:
                    sent, out = wait_from_thread(loop, self._send(target, op, inputs), elsewhere, token)
                    if sent:
                        return out
            return self.apply(op, inputs, ctx, token)

        return evaluate(self.ops, {self.source: table}, self.plan.output, RequestStore(self.store), apply=apply)

    def apply(self, op, inputs, ctx, token: Token | None = None, batched: bool = False):
        """``op`` over ``inputs`` (with ``batched``: a batching stage over several requests' tables,
        see ``run_batched``), timed into the stage's statistics."""
        # CPU time is measured only for racing replicas: their share decides hedging (_race).
        t0, c0 = time.perf_counter(), (time.thread_time() if getattr(op, "replica_of", None) else None)
        try:
            with running_under(token):
                out = run_batched(op, inputs, ctx) if batched else apply(op, inputs, ctx)
        except Cancelled:
            self.stats[op.name].count("cancelled")
            raise
        except BaseException:
            self.stats[op.name].record(time.perf_counter() - t0, ok=False)
            raise
        if token is not None and token.is_cancelled:   # it returned early when asked to stop: not a latency
            self.stats[op.name].count("cancelled")
            raise Cancelled(token.reason)
        self.stats[op.name].record(time.perf_counter() - t0, cpu=None if c0 is None else time.thread_time() - c0)
        return out

    async def local(self, op, inputs, token: Token | None = None, batched: bool = False):
        self.busy += 1
        try:
            return await self.in_thread(self.apply, op, inputs, RequestStore(self.store), token, batched,
                                        rows=sum(map(len, inputs)) if batched else 1)
        finally:
            self.busy -= 1
            for b in self.batchers.values():   # eager batches wait for a free thread
                b.thread_freed()

    async def execute(self, op, inputs, token: Token | None = None):
        """Run one stage where it belongs (see the class docstring); none of a request abandoned."""
        if token is not None and token.is_cancelled:
            raise Cancelled(token.reason)
        if op.name in self.batchers and not (op.is_gpu and not self.has_gpu):   # (a GPU one batches on its GPU)
            return await self.batchers[op.name].submit(inputs[0])
        target = await self.place(op, inputs)
        if target is not None:
            sent, out = await self._send(target, op, inputs)
            if sent:
                return out
        return await self.local(op, inputs, token)

    async def _send(self, target: str, op, inputs) -> tuple[bool, object]:
        """``(True, output)`` of ``op`` run on ``target``; ``(False, None)`` when that worker has
        gone (the caller runs it here instead)."""
        self.stats[op.name].count("sent to another worker")
        try:
            return True, await self.remote(target, op, inputs)
        except WorkerGone:
            return False, None

    def _here_for_sure(self, op, inputs) -> bool:
        """Whether ``op`` runs here without asking anyone: it is no ``lookup_split`` or GPU stage
        to place, or this worker holds every object it reads."""
        dkeys = self._stored_keys(op, inputs)
        return self.store.held_here(dkeys) if dkeys else not (op.is_gpu and not self.has_gpu)

    async def place(self, op, inputs) -> str | None:
        """The worker that should run ``op`` (None: this one)."""
        dkeys = self._stored_keys(op, inputs)
        if dkeys:
            if self.store.held_here(dkeys):   # (nobody holds more: nothing to ask)
                return None
            return holder_of_most((await self.store.holders(dkeys)).values(), self.worker.address)
        if op.is_gpu and not self.has_gpu:
            gpus = [a for a, w in (await self.peers.workers()).items()
                    if (w.get("resources") or {}).get("GPU", 0) > 0 and a != self.worker.address]
            return gpus[0] if gpus else None
        return None

    def _stored_keys(self, op, inputs) -> list[str]:
        """The dask keys of the stored objects a ``lookup_split`` stage reads (none for another stage)."""
        if not (isinstance(op, Stage) and op.lookup_split and inputs and isinstance(inputs[0], Table)):
            return []
        keys = {k for k in inputs[0].column(op.members[0].key) if k is not None}
        return [store_key(self.id, k) for k in keys]

    async def remote(self, target: str, op, inputs):
        """Run ``op`` on worker ``target``. Cancelling this (a lost race, an abandoned request)
        abandons the stage there, as a client abandons a request."""
        return await self.peers.call(target, "stage", dumps((op.name, inputs)))

    def snapshot(self) -> dict:
        snap = {name: s.snapshot() for name, s in self.stats.items()}
        snap[STORE] = self.store.stats.snapshot()
        snap[SERVED] = self.served.snapshot()
        windows = {name: (b.max_batch, b.max_wait * 1000) for name, b in self.batchers.items()}
        return {"worker": self.worker.address, "stages": snap, "windows": windows, "race_widths": dict(self.race_widths)}
