"""Autoscaling on the serving load.

Requests that go straight to workers never become dask tasks, so dask's default adaptive
target (which counts tasks) would see an idle cluster under any load. ``ServingAdaptive``
overrides ``Adaptive.target()`` with Cloudflow's operator-autoscaling rule applied to what the
deployment measures: a worker is busy while it holds requests, so the mean number of requests
in flight per worker thread is its utilization (those sent through the client, and those the
workers' own HTTP endpoints serve: ``load_of``). Above 70% the target grows to bring it back
under 70%; when the recent p99 latency passes 1.25x its history under real load, one worker
is added (when utilization is over 50% and there are 200 past requests to compare with); below 10% the target shrinks (dask then retires workers gracefully: their stored
objects move first, and requests in flight on them are sent again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from distributed.deploy.adaptive import Adaptive

from .stats import percentile

__all__ = ["ServingAdaptive", "Load", "load_of", "serving_target"]


@dataclass(frozen=True)
class Load:
    """What the deployment measured over the last interval."""

    inflight: float            # mean requests in flight (all workers)
    threads_per_worker: int
    p99_recent_ms: float
    p99_history_ms: float


def load_of(now: float, sent: list, served: list, sent_inflight: float, served_inflight: float,
            threads_per_worker: int, window: float = 2.0) -> Load:
    """The load over the last ``window`` seconds: ``sent`` and ``served`` are ``(finish time,
    latency s)`` of the requests sent through the client and of those the workers' own HTTP
    endpoints served (``now``: where both are recorded in full); in flight, the router's mean (``sent_inflight``) plus the endpoints' — by
    Little's law, their latencies summed over the window divided by it (which misses requests
    still running: at least ``served_inflight``, what they last reported). The p99 of the window
    and, with 200 requests to judge by, of those before it.

    >>> load_of(10.0, [(9.5, 0.002)], [(9.0, 0.5), (9.9, 0.5), (5.0, 0.004)], 1.0, 0.0, 1)
    Load(inflight=1.5, threads_per_worker=1, p99_recent_ms=500.0, p99_history_ms=0.0)
    """
    both = sent + served
    recent = [s for t, s in both if 0 <= now - t <= window]   # (finished after now: the next window's)
    history = [s for t, s in both if now - t > window]
    littles = sum(s for t, s in served if 0 <= now - t <= window) / window
    return Load(inflight=sent_inflight + max(littles, served_inflight), threads_per_worker=threads_per_worker,
                p99_recent_ms=percentile(recent, 99) * 1000 if recent else 0.0,
                p99_history_ms=percentile(history, 99) * 1000 if len(history) >= 200 else 0.0)


def serving_target(load: Load, workers: int, minimum: int, maximum: float,
                   high: float = 0.7, low: float = 0.1, latency_factor: float = 1.25) -> int:
    """The number of workers the load calls for (a pure function of the measurements).

    >>> serving_target(Load(3.0, 1, 5.0, 5.0), workers=2, minimum=1, maximum=8)
    5
    >>> serving_target(Load(0.05, 1, 5.0, 5.0), workers=4, minimum=1, maximum=8)
    1
    >>> serving_target(Load(1.2, 1, 30.0, 10.0), workers=2, minimum=1, maximum=8)
    3
    """
    capacity = max(1, workers) * max(1, load.threads_per_worker)
    utilization = load.inflight / capacity
    if utilization > high:
        target = max(workers + 1, math.ceil(load.inflight / (high * load.threads_per_worker)))
    elif utilization > 0.5 and load.p99_history_ms > 0 and load.p99_recent_ms > latency_factor * load.p99_history_ms:
        target = workers + 1
    elif utilization < low:
        target = math.ceil(load.inflight / (high * load.threads_per_worker))
    else:
        target = workers
    return int(max(minimum, min(maximum, target)))


class ServingAdaptive(Adaptive):
    """dask ``Adaptive`` whose target follows the deployment's load (see the module docstring)."""

    def __init__(self, *args, load: Callable[[], Load] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.load = load
        self.history: list[tuple[int, Load]] = []

    async def target(self) -> int:
        if self.load is None:
            return await super().target()
        load = self.load()
        workers = len(self.plan)
        target = serving_target(load, workers, self.minimum, self.maximum)
        self.history = (self.history + [(target, load)])[-600:]
        return target
