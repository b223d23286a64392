"""Which dask cluster a deployment runs on: the embedded default, or one the user gives."""

from __future__ import annotations

import logging
import sys
from typing import Any

from ..errors import FlowError

__all__ = ["connect", "serving_settings"]

#: dask's periodic housekeeping on a serving worker's event loop, less often (see serving_settings)
QUIET_HOUSEKEEPING = {"distributed.admin.tick.interval": "1s", "distributed.worker.memory.monitor-interval": "1s",
                      "distributed.admin.system-monitor.interval": "10s"}


def serving_settings() -> dict:
    """dask's settings for worker processes that serve, as ``dask.config.set`` takes them (the
    embedded cluster's workers get them; give your own the same before they start:
    ``with dask.config.set(serving_settings()): LocalCluster(...)``, or the environment
    variables ``DASK_DISTRIBUTED__ADMIN__EVENT_LOOP=uvloop
    DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s
    DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL=1s
    DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL=10s`` for ``dask worker``):

    - the event loop: uvloop (uvicorn's own default where it is installed, as flowkit installs
      it), whose loop serves a worker's HTTP endpoint and sessions;
    - dask's statistical profiler off: it samples every thread's stack on the worker's event
      loop every 10 ms (for the dashboard's profile page), between the requests that loop serves;
    - dask's housekeeping on the worker's loop less often: the loop's health check (``tick``)
      every 1 s instead of 20 ms (it still reports a loop blocked for over 3 s), the memory
      monitor every 1 s instead of 100 ms (a worker's spilling and pausing react that much
      later; the embedded cluster's nannies run in the client's process and keep dask's
      interval for restarting a worker over its memory limit), the system monitor (the dashboard's CPU
      and memory charts) every 10 s instead of 500 ms. Each wakes the loop, and the thread
      running a request's plan waits for the interpreter while it runs: the requests' hand-offs
      between the loop and that thread had twice the p99 with dask's intervals
      (``benchmarks/request_split.py``).
    """
    settings = {"distributed.worker.profile.enabled": False, **QUIET_HOUSEKEEPING}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return settings
    return {**settings, "distributed.admin.event-loop": "uvloop"}


def _serving_config() -> dict:
    """``serving_settings`` as a nanny's ``config=`` (so they reach the workers that adaptive
    scaling adds later too): dask's whole ``distributed`` configuration with them applied (the
    nanny merges its ``config`` over dask's one level deep)."""
    import copy

    import dask

    with dask.config.set(serving_settings()):
        return {"distributed": copy.deepcopy(dask.config.get("distributed"))}


def connect(cluster: Any, n_workers: int | None, timeout: float) -> tuple:
    """``(client, cluster object or None, what flowkit started and must close)`` for ``cluster``:
    ``None`` starts the embedded default (a ``LocalCluster`` of worker processes with
    ``n_workers``, 1 thread each); or a ``distributed.Client``, any dask ``Cluster`` object, or
    a scheduler address (``timeout`` seconds to answer)."""
    from distributed import Client

    if cluster is None:
        from distributed import LocalCluster

        try:
            cluster = LocalCluster(n_workers=n_workers or 1, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=logging.ERROR, config=_serving_config())
        except Exception as e:
            if getattr(sys.modules.get("__main__"), "__file__", None):   # run as a script
                e.add_note("flowkit: the embedded cluster's worker processes import the running script "
                           "again; a script must call fk.deploy under `if __name__ == \"__main__\":`")
            raise
        client = Client(cluster)
        return client, cluster, [client, cluster]
    if isinstance(cluster, Client):
        return cluster, getattr(cluster, "cluster", None), []
    if isinstance(cluster, str):
        try:
            try:
                client = Client(cluster, timeout=timeout)
            except AssertionError:   # (under heavy load dask's client thread can fail to start: once more)
                client = Client(cluster, timeout=timeout)
        except ValueError as e:
            raise FlowError(f"{cluster!r} is not a scheduler address (like tcp://host:8786): {e}") from e
        except (OSError, TimeoutError) as e:
            raise FlowError(f"no dask scheduler answered at {cluster!r} within {timeout:g} s: {e}") from e
        except Exception as e:   # (its client thread failed to start twice, or what dask did not foresee)
            raise FlowError(f"connecting to the dask scheduler at {cluster!r} failed: {type(e).__name__}: {e}") from e
        return client, None, [client]
    if hasattr(cluster, "scheduler_address"):
        client = Client(cluster)
        return client, cluster, [client]
    raise FlowError(f"cluster must be None, a distributed.Client, a dask Cluster or a scheduler address, "
                    f"not {type(cluster).__name__}")
