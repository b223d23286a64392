"""The latency model's inputs (``flowkit.latency_model``): the resources a plan may use, the
costs outside the operators, one candidate's knob setting, and each stage of a candidate plan as
profiled samples (``stage_specs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import FlowError
from .plan import AnyOf, Map, Plan, Stage

__all__ = ["Resources", "Overheads", "Knobs", "StageSpec", "stage_specs", "BATCHES"]

BATCHES = (1, 2, 4, 8, 16, 32)   # the batch sizes a batching stage may be planned with


@dataclass(frozen=True)
class Resources:
    """What the planner may use: up to ``max_workers`` workers of ``threads_per_worker`` threads,
    sharing ``cores`` CPU cores (None: one core per thread)."""

    max_workers: int = 1
    threads_per_worker: int = 1
    cores: int | None = None

    def __post_init__(self):
        for what, v in (("max_workers", self.max_workers), ("threads_per_worker", self.threads_per_worker),
                        ("cores", 1 if self.cores is None else self.cores)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise FlowError(f"{what} must be a whole number >= 1, not {v!r}")


@dataclass(frozen=True)
class Overheads:
    """Costs outside the operators: ``request_ms`` per request (client to worker and back),
    ``stage_ms`` per stage when stages are placed one by one (a plan that batches or races).
    ``request_path_ms``: round trips measured on the cluster (``Profile.request_path_ms``);
    each request then draws its own from them (the path's tail, not only its mean), and
    ``request_ms`` is their mean. ``stage_hop_ms``: likewise what a placed stage was measured
    to cost (``Profile.stage_hop_ms``); each request placed stage by stage draws its own, and
    ``stage_ms`` is their mean. ``http``: the request path is the one over HTTP served by the
    workers (``Profile.http_path_ms``), not the Python client's. ``extra_ms``: what the flow's
    own requests took beyond their operators and that path, added to each request; ``worker_ms``:
    what they took at the worker beyond their operators (the endpoint's parsing and encoding,
    the stages' bookkeeping), counted as worker time each request holds (``calibrated``).

    >>> from flowkit.profiling import Profile
    >>> Overheads.of(Profile.from_latencies({"m": {1: [1.0]}}))   # nothing measured: the defaults
    Overheads(request_ms=1.0, stage_ms=0.15, request_path_ms=(), stage_hop_ms=(), http=False, extra_ms=0.0, worker_ms=0.0)
    >>> from dataclasses import replace
    >>> p = replace(Profile.from_latencies({"m": {1: [1.0]}}), request_path_ms=(0.5,), http_path_ms=(0.8, 1.2))
    >>> Overheads.of(p).request_ms, Overheads.of(p, http=True).request_ms
    (0.5, 1.0)
    """

    request_ms: float = 1.0
    stage_ms: float = 0.15
    request_path_ms: tuple[float, ...] = ()
    stage_hop_ms: tuple[float, ...] = ()
    http: bool = False
    extra_ms: float = 0.0
    worker_ms: float = 0.0

    @classmethod
    def of(cls, profile, http: bool = False) -> "Overheads":
        """The overheads a profile measured (its request path — over HTTP served by the workers
        with ``http``, where it measured that — and its placed stages), else the defaults."""
        over_http = tuple(getattr(profile, "http_path_ms", ()) or ()) if http else ()
        path = over_http or tuple(getattr(profile, "request_path_ms", ()) or ())
        hops = tuple(getattr(profile, "stage_hop_ms", ()) or ())
        return cls(float(np.mean(path)) if path else cls.request_ms, float(np.mean(hops)) if hops else cls.stage_ms,
                   path, hops, bool(over_http))

    def draw(self, rng, n: int) -> np.ndarray | float:
        """Each of ``n`` requests' round trip outside its operators (ms)."""
        return _draw(rng, self.request_path_ms, self.request_ms, n)

    def draw_stages(self, rng, n: int, stages: int) -> np.ndarray | float:
        """Each of ``n`` requests' cost of its ``stages`` placed stages (ms): one draw per request,
        times ``stages`` — a request whose hops are slow (the worker's loop busy) is slow at each,
        as the probe's round trips were (a draw per stage would thin the tail)."""
        return _draw(rng, self.stage_hop_ms, self.stage_ms, n) * stages


def _draw(rng, samples: tuple[float, ...], mean: float, n: int) -> np.ndarray | float:
    """``n`` draws from ``samples`` (ms), or their ``mean`` where none were measured."""
    if not samples:
        return mean
    return np.asarray(samples, float)[rng.integers(0, len(samples), n)]


@dataclass(frozen=True)
class Knobs:
    """One candidate: fusion, ``(max_batch, max_wait_ms)`` per batching stage, race width per
    high-variance stage, and the number of workers. ``room``: the replicas deployed per stage
    where more than race (``deployed_of``), for a live re-plan to race once it adds workers
    (``runtime/replanner.py``; empty: none deployed yet, the race widths are free); a race
    deployed is placed stage by stage whatever its width."""

    fusion: bool = True
    batch: tuple[tuple[str, int, float], ...] = ()
    race: tuple[tuple[str, int], ...] = ()
    workers: int = 1
    room: tuple[tuple[str, int], ...] = ()

    def batch_of(self, stage: str) -> tuple[int, float]:
        return next(((b, w) for s, b, w in self.batch if s == stage), (1, 0.0))

    def race_of(self, stage: str) -> int:
        return next((k for s, k in self.race if s == stage), 1)

    def deployed_of(self, stage: str) -> int:
        """The replicas of ``stage`` deployed: its race width, or its room when that is wider."""
        return max(self.race_of(stage), next((k for s, k in self.room if s == stage), 1))


@dataclass(frozen=True)
class StageSpec:
    """A stage of a candidate plan as the model sees it: its members' latency samples."""

    name: str
    members: tuple[Any, ...]          # OpProfile of each profiled member
    batching: bool = False
    max_batch: int = 32               # the operator's own cap on the batch
    high_variance: bool = False
    missing: tuple[str, ...] = ()     # members the profile lacks (costed as zero)
    eager: bool = True                # batches go at once while the stage has a free thread

    @property
    def cpu_share(self) -> float:
        w = [m.mean(1) for m in self.members]
        total = sum(w)
        return sum(m.cpu_share * x for m, x in zip(self.members, w)) / total if total > 0 else 1.0

    def draw(self, rng, rows: float, n: int, inputs: np.ndarray | None = None) -> np.ndarray:
        """``n`` latency samples (ms) of the stage over ``rows`` rows: its members' summed.
        ``inputs`` (one number in [0, 1) per request, the same for every stage a request runs)
        picks each request's input where the profile knows which input each one-row run took:
        that input's own cost times a draw of the noise (``OpProfile.by_input``), so the stages
        of one request see the same input and replicas racing it differ only by the noise."""
        out = np.zeros(n)
        for m in self.members:
            split = m.by_input if inputs is not None and rows == 1 else None
            if split is not None:
                means, noise = split
                out += means[(inputs * len(means)).astype(int)] * noise[rng.integers(0, len(noise), n)]
            else:
                s = m.samples(rows)
                out += s[rng.integers(0, len(s), n)]
        return out

    def p95(self, rows: float) -> float:
        return float(sum(np.percentile(m.samples(rows), 95) for m in self.members))


def stage_specs(plan: Plan, profile) -> list[StageSpec]:
    """The model's view of an optimized plan's stages (before racing: race width is a knob)."""
    specs = []
    for op in plan.stages():
        if isinstance(op, AnyOf):
            continue   # a user's anyof costs nothing itself (its branches are costed, summed)
        members = op.operators
        have = tuple(profile.ops[m.name] for m in members if m.name in profile.ops)
        missing = tuple(m.name for m in members if m.name not in profile.ops)
        batching = isinstance(op, Stage) and op.batching is not None
        caps = [m.max_batch for m in members if isinstance(m, Map) and m.batching and m.max_batch]
        hv = any(isinstance(m, Map) and m.high_variance for m in members)
        eager = not op.is_gpu and (op.batching.eager if batching else True)
        specs.append(StageSpec(op.name, have, batching, min(caps) if caps else max(BATCHES), hv, missing, eager))
    return specs
