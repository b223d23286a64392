"""Latency objectives: predict a deployment's p99 from stage profiles, and plan one that holds
an objective at a request rate on the fewest workers.

Everything here is a pure function of a flow, a ``Profile`` (``flowkit.profiling``) and the
resources offered; ``fk.deploy(flow, slo_ms=..., rate=...)`` calls ``plan_slo`` and deploys
the plan it returns (an ``SLOPlan``, ``flowkit.slo_plan``), or raises ``SLOUnreachable`` before
anything is installed on a worker.

**The model** is ``latency_model``'s: a sampled sum of stage latencies (batch forming and
waiting, racing and hedging) queued in an M/G/c queue.

**The plan** (``plan_slo``). For 1, 2 ... ``max_workers`` workers, with and without fusion, a
coordinate search picks each batching stage's ``(b, w)`` and each high-variance stage's race
width to minimize the predicted p99; the first worker count whose best p99 meets the objective
less a margin for the model's own error (``MODEL_ERROR``) is the plan, or, where none does but
one meets the objective itself, the best predicted (``SLOPlan.short_of_margin``). On fewer workers than ``max_workers`` it is deployed with room to race where that
pays (``with_room``); where the best candidate gets none and another, also meeting the
objective on as many workers, does (unfused, a high-variance stage stays a stage of its own,
which a fused one's CPU-bound members would make too costly to race), that one is the plan: a
rate step then re-plans into workers that race. Where no plan meets the objective,
``SLOUnreachable`` says the best p99 reachable at that rate and the highest rate at which the
objective holds.

>>> from flowkit.profiling import Profile
>>> import flowkit as fk
>>> f = fk.Flow("f", {"x": int})
>>> _ = f.map(abs, names=["y"])
>>> prof = Profile.from_latencies({"abs": {1: [10.0] * 50}})
>>> p = plan_slo(f, prof, slo_ms=30, rate=150, resources=Resources(max_workers=4))
>>> p.workers, round(p.prediction.utilization, 2)   # 2 workers: 75% busy, queueing p99 past 30 ms
(3, 0.5)
>>> plan_slo(f, prof, slo_ms=5, rate=10, resources=Resources(max_workers=4))
Traceback (most recent call last):
...
flowkit.planner.SLOUnreachable: no plan holds p99 <= 5 ms at 10 req/s on up to 4 workers: the best predicted p99 is 11 ms at 10 req/s (4 workers); the objective holds at no rate (the stages alone take 11 ms at p99)
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from .errors import FlowError
from .flow import Flow
from .latency_model import (BATCHES, Knobs, Overheads, Prediction, Resources, StagePrediction, StageSpec, calibrated,
                            erlang_c, fewest_workers, placed, predict, stage_specs)
from .optimize.compete import high_variance, race_nodes
from .plan import Batching, Op, Plan, Rewrite, Stage
from .slo_plan import SLOPlan

__all__ = ["SLOPlan", "SLOUnreachable", "plan_slo", "MODEL_ERROR", "overheads_for", "search_knobs", "apply_knobs", "with_room", "shed_limit", "reasons_for", "require_positive",
           "BATCHES", "WAITS_MS",
           "RACE_WIDTHS",
           # the model's records and functions, for the planner's callers
           "Resources", "Overheads", "Knobs", "StageSpec", "StagePrediction", "Prediction", "stage_specs", "predict",
           "fewest_workers",
           "erlang_c"]

WAITS_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
RACE_WIDTHS = (1, 2, 3)
RACE_GAIN = 0.05        # a race must cut the predicted p99 by this share: it costs its width in work
BATCH_GAIN = 0.05       # so must a batch window where there was none: it runs the plan stage by stage
MODEL_ERROR = 0.25      # a plan holds slo_ms / (1 + this) as predicted: measured p99s ran up to ~1.3x the
                        # model's on 2 shared cores (docs/slo.md, Measured) until a live p99 calibrates it


class SLOUnreachable(FlowError):
    """No plan meets the latency objective on the resources offered. ``best_p99_ms``: the best
    predicted p99 at the rate asked (inf: no plan keeps up with it); ``holds_rate``: the highest
    rate (req/s) at which some plan meets the objective (0: none); ``best``: that best plan."""

    def __init__(self, message: str, *, best_p99_ms: float, holds_rate: float, best: "SLOPlan | None" = None):
        super().__init__(message)
        self.best_p99_ms = best_p99_ms
        self.holds_rate = holds_rate
        self.best = best


def _candidate(flow: Flow, fusion: bool) -> Plan:
    from .optimize import optimize

    return optimize(flow, fusion=fusion, compete=1, batching=True).plan


def overheads_for(flow: Flow, profile, http: bool = False, fused: list[StageSpec] | None = None) -> Overheads:
    """The overheads ``profile`` measured (``Overheads.of``; over HTTP served by the workers
    with ``http``), calibrated by the flow's own requests where it timed them (``calibrated``:
    ``Profile.flow_http_ms`` over HTTP, else ``flow_path_ms``; ``fused``: the fused candidate's
    stages, the plan those requests ran, where the caller has them)."""
    overheads = Overheads.of(profile, http)
    measured = getattr(profile, "flow_http_ms" if overheads.http else "flow_path_ms", ())
    if not measured:
        return overheads
    at_worker = getattr(profile, "flow_worker_ms", ()) if overheads.http else ()
    fused = fused if fused is not None else stage_specs(_candidate(flow.original, True), profile)
    return calibrated(overheads, fused, measured, at_worker)


class Predictions:
    """``predict`` for one planning, each plan at each rate computed once and counted (``count``:
    the model evaluations made). A search meets the same knobs many times (its second pass, the
    worker counts tried after one another, the search for the rate that holds); ``predict``'s
    draws are seeded, so the same plan predicts the same. (A candidate's stages are known by
    their list: the same list, the same stages.)

    >>> from flowkit.profiling import Profile
    >>> specs = [StageSpec("m", (Profile.from_latencies({"m": {1: [4.0] * 20}})["m"],))]
    >>> seen = Predictions()
    >>> a, b = (seen(specs, Knobs(), 100, Resources(2), Overheads(0, 0), 1, 500) for _ in range(2))
    >>> a is b, seen.count, seen(specs, Knobs(), 150, Resources(2), Overheads(0, 0), 1, 500) is a, seen.count
    (True, 1, False, 2)
    """

    def __init__(self):
        self.count = 0
        self._seen: dict = {}   # key -> (specs, prediction): the specs kept, so that their id stays theirs

    def __call__(self, specs, knobs: Knobs, rate: float, resources: Resources, overheads: Overheads, rows: int,
                 n: int) -> Prediction:
        key = (id(specs), knobs, rate, resources, overheads, rows, n)
        if key not in self._seen:
            self.count += 1
            self._seen[key] = (specs, predict(specs, knobs, rate, resources, overheads, rows, n))
        return self._seen[key][1]


def _search(specs, fusion: bool, workers: int, rate: float, resources: Resources, overheads: Overheads,
            rows: int, slo_ms: float, n: int, predictions: Predictions) -> tuple[Knobs, Prediction]:
    """The knobs minimizing the predicted p99 on ``workers`` workers (a coordinate search)."""
    start = Knobs(fusion, tuple((s.name, 1, 0.0) for s in specs if s.batching),
                  tuple((s.name, 1) for s in specs if s.high_variance), workers)
    return search_knobs(specs, start, rate, resources, overheads, rows, slo_ms, n, predictions)


def search_knobs(specs, start: Knobs, rate: float, resources: Resources, overheads: Overheads, rows: int,
                 slo_ms: float, n: int = 2000, predictions: Predictions | None = None, *,
                 windows=None, resize_gain: float = 0.0) -> tuple[Knobs, Prediction]:
    """From ``start``, a coordinate search for the batch windows and race widths minimizing the
    predicted p99 (``start``'s fusion and workers stay). ``windows``: the stages whose batch
    window may change (default: every batching stage); race widths, with ``start.room``, only up
    to the replicas deployed (``Knobs.deployed_of``). ``resize_gain``: the share of the p99 a
    batch window must cut to replace ``start``'s (a live re-plan's, from the deployed windows: the
    model's noise between two measured rates would otherwise move a window back and forth)."""
    predictions = Predictions() if predictions is None else predictions
    knobs = start

    def score(k: Knobs) -> tuple:
        p = predictions(specs, k, rate, resources, overheads, rows, n)
        return (p.p99_ms, p.utilization), p

    best, pred = score(knobs)
    for _ in range(2):
        changed = False
        for s in specs:
            if s.batching and (windows is None or s.name in windows):
                # (an eager batch waits for a busy thread, not for its window: one wait will do)
                options = [(1, 0.0)] + [(b, w) for b in BATCHES if 1 < b <= s.max_batch
                                        for w in (WAITS_MS[:1] if s.eager else WAITS_MS) if w < slo_ms / 2]
                for b, w in options:
                    cur = knobs.batch_of(s.name)
                    if (b, w) == cur:
                        continue
                    k = replace(knobs, batch=tuple((x, b, w) if x == s.name else (x, bb, ww)
                                                   for x, bb, ww in knobs.batch))
                    sc, p = score(k)
                    now, was = placed(specs, k), placed(specs, knobs)
                    gain = BATCH_GAIN if now != was else resize_gain if cur == start.batch_of(s.name) else 0.0
                    if _better(sc, best, gain, simpler=was and not now):
                        best, pred, knobs, changed = sc, p, k, True
            if s.high_variance:
                for width in RACE_WIDTHS:
                    if width > knobs.workers or width == knobs.race_of(s.name) or \
                            (knobs.room and width > knobs.deployed_of(s.name)):
                        continue
                    k = replace(knobs, race=tuple((x, width if x == s.name else kk) for x, kk in knobs.race))
                    sc, p = score(k)
                    if _better(sc, best, RACE_GAIN, simpler=width < knobs.race_of(s.name)):
                        best, pred, knobs, changed = sc, p, k, True
        if not changed:
            break
    return knobs, pred


def _better(score: tuple, best: tuple, gain: float, *, simpler: bool) -> bool:
    """Whether a change of plan (``score``: its predicted ``(p99, utilization)``) is worth its
    cost against ``best``: one adding work or hops (a wider race, the first batch window, which
    runs the plan stage by stage) must cut the predicted p99 by the share ``gain``, the model's
    margin for what it prices only on average; one taking them away (``simpler``) may raise it
    by no more than that. Where either cannot keep up (p99 inf), the lower utilization wins.

    >>> _better((9.0, 0.5), (10.0, 0.5), 0.05, simpler=False), _better((9.8, 0.5), (10.0, 0.5), 0.05, simpler=False)
    (True, False)
    >>> _better((10.2, 0.5), (10.0, 0.5), 0.05, simpler=True), _better((math.inf, 1.2), (math.inf, 1.1), 0.05, simpler=True)
    (True, False)
    """
    p99, before = score[0], best[0]
    if not (math.isfinite(p99) and math.isfinite(before)):
        return score < best
    return p99 * (1 - gain) <= before if simpler else p99 < before * (1 - gain)


def _best_at(flow, candidates, rate, resources, overheads, rows, slo_ms, n, predictions, workers_range):
    """(knobs, prediction, specs) of the first worker count in ``workers_range`` whose best plan
    meets ``slo_ms``, else of the best plan seen (and False)."""
    best = None
    for w in workers_range:
        for fusion, specs in candidates:
            knobs, pred = _search(specs, fusion, w, rate, resources, overheads, rows, slo_ms, n, predictions)
            if best is None or (pred.p99_ms, pred.utilization) < (best[1].p99_ms, best[1].utilization):
                best = (knobs, pred, specs)
        if best[1].p99_ms <= slo_ms:
            return best, True
    return best, False


def plan_slo(flow: Flow, profile, slo_ms: float, rate: float, resources: Resources = Resources(),
             overheads: Overheads | None = None, *, rows: int = 1, n: int = 2000,
             margin: float = MODEL_ERROR) -> SLOPlan:
    """The plan holding p99 <= ``slo_ms`` at ``rate`` requests/s on the fewest workers (see the
    module docstring); raises ``SLOUnreachable`` when no plan on ``resources`` does.
    ``overheads``: by default those the profile measured (``overheads_for``). ``margin``: the
    share of the objective kept for the model's error — the plan is the first whose predicted
    p99 is within ``slo_ms / (1 + margin)``; where none is but one is within ``slo_ms``, the
    best predicted (``SLOPlan.short_of_margin``)."""
    if not isinstance(flow, Flow):
        raise FlowError(f"planning needs a Flow, not {type(flow).__name__}")
    require_positive("slo_ms", slo_ms, "of milliseconds ")
    require_positive("rate", rate, "of requests per second ")
    if not (isinstance(margin, (int, float)) and 0 <= margin < math.inf):
        raise FlowError(f"margin must be a share >= 0 of the objective, not {margin!r}")
    flow = flow.original
    t0 = time.perf_counter()
    predictions = Predictions()
    candidates = []
    for fusion in (True, False):
        specs = stage_specs(_candidate(flow, fusion), profile)
        if fusion is False and [s.name for s in specs] == [s.name for s in candidates[0][1]]:
            continue   # nothing to fuse: one candidate
        candidates.append((fusion, specs))
    overheads = overheads or overheads_for(flow, profile, fused=candidates[0][1])
    W = resources.max_workers   # (fewer workers than the CPU needs cannot hold: not searched)
    fewest = min(W, min(fewest_workers(specs, rate, resources, overheads, rows) for _, specs in candidates))
    target = slo_ms / (1 + margin)
    (knobs, pred, specs), ok = _best_at(flow, candidates, rate, resources, overheads, rows, target, n, predictions,
                                        range(fewest, W + 1))
    short = not ok and pred.p99_ms <= slo_ms   # within the objective, not by the margin: the best there is
    if short:
        ok, target = True, slo_ms
    short_of = slo_ms / (1 + margin) if short else None
    if not ok:
        holds = _holding_rate(flow, candidates, rate, resources, overheads, rows, slo_ms, n, predictions)
        best_p99 = pred.p99_ms
        if holds > 0:
            tail = f"it holds up to about {holds:.3g} req/s" if holds < 1000 else \
                f"it holds up to about {holds:.0f} req/s"
        else:
            floor = min(p.service_p99_ms for p in [pred])
            tail = f"the objective holds at no rate (the stages alone take {floor:.2g} ms at p99)"
        on = f"{knobs.workers} worker{'s' if knobs.workers != 1 else ''}"
        at = (f"{best_p99:.2g} ms at {rate:g} req/s ({on})" if math.isfinite(best_p99) else
              f"unbounded: at {rate:g} req/s even {W} workers run at {pred.utilization:.0%} of their capacity")
        best_plan = _finish(flow, profile, knobs, pred, specs, slo_ms, rate, resources, overheads, rows, t0, predictions, [],
                            margin, slo_ms, holds=False)
        raise SLOUnreachable(f"no plan holds p99 <= {slo_ms:g} ms at {rate:g} req/s on up to {W} worker"
                             f"{'s' if W != 1 else ''}: the best predicted p99 is {at}; {tail}",
                             best_p99_ms=best_p99, holds_rate=holds, best=best_plan)
    # the fewer workers' best, for explain()
    fewer = []
    if knobs.workers > 1:
        for fusion, sp in candidates:
            k, p = _search(sp, fusion, knobs.workers - 1, rate, resources, overheads, rows, slo_ms, n, predictions)
            fewer.append(p)
    knobs, pred = with_room(specs, knobs, pred, rate, resources, overheads, rows, target, n, predictions)
    others = [(f, sp) for f, sp in candidates if sp is not specs] if not knobs.room and knobs.workers < W else []
    for fusion, sp in others:   # no room: another candidate that holds on as many workers, with room to race?
        k, p = _search(sp, fusion, knobs.workers, rate, resources, overheads, rows, slo_ms, n, predictions)
        k, p = with_room(sp, k, p, rate, resources, overheads, rows, target, n, predictions)
        if k.room and p.p99_ms <= target:
            knobs, pred, specs = k, p, sp
            break
    return _finish(flow, profile, knobs, pred, specs, slo_ms, rate, resources, overheads, rows, t0, predictions,
                   [] if short else fewer, margin, target, short_of=short_of)


def with_room(specs, knobs: Knobs, pred: Prediction, rate: float, resources: Resources, overheads: Overheads,
              rows: int, slo_ms: float, n: int = 2000, predictions: Predictions | None = None
              ) -> tuple[Knobs, Prediction]:
    """``knobs`` with room to race (``Knobs.room``) for a plan on fewer workers than
    ``resources.max_workers``: each high-variance stage deployed with as many replicas as those
    could race (up to ``max(RACE_WIDTHS)``), those beyond its race width idle until a live
    re-plan adds workers and races them (``runtime/replanner.py``: a live re-plan cannot deploy
    replicas). Only where racing them on every worker is predicted to cut the p99 by
    ``RACE_GAIN``, and where the plan still meets ``slo_ms`` with them: a race deployed runs the
    plan stage by stage, a hop per stage (``placed``), even while it races one replica.
    ``(knobs, pred)`` unchanged otherwise.

    >>> from flowkit.profiling import Profile
    >>> import flowkit as fk
    >>> f = fk.Flow("f", {"x": int}); _ = f.map(abs, names=["y"], high_variance=True)
    >>> prof = Profile.from_latencies({"abs": {1: ([2.0] * 19 + [9.0]) * 3}}, cpu_share=0.1)
    >>> specs = stage_specs(_candidate(f, True), prof)
    >>> one = Knobs(race=(("abs", 1),))
    >>> pred = predict(specs, one, 10, Resources(2), Overheads(0.5, 0.2))
    >>> with_room(specs, one, pred, 10, Resources(2), Overheads(0.5, 0.2), 1, 30)[0].room
    (('abs', 2),)
    >>> with_room(specs, one, pred, 10, Resources(2), Overheads(0.5, 0.2), 1, 9.0)[0].room   # (it predicts 9.7 ms)
    ()
    """
    W = resources.max_workers
    width = min(max(RACE_WIDTHS), W)
    room = tuple((s.name, width) for s in specs if s.high_variance and knobs.race_of(s.name) < width)
    if not room or knobs.workers >= W:
        return knobs, pred
    everywhere = replace(knobs, workers=W)
    roomed = {s for s, _ in room}
    raced = replace(everywhere, race=tuple((s, width if s in roomed else k) for s, k in knobs.race))
    predictions = Predictions() if predictions is None else predictions
    wide, narrow = (predictions(specs, k, rate, resources, overheads, rows, n) for k in (raced, everywhere))
    if not _better((wide.p99_ms, wide.utilization), (narrow.p99_ms, narrow.utilization), RACE_GAIN, simpler=False):
        return knobs, pred   # (a re-plan would not race them)
    roomy = replace(knobs, room=room)
    p = predictions(specs, roomy, rate, resources, overheads, rows, n)
    return (roomy, p) if p.p99_ms <= slo_ms else (knobs, pred)


def require_positive(what: str, v, unit: str = "") -> None:
    """A ``FlowError`` unless ``v`` is a finite number > 0 (not a bool): an objective, a rate.

    >>> require_positive("rate", math.inf, "of requests per second ")
    Traceback (most recent call last):
    ...
    flowkit.errors.FlowError: rate must be a number of requests per second > 0, not inf
    """
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)):
        raise FlowError(f"{what} must be a number {unit}> 0, not {v!r}")


def _holding_rate(flow, candidates, rate, resources, overheads, rows, slo_ms, n, predictions) -> float:
    """The highest rate (to 5%) below ``rate`` at which some plan on all the workers meets the
    objective; 0 when none does even at a trickle."""
    W = resources.max_workers
    lo, hi = 0.0, rate

    def ok(r):
        return _best_at(flow, candidates, r, resources, overheads, rows, slo_ms, n, predictions, [W])[1]

    tiny = rate / 1000
    while not ok(tiny):   # (a rate far beyond the cluster: look a thousand times lower, to a trickle)
        if tiny < 1e-3:
            return 0.0
        hi, tiny = tiny, tiny / 1000
    lo = tiny
    while hi - lo > 0.05 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def shed_limit(pred: Prediction, slo_ms: float) -> int:
    """Requests in flight beyond which a new one is refused: with more ahead of it, the queue
    alone (draining at the predicted mean demand per server) would outlast the objective, so
    it would miss it, and delay every request behind it.

    >>> p = Prediction(5, 10, 0.5, "threads", 2, 0.3, 2, 8, 1, 4.0)
    >>> shed_limit(p, 50)
    27
    """
    per_request = max(pred.demand_ms, 1e-3) / max(1, pred.servers)
    return int(pred.servers + slo_ms / per_request)


def _finish(flow, profile, knobs, pred, specs, slo_ms, rate, resources, overheads, rows, t0, predictions, fewer,
            margin, target, *, holds: bool = True, short_of: float | None = None) -> SLOPlan:
    """The ``SLOPlan`` of the chosen knobs: made to hold ``target`` as predicted (the objective
    less the margin; the objective itself where no plan holds that, ``short_of``, or none holds
    the objective at all, ``holds=False``), shedding where the queue would outlast it."""
    planned = Flow.from_plan(apply_knobs(_candidate(flow, knobs.fusion), knobs), original=flow)
    shed = shed_limit(pred, target)
    reasons = reasons_for(specs, knobs, pred, slo_ms, rate, resources, overheads, shed, fewer, holds=holds,
                          target=target, short_of=short_of)
    return SLOPlan(slo_ms, rate, knobs, pred, planned, resources, tuple(reasons), shed,
                   time.perf_counter() - t0, predictions.count, specs=tuple(specs), overheads=overheads, rows=rows,
                   profile=profile, margin=margin, short_of_margin=short_of is not None)


def reasons_for(specs, knobs, pred, slo_ms, rate, resources, overheads, shed, fewer=(), kept: bool = False,
                holds: bool = True, target: float | None = None, why_target: str = "",
                short_of: float | None = None) -> list[str]:
    """``explain()``'s lines for a plan; ``fewer``: the predictions on one worker fewer;
    ``kept``: its workers are a floor it was given (a re-plan that retires none), not the fewest;
    ``holds``: False where no plan on the workers there may be holds the objective; ``target``:
    the p99 the plan was made to hold as predicted (default ``slo_ms``), and ``why_target``
    why it is lower (default: the model's margin, ``MODEL_ERROR``); ``short_of``: the objective
    less the margin, where no plan held that and this is the best predicted."""
    W = knobs.workers
    target = slo_ms if target is None else target
    out = [f"objective: p99 <= {slo_ms:g} ms at {rate:g} req/s; predicted p99 {pred.p99_ms:.3g} ms "
           f"(p50 {pred.p50_ms:.3g} ms) on {W} worker{'s' if W != 1 else ''} of "
           f"{resources.threads_per_worker} thread{'s' if resources.threads_per_worker != 1 else ''}; "
           f"bottleneck: {pred.bottleneck} at {pred.utilization:.0%} utilization; queueing adds "
           f"{pred.queue_p99_ms:.3g} ms at p99 (a request waits with probability {pred.wait_probability:.2f})"]
    if why_target and target < slo_ms:
        out.append(f"{why_target}, so the plan holds {target:.3g} ms as the model predicts")
    elif target < slo_ms and holds:
        out.append(f"margin: the plan holds {target:.3g} ms as the model predicts, the objective less "
                   f"{slo_ms / target - 1:.0%} for the model's error (measured p99s ran up to about that above its "
                   "predictions: docs/slo.md), until a live p99 calibrates it")
    if short_of is not None:
        out.append(f"margin: none; no plan is predicted within {short_of:.3g} ms (the objective less "
                   f"{slo_ms / short_of - 1:.0%} for the model's error), so this is the best predicted")
    if not holds:
        out.append(f"workers: {W}, all there may be: no plan on them holds the objective")
    elif short_of is not None:
        out.append(f"workers: {W}, those of the best predicted plan")
    elif fewer:
        f = min(fewer, key=lambda p: p.p99_ms)
        why = (f"utilization {f.utilization:.0%}: it cannot keep up" if not f.holds else
               f"predicted p99 {f.p99_ms:.3g} ms")
        out.append(f"workers: {W}, the fewest that hold the objective{' by that margin' if target < slo_ms else ''} "
                   f"({W - 1} would give {why})")
    elif kept:
        out.append(f"workers: {W}, kept: this re-plan does not retire workers (a measured fall of the rate does, "
                   "once it lasts)")
    else:
        out.append(f"workers: {W}, the fewest possible")
    fused = [s for s in specs if len(s.members) > 1]
    if knobs.fusion and fused:
        out.append(f"fusion: on — {', '.join(repr(s.name) for s in fused)} run as one task each "
                   f"(no hop of ~{overheads.stage_ms:.2g} ms between their operators)")
    elif not knobs.fusion:
        roomy = [s for s, k in knobs.room if k > knobs.race_of(s)]
        out.append(f"fusion: off — {', '.join(map(repr, roomy))} stay{'s' if len(roomy) == 1 else ''} a stage of "
                   "its own, deployed with room to race once a re-plan adds workers" if roomy else
                   "fusion: off — predicted no better fused")
    for s, sp in zip(specs, pred.stages):
        line = (f"{s.name!r}: p99 {sp.p99_ms:.3g} ms (p50 {sp.p50_ms:.3g} ms), {sp.demand_ms:.3g} ms of worker "
                f"time per request, CPU share {sp.cpu_share:.2f}")
        if s.batching:
            if sp.max_batch > 1:
                window = Batching(max_batch=sp.max_batch, max_wait_ms=sp.max_wait_ms, eager=s.eager)
                line += (f"; {window.describe()}: "
                         f"{sp.batch_rows:.2g} rows per batch expected at {rate / W:.3g} req/s per worker "
                         f"(batch wait p99 {sp.wait_p99_ms:.3g} ms)")
            else:
                line += (f"; not batched: no batch window was predicted to cut the p99 by {BATCH_GAIN:.0%} (at this "
                         "rate batches would not fill before the wait cost more than they save, and batching runs "
                         "the plan stage by stage)")
        if s.high_variance and knobs.deployed_of(s.name) > max(sp.replicas, knobs.race_of(s.name)):
            line += (f"; {knobs.deployed_of(s.name)} replicas deployed, {knobs.race_of(s.name)} racing: "
                     + ("the rest race once a live re-plan adds workers" if W < knobs.deployed_of(s.name) else
                        f"racing more is not predicted to pay at {rate:g} req/s (its other workers are busy)"))
        elif s.high_variance:
            line += (f"; {sp.replicas} replicas race (latency cv {max((m.cv(1) for m in s.members), default=0):.2f}); "
                     f"{sp.race_skipped:.0%} of races expected to find their worker's threads all taken and run one replica"
                     if sp.replicas > 1 else "; no race: racing predicted no lower p99 (its latency follows its input, "
                     "which every replica gets alike, or too few workers)")
        if s.missing:
            line += f"; not profiled: {', '.join(s.missing)} (costed as 0)"
        out.append(line)
    out.append(f"request path: {overheads.request_ms:.3g} ms per request on average outside the operators, "
               + ("over HTTP to the workers" if overheads.http else "from the Python client")
               + (f", and {overheads.extra_ms:.2g} ms more that the flow's own requests took (their rows, their "
                  f"stages' bookkeeping)" if overheads.extra_ms else "")
               + (f"; {overheads.worker_ms:.2g} ms of each at the worker, which holds it" if overheads.worker_ms
                  else ""))
    out.append(f"shedding: beyond {shed} requests in flight a new one is refused (fk.Overloaded): the queue "
               f"ahead of it would outlast {target:.3g} ms")
    return out


# -- applying the knobs -------------------------------------------------------------------------
def apply_knobs(plan: Plan, knobs: Knobs) -> Plan:
    """``plan`` (optimized with ``compete=1``) with each batching stage's batch and wait set
    (batch 1: not batched) and each high-variance stage racing its width — a pure pass like the
    optimizer's, recording its rewrites under the rule ``"slo"``.

    >>> import flowkit as fk
    >>> f = fk.Flow("f", {"x": int})
    >>> _ = f.map(lambda t: [r["x"] for r in t], names=["y"], batching=True).map(abs, names=["z"], high_variance=True)
    >>> p = apply_knobs(_candidate(f, False), Knobs(False, (("lambda#1", 8, 2.0),), (("abs", 2),), 2))
    >>> [(op.name, op.kind) for op in p.stages()]
    [('lambda#1', 'stage'), ('abs~1', 'stage'), ('abs~2', 'stage'), ('abs', 'anyof')]
    >>> p["lambda#1"].batching
    Batching(max_batch=8, max_wait_ms=2.0, eager=True)
    """
    nodes: list[Op] = []
    notes: list[Rewrite] = []
    for op in plan.nodes:
        if isinstance(op, Stage) and op.batching is not None:
            b, w = knobs.batch_of(op.name)
            spec = Batching(max_batch=b, max_wait_ms=w, eager=op.batching.eager) if b > 1 else None
            if spec != op.batching:
                notes.append(Rewrite("slo", f"{op.name!r}: " + (spec.describe() if spec else "not batched (batch 1)"),
                                     (op.name,), (op.name,)))
                op = replace(op, batching=spec)
        k = knobs.deployed_of(op.name)
        if high_variance(op) and k > 1:
            raced = race_nodes(op, k)
            nodes += raced
            live = knobs.race_of(op.name)
            notes.append(Rewrite("slo", f"{op.name!r}: {k} replicas race" if live == k else
                                 f"{op.name!r}: {k} replicas deployed, {live} racing (the rest once a live "
                                 "re-plan adds workers)", (op.name,),
                                 tuple(r.name for r in raced)))
            continue
        nodes.append(op)
    return plan.with_nodes(nodes, rewrites=notes)
