"""The dask ``WorkerPlugin`` that puts a deployment on every worker of a cluster.

``DeploymentPlugin`` is registered with ``client.register_plugin``, so dask gives it to every
current and future worker. Its ``setup`` unpickles the plan once per worker, creates the
deployment's executor (``executor.WorkerDeployment``; class operators are instantiated there,
before any request), adds the ``flowkit_session`` handler to the worker's own server (same
address, same TLS; see ``session``), and announces the worker on the deployment's own event
topic (``ready_topic``: a dask ``Client`` keeps one handler per topic, and several deployments
may share a client). On a plain-TCP cluster the worker also listens for the same sessions over
the lighter ``framed`` transport, on its own host; clients move there after saying hello.

State per worker: ``worker._flowkit`` maps deployment ids to their ``WorkerDeployment``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import FlowError

from . import framed
from .compat import add_handler, address_host, heartbeat_at_least
from .executor import WorkerDeployment
from .session import serve_session
from .wire import loads, operator_needing

__all__ = ["DeploymentPlugin", "register", "ready_topic", "tune_malloc", "freeze_heap", "thaw_heap", "HEARTBEAT_S"]

logger = logging.getLogger("flowkit.worker")

#: the longest interval between a tuned worker's heartbeats to the scheduler (dask's: 0.5 s up
#: to 10 workers). Each heartbeat gathers the worker's metrics on its event loop, between the
#: requests that loop serves: with dask's interval instead, a closed loop over HTTP had the
#: higher p99 in 4 of 6 alternating repetitions, median 2.05 against 1.86 ms
#: (``benchmarks/results/request_split_heartbeats.md``).
#: The scheduler's view of the worker's memory and tasks is that much older; a worker that dies
#: is still noticed at once (its connections close).
HEARTBEAT_S = 5.0


def ready_topic(deployment: str) -> str:
    """The dask event topic on which workers announce that they hold ``deployment``."""
    return f"flowkit-ready-{deployment}"


def register(client, deployment: str, plan, plan_bytes: bytes, name: str, tune_workers: bool,
             options: dict | None = None) -> None:
    """Give ``client``'s workers the deployment (``DeploymentPlugin``, registered as ``name``:
    the scheduler keeps a plugin whose set-up failed, so its remover must know the name before
    this can fail). A module the workers cannot import names the operator that needs it.
    ``options``: ``race_widths``, the replicas racing per race a latency plan set
    (``SLOPlan.race_widths``)."""
    try:
        client.register_plugin(DeploymentPlugin(deployment, plan_bytes, options, tune_workers=tune_workers), name=name)
    except ImportError as e:   # the workers lack a module the plan's functions need
        op = operator_needing(plan, e.name) if e.name else None
        raise FlowError(f"{f'operator {op!r}' if op else 'the plan'} needs the module {e.name!r}, which the "
                        f"workers cannot import ({e}); install it on the workers") from e
    except Exception as e:
        raise FlowError(f"setting up deployment {deployment!r} on the workers failed: {type(e).__name__}: {e}") from e


class DeploymentPlugin(WorkerPlugin):
    """Gives every worker of the cluster the deployment's plan and request handler.
    ``tune_workers`` (``tune_malloc``, ``freeze_heap`` and heartbeats at most every
    ``HEARTBEAT_S``): by default only for clusters flowkit started itself (see ``deploy``)."""

    idempotent = False

    def __init__(self, deployment: str, plan: bytes, options: dict | None = None, tune_workers: bool = False):
        self.deployment = deployment
        self.plan = plan
        self.options = options or {}
        self.tune_workers = tune_workers

    async def setup(self, worker) -> None:
        if self.tune_workers:
            tune_malloc()
        deployments = _install(worker)
        await _serve_framed(worker)
        dep = WorkerDeployment(self.deployment, loads(self.plan), worker, self.options)
        # Models load before the worker takes requests: deploy() returns with every current
        # worker warm, and a worker added by scaling gets traffic only once its models are in.
        await asyncio.get_running_loop().run_in_executor(dep.pool, dep.load_models)
        if self.tune_workers:
            freeze_heap()
            heartbeat_at_least(worker, HEARTBEAT_S)
            dep.tuned = True
        deployments[self.deployment] = dep
        worker.log_event(ready_topic(self.deployment), {"deployment": self.deployment, "worker": worker.address})

    async def teardown(self, worker) -> None:
        dep = getattr(worker, "_flowkit", {}).pop(self.deployment, None)
        if dep is not None:
            dep.close()
            if self.tune_workers:   # frozen with the heap, its objects would never be collected
                tuned = any(d.tuned for d in worker._flowkit.values())
                thaw_heap(refreeze=tuned)
                if not tuned:
                    heartbeat_at_least(worker, None)
        listener = getattr(worker, "_flowkit_framed", None)
        if listener is not None and not getattr(worker, "_flowkit", None):   # its last deployment went
            listener.server.close()
            worker._flowkit_framed = None


def tune_malloc() -> None:
    """Undo the cost of dask's ``MALLOC_TRIM_THRESHOLD_=65536`` for model code, in this process.

    dask's nanny starts workers with that variable, which fixes glibc's mmap threshold at 128 KiB:
    every tensor buffer above it is then mmap'd and unmapped per call. Measured here, a 16-channel
    32x32 conv ran in 286 µs in a worker against 81 µs in a plain process, and the demo model
    took 1.44 ms against 0.49 ms. Raising the mmap threshold (glibc only) brings it back to 81 µs.
    It changes the whole worker process, so flowkit does it only on clusters it started (the
    embedded default); ``fk.deploy(..., tune_workers=True)`` asks for it on any cluster.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)   # M_MMAP_THRESHOLD: large buffers come from the heap again
        libc.mallopt(-1, 64 * 1024 * 1024)   # M_TRIM_THRESHOLD: per-thread heaps are not shrunk per call
    except Exception as e:  # musl and others: keep the default
        logger.debug("mallopt unavailable: %s", e)


def freeze_heap() -> None:
    """Collect this process's garbage once, then leave every object it holds now (modules,
    models, dask's own state) out of the garbage collector's later full collections.

    A full (generation 2) collection walks every tracked object; a dask worker with torch and a
    model holds about 210,000, and each such collection held the worker's event loop for over
    a hundred milliseconds — every HTTP request and session answer on that worker waited
    (``benchmarks/gc_pauses.py``). Frozen, later full collections walk only what was made
    since. An object frozen here that becomes cyclic garbage is not freed until the heap thaws
    (``thaw_heap``, when a tuned deployment leaves the worker). It changes the whole worker
    process, so flowkit does it only where it tunes workers.
    """
    import gc

    gc.collect()
    gc.freeze()


def thaw_heap(refreeze: bool) -> None:
    """Give every frozen object back to the garbage collector and collect (a closed deployment's
    cycles are freed); freeze again when ``refreeze`` (other tuned deployments remain)."""
    import gc

    gc.unfreeze()
    if refreeze:
        freeze_heap()
    else:
        gc.collect()


def _install(worker) -> dict:
    if not hasattr(worker, "_flowkit"):
        worker._flowkit = {}

        async def flowkit_session(comm, deployment=None):
            return await serve_session(worker, comm, deployment)

        add_handler(worker, "flowkit_session", flowkit_session)
    return worker._flowkit


async def _serve_framed(worker) -> None:
    """Start the worker's framed-TCP session listener (see ``framed``) on its own host, once.
    Plain-TCP workers only: with TLS, sessions stay on dask's comm."""
    if getattr(worker, "_flowkit_framed", None) is not None or not worker.address.startswith("tcp://"):
        return
    host = address_host(worker.address)

    async def on_connection(comm) -> None:
        try:
            hello = await comm.read()
            await serve_session(worker, comm, hello.get("deployment"))
        except OSError:
            pass   # the client went away

    try:
        server, port = await framed.serve(host, on_connection)
    except OSError as e:   # cannot listen there: sessions use dask's comm
        logger.info("no framed session listener on %s: %s", host, e)
        return
    worker._flowkit_framed = _Listener(host, port, server)


class _Listener(NamedTuple):
    """A worker's framed session listener: where clients reach it, and the server to close."""

    host: str
    port: int
    server: asyncio.Server
