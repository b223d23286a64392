"""HTTP served where the work runs: a worker's own endpoint for the deployments it holds.

``dep.serve()`` (``endpoints``) asks each worker to serve: the worker then parses, runs and
answers HTTP requests itself, running the plan in its own executor (``WorkerDeployment.run``) and
reaching other workers only when the plan needs them (locality, races, GPU stages). No request
crosses the client's process. The workers of one host share one port (``SO_REUSEPORT``: the
kernel spreads connections over them); one worker's server holds every deployment served on
that port (routes by flow name), with the same front door as the client-side server
(``http.HTTPServer``: auth, limits, error codes, metrics).

State per worker: ``worker._flowkit_http`` maps ``(host, port)`` to its ``HTTPServer``.
"""

from __future__ import annotations

import asyncio
import time

from ..errors import FlowError, Overloaded, WorkerLost
from ..table import as_table
from .cancel import Token
from .stats import stats_frame

__all__ = ["LocalEndpoint", "serve_http", "unserve_http", "limit_http", "http_counts"]


class LocalEndpoint:
    """One deployment on this worker, as the HTTP front door sees a deployment: its plan,
    ``submit`` (on the worker's event loop; the answer's task, which the front door cancels on
    a timeout or a hang-up), its workers, its statistics, and ``answered`` (the front door's
    time for each request)."""

    def __init__(self, dep, max_inflight: tuple[int, int]):
        self.dep = dep
        self.plan = dep.plan
        self.name = dep.plan.name
        self.limit_version, self.max_inflight = max_inflight   # (see limit_http)
        self.inflight = 0

    @property
    def workers(self) -> list[str]:
        return [] if self.dep.closed else [self.dep.worker.address]

    def submit(self, rows) -> asyncio.Task:
        table = as_table(rows, self.plan.source.schema)
        if self.inflight >= self.max_inflight:
            raise Overloaded(f"flow {self.name!r} has {self.inflight} requests in flight on worker "
                             f"{self.dep.worker.address} (max_inflight={self.max_inflight}); retry later")
        self.inflight += 1
        return asyncio.ensure_future(self._run(table))

    async def _run(self, table):
        token = Token()
        try:
            out = await self._elsewhere(table) if self.dep.stuck(time.monotonic()) else None
            if out is None:
                out = await self.dep.run(table, token)
        except asyncio.CancelledError:   # a 504 or a hang-up: its work stops between rows and operators
            token.cancel("the HTTP request was abandoned")
            self.dep.served.count("cancelled")
            raise
        finally:
            self.inflight -= 1
        return out

    def answered(self, seconds: float, status: int) -> None:
        """Count a request that reached the plan, in the worker's statistics (a 5xx as an
        error) and, with its finish time, for the client's re-planner and autoscaler
        (``Deployment.recent``): ``seconds`` is the front door's time for it, from its arrival
        to its answer's bytes. A 503 (refused while overloaded, or a worker it needed lost) and
        the client's faults (4xx) are not counted here (the front door counts every answer by
        status)."""
        if status < 400 or (status >= 500 and status != 503):
            self.dep.served.record(seconds, ok=status < 500)
            self.dep.served_recent.append((time.monotonic(), seconds))

    async def _elsewhere(self, table):
        """While this worker is stuck (its threads held by a slow request, or one abandoned whose
        function has not returned yet), a request that reached it is run by another worker
        rather than queued here behind them; None when there is none to run it."""
        try:
            return await self.dep.run_elsewhere(table)
        except WorkerLost:   # (the other worker left: run it here after all)
            return None

    def stats(self):
        return stats_frame(self.plan, [self.dep.snapshot()])


async def serve_http(dep, options: dict) -> int:
    """Serve ``dep`` over HTTP on this worker at ``options["host"]``/``["port"]`` (0: a new port);
    the port it serves on. A port this worker already serves with the same settings gets this
    flow too; the same flow twice, or other settings on a taken port, is a ``FlowError``."""
    from .http import HTTPServer, bind

    worker, loop = dep.worker, asyncio.get_running_loop()
    servers = worker.__dict__.setdefault("_flowkit_http", {})
    host, port, settings = options["host"], options["port"], dict(options["settings"])
    server = servers.get((host, port)) if port else None
    endpoint = LocalEndpoint(dep, options["max_inflight"])
    if server is not None:
        if dep.plan.name in server.deployments:
            raise FlowError(f"cannot serve on {host}:{port}: flow {dep.plan.name!r} is already served there; "
                            "pass port=0 for a free port")
        if server.settings != settings:
            raise FlowError(f"port {port} on {host} already serves {sorted(server.deployments)} with other settings")
        server.deployments[dep.plan.name] = endpoint
        return port
    sock = bind(host, port, shared=True)

    def start():   # (HTTPServer waits for its start: not on this loop, which runs it)
        return HTTPServer({dep.plan.name: endpoint}, host, sock=sock, loop=loop, worker=worker.address, **settings)

    server = await loop.run_in_executor(None, start)
    server.settings = settings
    servers[(host, server.port)] = server
    return server.port


def unserve_http(dep, port: int | None = None) -> None:
    """Stop serving ``dep`` on this worker, on ``port`` (None: every port); a server left with
    no flow stops."""
    for key, server, _ in _served(dep):
        if port in (None, key[1]):
            del server.deployments[dep.plan.name]
            if not server.deployments:
                server.stop(wait=False)
                del dep.worker._flowkit_http[key]


def _served(dep):
    """``((host, port), server, endpoint)`` for each port of this worker serving ``dep``."""
    for key, server in list(getattr(dep.worker, "_flowkit_http", {}).items()):
        endpoint = server.deployments.get(dep.plan.name)
        if getattr(endpoint, "dep", None) is dep:
            yield key, server, endpoint


def limit_http(dep, max_inflight: tuple[int, int]) -> None:
    """From now on this worker's endpoints admit at most ``max_inflight[1]`` of ``dep``'s
    requests at once (a live re-plan's shedding limit, or the user's), unless they hold a later
    version (``max_inflight[0]``) already; requests in flight beyond it finish."""
    version, limit = max_inflight
    for _, _, endpoint in _served(dep):
        if version > endpoint.limit_version:
            endpoint.limit_version, endpoint.max_inflight = version, limit


def http_counts(dep) -> dict:
    """This worker's HTTP answers for ``dep`` by ``(flow, status)``, its requests in flight, and
    the most it admits at once (per port)."""
    counts: dict = {}
    inflight, limits = 0, []
    for _, server, endpoint in _served(dep):
        inflight += endpoint.inflight
        limits.append(endpoint.max_inflight)
        for key, n in list(server.counts.items()):
            if key[0] == dep.plan.name:
                counts[key] = counts.get(key, 0) + n
    return {"counts": counts, "inflight": inflight, "max_inflight": limits}
