"""Client: keeping a deployment's latency objective live (docs/slo.md, "Re-planning").

``decide`` is the decision, a pure function: given the deployed ``SLOPlan``, the measured
request rate and p99 and the objective, it says whether to re-plan and returns the new plan
with the reason. It re-plans when the measured rate is ×3 (or ÷3) the planned one, or when the
measured p99 is above the objective by more than chance (``beyond_chance``: more requests late
than 1% late would make, with the second that held most of them set aside as a stall where the
rest are on time: ``window.judge``; while the rate is changing, planned for, not calibrated on).
The new plan keeps the deployed operators (fusion and the replicas deployed: changing them means
installing another plan on every worker) and chooses again what
can change live: the workers (the fewest that hold the objective at the measured rate, up to
the resources' maximum), each deployed batching stage's window (``resizable``; the batch size
and wait the model finds best at that rate on those workers, where it cuts the predicted p99
by the margin a first batch window must: the model's noise between two measured rates would
otherwise resize it back and forth), how many of each race's deployed
replicas race (no more than the workers: the planner deploys room for them,
``planner.with_room``), and the shedding limit. A p99 above
the objective that the model did not predict also calibrates it: the objective the model must
meet becomes ``slo_ms / (measured p99 / predicted p99)`` where that is tighter than the plan's
margin for the model's error (``slo_ms / (1 + SLOPlan.margin)``), so the model's optimism is paid
for with workers, and, once they run out, with earlier shedding (for the calibration only: a
plan short of the margin is the best predicted, and sheds only where the queue would outlast
the objective as calibrated). One measurement raises a calibration by ``RAISE`` at most: a
shortfall that lasts raises it again at the next. A calibration eases when, within the objective and with the load
steady, the measured p99 runs a quarter or more below the calibrated ratio (a slow spell
passed): to what is measured, halved at most at a time, not below 1 (``EASE``) — the workers and
shedding a spell brought are not kept for good. (Shedding also lowers the p99 measured: where
the spell lasts, an eased plan calibrates again.)

``Replanner`` is the thread (one per deployment with an objective) that measures every
``interval`` seconds and applies a new plan (a measured fall of the rate, and an eased
calibration, only once it has lasted longer than the measuring window, ``Replanner.fall_steps``
measurements running; a rise at once, judged over the window's last ``RISE_S`` seconds): the
adaptive minimum and maximum workers of ``dep.adaptive`` (both the plan's: the serving
autoscaler adds none beyond it), the batch windows and race widths on every worker
(``dep.windows``) and ``dep.max_inflight`` (never above the ``max_inflight`` the user asked
for). None loses a request: admission only refuses new requests, a resized batch queue keeps
what it holds, and dask retires a worker gracefully (requests in flight on it are sent again).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, replace

from ..plan import Stage
from ..planner import (BATCH_GAIN, SLOPlan, fewest_workers, overheads_for, predict, reasons_for, require_positive,
                       search_knobs, shed_limit)
from .window import LATE_SHARE, RISE_MIN, RISE_S, STALL_S, Stall, Window, beyond_chance, judge, window_rates

__all__ = ["Replan", "decide", "retarget", "over_http", "Replanner", "RATE_FACTOR", "RAISE", "STEADY"]

logger = logging.getLogger("flowkit.deploy")

RATE_FACTOR = 3.0
RAISE = 4.0         # one measurement raises a calibration by this factor at most (a sustained shortfall
                    # raises it again at the next: one window's wildest reading does not set it alone)
EASE = 2.0          # a calibration eases by this factor at most at a time ...
EASE_GAP = 1.25     # ... once measured p99s run this far below it (the model's margin, MODEL_ERROR: within it,
                    # a calibration changes nothing)
STEADY = 1.25       # a load whose last RISE_S run within this factor of its window's rate is steady: only then
                    # does a p99 above the objective calibrate the model


@dataclass(frozen=True)
class Replan:
    """One re-plan: when (``time.time()``), why, what was measured, and what changed
    (``(what, old, new)``); ``applied``: what the deployment could do about it."""

    at: float
    reason: str
    rate: float
    p99_ms: float
    changes: tuple[tuple[str, object, object], ...] = ()
    applied: tuple[str, ...] = ()

    def __str__(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.at)) if self.at else "-"
        what = ", ".join(f"{w} {a} -> {b}" for w, a, b in self.changes) or "nothing to change"
        done = f"; {'; '.join(self.applied)}" if self.applied else ""
        return f"re-planned at {when}: {self.reason}: {what}{done}"


def decide(plan: SLOPlan, rate: float, p99_ms: float, slo_ms: float | None = None, *,
           late_of: tuple[int, int] | None = None, rate_now: float | None = None, now: float = 0.0,
           rate_factor: float = RATE_FACTOR) -> tuple[SLOPlan | None, str]:
    """``(new plan, why)`` when the measurements call for a re-plan that changes something,
    else ``(None, why not)``. ``rate``: measured requests/s; ``p99_ms``: measured end-to-end
    p99 (nan: too few requests to say); ``slo_ms``: the objective (default: the plan's);
    ``late_of``: ``(requests over the objective, requests)`` behind that p99 — a p99 above the
    objective counts only when they are more than chance gives at 1% late (``beyond_chance``);
    ``rate_now``: the rate over the window's last ``RISE_S`` seconds — where it differs from
    ``rate`` by more than ``STEADY``, the load is changing, and a p99 above the objective is
    re-planned for the higher of the two without calibrating the model (a queue that builds
    after a rise is the rise, not the model's error).

    >>> import flowkit as fk
    >>> from flowkit.planner import Resources, plan_slo
    >>> from flowkit.profiling import Profile
    >>> f = fk.Flow("f", {"x": int})
    >>> _ = f.map(abs, names=["y"])
    >>> plan = plan_slo(f, Profile.from_latencies({"abs": {1: [10.0] * 50}}), 30, 150, Resources(max_workers=4))
    >>> plan.workers
    3
    >>> decide(plan, rate=160, p99_ms=20)
    (None, 'within the objective: p99 20 ms <= 30 ms at 160 req/s (planned for 150 req/s)')
    >>> decide(plan, rate=160, p99_ms=math.nan)[1]   # (fewer than P99_SAMPLES requests: Replanner.measure)
    '160 req/s (planned for 150); too few requests yet to judge a p99'
    >>> new, why = decide(plan, rate=40, p99_ms=15)
    >>> why, new.workers, new.rate
    ('the rate changed x0.27: 40 req/s measured, 150 planned', 2, 40.0)
    >>> decide(plan, rate=150, p99_ms=40, late_of=(2, 150))[1]   # two late of 150: chance, at 1% late
    'p99 40 ms measured, above the objective of 30 ms, yet 2 late of 150 requests is within chance at 1% late'
    >>> new, why = decide(plan, rate=150, p99_ms=40)   # the model said ~19 ms: it is calibrated, x2.0
    >>> why, new.workers, round(new.calibration, 1)
    ('p99 40 ms measured, above the objective of 30 ms', 4, 2.0)
    >>> new.replans[-1].changes
    (('workers', 3, 4), ('max_inflight', 10, 9))
    >>> round(decide(plan, rate=150, p99_ms=400)[0].calibration, 1)   # ~21x the model's, in one measurement
    4.0
    >>> new, why = decide(plan, rate=150, p99_ms=40, rate_now=250)   # a rise under way: planned for, not calibrated
    >>> why, new.workers, new.calibration, new.rate
    ('p99 40 ms measured, above the objective of 30 ms, while the rate changes (250 req/s over the last 2 s)', 4, 1.0, 250.0)
    >>> # asked for rather than measured (dep.set_objective):
    >>> new = retarget(plan, rate=40)
    >>> new.workers, new.slo_ms, new.rate, new.replans[-1].reason
    (2, 30, 40.0, 'asked: p99 <= 30 ms at 40 req/s')
    >>> retarget(plan, slo_ms=18).replans[-1].changes
    (('workers', 3, 4), ('max_inflight', 10, 9))
    >>> retarget(plan, slo_ms=12).replans[-1].reason
    'asked: p99 <= 12 ms at 150 req/s (no plan holds it on 4 workers: shedding beyond 8 in flight)'
    """
    slo_ms = plan.slo_ms if slo_ms is None else slo_ms
    require_positive("slo_ms", slo_ms)
    if not (rate > 0 and math.isfinite(rate)):
        return None, "no measured rate"
    ratio = rate / plan.rate
    calibration = plan.calibration
    if ratio >= rate_factor or ratio <= 1 / rate_factor:
        reason = f"the rate changed x{ratio:.2g}: {rate:.3g} req/s measured, {plan.rate:.3g} planned"
    elif p99_ms > slo_ms:
        reason = f"p99 {p99_ms:.3g} ms measured, above the objective of {slo_ms:g} ms"
        if late_of is not None and not beyond_chance(*late_of):
            return None, (f"{reason}, yet {late_of[0]} late of {late_of[1]} requests is within chance "
                          f"at {LATE_SHARE:.0%} late")
        if rate_now is not None and not 1 / STEADY <= rate_now / rate <= STEADY:
            reason += f", while the rate changes ({rate_now:.3g} req/s over the last {RISE_S:g} s)"
            rate = max(rate, rate_now)
        else:
            predicted = predict(plan.specs, plan.knobs, rate, plan.resources, plan.overheads, plan.rows).p99_ms
            if math.isfinite(predicted) and predicted > 0 and math.isfinite(p99_ms):   # (inf: nothing answered)
                ratio = p99_ms / predicted
                calibration = max(calibration, min(ratio, calibration * RAISE))
                if ratio > calibration:
                    reason += f" ({ratio:.2g}x the model's; one measurement calibrates it x{RAISE:g} at most)"
    elif math.isnan(p99_ms):
        return None, f"{rate:.3g} req/s (planned for {plan.rate:.3g}); too few requests yet to judge a p99"
    else:
        within = (f"within the objective: p99 {p99_ms:.3g} ms <= {slo_ms:g} ms at {rate:.3g} req/s "
                  f"(planned for {plan.rate:.3g} req/s)")
        steady = rate_now is None or 1 / STEADY <= rate_now / rate <= STEADY
        eased = _eased(plan, rate, p99_ms) if steady else calibration
        if eased >= calibration:
            return None, within
        reason = (f"{within}, the model's {calibration:.2g}x calibration more than measured: eased to "
                  f"{eased:.2g}x")
        return _replan(plan, rate, p99_ms, slo_ms, eased, reason, now, always=True)
    return _replan(plan, rate, p99_ms, slo_ms, calibration, reason, now)


def _eased(plan: SLOPlan, rate: float, p99_ms: float) -> float:
    """The plan's calibration eased where the measured ``p99_ms`` runs ``EASE_GAP`` times below
    it or more (a slow spell passed): to what is measured, but by ``EASE`` at most at a time,
    and not below 1. A calibration raised by a spell would otherwise keep its workers and
    shedding for good."""
    if plan.calibration <= 1 or not math.isfinite(p99_ms):
        return plan.calibration
    predicted = predict(plan.specs, plan.knobs, rate, plan.resources, plan.overheads, plan.rows).p99_ms
    if not (math.isfinite(predicted) and predicted > 0):
        return plan.calibration
    measured = p99_ms / predicted
    return max(1.0, plan.calibration / EASE, measured) if measured * EASE_GAP <= plan.calibration else plan.calibration


def retarget(plan: SLOPlan, slo_ms: float | None = None, rate: float | None = None, *, now: float = 0.0) -> SLOPlan:
    """``plan`` re-planned for a new objective (``slo_ms``) and/or rate (``rate``), what a
    slider or ``dep.set_objective`` asks: the same live choices as ``decide`` (workers, batch
    windows, race widths and shedding), whether or not they change; the plan's calibration is
    kept (examples: ``decide``).
    """
    slo_ms = plan.slo_ms if slo_ms is None else slo_ms
    rate = plan.rate if rate is None else rate
    require_positive("slo_ms", slo_ms)
    require_positive("rate", rate)
    reason = f"asked: p99 <= {slo_ms:g} ms at {rate:g} req/s"
    new, _ = _replan(replace(plan, slo_ms=slo_ms), rate, math.nan, slo_ms, plan.calibration, reason, now, always=True)
    return new


def over_http(plan: SLOPlan, *, now: float = 0.0) -> SLOPlan | None:
    """``plan`` re-planned for requests that reach the workers over HTTP (``dep.serve()`` served
    by the workers): the profile's HTTP path in place of the Python client's request path
    (``planner.overheads_for(flow, profile, http=True)``), with the same live choices as ``retarget`` — but
    never fewer workers: a cheaper path retires none as the clients connect (fewer workers are
    never urgent; a measured fall of the rate re-plans them, ``decide``). None when nothing
    changes: the plan is already for HTTP, its profile measured no HTTP path, or its overheads
    were not the profile's (given by hand: they stay).

    >>> import flowkit as fk
    >>> from flowkit.planner import Resources, plan_slo
    >>> from flowkit.profiling import Profile
    >>> f = fk.Flow("f", {"x": int}); _ = f.map(abs, names=["y"])
    >>> prof = replace(Profile.from_latencies({"abs": {1: [1.0] * 50}}), request_path_ms=(0.5,) * 50,
    ...                http_path_ms=(2.0,) * 50)
    >>> plan = plan_slo(f, prof, 10, 100, Resources(max_workers=2))
    >>> http = over_http(plan)
    >>> round(plan.prediction.p50_ms, 2), round(http.prediction.p50_ms, 2), http.overheads.http, over_http(http)
    (1.5, 3.0, True, None)
    >>> cheaper = replace(prof, request_path_ms=(4.0,) * 50, http_path_ms=(0.5,) * 50)
    >>> plan = plan_slo(f, cheaper, 6, 500, Resources(max_workers=2))   # 1 worker would do over HTTP
    >>> plan.workers, over_http(plan).workers
    (2, 2)
    """
    if plan.overheads.http or plan.profile is None or not getattr(plan.profile, "http_path_ms", ()) \
            or plan.overheads != overheads_for(plan.flow, plan.profile):
        return None
    reason = "served over HTTP by the workers: planned for the HTTP path the profile measured"
    new, _ = _replan(replace(plan, overheads=overheads_for(plan.flow, plan.profile, http=True)), plan.rate, math.nan,
                     plan.slo_ms, plan.calibration, reason, now, always=True, fewest=plan.workers)
    return new


def resizable(plan: SLOPlan) -> set[str]:
    """The stages whose batch window a live re-plan may change: those deployed batching (a
    stage deployed unbatched has no batch queue on the workers to resize)."""
    return {op.name for op in plan.plan.nodes if isinstance(op, Stage) and op.batching is not None}


def _replan(plan: SLOPlan, rate: float, p99_ms: float, slo_ms: float, calibration: float, reason: str, now: float,
            always: bool = False, fewest: int = 1) -> tuple[SLOPlan | None, str]:
    """The fewest workers, ``fewest`` at least (and the shedding limit), that hold ``slo_ms /
    calibration`` at ``rate`` with the plan's other knobs — by the plan's margin for the model's
    error too (``SLOPlan.margin``) while the calibration is below it, where a plan does;
    ``(None, why)`` when nothing changes, unless ``always``."""
    factor = max(calibration, 1 + plan.margin)
    target = slo_ms / factor
    windows = resizable(plan)
    deployed = replace(plan.knobs, room=tuple((s.name, plan.knobs.deployed_of(s.name)) for s in plan.specs
                                              if s.high_variance))   # (races only as wide as deployed)
    chosen, fewer = None, []
    W = plan.resources.max_workers   # (fewer workers than the CPU needs cannot hold: not searched)
    for w in range(min(max(fewest, fewest_workers(plan.specs, rate, plan.resources, plan.overheads, plan.rows)), W),
                   W + 1):
        start = replace(deployed, workers=w, race=tuple((s, min(k, w)) for s, k in deployed.race))
        knobs, pred = search_knobs(plan.specs, start, rate, plan.resources, plan.overheads,
                                   plan.rows, target, windows=windows, resize_gain=BATCH_GAIN)
        if pred.p99_ms <= target:
            chosen = (knobs, pred)
            break
        fewer = [pred]
    short = chosen is None and factor > calibration and pred.p99_ms <= slo_ms / calibration
    if short:   # within the objective (as calibrated), not by the margin: the best there is, without shedding for it
        chosen, target = (knobs, pred), slo_ms / calibration
    held = chosen is not None
    if chosen is None:   # even every worker cannot hold it: all of them, and shedding keeps the rest in time
        chosen, target = (knobs, pred), slo_ms / calibration   # (in the objective as calibrated, not the margin)
    knobs, pred = chosen
    if not fewer and knobs.workers > 1:   # (skipped for the CPU, or a floor: for explain(), what one fewer gives)
        fewer = [predict(plan.specs, replace(knobs, workers=knobs.workers - 1), rate, plan.resources, plan.overheads,
                         plan.rows)]
    kept = knobs.workers == fewest > 1 and fewer[-1].p99_ms <= target   # (one fewer would hold: a floor kept them)
    shed = shed_limit(pred, target)
    changes = tuple((what, old, new) for what, old, new in
                    [("workers", plan.workers, knobs.workers), ("max_inflight", plan.shed_inflight, shed)]
                    + [(f"batch window {s}", plan.knobs.batch_of(s), knobs.batch_of(s)) for s in sorted(windows)]
                    + [(f"race width {s}", plan.knobs.race_of(s), knobs.race_of(s)) for s, _ in deployed.room]
                    if old != new)
    if not changes and not always:
        return None, f"{reason}; re-planned: nothing to change"
    if not held:
        reason += f" (no plan holds it on {plan.resources.max_workers} workers: shedding beyond {shed} in flight)"
    measured = (f"calibration: measured p99s ran {calibration:.2g}x the model's"
                if calibration > 1 and (short or not held or calibration >= 1 + plan.margin) else "")
    reasons = reasons_for(plan.specs, knobs, pred, slo_ms, rate, plan.resources, plan.overheads, shed,
                          () if kept or short else fewer, kept=kept, holds=held, target=target, why_target=measured,
                          short_of=slo_ms / factor if short else None)
    record = Replan(now, reason, float(rate), float(p99_ms), changes)
    new = replace(plan, rate=float(rate), knobs=knobs, prediction=pred, shed_inflight=shed, reasons=tuple(reasons),
                  calibration=calibration, replans=plan.replans + (record,), measured=None, short_of_margin=short)
    return new, reason


class Replanner:
    """Measures the deployment every ``interval`` seconds over the last ``window`` seconds and
    applies what ``decide`` re-plans (needs ``min_requests`` finished requests in the window to
    judge at all: an idle deployment keeps its plan). Its p99 is judged only over
    ``P99_SAMPLES`` requests or more, all started since the deployment last had the workers its
    plan asks for (and since its last re-plan that changed them: requests queued on fewer workers
    through a rise measure the rise, not the plan that answered it): a worker starting (its
    first requests open connections) is no measure of the plan, and one slow request among a
    few dozen would pass for their p99, calibrate the model by it for good and shed requests
    the plan could serve. For the same reason the second of starts that held the most late
    requests is set aside where the rest are on time (``window.judge``): a stall late requests
    crowd into is not the plan's shortfall, which shows in the other seconds too; ``stalls``
    keeps those that alone would have re-planned (with the wall-clock time each began)."""

    def __init__(self, dep, interval: float = 1.0, window: float = 5.0, min_requests: int = 20,
                 max_inflight: int | None = None):
        self.dep = dep
        self.interval = interval
        self.window = window
        self.min_requests = min_requests
        self.max_inflight = max_inflight if max_inflight is not None else dep.max_inflight   # the user's cap
        self.last_reason = "not yet measured"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._settled = self._started   # since when the deployment has had its planned workers
        # a fall of the rate re-plans once this many measurements running found it: past the
        # window, which may reach back before the load began (see _fallen), and one measurement
        # more, as the workers' answers arrive one asking interval late (ServedByWorkers)
        self.fall_steps = math.ceil(window / interval) + 1
        self._falls = 0                 # measurements running that found the rate fallen
        self._eases = 0                 # ... that found the calibration more than measured (decide)
        self.stalls: list[tuple[float, Stall]] = []   # (time.time() it began, the stall) set aside (_note_stall)
        self._thread = threading.Thread(target=self._run, name=f"flowkit-replanner-{dep.id}", daemon=True)

    def start(self) -> "Replanner":
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def measure(self) -> Window:
        """The requests finished in the ``window`` seconds up to ``dep.recorded_until()`` (now, or
        when the workers serving HTTP last reported: what they served since has not arrived, and
        counting the time without its requests would read the rate low) (``Window``); their rate
        over the time since the first of them started, when that is shorter."""
        now = time.perf_counter()
        if self._arriving():
            self._settled = now
        end = self.dep.recorded_until()
        span = max(1e-3, min(self.window, end - self._started))
        recent = [(t, s) for t, s in self.dep.recent(now - end + span) if end - span <= t <= end]
        if not recent:
            return Window(0.0, math.nan, 0, 0, 0)
        # the rate over the time the requests span: a load that began within the window (the
        # deployment idle before it) is not spread over the idle part
        span = max(1e-3, min(span, end - min(t - s for t, s in recent)))
        settled = [(t - s, s) for t, s in recent if t - s >= self._settled]   # (started since)
        p99, late, judged, stall = judge(settled, self.dep._slo_plan.slo_ms)
        rate, rate_now = window_rates([t for t, _ in recent], end, span)
        return Window(rate, p99, len(recent), late, judged, rate_now, stall)

    def _arriving(self) -> bool:
        """Whether workers the plan asks for are still starting (on a cluster flowkit scales)."""
        dep = self.dep
        return dep.adaptive is not None and len(dep.workers) < dep._slo_plan.workers

    def step(self, rate: float | None = None, p99_ms: float | None = None) -> SLOPlan | None:
        """Measure (or take ``rate`` / ``p99_ms`` as measured), decide, apply; the new plan or None."""
        with self._lock:
            late_of = rate_now = None
            stalled = False
            if rate is None or p99_ms is None:
                m = self.measure()
                if m.requests < self.min_requests and rate is None and p99_ms is None:
                    self._falls = self._eases = 0
                    self.last_reason = f"{m.requests} requests in the last {self.window:g} s: too few to judge"
                    return None
                late_of = (m.late, m.judged) if p99_ms is None else None
                if rate is None:
                    if m.rate_now >= max(RATE_FACTOR * self.dep._slo_plan.rate, RISE_MIN / RISE_S):   # a rise: at once
                        rate = m.rate_now
                    elif self._fallen(m.rate):
                        self._eases = 0
                        return None
                    else:
                        rate, rate_now = m.rate, m.rate_now
                p99_ms = m.p99_ms if p99_ms is None else p99_ms
                stalled = late_of is not None and self._note_stall(m)
            new, self.last_reason = decide(self.dep._slo_plan, rate, p99_ms, late_of=late_of, rate_now=rate_now,
                                           now=time.time())
            if stalled:
                self.last_reason += (f" ({m.stall.late} late of {m.stall.requests} requests that started within "
                                     f"{STALL_S:g} s set aside: a stall)")
            if new is not None and late_of is not None and new.calibration < self.dep._slo_plan.calibration:
                self._eases += 1   # (a calibration eased, like a fall of the rate, once it lasts: never urgent)
                if self._eases < self.fall_steps:
                    self.last_reason += f"; if it lasts {self.fall_steps} measurements running ({self._eases} so far)"
                    return None
            else:
                self._eases = 0
            return None if new is None else self._adopt(new)

    def _note_stall(self, m: Window) -> bool:
        """Whether ``judge`` set aside a stall that alone made the window's late requests more
        than chance — what would have re-planned, and calibrated the model, had it been judged
        with the rest; each such stall is kept once in ``stalls``."""
        st = m.stall
        if st is None or not beyond_chance(m.late + st.late, m.judged + st.requests):
            return False
        began = time.time() - (time.perf_counter() - st.start)
        if self.stalls and abs(self.stalls[-1][1].start - st.start) < STALL_S:   # the same stall, measured again
            if st.late > self.stalls[-1][1].late:
                self.stalls[-1] = (began, st)
        else:
            self.stalls.append((began, st))
        return True

    def _fallen(self, rate: float) -> bool:
        """Whether a measured ``rate`` below the plan's by ``RATE_FACTOR`` or more is to wait
        (the measurement judges nothing else meanwhile): a fall re-plans (to fewer workers) only
        once ``fall_steps`` measurements running found it — a rise at once. A window that
        reaches back before the load began (a warm-up, then a pause) measures a fall that is
        none, and fewer workers are never urgent."""
        plan = self.dep._slo_plan
        if not (rate > 0 and rate * RATE_FACTOR <= plan.rate):
            self._falls = 0
            return False
        self._falls += 1
        if self._falls >= self.fall_steps:
            return False
        self.last_reason = (f"the rate fell to {rate:.3g} req/s ({plan.rate:.3g} planned): re-planned if it stays "
                            f"there {self.fall_steps} measurements running ({self._falls} so far)")
        return True

    def retarget(self, slo_ms: float | None = None, rate: float | None = None) -> SLOPlan:
        """Re-plan now for a new objective and/or rate (``retarget``), apply it, and return it."""
        with self._lock:
            new = self._adopt(retarget(self.dep._slo_plan, slo_ms, rate, now=time.time()))
            self.last_reason = new.replans[-1].reason
            return new

    def serving_over_http(self) -> SLOPlan | None:
        """Re-plan for requests arriving over HTTP at the workers (``over_http``) and apply it;
        the new plan, or None when nothing changed. A failure is logged and noted
        (``last_reason``), not raised: the server runs, and the plan stays the client's."""
        try:
            return self._serving_over_http()
        except Exception as e:
            logger.warning("deployment %s: planning for HTTP failed: %s: %s", self.dep.id, type(e).__name__, e)
            self.last_reason = f"planning for HTTP failed: {type(e).__name__}: {e}"
            return None

    def _serving_over_http(self) -> SLOPlan | None:
        with self._lock:
            new = over_http(self.dep._slo_plan, now=time.time())
            if new is None:
                if not self.dep._slo_plan.overheads.http:
                    self.last_reason = ("served over HTTP; the plan keeps its request path (its profile "
                                        "measured no HTTP path, or its overheads were given)")
                return None
            new = self._adopt(new)
            self.last_reason = new.replans[-1].reason
            return new

    def _adopt(self, new: SLOPlan) -> SLOPlan:
        """Apply ``new``, note what was done in its last re-plan record, and make it the plan."""
        last = replace(new.replans[-1], applied=tuple(self._apply(new)))
        if new.workers != self.dep._slo_plan.workers:   # a p99 is judged over requests started since they are all
            self._settled = time.perf_counter()        # there (measure; a worker added may already have joined)
        new = self.dep._slo_plan = replace(new, replans=new.replans[:-1] + (last,))
        self._falls = self._eases = 0   # (a fall is judged against this plan from now on)
        return new

    def _apply(self, plan: SLOPlan) -> list[str]:
        dep, done = self.dep, []
        windows = {s: plan.knobs.batch_of(s) for s in resizable(plan)}
        resized = {s: bw for s, bw in windows.items() if bw != dep._slo_plan.knobs.batch_of(s)}
        rewidth = {s: k for s, k in plan.race_widths.items() if k != dep._slo_plan.knobs.race_of(s)}
        if resized or rewidth:
            dep.windows.resize(resized, rewidth)
            done += [f"batch window {s}: up to {b} rows, waiting at most {w:g} ms" for s, (b, w) in resized.items()]
            done += [f"race width {s}: {k} replicas" for s, k in rewidth.items()]
        limit = min(self.max_inflight, plan.shed_inflight or self.max_inflight)
        if limit != dep.max_inflight:
            done.append(f"max_inflight {dep.max_inflight} -> {limit}")
            dep.max_inflight = limit
        adaptive = dep.adaptive
        if adaptive is None:
            if len(dep.workers) != plan.workers:
                done.append(f"workers: {plan.workers} wanted, {len(dep.workers)} there (the cluster was given, "
                            f"not flowkit's to scale: call dep.adapt() to let it)")
        else:   # the plan decides how many workers run: the serving autoscaler adds none beyond it
            # (raising, the maximum first; lowering, the minimum first: minimum <= maximum throughout)
            order = ("maximum", "minimum") if plan.workers > adaptive.maximum else ("minimum", "maximum")
            for what in order:
                old = getattr(adaptive, what)
                if old != plan.workers:
                    done.append(f"adaptive {what} {old} -> {plan.workers}")
                    setattr(adaptive, what, plan.workers)
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if getattr(self.dep, "_closed", True):
                return
            try:
                self.step()
            except Exception as e:   # a failed measurement (a closing deployment) must not end the loop
                self.last_reason = f"error: {type(e).__name__}: {e}"
