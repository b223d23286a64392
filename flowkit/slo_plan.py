"""The latency objective's plan as a record (``SLOPlan``): the knobs the planner chose
(``flowkit.planner``), their prediction, the optimized flow to deploy, why, and — once deployed —
its re-plans and the stages measured against the prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .flow import Flow
from .latency_model import Knobs, Overheads, Prediction, Resources
from .plan import Plan

__all__ = ["SLOPlan"]


@dataclass(frozen=True)
class SLOPlan:
    """The chosen plan: the knobs, its prediction, the optimized flow to deploy, and why.

    ``explain()`` lists the reasons; ``table()`` is predicted per stage (and measured, once a
    deployment attached its statistics: ``dep.slo_plan``)."""

    slo_ms: float
    rate: float
    knobs: Knobs
    prediction: Prediction
    flow: Flow
    resources: Resources
    reasons: tuple[str, ...] = ()
    shed_inflight: int | None = None
    planning_s: float = 0.0
    evaluated: int = 0
    measured: Any = None      # dep.stats() when attached by a deployment
    specs: tuple = ()         # the model's view of the planned stages (for re-planning: runtime/replanner.py)
    overheads: Overheads = Overheads()
    rows: int = 1
    calibration: float = 1.0  # measured p99 / predicted p99 seen live (>= 1)
    margin: float = 0.0       # the share of the objective kept for the model's error until calibrated (planner.MODEL_ERROR)
    short_of_margin: bool = False   # no plan was predicted within the margin: the best predicted was deployed
    replans: tuple = ()       # runtime.replanner.Replan records, oldest first
    profile: Any = None       # the profile it was planned from (to plan again: the notebook's sliders)

    @property
    def workers(self) -> int:
        return self.knobs.workers

    @property
    def plan(self) -> Plan:
        return self.flow.plan

    @property
    def race_widths(self) -> dict[str, int]:
        """The replicas racing per race deployed, which may be fewer than deployed
        (``planner.with_room``): each worker races as many, each on a worker of its own."""
        k = self.knobs
        return {s: k.race_of(s) for s in dict(k.race) | dict(k.room) if k.deployed_of(s) > 1}

    def explain(self) -> list[str]:
        return list(self.reasons) + [str(r) for r in self.replans]

    def with_measured(self, stats) -> "SLOPlan":
        return replace(self, measured=stats)

    def table(self):
        """One row per stage after an ``(end to end)`` row: the predicted p50/p99 (ms), batch,
        wait, replicas and utilization; with ``measured``: the measured p50/p99 and the p99's
        error (predicted / measured - 1)."""
        import pandas as pd

        pr = self.prediction
        rows = [{"stage": "(end to end)", "predicted_p50_ms": pr.p50_ms, "predicted_p99_ms": pr.p99_ms,
                 "max_batch": None, "max_wait_ms": None, "replicas": None, "utilization": pr.utilization}]
        for s in pr.stages:
            rows.append({"stage": s.name, "predicted_p50_ms": s.p50_ms, "predicted_p99_ms": s.p99_ms,
                         "max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms, "replicas": s.replicas,
                         "utilization": self.rate * s.demand_ms / 1000 / (self.workers * self.resources.threads_per_worker)})
        df = pd.DataFrame(rows)
        if self.measured is not None:
            m = self.measured.set_index("stage") if "stage" in self.measured else self.measured
            df["measured_p50_ms"] = [m["p50_ms"].get(s, math.nan) for s in df["stage"]]
            df["measured_p99_ms"] = [m["p99_ms"].get(s, math.nan) for s in df["stage"]]
            df["requests"] = [m["requests"].get(s, 0) for s in df["stage"]]
            df["p99_error"] = df["predicted_p99_ms"] / df["measured_p99_ms"] - 1
        return df

    def _repr_html_(self) -> str:
        items = "".join(f"<li>{_esc(r)}</li>" for r in self.reasons)
        return f"<ul>{items}</ul>" + self.table().to_html(index=False, float_format=lambda v: f"{v:.3g}", na_rep="")

    def __repr__(self) -> str:
        pr = self.prediction
        again = f"; re-planned {len(self.replans)}x" if self.replans else ""
        return (f"<SLOPlan {self.plan.name!r}: p99 <= {self.slo_ms:g} ms at {self.rate:g} req/s on {self.workers} "
                f"worker{'s' if self.workers != 1 else ''}; predicted p99 {pr.p99_ms:.3g} ms, utilization "
                f"{pr.utilization:.0%}{again}>")


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
