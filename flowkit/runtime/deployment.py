"""``fk.deploy``: serve a flow from a dask.distributed cluster.

A ``Deployment`` optimizes the flow, gives every worker the plan through a dask
``WorkerPlugin`` (so dask places it on new workers too), and sends requests straight to the
workers over one session each (see ``router.py`` and ``worker.py``). dask stays in charge of
the cluster: starting and adapting workers, restarting dead ones, holding stored objects.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Iterable, Mapping

from ..errors import DeploymentClosed, FlowError, Overloaded
from ..flow import Flow
from ..table import Table, as_table
from .clusters import connect
from .endpoints import WorkerEndpoints, open_server
from .plugin import ready_topic, register
from .progress import score_many
from .router import Request, Router
from .scaling import Load, ServingAdaptive
from .served import RecentRequests
from .stats import StageStats, stats_frame
from .store_client import StoredObjects, routing_column
from .windows import BatchWindows
from .wire import dumps, dumps_plan

__all__ = ["deploy", "Deployment"]

logger = logging.getLogger("flowkit.deploy")


def deploy(flow: Flow, cluster: Any = None, optimize: bool | Mapping[str, Any] = True, *, slo_ms: float | None = None,
           rate: float | None = None, profile=None, sample: Any = None, max_workers: int | None = None,
           max_inflight: int = 1000, retries: int = 2, timeout: float = 60.0, n_workers: int | None = None,
           tune_workers: bool | None = None) -> "Deployment":
    """Deploy ``flow`` on ``cluster`` and return the running ``Deployment`` (a context manager).

    ``cluster``: ``None`` starts the embedded default (an adaptive ``LocalCluster`` with worker
    processes, 1 to the number of cores; ``n_workers`` to start with); or a ``distributed.Client``,
    any dask ``Cluster`` object (dask-kubernetes, dask-jobqueue, dask-gateway ...), or a scheduler
    address. ``optimize``: True (default rules), False, or a dict of rules for ``fk.optimize``.
    ``max_inflight``: requests admitted at once (beyond: ``fk.Overloaded``); ``retries``: times a
    request whose worker died is sent again (then ``fk.WorkerLost``); ``timeout``: seconds to
    wait for workers (at deploy, and for a request no worker takes: ``fk.NoWorkers``).
    ``tune_workers``: tune the worker processes for serving — raise glibc's mmap threshold
    (model code runs up to 3x faster under dask's nanny settings; ``plugin.tune_malloc``) and
    freeze the garbage collector's heap once the models are in (a full collection of a dask
    worker's heap paused its event loop for over 100 ms; ``plugin.freeze_heap``), and heartbeat
    to the scheduler every 5 s rather than 0.5 s (``plugin.HEARTBEAT_S``); by default only on
    the embedded cluster, which flowkit owns — it changes the whole worker process.
    Returns once every worker of the cluster (or the ``n_workers`` asked for) holds the flow,
    or after ``timeout`` with at least one.

    A latency objective (docs/slo.md): ``slo_ms`` (end-to-end p99, ms) at ``rate`` (requests/s)
    plans fusion, batching, racing and the number of workers from stage profiles —
    ``profile=fk.profile(flow, sample)``, or ``sample=`` to measure on this cluster, or the
    profile ``fk.profile`` last measured for this flow version — on up to ``max_workers``
    workers (default: one per core for the embedded cluster; the workers there for a cluster
    given), and deploys that plan: ``dep.slo_plan`` shows it, predicted against measured per
    stage. Beyond the requests in flight that the objective allows, ``fk.Overloaded`` is raised
    early. An objective no plan meets raises ``fk.SLOUnreachable`` (an ``fk.FlowError``) before
    the flow is installed on any worker, saying the best p99 reachable and the rate it holds.
    """
    return Deployment(flow, cluster=cluster, optimize=optimize, slo_ms=slo_ms, rate=rate, profile=profile,
                      sample=sample, max_workers=max_workers, max_inflight=max_inflight, retries=retries,
                      timeout=timeout, n_workers=n_workers, tune_workers=tune_workers)


class Deployment:
    """A flow served from a dask cluster. Also a context manager (closes on exit)."""

    def __init__(self, flow: Flow, cluster: Any = None, optimize: bool | Mapping[str, Any] = True, *,
                 slo_ms: float | None = None, rate: float | None = None, profile=None, sample: Any = None,
                 max_workers: int | None = None, max_inflight: int = 1000, retries: int = 2, timeout: float = 60.0,
                 n_workers: int | None = None, tune_workers: bool | None = None):
        from ..optimize import optimize as _optimize
        from .objective import check_request, plan_deployment

        if not isinstance(flow, Flow):
            raise FlowError(f"deploy needs a Flow, not {type(flow).__name__}")
        self._slo_plan = None   # the latency objective's plan (see slo_plan), once planned
        self.replanner = None   # with an objective: the thread re-planning it live (runtime/replanner.py)
        objective = check_request(slo_ms, rate, optimize, profile, sample)
        if objective:
            optimize = False   # the planner chooses the rules, once it has the cluster's resources
        if optimize is True:
            flow = _optimize(flow)
        elif isinstance(optimize, Mapping):
            flow = _optimize(flow, **optimize)
        elif optimize is not False:
            raise FlowError(f"optimize must be True, False or a dict of rules, not {optimize!r}")
        _check_max_inflight(max_inflight)
        if not (isinstance(retries, int) and retries >= 0):
            raise FlowError(f"retries must be a whole number >= 0, not {retries!r}")
        if not timeout > 0:
            raise FlowError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        self.flow = flow
        self.plan = flow.plan
        self._plan_bytes = dumps_plan(self.plan)   # before any cluster starts: a function that cannot travel fails here
        self.name = self.plan.name
        self.id = f"{self.name}-{uuid.uuid4().hex[:8]}"
        self._servers: list = []
        self._limit_lock = threading.Lock()   # max_inflight: each new value numbered (workers keep the latest)
        self.limit_version = 0
        self.max_inflight = max_inflight
        self._inflight = 0
        self._lock = threading.Lock()
        self._e2e = StageStats()
        self._finished = RecentRequests(self)   # what it served lately (the re-planner's and autoscaler's measure)
        self._stored: StoredObjects | None = None   # (set up once the router exists)
        self._closed = False
        self._owned: list = []
        self.adaptive = None   # the ServingAdaptive scaling the cluster, once adapt() (or the embedded default) set it
        self.client, self.cluster, self._owned = connect(cluster, n_workers, timeout)
        try:
            minimum, owned = 1, bool(self._owned) and self.cluster in self._owned
            if objective:   # planned before the flow is installed anywhere: an unreachable objective stops here
                slo = self._slo_plan = plan_deployment(flow, self.client, owned, slo_ms, rate, profile, sample,
                                                       max_workers)
                self.flow, self.plan, self._plan_bytes = slo.flow, slo.plan, dumps_plan(slo.plan)
                self.max_inflight = min(max_inflight, slo.shed_inflight or max_inflight)
                minimum = slo.workers
                if owned:   # (the re-planner scales it from here on: runtime/replanner.py)
                    n_workers, max_workers = max(minimum, n_workers or 0), slo.resources.max_workers
                    self.cluster.scale(n_workers)
            self._start(retries, timeout, n_workers, owned if tune_workers is None else tune_workers)
            if owned:   # (with an objective, its plan's workers: see replanner)
                self.adapt(minimum=minimum, maximum=minimum if objective else
                           max(os.cpu_count() or 1, n_workers or 1, max_workers or 1))
            if objective:   # keeps the objective live: re-plans on a x3 rate change or a p99 above it
                from .replanner import Replanner

                self.replanner = Replanner(self, max_inflight=max_inflight).start()
        except BaseException:
            self.close()
            raise

    @property
    def max_inflight(self) -> int:
        """Requests admitted at once (beyond: ``fk.Overloaded``; over HTTP, 503). A new value
        holds at once here and is sent at once (not waited for) to the workers' own HTTP
        endpoints; with an objective, the next live re-plan sets it again (never above the
        ``max_inflight`` asked at deploy)."""
        return self._max_inflight

    @max_inflight.setter
    def max_inflight(self, n: int) -> None:
        _check_max_inflight(n)
        with self._limit_lock:
            self._max_inflight = n
            self.limit_version += 1
            for server in self._servers:
                if isinstance(server, WorkerEndpoints):
                    server.catch_up()

    # -- set-up -----------------------------------------------------------------------------
    def _start(self, retries: int, timeout: float, n_workers: int | None, tune_workers: bool) -> None:
        security = getattr(self.client, "security", None)
        args = security.get_connection_args("client") if security is not None else {}
        self._router = Router(self.id, args, retries=retries, wait_for_workers=timeout, on_done=self._done)
        self.windows = BatchWindows(self._router)   # batch windows a live re-plan resizes
        # a request whose dynamic-lookup key is an input column starts on the key's worker
        self._stored = StoredObjects(self.id, self.client, self._router, routing_column(self.plan))
        self.client.subscribe_topic(ready_topic(self.id), self._on_ready)
        self._plugin_name = f"flowkit-{self.id}"   # (close() removes it, even when its set-up failed)
        register(self.client, self.id, self.plan, self._plan_bytes, self._plugin_name, tune_workers,
                 {"race_widths": self._slo_plan.race_widths} if self._slo_plan is not None else None)
        known = list(self.client.scheduler_info().get("workers", {}))
        for address in known:
            self._joined(address)
        if not self._router.ready.wait(timeout):
            raise FlowError(f"no worker of the cluster took deployment {self.id!r} within {timeout:g} s")
        self._await_workers(max(len(known), n_workers or 0), timeout)

    def _await_workers(self, n: int, timeout: float) -> None:
        """Return once ``n`` workers are connected (the cluster's workers at deploy time, or the
        ``n_workers`` asked for), or after ``timeout`` seconds saying how many are."""
        deadline = time.monotonic() + timeout
        while len(self._router.workers) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(self._router.workers) < n:
            logger.warning("deployment %s: %d of %d workers connected after %g s; serving on those",
                           self.id, len(self._router.workers), n, timeout)

    def _on_ready(self, event) -> None:
        msg = event[1] if isinstance(event, tuple) else event
        if isinstance(msg, dict) and msg.get("deployment") == self.id:
            self._joined(msg["worker"])
            for server in self._servers:   # a worker that joined serves HTTP too where the workers do
                if hasattr(server, "add_worker"):
                    server.add_worker(msg["worker"])

    def _joined(self, address: str) -> None:
        self._router.add_worker(address)
        self.windows.joined(address)
        self._stored.joined(address)

    # -- requests ---------------------------------------------------------------------------
    def submit(self, data: Any) -> Future:
        """Send one request; returns a ``concurrent.futures.Future`` of its ``fk.Table``.

        The input is checked first (``SchemaError`` before any work is scheduled); beyond
        ``max_inflight`` requests in flight, ``fk.Overloaded`` is raised instead of queueing.
        ``future.cancel()`` abandons the request: its worker stops it between rows and operators
        (and user code that asks ``fk.cancelled()``), and it no longer counts as in flight.
        """
        self._check_open("submit")
        table = as_table(data, self.plan.source.schema)
        with self._lock:
            if self._inflight >= self.max_inflight:
                raise Overloaded(f"deployment {self.name!r} has {self._inflight} requests in flight "
                                 f"(max_inflight={self.max_inflight}); retry later")
            self._inflight += 1
        try:
            stored = self._stored
            prefer = stored.holder_of(table.column(stored.route_by)) if stored.route_by and stored.where else None
            return self._router.submit("run", dumps(table), prefer=prefer)
        except BaseException:
            with self._lock:
                self._inflight -= 1
            raise

    def _done(self, req: Request, ok: bool) -> None:
        if req.kind != "run":
            return
        with self._lock:
            self._inflight -= 1
        if req.future.cancelled():
            self._e2e.count("cancelled")
            return
        now = time.perf_counter()
        self._e2e.record(now - req.started, ok)
        self._finished.record(now, now - req.started)

    def run(self, data: Any, timeout: float | None = None) -> Table:
        """Send one request and wait for its result. After ``timeout`` seconds it raises
        ``TimeoutError`` and the request is cancelled (nobody could wait for it again); so it is
        when the wait is interrupted (Ctrl-C)."""
        fut = self.submit(data)
        try:
            return fut.result(timeout)
        except (TimeoutError, KeyboardInterrupt):
            fut.cancel()
            raise

    def map(self, inputs: Iterable[Any], *, progress: bool = True, timeout: float | None = None,
            return_exceptions: bool = False) -> list:
        """Score many inputs, keeping at most half of ``max_inflight`` in flight; results in order.

        An input that fails raises its error, with a note saying which input it was (the inputs
        still in flight are then cancelled); with ``return_exceptions=True`` the error takes that
        input's place in the results instead."""
        self._check_open("map")
        return score_many(self.submit, list(inputs), window=max(1, self.max_inflight // 2),
                          progress=self.name if progress else None, timeout=timeout,
                          return_exceptions=return_exceptions)

    # -- scaling ----------------------------------------------------------------------------
    def adapt(self, minimum: int = 1, maximum: int | None = None, *, interval: float = 0.5, wait_count: int = 6):
        """Scale the cluster on this deployment's serving load (``ServingAdaptive``), deciding
        every ``interval`` seconds; a worker is retired after ``wait_count`` decisions in a row
        say so.

        The embedded cluster does this from the start. Any dask cluster object with
        ``adapt(Adaptive=...)`` (LocalCluster, SpecCluster, KubeCluster ...) can use it too."""
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise FlowError(f"interval is a number of seconds > 0, not {interval!r}")
        self._check_open("adapt")
        if self.cluster is None or not hasattr(self.cluster, "adapt"):
            raise FlowError("this deployment was given no cluster object to scale (pass cluster=a dask Cluster)")
        maximum = maximum if maximum is not None else (os.cpu_count() or 1)
        self.adaptive = self.cluster.adapt(Adaptive=ServingAdaptive, load=self._load, minimum=minimum,
                                           maximum=maximum, interval=f"{interval * 1000:g}ms", wait_count=wait_count)
        return self.adaptive

    def recent(self, seconds: float) -> list[tuple[float, float]]:
        """The requests finished in the last ``seconds``, as ``(finish time on this process's
        ``time.perf_counter()``, latency s)``: those sent from this process, and — while the
        workers serve HTTP themselves — those their endpoints served (``served.RecentRequests``)."""
        return self._finished.within(seconds)

    def recorded_until(self) -> float:
        """The time (``time.perf_counter()``) up to which ``recent`` holds every request finished:
        now, unless the workers serve HTTP themselves — then about a second ago."""
        return self._finished.until()

    def _load(self) -> Load:
        """The serving autoscaler's measure (``scaling.load_of``)."""
        return self._finished.load(self._router.mean_inflight(), self._router.threads_per_worker())

    # -- store ------------------------------------------------------------------------------
    def put(self, key: Any, obj: Any, *, restore: bool = True, broadcast: bool = False) -> None:
        """Store ``obj`` on the cluster under ``key`` (for ``lookup``), held as dask data.

        It lives in one worker's memory; with ``broadcast`` every worker also keeps a copy of its
        own (each lookup of it is then local, at the cost of a copy per worker; a worker that
        joins gets its copy as it joins). With ``restore`` (the default) the deployment keeps a
        reference to ``obj`` and stores it again if its worker dies (dask cannot recompute
        scattered data); ``restore=False`` keeps no reference here, except for an object put
        with ``broadcast``, which the deployment keeps (pickled) for workers that join. See
        ``store_client``."""
        self._check_open("put")
        self._stored.put(key, obj, restore, broadcast)

    # -- observability ----------------------------------------------------------------------
    def stats(self):
        """A pandas DataFrame, one row per stage after a first ``(end to end)`` row measured at the
        client: requests, errors, p50_ms, p99_ms, workers (where the stage ran), and what the
        stage did: ``batch_sizes`` (rows per batch -> count), ``wins <replica>`` and
        ``cancelled losers`` for races, ``cancelled`` for a replica's stopped work, ``local
        lookups`` / ``remote lookups`` and ``holders asked of the scheduler`` (to place a
        stage or read an object from another worker) for stages with dynamic lookups, and
        ``sent to another worker`` where a worker placed the stage elsewhere (with its object,
        on a GPU worker)."""
        self._check_open("stats")
        return stats_frame(self.plan, self._router.broadcast("stats"), self._e2e.snapshot())

    def serve(self, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
              allow_unauthenticated: bool = False, max_body_bytes: int = 10 * 2 ** 20, timeout: float = 30.0,
              body_timeout: float = 30.0, where: str = "auto", sock=None):
        """Serve this deployment over HTTP at ``POST /v1/flows/<name>/predict``; returns the
        running server (``server.url``, ``server.stop()``; a context manager). See docs/serving.md.

        ``where="workers"``: every worker serves it itself, the workers of a host on one shared
        port (``server.urls``: one per host), running the plan where the request lands — no hop
        through this process; ``"client"``: this process serves and sends each request to a
        worker; ``"auto"`` (default): the workers when they can be reached as ``host`` says (a
        wildcard host, or all of them on this machine's loopback), else the client.
        ``token``: bearer token clients must send (required off loopback unless
        ``allow_unauthenticated=True``); ``max_body_bytes``: larger bodies get 413;
        ``timeout``: seconds a request may run before its 504 (it is then cancelled);
        ``body_timeout``: seconds a client may take to send its whole body before its 408;
        ``sock``: an already bound listening socket for the client to serve on.
        With a latency objective, served by the workers, the plan is made again for requests
        that arrive over HTTP (the profile's HTTP path: ``dep.slo_plan.replans`` says so; a model
        search like a live re-plan's, before this returns). It stays so after the server stops."""
        self._check_open("serve")
        server = open_server(self, host, port, where, sock, dict(
            token=token, allow_unauthenticated=allow_unauthenticated, max_body_bytes=max_body_bytes,
            timeout=timeout, body_timeout=body_timeout))
        with self._limit_lock:
            self._servers.append(server)
            if isinstance(server, WorkerEndpoints):
                server.catch_up()   # (a max_inflight set while its workers started serving)
        if self.replanner is not None and isinstance(server, WorkerEndpoints):
            self.replanner.serving_over_http()   # (requests now arrive over HTTP: the objective holds for them)
        return server

    def dashboard(self, interval: float = 0.3):
        """A live notebook view: the deployed plan with per-stage throughput and p50/p99, updated
        every ``interval`` seconds, plus the dask dashboard link."""
        from flowkit_widgets.live import DeploymentView

        self._check_open("dashboard")
        return DeploymentView(self, interval).start()

    @property
    def slo_plan(self):
        """The latency objective's plan (None without ``slo_ms``): a ``slo_plan.SLOPlan`` with
        this deployment's statistics attached — ``.table()`` is predicted against measured p50
        and p99 per stage, ``.explain()`` says why each choice was made, ending with the
        re-plans made live (``.replans``: when, why, what changed). (``dep.plan`` stays the
        deployed ``Plan``.)"""
        if self._slo_plan is None:
            return None
        return self._slo_plan.with_measured(self.stats())

    def set_objective(self, *, slo_ms: float | None = None, rate: float | None = None):
        """Hold a new latency objective (``slo_ms``) and/or plan for a new ``rate`` from now on:
        re-planned at once (workers, batch windows and shedding; the deployed plan's fusion and
        races stay) and applied; returns the new ``slo_plan``. A slider can call it (docs/slo.md)."""
        self._check_open("set_objective")
        if self.replanner is None:
            raise FlowError(f"deployment {self.id!r} has no latency objective: deploy with slo_ms= and rate=")
        self.replanner.retarget(slo_ms, rate)
        return self.slo_plan

    @property
    def workers(self) -> list[str]:
        """Addresses of the workers this deployment is connected to."""
        return self._router.workers

    @property
    def dashboard_link(self) -> str | None:
        try:
            return self.client.dashboard_link
        except Exception:
            return None

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise DeploymentClosed(f"deployment {self.id!r} is closed: {what} needs a deployment that is not")

    def __repr__(self) -> str:
        if self._closed:
            return f"<Deployment {self.name!r} (closed)>"
        n = len(self.workers)
        return (f"<Deployment {self.name!r} ({n} worker{'' if n == 1 else 's'}, {self._inflight} in flight) "
                f"dashboard: {self.dashboard_link}>")

    # -- shutdown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release what this deployment started (its plugin, stored objects, and the embedded
        cluster) and nothing it was given."""
        if self._closed:
            return
        self._closed = True
        if getattr(self, "replanner", None) is not None:
            self.replanner.stop()
        for server in getattr(self, "_servers", []):
            server.stop(timeout=5)
        router = getattr(self, "_router", None)
        if router is not None:
            router.close()
        try:
            self.client.unsubscribe_topic(ready_topic(self.id))
        except Exception:
            pass
        if getattr(self, "_plugin_name", None) and self.client.status == "running":
            try:
                self.client.unregister_worker_plugin(self._plugin_name)
            except Exception as e:
                logger.debug("unregistering the plugin: %s", e)
        if self._stored is not None:
            self._stored.release()
        for thing in self._owned:
            try:
                thing.close()
            except Exception as e:
                logger.debug("closing %r: %s", thing, e)

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True) and sys is not None:
            try:
                self.close()
            except Exception:
                pass


def _check_max_inflight(n) -> None:
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise FlowError(f"max_inflight must be a whole number >= 1, not {n!r}")
