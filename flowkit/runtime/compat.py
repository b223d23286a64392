"""Every use flowkit makes of dask internals, in one place (the seam for dask upgrades).

dask's public API (``Client``, ``LocalCluster``, ``WorkerPlugin``, ``Adaptive``) is used where
it is needed; what is not public — a worker's RPC handler table, its thread count and
resources, the ``dont_reply`` status, the scheduler's RPCs, the worker-to-worker data
handshake and the worker's heartbeat — goes through the functions here, each with a test
(``tests/test_compat.py``).
pyproject.toml bounds ``distributed`` to the newest minor these were tested on.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from distributed.comm.addressing import get_address_host
from distributed.core import Status

__all__ = ["add_handler", "DONT_REPLY", "worker_threads", "worker_resources", "address_host", "set_worker_resources",
           "on_worker_removed", "heartbeat_at_least", "heartbeat_ms", "stored_data", "run_on_worker_loop", "fetch_data",
           "scheduler_who_has", "scheduler_workers", "task_known", "check_serializable"]

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


def on_worker_removed(worker, callback: Callable[[str], None]) -> None:
    """Call ``callback(address)`` whenever the scheduler tells ``worker`` that a worker left the
    cluster (its "remove-worker" stream message), before dask handles it."""
    import inspect

    handle = worker.stream_handlers["remove-worker"]

    async def noting_removal(worker: str, **kwargs):
        callback(worker)
        result = handle(worker=worker, **kwargs)
        if inspect.isawaitable(result):
            await result

    worker.stream_handlers["remove-worker"] = noting_removal


def heartbeat_at_least(worker, seconds: float | None) -> None:
    """The worker heartbeats to the scheduler at most once every ``seconds`` (None: as often as
    the scheduler asks again). The scheduler sets a worker's interval in its answer to each
    heartbeat (dask: every 0.5 s up to 10 workers, slower in larger clusters); this keeps the
    longer of that and ``seconds``, on the worker's own periodic heartbeat."""
    beat = worker.periodic_callbacks.get("heartbeat")
    if beat is None:
        return
    own = beat.__dict__.setdefault("flowkit_own_callback", beat.callback)
    if seconds is None:
        beat.callback = own   # (the scheduler's next answer sets its interval again)
        return

    async def heartbeat():
        await own()
        beat.callback_time = max(beat.callback_time, seconds * 1000)

    beat.callback = heartbeat
    beat.callback_time = max(beat.callback_time, seconds * 1000)


def heartbeat_ms(worker) -> float | None:
    """The worker's heartbeat interval now, in milliseconds (None: it has none)."""
    beat = worker.periodic_callbacks.get("heartbeat")
    return None if beat is None else beat.callback_time


def stored_data(worker):
    """The worker's in-memory data (a mapping of dask keys to values)."""
    return worker.data


def run_on_worker_loop(worker, coroutine_function: Callable[[], Awaitable[Any]], timeout: float) -> Any:
    """Run ``coroutine_function()`` on ``worker``'s event loop from another thread of the worker
    and return its result; ``TimeoutError`` after ``timeout`` seconds."""
    from distributed.utils import sync

    return sync(worker.loop, coroutine_function, callback_timeout=timeout)


async def fetch_data(worker, holder: str, keys: list, connect_timeout: float) -> dict:
    """Ask worker ``holder`` for ``keys`` as dask's ``get_data_from_worker`` does (its two-step
    handshake), but dialling with ``connect_timeout`` (dask's own dial waits 30 s for a dead
    peer). The answer: ``{"status": "OK", "data": {...}}`` or ``{"status": "busy"}``. Raises
    ``OSError`` when ``holder`` cannot be reached or the connection breaks."""
    from distributed.core import send_recv

    rpc = worker.rpc
    comm = await rpc.connect(holder, timeout=connect_timeout)
    comm.name = "flowkit stored-object fetch"
    try:
        resp = await send_recv(comm, serializers=rpc.serializers, deserializers=rpc.deserializers,
                               op="get_data", keys=keys, who=worker.address)
        if resp.get("status") == "OK":
            await comm.write("OK")
        return resp
    finally:
        rpc.reuse(holder, comm)


async def scheduler_who_has(worker, keys: list) -> dict:
    """The scheduler's answer, from a worker: which workers hold each of ``keys``."""
    return await worker.scheduler.who_has(keys=keys)


async def scheduler_workers(worker) -> dict:
    """The scheduler's running workers, from a worker: address -> its identity (``resources``...)."""
    ident = await worker.scheduler.identity()
    return {a: w for a, w in ident.get("workers", {}).items()
            if w.get("status", "running") in ("running", "Status.running")}


def task_known(client, key: str) -> bool:
    """Whether the scheduler still knows dask key ``key`` (it has not forgotten it yet)."""
    return client.sync(client.scheduler.get_task_status, keys=[key]).get(key) is not None


#: the logger on which dask's pickling logs each failed attempt (with its traceback)
PICKLE_LOGGER = "distributed.protocol.pickle"


def check_serializable(client, obj: Any) -> None:
    """Raise what dask's serialization raises for ``obj`` with the client's serializers (as
    ``scatter`` would), without sending anything (its failures log on ``PICKLE_LOGGER``)."""
    from distributed.protocol import serialize

    serialize(obj, serializers=client._serializers, on_error="raise")
