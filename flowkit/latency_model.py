"""The latency model behind latency objectives: a deployment's latency predicted from stage
profiles (``flowkit.profiling``), a knob setting and a request rate. Pure functions; the planner
(``flowkit.planner``) searches knob settings with it.

**The model** (``predict``). A request runs its stages one after another on the worker it
lands on (``runtime/executor.py``), so its service time is the sum of its stages' latencies,
drawn from their profiled distributions (a Monte Carlo sample, fixed seed), one input per request
for all its stages:

- a *batching* stage with ``(max_batch b, max_wait w)`` at ``λ/W`` requests/s per worker
  closes batches of ``n = min(b, r·(1 + λ/W·w'))`` rows (``w'``: the wait, shortened when
  ``b`` rows arrive sooner); a request waits ``U(0, w')`` for its batch, then the batch's
  latency at ``n`` rows, and occupies the worker for its share ``r/n`` of the batch. An
  *eager* stage (``Batching.eager``) waits only when it finds the worker's threads busy, then
  for the batch running to finish, whatever ``w`` (``runtime/batcher.batch_wait``): ``w'`` is
  one batch's run ``s(n)``, waited with the threads' utilization ``ρ`` (per thread: the other
  stages' unbatched means and this stage's ``s(n)·r/n``, at ``λ/W``) as its probability, and
  ``n = min(b, r·(1 + ρ·λ/W·w'))``, found together by iterating from ``n = r``;
- a *racing* stage with ``k`` replicas takes the fastest of ``k`` draws and occupies ``k``
  workers until it finishes; a replica on another worker first pays a round trip there and,
  when that worker's threads are busy, the rest of the request running there
  (``remote_delay``); the draws share the request's input and differ only by the noise
  the profile saw around each input's own cost (``OpProfile.by_input``): a stage whose latency
  follows its input gains nothing from a race; a CPU-bound one is hedged
  (``runtime/racing.py``): the others start only after the first has run for the stage's p95.
  A race that finds its worker's threads taken runs one replica (``runtime/execution.py``):
  with the probability all of a worker's threads are taken (``race_skipped``), it takes one draw;
- every other stage takes one draw, at the request's ``r`` rows.

Each request adds its round trip outside the operators, drawn from the request path measured
on the cluster; a plan placed stage by stage (one that batches or races) adds each stage's hop
too, drawn from what a placed stage was measured to cost (``Overheads``).

Requests then queue for the cluster's servers, an M/G/c queue (least-loaded routing is close
to one shared queue): ``c`` is the workers' threads, or the CPU cores when the CPU is the
tighter limit (each stage's CPU share from its profile). The waiting time is Erlang C's
probability of waiting, scaled, times an exponential tail at the queue's own decay rate, both
found from the sampled service times (``wait_tail``): a steady service's queue clears much
faster than a variable one's; the predicted p99 is that of the sampled sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .latency_inputs import BATCHES, Knobs, Overheads, Resources, StageSpec, stage_specs
from .queueing import erlang_c, wait_tail

__all__ = ["Resources", "Overheads", "Knobs", "StageSpec", "StagePrediction", "Prediction", "stage_specs", "predict",
           "calibrated", "fewest_workers", "race_skipped", "remote_delay", "erlang_c", "wait_tail", "placed",
           "HEDGE_CPU_SHARE", "BATCHES"]

HEDGE_CPU_SHARE = 0.5   # as runtime/racing.py: CPU-bound replicas are hedged, not raced at once
MARGIN = 0.1   # fewest_workers' allowance for predict's Monte Carlo draws (their means wander from the profile's)


# -- the model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagePrediction:
    name: str
    p50_ms: float            # the stage's latency as dep.stats() measures it (a batch's run; a race's winner)
    p99_ms: float
    wait_p99_ms: float = 0.0  # waiting for a batch to close (batching stages)
    batch_rows: float = 1.0   # expected rows per batch
    max_batch: int = 1
    max_wait_ms: float = 0.0
    replicas: int = 1
    demand_ms: float = 0.0    # mean worker time a request takes from this stage
    cpu_share: float = 1.0
    race_skipped: float = 0.0  # the share of its races run with one replica (their worker busy)


@dataclass(frozen=True)
class Prediction:
    p50_ms: float
    p99_ms: float
    utilization: float        # of the bottleneck (threads or CPU); >= 1: it cannot keep up
    bottleneck: str           # "threads" or "cpu"
    servers: int
    wait_probability: float
    queue_p99_ms: float
    service_p99_ms: float
    overhead_ms: float
    demand_ms: float          # mean time per request at the bottleneck (worker threads' time, or CPU time)
    stages: tuple[StagePrediction, ...] = ()

    @property
    def holds(self) -> bool:
        return bool(self.utilization < 1)


def placed(specs: Sequence[StageSpec], knobs: Knobs) -> bool:
    """Whether the plan runs stage by stage on its worker (a batch window or a race: see
    ``runtime/executor.py``), each stage a hop through the worker's event loop, rather than in one go."""
    return any((s.batching and knobs.batch_of(s.name)[0] > 1) or knobs.deployed_of(s.name) > 1 for s in specs)


def predict(specs: Sequence[StageSpec], knobs: Knobs, rate: float, resources: Resources,
            overheads: Overheads = Overheads(), rows: int = 1, n: int = 4000, seed: int = 0) -> Prediction:
    """The predicted latency of a plan (``specs`` with ``knobs``) at ``rate`` requests/s (see
    the module docstring).

    >>> from flowkit.profiling import Profile
    >>> prof = Profile.from_latencies({"m": {1: [4.0] * 20, 8: [8.0] * 20}}, batching=["m"])
    >>> spec = StageSpec("m", (prof["m"],), batching=True)
    >>> one = predict([spec], Knobs(batch=(("m", 1, 0.0),)), 200, Resources(1), Overheads(0, 0))
    >>> eight = predict([spec], Knobs(batch=(("m", 8, 20.0),)), 200, Resources(1), Overheads(0, 0))
    >>> one.utilization, one.holds, round(eight.stages[0].batch_rows, 1), eight.holds
    (0.8, True, 1.5, True)
    >>> waiting = StageSpec("m", (prof["m"],), batching=True, eager=False)   # every batch waits to fill
    >>> round(predict([waiting], Knobs(batch=(("m", 8, 20.0),)), 200, Resources(1), Overheads(0, 0)).stages[0].batch_rows, 1)
    5.0
    """
    rng = np.random.default_rng(seed)
    W = knobs.workers
    lam_w = rate / W
    simple = not placed(specs, knobs)
    inputs = np.random.default_rng([seed, 1]).random(n)   # each request's input, for all its stages (StageSpec.draw)
    alone: dict[str, float] = {}   # each stage's mean unbatched (ms): the load on a worker's threads
    request = np.zeros(n)          # ... and a request's stages summed, unbatched (ms; for remote_delay)
    if any(s.eager and s.batching and knobs.batch_of(s.name)[0] > 1 for s in specs) or any(
            s.high_variance and min(knobs.race_of(s.name), W) > 1 for s in specs):
        alone_rng = np.random.default_rng([seed, 2])
        for s in specs:
            d = s.draw(alone_rng, rows, n, inputs)
            alone[s.name], request = float(d.mean()), request + d
    busy_elsewhere = min(1.0, lam_w * sum(alone.values()) / 1000 / resources.threads_per_worker)
    skip = race_skipped(specs, knobs, rate, resources, rows, inputs, seed, alone)
    lat = np.zeros(n)
    wall = np.zeros(n)
    cpu = np.zeros(n)
    stages = []
    for s in specs:
        b, w_ms = knobs.batch_of(s.name) if s.batching else (1, 0.0)
        k = min(knobs.race_of(s.name), W) if s.high_variance else 1
        share = s.cpu_share
        wait = np.zeros(n)
        rows_in = float(rows)
        if s.batching and b > 1:
            fill_s = (b / rows - 1) / lam_w if lam_w > 0 else math.inf
            w_eff = min(w_ms / 1000, fill_s)
            waits = np.ones(n, bool)
            if s.eager:   # the batch's rows and the worker's busy threads, found together
                rows_in, span, rho = float(rows), 0.0, 0.0
                others = sum(v for name, v in alone.items() if name != s.name) / 1000
                for _ in range(8):
                    span = float(s.draw(rng, rows_in, n, inputs).mean()) / 1000   # one batch's run
                    rho = min(1.0, lam_w * (others + span * rows / rows_in) / resources.threads_per_worker)
                    rows_in = min(float(b), rows * (1 + rho * lam_w * span))
                w_eff = span
                waits = rng.random(n) < rho
            else:
                rows_in = min(float(b), rows * (1 + lam_w * w_eff))
            wait = np.where(waits, rng.uniform(0, w_eff * 1000, n), 0.0)
            svc = s.draw(rng, rows_in, n, inputs)
            busy = svc * rows / rows_in
        elif k > 1:
            draws = np.stack([s.draw(rng, rows, n, inputs) for _ in range(k)])
            draws[1:] += np.stack([remote_delay(rng, overheads, busy_elsewhere, request) for _ in range(k - 1)])
            if share >= HEDGE_CPU_SHARE:
                h = s.p95(rows)
                first, others = draws[0], draws[1:].min(axis=0)
                svc = np.where(first <= h, first, np.minimum(first, h + others))
                busy = svc + np.where(first > h, (k - 1) * (svc - h), 0.0)
            else:
                svc = draws.min(axis=0)
                busy = k * svc
            solo = rng.random(n) < skip   # the worker's threads were taken: the first replica alone
            svc, busy = np.where(solo, draws[0], svc), np.where(solo, draws[0], busy)
        else:
            svc = s.draw(rng, rows, n, inputs)
            busy = svc
        if not simple:
            busy = busy + overheads.stage_ms
        lat += wait + svc
        wall += busy
        cpu += busy * share
        stages.append(StagePrediction(s.name, float(np.percentile(svc, 50)), float(np.percentile(svc, 99)),
                                      float(np.percentile(wait, 99)), rows_in, b, w_ms if b > 1 else 0.0, k,
                                      float(busy.mean()), share, skip if k > 1 else 0.0))
    per_stage = 0.0 if simple else overheads.stage_ms * len(specs)
    overhead = overheads.request_ms + per_stage + overheads.extra_ms
    wall += overheads.worker_ms   # (the worker's own time per request holds its GIL: its plan's threads wait)
    cpu += overheads.worker_ms
    threads = W * resources.threads_per_worker * (1 if simple else 8)   # (the executor's pool: see executor.py)
    cores = min(resources.cores or W * resources.threads_per_worker, W * resources.threads_per_worker)
    rho_t = rate * wall.mean() / 1000 / threads
    rho_c = rate * cpu.mean() / 1000 / cores
    if rho_c >= rho_t:
        util, c, demand, bottleneck = float(rho_c), int(cores), cpu, "cpu"
    else:
        util, c, demand, bottleneck = float(rho_t), threads, wall, "threads"
    service = (lat + overheads.draw(rng, n) + (0.0 if simple else overheads.draw_stages(rng, n, len(specs)))
               + overheads.extra_ms)
    if util >= 1:
        return Prediction(math.inf, math.inf, util, bottleneck, c, 1.0, math.inf, float(np.percentile(service, 99)),
                          overhead, float(demand.mean()), tuple(stages))
    pw = erlang_c(c, util * c)
    mean_d = float(demand.mean()) / c
    theta, k = wait_tail(rate / 1000, mean_d, float(demand.var() / demand.mean() ** 2) if mean_d > 0 else 0.0)
    # P(wait > t) = min(pw, k·pw·exp(-θt)): a request waits with Erlang C's probability, and the
    # tail beyond falls at θ from where it meets k·pw·exp(-θt) (k > 1: a steady queue's waits
    # start at t0 and fall fast; k < 1: fewer waits than pw, from zero)
    if theta < math.inf:
        t0 = math.log(k) / theta if k > 1 else 0.0
        waits = rng.random(n) < pw * min(k, 1.0)
        queue = np.where(waits, t0 + rng.exponential(1 / theta, n), 0.0)
    else:
        queue = np.zeros(n)
    total = service + queue
    return Prediction(float(np.percentile(total, 50)), float(np.percentile(total, 99)), util, bottleneck, c, pw,
                      float(np.percentile(queue, 99)), float(np.percentile(service, 99)), overhead, float(demand.mean()),
                      tuple(stages))


def remote_delay(rng, overheads: Overheads, busy: float, request: np.ndarray) -> np.ndarray:
    """What a replica raced on another worker waits before it runs (ms, one draw per entry of
    ``request``): a round trip there (a draw of the request path: the same router and transport
    carry it) and, with probability ``busy`` (that worker's threads all taken by its own
    requests), the rest of a request running there (uniform over ``request``: draws of a whole
    request's stages, ms).

    >>> rng = np.random.default_rng(0)
    >>> float(remote_delay(rng, Overheads(1.0), 0.0, np.full(4000, 10.0)).mean())
    1.0
    >>> round(float(remote_delay(rng, Overheads(1.0), 0.5, np.full(4000, 10.0)).mean()), 1)
    3.5
    """
    n = len(request)
    trip = overheads.draw(rng, n) * np.ones(n)
    if busy <= 0:
        return trip
    return trip + np.where(rng.random(n) < busy, rng.uniform(0, 1, n) * request, 0.0)


def race_skipped(specs: Sequence[StageSpec], knobs: Knobs, rate: float, resources: Resources, rows: int = 1,
                 inputs: np.ndarray | None = None, seed: int = 0, means: dict[str, float] | None = None) -> float:
    """The share of races that run one replica: a race finds all of its worker's threads taken
    (a stage running there, or another race) and races nothing (``runtime/execution.py``).
    Erlang C's probability that all ``threads_per_worker`` are taken, with each worker's load
    its requests' stages (their means, one replica each: ``means``, in ms, when the caller has
    them) and the other workers' replicas sent to it (``k - 1`` per race that is run, for as
    long as they run: a whole race, or from the hedge's p95 on). The share sets that load (the
    fewer races run, the less the others send): found by bisection, the share whose load gives
    it back.

    >>> from flowkit.profiling import Profile
    >>> waits = Profile.from_latencies({"r": {1: [5.0, 10.0, 20.0] * 10}}, cpu_share=0.1)["r"]   # raced at once
    >>> spec = StageSpec("r", (waits,), high_variance=True)
    >>> [round(race_skipped([spec], Knobs(race=(("r", 2),), workers=2), r, Resources(2)), 2) for r in (10, 60)]
    [0.11, 0.51]
    """
    W = knobs.workers
    raced = [s for s in specs if s.high_variance and min(knobs.race_of(s.name), W) > 1]
    if not raced or rate <= 0:
        return 0.0
    rng = np.random.default_rng([seed, 3])
    n = 400 if inputs is None else len(inputs)
    if means is None:
        means = {s.name: float(s.draw(rng, rows, n, inputs).mean()) for s in specs}
    own = sum(means.values()) / 1000
    sent = 0.0
    for s in raced:
        if s.cpu_share >= HEDGE_CPU_SHARE:   # hedged: the others run from the p95 until the race ends
            first, other, h = s.draw(rng, rows, n, inputs), s.draw(rng, rows, n, inputs), s.p95(rows)
            run = float(np.where(first > h, np.minimum(first, h + other) - h, 0.0).mean())
        else:
            run = means[s.name]
        sent += (min(knobs.race_of(s.name), W) - 1) * run / 1000
    c, lam_w = resources.threads_per_worker, rate / W

    def excess(p: float) -> float:   # falls as p rises, from >= 0 at p = 0 to <= 0 at p = 1
        return erlang_c(c, min(float(c), lam_w * (own + (1 - p) * sent))) - p

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def fewest_workers(specs: Sequence[StageSpec], rate: float, resources: Resources, overheads: Overheads = Overheads(),
                   rows: int = 1) -> int:
    """A lower bound on the workers any knob setting of ``specs`` needs at ``rate``: the least
    CPU time a request can take — each stage at its cheapest batch per row (or, where a race may
    cut a high-variance stage short, at its fastest run if that is less), plus the worker's own time
    (``Overheads.worker_ms``) — times the rate, over the cores that many workers get, less
    ``MARGIN`` for the model's sampling. With fewer, the CPU cannot keep up whatever the plan
    batches or races (``predict``'s CPU utilization is at least this); ``max_workers + 1`` when
    even all of them cannot.

    >>> from flowkit.profiling import Profile
    >>> spec = StageSpec("m", (Profile.from_latencies({"m": {1: [10.0], 8: [40.0]}})["m"],), batching=True)
    >>> fewest_workers([spec], 500, Resources(16)), fewest_workers([spec], 500, Resources(16, cores=2))
    (3, 17)
    """
    cpu_ms = overheads.worker_ms
    for s in specs:
        measured = {b for m in s.members for b in m.batch_sizes}
        sizes = sorted({b for b in set(BATCHES) | measured if b <= s.max_batch}) if s.batching else [rows]
        cheapest = rows * min(sum(m.mean(b) for m in s.members) / b for b in sizes)
        if s.high_variance:
            cheapest = min(cheapest, sum(float(np.min(m.samples(rows))) for m in s.members))
        cpu_ms += s.cpu_share * cheapest
    need = rate * cpu_ms / 1000 * (1 - MARGIN)   # cores busy
    if resources.cores is not None and need >= resources.cores:
        return resources.max_workers + 1
    return max(1, math.floor(need / resources.threads_per_worker) + 1)


def calibrated(overheads: Overheads, specs: Sequence[StageSpec], flow_ms: Sequence[float],
               at_worker_ms: Sequence[float] = ()) -> Overheads:
    """``overheads`` with what the flow's own requests measured beyond the model: ``flow_ms``,
    round trips of the flow run by ``specs`` unbatched and unraced (``probes.flow_paths``), one
    request at a time; their median over the model's median with no queue is ``extra_ms``, and
    ``at_worker_ms`` (their time at the worker's endpoint) over the operators' medians is
    ``worker_ms`` (never below zero: what the probes saw already stands).

    >>> from flowkit.profiling import Profile
    >>> spec = StageSpec("m", (Profile.from_latencies({"m": {1: [2.0] * 20}})["m"],))
    >>> o = calibrated(Overheads(1.0, 0.1), [spec], [4.5] * 20, [3.0] * 20)
    >>> o.extra_ms, o.worker_ms
    (1.5, 1.0)
    >>> predict([spec], Knobs(), 1e-6, Resources(1), o).p50_ms   # the flow's own round trip
    4.5
    >>> calibrated(Overheads(1.0, 0.1), [spec], [2.5] * 20) == Overheads(1.0, 0.1)   # faster than the model: kept
    True
    """
    if not len(flow_ms):
        return overheads
    base = replace(overheads, extra_ms=0.0, worker_ms=0.0)
    alone = predict(specs, Knobs(batch=tuple((s.name, 1, 0.0) for s in specs if s.batching)), 1e-6, Resources(1), base)
    ops_ms = sum(st.p50_ms for st in alone.stages)
    return replace(base, extra_ms=max(0.0, float(np.median(flow_ms)) - alone.p50_ms),
                   worker_ms=max(0.0, float(np.median(at_worker_ms)) - ops_ms) if len(at_worker_ms) else 0.0)
