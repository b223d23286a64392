"""Stage profiles: each operator of a flow measured on a real worker at several batch sizes.

``fk.profile(flow, sample)`` runs the flow's operators on one worker of a dask cluster (the
embedded one by default: one worker process, started for the measurement and stopped after),
each operator over tables of 1, 2, 4 ... ``max_batch`` rows cut from ``sample`` (one row at a
time over several of its rows, each about ten times, so that the cost that follows the input can
be told from the noise that does not), and records per operator and batch size its latency
distribution, the share of it spent computing (CPU time over wall time: 1 is CPU-bound, near 0
waits on sleep, I/O or a device) and its output size. The planner (``flowkit.planner``)
predicts a deployment's latency from these.

A profile is cached per flow version (``versions.flow_version``: a hash of the plan and of its
functions' code), so ``fk.profile`` then ``fk.deploy(flow, slo_ms=..., rate=...)`` measures once.

Profiles are plain data and can be written by hand (the planner's tests do):

>>> p = Profile.from_latencies({"embed": {1: [2.0] * 9 + [4.0], 8: [6.0] * 10}}, cpu_share=1.0)
>>> op = p["embed"]
>>> op.p50(1), round(op.p99(1), 2), round(op.mean(4), 2)   # batch 4: between the sizes measured
(2.0, 3.82, 3.83)
"""

from __future__ import annotations

import logging
import numbers
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import FlowError
from .flow import Flow
from .plan import Map, Op, Plan, Source
from .probes import flow_paths, http_path, probed, request_path, stage_hops
from .versions import flow_version

__all__ = ["profile", "Profile", "OpProfile", "flow_version", "cached_profile", "clear_cache", "BATCH_SIZES",
           "ONE_ROW_RUNS", "TAIL_RUNS"]

logger = logging.getLogger("flowkit.profile")

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
ONE_ROW_RUNS = 200   # runs at one row: enough for a p99 and for telling each input's own cost from the
                     # noise (OpProfile.by_input)
TAIL_RUNS = 5        # ... times as many where a high-variance operator's p99 lies in a long tail (within the
                     # budget): from 200 runs a lognormal's p99 came out 14 and 18 ms in two profiles of one stage

_CACHE: dict[tuple, "Profile"] = {}


# -- the data ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpProfile:
    """One operator's measurements: latency samples (ms) per batch size (rows in its input),
    its CPU share and output bytes per row; ``batching``/``high_variance``/``gpu`` copy the
    operator's own marks."""

    name: str
    kind: str
    latencies: Mapping[int, tuple[float, ...]]
    cpu_share: float = 1.0
    out_bytes_per_row: float = 0.0
    batching: bool = False
    high_variance: bool = False
    gpu: bool = False
    input_rows: tuple[int, ...] = ()   # the sample row each one-row run took (parallel to latencies[1])

    def __post_init__(self):
        """Measurements a model can use: at least one batch size, each a whole number >= 1 with
        at least one finite latency >= 0; a CPU share between 0 and 1 (a ``FlowError`` names the
        operator otherwise: a profile written by hand is checked as one measured)."""
        def bad(why: str) -> FlowError:
            return FlowError(f"the profile of operator {self.name!r}: {why}")

        if not self.latencies:
            raise bad("no latencies at any batch size")
        for b, runs in self.latencies.items():
            if not (isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 1):
                raise bad(f"batch size {b!r} is not a whole number >= 1")
            arr = np.asarray(runs, float)
            if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise bad(f"the latencies at batch {b} must be finite numbers of ms >= 0, at least one")
        if not (0.0 <= self.cpu_share <= 1.0):
            raise bad(f"cpu_share must lie between 0 and 1, not {self.cpu_share!r}")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.latencies))

    def samples(self, batch: float) -> np.ndarray:
        """Latency samples (ms) at ``batch`` rows: the measured ones, or those of the nearest
        measured sizes scaled linearly in between (and proportionally beyond the largest)."""
        sizes = self.batch_sizes
        if not sizes:
            return np.zeros(1)
        if batch in self.latencies:
            return np.asarray(self.latencies[batch], dtype=float)
        lo = max((b for b in sizes if b <= batch), default=sizes[0])
        hi = min((b for b in sizes if b >= batch), default=sizes[-1])
        a, b = np.asarray(self.latencies[lo], float), np.asarray(self.latencies[hi], float)
        if lo == hi:   # outside the measured sizes: scale the nearest by the row count
            return a * (batch / lo) if batch > lo else a
        t = (batch - lo) / (hi - lo)
        n = max(len(a), len(b))
        qs = np.linspace(0, 100, n)
        return np.percentile(a, qs) * (1 - t) + np.percentile(b, qs) * t

    def mean(self, batch: float = 1) -> float:
        return float(np.mean(self.samples(batch)))

    def p50(self, batch: float = 1) -> float:
        return float(np.percentile(self.samples(batch), 50))

    def p99(self, batch: float = 1) -> float:
        return float(np.percentile(self.samples(batch), 99))

    def cv(self, batch: float = 1) -> float:
        """Coefficient of variation of the latency (std / mean): how high-variance it is."""
        s = self.samples(batch)
        m = float(np.mean(s))
        return float(np.std(s)) / m if m > 0 else 0.0

    @cached_property
    def by_input(self) -> tuple[np.ndarray, np.ndarray] | None:
        """One row's latency split into what follows the input and what does not: each input's
        mean (ms), and the noise — every run's ratio to its input's mean, pooled over the inputs
        run more than once (a group of k runs' ratios widened by sqrt(k/(k-1)): a slow run also
        raises its own input's mean). Racing replicas of a stage cuts only the noise: replicas
        given the same input all pay that input's own cost. (Computed once: the planner's
        search reads it for every candidate it predicts.)

        None — the runs are then one distribution — when the runs' inputs are unknown (a profile
        written by hand without ``input_rows``), when no input ran twice, or when the inputs'
        means differ no more than the noise alone would make them (their spread is not
        larger than the noise's: a stage whose latency is noise, whatever its input).

        >>> op = OpProfile("t", "map", {1: (10.0, 30.0, 11.0, 29.0)}, input_rows=(0, 1, 0, 1))
        >>> means, noise = op.by_input
        >>> means.tolist(), noise.round(3).tolist()
        ([10.5, 29.5], [0.933, 1.067, 1.024, 0.976])
        >>> OpProfile("t", "map", {1: (10.0, 30.0, 30.0, 10.0)}, input_rows=(0, 1, 0, 1)).by_input is None
        True
        """
        runs = self.latencies.get(1, ())
        if not self.input_rows or len(self.input_rows) != len(runs):
            return None
        per: dict[int, list[float]] = {}
        for row, ms in zip(self.input_rows, runs):
            per.setdefault(row, []).append(ms)
        groups = [np.asarray(v) for v in per.values()]
        twice = [g for g in groups if len(g) > 1]
        if not twice:
            return None
        within = float(np.mean([g.var(ddof=1) for g in twice]))          # the noise's variance
        means = np.array([g.mean() for g in groups])
        between = float(means.var(ddof=1)) - within / np.mean([len(g) for g in groups]) if len(means) > 1 else 0.0
        if between <= within:
            return None
        noise = [1 + (x / g.mean() - 1) * np.sqrt(len(g) / (len(g) - 1)) for g in twice if g.mean() > 0 for x in g]
        return means, np.array(noise or [1.0])


@dataclass(frozen=True)
class Profile:
    """A flow's operator profiles, keyed by operator name (the unoptimized plan's names)."""

    ops: Mapping[str, OpProfile]
    version: str = ""
    worker: str = ""
    seconds: float = 0.0                      # how long measuring took
    notes: tuple[str, ...] = field(default=())
    request_path_ms: tuple[float, ...] = ()   # a request's round trip outside its operators (``probes.request_path``)
    stage_hop_ms: tuple[float, ...] = ()      # a stage's cost when stages are placed one by one (``probes.stage_hops``)
    http_path_ms: tuple[float, ...] = ()      # ``request_path_ms`` over HTTP served by the workers (``probes.http_path``)
    flow_path_ms: tuple[float, ...] = ()      # the flow's own requests, fused, from the client (``probes.flow_paths``)
    flow_http_ms: tuple[float, ...] = ()      # ... over HTTP served by the workers
    flow_worker_ms: tuple[float, ...] = ()    # ... and those HTTP requests' time at the worker's endpoint

    def __getitem__(self, name: str) -> OpProfile:
        try:
            return self.ops[name]
        except KeyError:
            raise FlowError(f"the profile has no operator {name!r} (it has {', '.join(self.ops) or 'none'}); "
                            f"profile the flow again (fk.profile)") from None

    def __contains__(self, name: str) -> bool:
        return name in self.ops

    @classmethod
    def from_latencies(cls, latencies: Mapping[str, Mapping[int, Sequence[float]]], *, cpu_share: float = 1.0,
                       batching: Sequence[str] = (), high_variance: Sequence[str] = (),
                       input_rows: Sequence[int] = (), version: str = "") -> "Profile":
        """A profile written by hand: ``{op: {batch: [ms, ...]}}`` (for tests and what-ifs);
        ``input_rows``: the input each one-row run took, the same for every operator."""
        return cls({name: OpProfile(name, "map", {int(b) if isinstance(b, numbers.Integral) else b: tuple(map(float, v))
                                                  for b, v in per.items()},
                                    cpu_share=cpu_share, batching=name in batching,
                                    high_variance=name in high_variance, input_rows=tuple(input_rows))
                    for name, per in latencies.items()}, version=version)

    def table(self):
        """A pandas DataFrame: one row per operator and batch size (p50/p99 ms, per-row ms,
        CPU share, output bytes per row)."""
        import pandas as pd

        rows = []
        for op in self.ops.values():
            for b in op.batch_sizes:
                s = op.samples(b)
                rows.append({"operator": op.name, "batch": b, "runs": len(s),
                             "p50_ms": float(np.percentile(s, 50)), "p99_ms": float(np.percentile(s, 99)),
                             "ms_per_row": float(np.mean(s)) / b, "cpu_share": op.cpu_share,
                             "out_bytes_per_row": op.out_bytes_per_row})
        for name, runs in (("(request path)", self.request_path_ms), ("(stage hop)", self.stage_hop_ms),
                           ("(HTTP path)", self.http_path_ms), ("(the flow's requests)", self.flow_path_ms),
                           ("(the flow over HTTP)", self.flow_http_ms),
                           ("(the flow at the worker)", self.flow_worker_ms)):
            if runs:
                s = np.asarray(runs)
                rows.append({"operator": name, "batch": 1, "runs": len(s), "p50_ms": float(np.percentile(s, 50)),
                             "p99_ms": float(np.percentile(s, 99)), "ms_per_row": float(np.mean(s))})
        return pd.DataFrame(rows)

    def chart_svg(self) -> str:
        """Per-row latency (p50, ms) against batch size, one line per operator (an SVG string)."""
        try:
            from flowkit_widgets.charts import line_chart_svg
        except ImportError:   # the notebook layer is optional
            return ""
        series = {op.name: [(b, op.p50(b) / b) for b in op.batch_sizes] for op in self.ops.values()}
        return line_chart_svg(series, title="p50 per row vs batch size", unit="ms/row")

    def _repr_html_(self) -> str:
        return self.table().to_html(index=False, float_format=lambda v: f"{v:.3g}", na_rep="") + self.chart_svg()

    def __repr__(self) -> str:
        parts = ", ".join(f"{op.name}: {op.p50(1):.3g} ms" for op in self.ops.values())
        return f"<Profile {self.version[:12] or '(by hand)'}: p50 at batch 1 — {parts}>"


# -- the cache ----------------------------------------------------------------------------------
def cached_profile(flow: Flow | Plan) -> "Profile | None":
    """The most recent profile of this flow version measured in this process, if any."""
    v = flow_version(flow)
    found = [p for k, p in _CACHE.items() if k[0] == v]
    return found[-1] if found else None


def clear_cache() -> None:
    _CACHE.clear()


# -- measuring ----------------------------------------------------------------------------------
def profile(flow: Flow, sample: Any, cluster: Any = None, *, batch_sizes: Sequence[int] = BATCH_SIZES,
            repeats: int = 20, one_row_runs: int = ONE_ROW_RUNS, budget_s: float = 20.0,
            store: Mapping[Any, Any] | None = None, refresh: bool = False, timeout: float = 120.0) -> Profile:
    """Measure every operator of ``flow`` on a worker of ``cluster`` (a ``distributed.Client``,
    a dask cluster, a scheduler address, or None: an embedded one-worker cluster started for
    this and closed after) at each of ``batch_sizes`` rows, ``repeats`` times and at one row
    ``max(repeats, one_row_runs)`` times (a request's size: its p99 needs the tail; ``TAIL_RUNS``
    times as many where an operator is marked ``high_variance``), fewer where
    the operators would take past ``budget_s`` seconds (half of it for one row, half for the
    batches); then the request path on the cluster, ``one_row_runs`` times, as many with
    stages placed one by one and as many over HTTP served by the workers (``probes``; about
    ``one_row_runs`` x 40 ms more). ``sample`` is the input (a Table, a DataFrame, records...) whose rows are cycled to
    make each batch, ``store`` the objects lookups read.
    Cached per flow version and batch sizes (``refresh=True`` measures again); the request path
    is the cluster's the profile ran on: profile on the cluster that will serve (``cluster=``)
    where its network differs.
    """
    if not isinstance(flow, Flow):
        raise FlowError(f"profile needs a Flow, not {type(flow).__name__}")
    from .table import as_table

    plan = flow.original.plan   # the user's operators (an optimized flow's stages are made of them)
    sizes = tuple(sorted({int(b) for b in batch_sizes}))
    if not sizes or sizes[0] < 1:
        raise FlowError(f"batch_sizes must be whole numbers >= 1, not {batch_sizes!r}")
    for arg, v in (("repeats", repeats), ("one_row_runs", one_row_runs)):
        if not (isinstance(v, int) and v >= 1):
            raise FlowError(f"{arg} must be a whole number >= 1, not {v!r}")
    table = as_table(sample, plan.source.schema)
    if len(table) == 0:
        raise FlowError("profile needs a sample with at least one row")
    version = flow_version(plan)
    key = (version, sizes)
    if not refresh and key in _CACHE:
        return _CACHE[key]

    from .runtime.clusters import connect
    from .runtime.wire import dumps, dumps_plan

    plan_bytes = dumps_plan(plan)
    client, _, owned = connect(cluster, 1, timeout)
    t0 = time.perf_counter()
    try:
        tail = TAIL_RUNS if any(_marked(op, "high_variance") for op in plan.nodes) else 1
        fut = client.submit(_measure_on_worker, plan_bytes, dumps(table), sizes, repeats, one_row_runs * tail, budget_s,
                            dumps(dict(store or {})), pure=False, key=f"flowkit-profile-{version}-{time.time_ns()}")
        raw = fut.result(timeout=max(timeout, budget_s * 3))
        path = probed("request path", "1 ms per request", raw["notes"],
                      lambda: request_path(client, one_row_runs, min(timeout, 30.0)))
        hops = probed("placed stages", "0.15 ms per placed stage", raw["notes"], lambda: stage_hops(
            path, request_path(client, one_row_runs, min(timeout, 30.0), placed=True))) if path else ()
        over_http = probed("HTTP path", "the request path", raw["notes"],
                           lambda: http_path(client, one_row_runs, min(timeout, 30.0)))
        own = probed("flow's own requests", "its operators and the probe's path", raw["notes"],
                     lambda: flow_paths(client, flow, table, max(20, one_row_runs // 2), min(timeout, 30.0),
                                        store=store))
    finally:
        for thing in owned:
            try:
                thing.close()
            except Exception as e:  # pragma: no cover - best effort
                logger.debug("closing %r: %s", thing, e)
    ops = {}
    for op in plan.nodes:
        if isinstance(op, Source) or op.name not in raw["ops"]:
            continue
        r = raw["ops"][op.name]
        ops[op.name] = OpProfile(op.name, op.kind, {int(b): tuple(v) for b, v in r["latencies"].items()},
                                 cpu_share=r["cpu_share"], out_bytes_per_row=r["out_bytes_per_row"],
                                 batching=_marked(op, "batching"), high_variance=_marked(op, "high_variance"),
                                 gpu=op.is_gpu, input_rows=tuple(raw["input_rows"]))
    prof = Profile(ops, version=version, worker=raw["worker"], seconds=time.perf_counter() - t0,
                   notes=tuple(raw["notes"]), request_path_ms=path, stage_hop_ms=hops, http_path_ms=over_http,
                   **dict(zip(("flow_path_ms", "flow_http_ms", "flow_worker_ms"), own)))
    _CACHE[key] = prof
    return prof


def _marked(op: Op, flag: str) -> bool:
    return any(isinstance(m, Map) and getattr(m, flag) for m in op.operators)


def _measure_on_worker(plan_bytes: bytes, table_bytes: bytes, sizes, repeats: int, one_row_runs: int,
                       budget_s: float, store_bytes: bytes) -> dict:
    """On a worker: time every operator of the plan over batches of each size (see ``profile``)."""
    from distributed import get_worker

    from .runtime.semantics import DictStore, apply
    from .runtime.wire import dumps, loads
    from .table import Table

    plan: Plan = loads(plan_bytes)
    sample: Table = loads(table_bytes)
    ctx = DictStore(loads(store_bytes))
    ops = plan.nodes[1:]
    lat: dict[str, dict[int, list[float]]] = {op.name: {} for op in ops}
    cpu: dict[str, list[tuple[float, float]]] = {op.name: [] for op in ops}
    out_bytes: dict[str, list[float]] = {op.name: [] for op in ops}
    notes: list[str] = []

    # One row at a time, the runs take turns over up to a tenth as many of the sample's rows as
    # the runs that fit the budget (each input about ten times: what follows the input, and what
    # does not, see OpProfile.by_input); a batch of n rows starts where the previous one ended.
    runs = {n: max(repeats, one_row_runs) if n == 1 else repeats for n in sizes}
    batched = [n for n in sizes if n > 1]
    halves = 2 if batched and 1 in sizes else 1   # the budget: half for one row, half for the batches
    budget = {n: budget_s / halves / (len(batched) if n > 1 else 1) for n in sizes}
    distinct = 1
    input_rows: list[int] = []

    def batch(n: int, r: int) -> Table:
        start = r % distinct if n == 1 else r * n
        idx = [(start + i) % len(sample) for i in range(n)]
        return Table._make(sample.schema, [sample.rows[i] for i in idx], list(range(n)))

    def one_pass(n: int, r: int, record: bool) -> None:
        env = {plan.source.name: batch(n, r)}
        if record and n == 1:
            input_rows.append(r % distinct)
        for op in ops:
            inputs = [env[i] for i in op.inputs]
            t0, c0 = time.perf_counter(), time.thread_time()
            out = apply(op, inputs, ctx)
            wall, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
            env[op.name] = out
            if record:
                lat[op.name].setdefault(n, []).append(wall * 1000)
                cpu[op.name].append((cpu_s, wall))
                if n == sizes[-1] and not out_bytes[op.name] and isinstance(out, Table) and len(out):
                    out_bytes[op.name].append(len(dumps(out)) / len(out))   # at the largest batch: header amortized

    one_pass(sizes[0], 0, record=False)   # warm-up: class operators are created, caches filled
    started = time.perf_counter()
    if sizes[0] == 1:   # a tenth as many inputs as the runs the budget allows, timed by a second pass
        one_pass(1, 0, record=False)
        fits = budget[1] / max(time.perf_counter() - started, 1e-6)
        distinct = min(len(sample), max(1, int(min(runs[1], fits)) // 10))
        started = time.perf_counter()
    for n in sizes:
        t_size = time.perf_counter()
        for r in range(runs[n]):
            one_pass(n, r, record=True)
            if r >= 2 and time.perf_counter() - t_size > budget[n]:
                notes.append(f"batch {n}: {r + 1} runs (the time budget ran out)")
                break
    result = {}
    for op in ops:
        wall = sum(w for _, w in cpu[op.name])
        share = min(1.0, sum(c for c, _ in cpu[op.name]) / wall) if wall > 0 else 1.0
        ob = out_bytes[op.name]
        result[op.name] = {"latencies": lat[op.name], "cpu_share": share,
                           "out_bytes_per_row": float(np.mean(ob)) if ob else 0.0}
    notes.append(f"measured in {time.perf_counter() - started:.2f} s")
    return {"ops": result, "worker": get_worker().address, "notes": notes, "input_rows": input_rows}
