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

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from distributed.deploy.adaptive import Adaptive

from .stats import percentile

__all__ = ["ServingAdaptive", "Load", "load_of", "serving_target", "InflightSamples"]

LOAD_SAMPLE_S = 0.02   # how often the requests in flight are sampled (InflightSamples)
LOAD_WINDOW_S = 2.0    # how far back the samples reach; after that long with none in flight, sampling waits


class InflightSamples:
    """A router's requests in flight (``count``), sampled every ``LOAD_SAMPLE_S`` over the last
    ``LOAD_WINDOW_S`` (``Router.mean_inflight``: the utilization ``load_of`` reads). ``sample``
    runs on the router's event loop; after a whole window with none in flight it waits for the
    next request (``wake``) instead: an idle deployment's router thread does not wake 50 times
    a second (``sampling`` is False meanwhile)."""

    def __init__(self, count: Callable[[], int]):
        self.count = count
        self.samples: deque = deque(maxlen=round(LOAD_WINDOW_S / LOAD_SAMPLE_S))   # (time, requests in flight)
        self._work = asyncio.Event()
        self.sampling = True

    def wake(self) -> None:
        """A request arrived (called on the router's loop)."""
        self._work.set()

    def mean(self, seconds: float, now: Callable[[], int]) -> float:
        """The mean of the samples of the last ``seconds``; none there: ``now()``."""
        t = time.monotonic()
        samples = [n for at, n in list(self.samples) if t - at <= seconds]
        return sum(samples) / len(samples) if samples else float(now())

    async def sample(self) -> None:
        idle = 0
        while True:
            await asyncio.sleep(LOAD_SAMPLE_S)
            n = self.count()
            self.samples.append((time.monotonic(), n))
            idle = 0 if n else idle + 1
            if idle >= self.samples.maxlen:   # (the window holds only zeros: the mean is 0 either way)
                self._work.clear()
                self.sampling = False
                await self._work.wait()
                self.sampling, idle = True, 0


@dataclass(frozen=True)
class Load:
    """What the deployment measured over the last interval."""

    inflight: float            # mean requests in flight (all workers)
    threads_per_worker: int
    p99_recent_ms: float
    p99_history_ms: float


def load_of(now: float, sent: list, served: list, sent_inflight: float, served_inflight: float,
            threads_per_worker: int, window: float = 2.0) -> Load:
    """The load over the last ``window`` seconds up to ``now`` (where both are recorded in full):
    ``sent`` and ``served`` are ``(finish time, latency s)`` of the requests sent through the
    client and of those the workers' own HTTP endpoints served; in flight, the router's mean
    (``sent_inflight``) plus the endpoints' — by Little's law, their latencies summed over the
    window divided by it (which misses requests still running: at least ``served_inflight``,
    what they last reported). The p99 of the window and, with 200 requests to judge by, of those
    before it.

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
