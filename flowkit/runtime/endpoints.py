"""The client's handle on HTTP served by the workers themselves (``dep.serve()``).

Each worker holding the deployment serves it (``ingress``): the workers of one host on one
shared port, so a host has one URL, and clients (or any L4 balancer, as a Kubernetes Service
would be) connect straight to where the work runs. A worker that joins later serves too, on its
host's port. ``WorkerEndpoints`` says where (``url``, ``urls``) and stops them all.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import deque

from .compat import address_host
from .wire import dumps

__all__ = ["WorkerEndpoints", "serves_at_workers", "open_server"]

logger = logging.getLogger("flowkit.http")

WILDCARDS = ("0.0.0.0", "::", "")


def serves_at_workers(host: str, workers: list[str]) -> bool:
    """Whether ``dep.serve(host)`` can be served by the workers (``where="auto"``): ``host`` is a
    wildcard (every worker listens on all its interfaces), or every worker runs on this
    machine's loopback (the embedded cluster, a LocalCluster) where ``host`` is loopback too.
    Else the client serves, as it can reach the workers and its callers can reach it.

    >>> serves_at_workers("127.0.0.1", ["tcp://127.0.0.1:4000"]), serves_at_workers("0.0.0.0", ["tcp://10.0.0.5:4000"])
    (True, True)
    >>> serves_at_workers("127.0.0.1", ["tcp://10.0.0.5:4000"]), serves_at_workers("10.0.0.9", ["tcp://127.0.0.1:1"])
    (False, False)
    """
    if host in WILDCARDS:
        return True
    return bool(workers) and _loopback(host) and all(_loopback(address_host(w)) for w in workers)


def open_server(dep, host: str, port: int, where: str, sock, settings: dict):
    """The HTTP server ``dep.serve`` asks for: the workers' own endpoints (``where="workers"``,
    or ``"auto"`` when ``serves_at_workers``), else one in this process that sends each request to
    a worker (``"client"``, or a ``sock`` given to listen on)."""
    from ..errors import FlowError
    from .http import HTTPServer, require_authentication

    if where not in ("auto", "workers", "client"):
        raise FlowError(f'where must be "auto", "workers" or "client", not {where!r}')
    require_authentication(host, settings["token"], settings["allow_unauthenticated"])
    if where == "auto":
        where = "workers" if sock is None and serves_at_workers(host, dep.workers) else "client"
    if where == "workers":
        return WorkerEndpoints(dep, host, port, settings)
    return HTTPServer({dep.name: dep}, host, port, sock=sock, loop=dep._router.loop, **settings)


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WorkerEndpoints:
    """HTTP served by every worker of ``dep`` (one port per host); ``url`` is the first host's."""

    def __init__(self, dep, host: str, port: int, settings: dict, timeout: float = 60.0):
        self.dep = dep
        self.host = host
        self.requested = port
        self.settings = settings
        self.timeout = timeout
        self.ports: dict[str, int] = {}     # worker host -> the port its workers serve
        self.serving: dict[str, str] = {}   # worker address -> its host
        self._limits: dict[str, int] = {}   # worker address -> the max_inflight version last sent it
        self._lock = threading.Lock()
        self.stopped = False
        by_host: dict[str, list[str]] = {}
        for address in dep.workers:
            by_host.setdefault(address_host(address), []).append(address)
        try:
            for where, addresses in by_host.items():
                self.ports[where] = self._serve(addresses[0], port).result(timeout)
                self.serving[addresses[0]] = where
                rest = [(a, self._serve(a, self.ports[where])) for a in addresses[1:]]
                for a, fut in rest:
                    fut.result(timeout)
                    self.serving[a] = where
        except BaseException:
            self.stop()
            raise

    def _serve(self, address: str, port: int):
        version, limit = self.dep.limit_version, self.dep.max_inflight
        options = {"host": self.host, "port": port, "settings": self.settings, "max_inflight": (version, limit)}
        with self._lock:
            self._limits[address] = version
        return self.dep._router.submit("serve", dumps(options), worker=address)

    def add_worker(self, address: str) -> None:
        """A worker that joined the deployment serves too, on its host's port (without waiting)."""
        where = address_host(address)
        with self._lock:
            if self.stopped or address in self.serving:
                return
            port = self.ports.get(where, self.requested)

        def served(fut) -> None:
            if fut.exception() is not None:
                logger.warning("worker %s could not serve HTTP: %s", address, fut.exception())
                return
            with self._lock:
                self.ports.setdefault(where, fut.result())
                self.serving[address] = where
            self.catch_up()   # (a max_inflight set while it started serving)

        self._serve(address, port).add_done_callback(served)

    def catch_up(self) -> None:
        """Send the deployment's ``max_inflight`` to every serving worker that has not had its
        latest value (not waited for; each worker keeps the latest version it is sent, so a
        late or repeated one changes nothing)."""
        version, limit, live = self.dep.limit_version, self.dep.max_inflight, set(self.dep.workers)
        with self._lock:
            behind = [] if self.stopped else [a for a in self.serving if a in live and self._limits.get(a, 0) < version]
            for a in behind:
                self._limits[a] = version
        for address in behind:
            fut = self.dep._router.submit("limit", dumps((version, limit)), worker=address)
            fut.add_done_callback(lambda f, a=address: f.exception() is None or
                                  logger.debug("max_inflight on %s: %s", a, f.exception()))

    def _gather(self) -> list[dict]:
        live = set(self.dep.workers)
        futures = [self.dep._router.submit("http", worker=a) for a in list(self.serving) if a in live]
        out = []
        for fut in futures:
            try:
                out.append(fut.result(self.timeout))
            except Exception as e:   # a worker that left answers nothing
                logger.debug("http counts: %s", e)
        return out

    @property
    def counts(self) -> dict:
        """HTTP answers by ``(flow, status)``, summed over the serving workers."""
        total: dict = {}
        for part in self._gather():
            for key, n in part["counts"].items():
                total[key] = total.get(key, 0) + n
        return total

    @property
    def inflight(self) -> int:
        """HTTP requests in flight on the serving workers."""
        return sum(part["inflight"] for part in self._gather())

    @property
    def max_inflight(self) -> list[int]:
        """The most requests each serving worker admits at once (per port it serves on)."""
        return [n for part in self._gather() for n in part["max_inflight"]]

    @property
    def urls(self) -> list[str]:
        """One URL per host whose workers serve."""
        out = []
        for where, port in self.ports.items():
            h = where if self.host in WILDCARDS else self.host
            out.append(f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}")
        return out

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else f"{len(self.serving)} workers"
        return f"<flowkit HTTP served by the workers of {self.dep.name!r} at {', '.join(self.urls)} ({state})>"

    def stop(self, timeout: float | None = None) -> None:
        """Every worker stops serving this deployment (a port left with no flow closes)."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            live = set(self.dep.workers)   # (a worker that left stopped serving with it)
            serving = [(a, self.ports[where]) for a, where in self.serving.items() if a in live]
        futures = [self.dep._router.submit("unserve", dumps(port), worker=a) for a, port in serving]
        for fut in futures:
            try:
                fut.result(timeout or 10)
            except Exception as e:   # a worker that left stopped serving with it
                logger.debug("unserve: %s", e)

    close = stop

    def __enter__(self) -> "WorkerEndpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
