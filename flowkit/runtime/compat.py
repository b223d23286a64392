"""Every use flowkit makes of dask internals, in one place (the seam for dask upgrades).

dask's public API (``Client``, ``LocalCluster``, ``WorkerPlugin``, ``Adaptive``) is used where
it is needed; what is not public — a worker's RPC handler table, its thread count and
resources, the ``dont_reply`` status, the scheduler's RPCs and the worker-to-worker data
handshake — goes through the functions here, each with a test (``tests/test_compat.py``).
pyproject.toml bounds ``distributed`` to the newest minor these were tested on.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from distributed.comm.addressing import get_address_host
from distributed.core import Status

__all__ = ["add_handler", "DONT_REPLY", "worker_threads", "worker_resources", "address_host"]

#: what a comm handler returns when it answered on its own (the comm stays the handler's)
DONT_REPLY = Status.dont_reply


def add_handler(worker, name: str, handler: Callable[..., Awaitable[Any]]) -> None:
    """Serve RPC ``op=name`` on the worker's own server (its address, its TLS)."""
    worker.handlers[name] = handler


def worker_threads(worker) -> int:
    """The worker's number of task threads."""
    return worker.state.nthreads


def worker_resources(worker) -> dict:
    """The worker's declared resources (``{"GPU": 1}``)."""
    return dict(worker.state.total_resources)


def address_host(address: str) -> str:
    """The host part of a dask address (``tcp://10.0.0.5:4000`` -> ``10.0.0.5``)."""
    return get_address_host(address)


async def set_worker_resources(worker, **resources: float) -> None:
    """Declare resources on a running worker (``GPU=1``), on the worker and on the scheduler,
    so that work restricted to them (and peers reading the scheduler's view) finds it."""
    await worker.set_resources(**resources)
