"""Sliders for a latency objective: move the objective or the rate, see the plan change.

``SLOExplorer(flow, profile, slo_ms=..., rate=...)`` draws what ``planner.plan_slo`` plans at
the sliders' values — the optimized plan with each stage's predicted latency, batch and
replicas, the workers it needs and why (``explain``), or, where no plan holds, what the best one
reaches. Given a live deployment (``SLOExplorer(dep)``), it starts at
the deployment's objective and an **apply** button re-plans the deployment itself
(``dep.set_objective``): its workers, batch windows and shedding follow at once.
"""

from __future__ import annotations

import html
import math

import ipywidgets as w

import flowkit as fk
from flowkit.planner import Resources, SLOUnreachable, plan_slo

from .inspector import explain_html, slo_labels
from .render import plan_to_svg, problem_html

__all__ = ["SLOExplorer", "plan_view"]


def plan_view(flow, profile, slo_ms: float, rate: float, resources: Resources) -> tuple[str, str, str]:
    """``(title, drawing SVG, explanation HTML)`` of the plan for ``slo_ms`` at ``rate`` (pure)."""
    try:
        p = plan_slo(flow, profile, slo_ms, rate, resources)
    except SLOUnreachable as e:
        drawing = problem_html(str(e))
        if e.best is not None:
            drawing += plan_to_svg(e.best.plan, title="the best plan reachable", labels=slo_labels(e.best))
        return "unreachable", drawing, explain_html(list(e.best.explain()) if e.best is not None else [])
    title = (f"{flow.name}: p99 <= {slo_ms:g} ms at {rate:g} req/s on {p.workers} "
             f"worker{'s' if p.workers != 1 else ''} (predicted p99 {p.prediction.p99_ms:.3g} ms)")
    return title, plan_to_svg(p.plan, title=title, labels=slo_labels(p)), explain_html(p.explain())


class SLOExplorer(w.VBox):
    """Two sliders (objective in ms, rate in requests/s) over the plan they give; with a
    deployment, an apply button that re-plans it live."""

    def __init__(self, source, profile=None, *, slo_ms: float | None = None, rate: float | None = None,
                 resources: Resources | None = None):
        self.dep = None
        if isinstance(source, fk.Flow):
            if profile is None or slo_ms is None or rate is None:
                raise fk.FlowError("SLOExplorer(flow, profile, slo_ms=..., rate=...) needs a profile, an objective "
                                   "and a rate (or a deployment planned for an objective: SLOExplorer(dep))")
            self.flow = source.original
        else:   # a deployment with an objective
            plan = getattr(source, "slo_plan", None)
            if plan is None:
                raise fk.FlowError(f"{source!r} has no latency objective: deploy with slo_ms= and rate=")
            self.dep, self.flow = source, source.flow.original
            profile = plan.profile if profile is None else profile
            slo_ms = plan.slo_ms if slo_ms is None else slo_ms
            rate = plan.rate if rate is None else rate
            resources = plan.resources if resources is None else resources
        self.profile = profile
        self.resources = resources or Resources()
        self.slo = _log_slider(slo_ms, "p99 ≤ (ms)")
        self.rate = _log_slider(rate, "rate (req/s)")
        self.drawing = w.HTML(layout=w.Layout(width="68%", overflow="hidden"))
        self.explain = w.HTML(layout=w.Layout(width="32%", overflow="auto"))
        self.status = w.HTML()
        controls = [self.slo, self.rate]
        if self.dep is not None:
            self.apply = w.Button(description="apply to the deployment", button_style="primary",
                                  layout=w.Layout(width="auto"))
            self.apply.on_click(lambda _: self.apply_to_deployment())
            controls.append(self.apply)
        for s in (self.slo, self.rate):
            s.observe(lambda _: self.render(), names="value")
        super().__init__([w.HBox(controls), self.status, w.HBox([self.drawing, self.explain])])
        self.render()

    def render(self) -> None:
        self.title, self.drawing.value, self.explain.value = plan_view(
            self.flow, self.profile, self.slo.value, self.rate.value, self.resources)

    def apply_to_deployment(self):
        """Re-plan the deployment for the sliders' objective and rate; the new ``slo_plan``."""
        plan = self.dep.set_objective(slo_ms=self.slo.value, rate=self.rate.value)
        self.status.value = f"<p style='font-family:Helvetica,Arial,sans-serif'>{html.escape(plan.explain()[-1])}</p>"
        return plan


def _log_slider(value: float, label: str) -> w.FloatLogSlider:
    """A slider over 1..10^4, widened to hold ``value`` a decade inside (never clamped)."""
    decade = math.log10(value)
    return w.FloatLogSlider(value=value, base=10, min=min(0, math.floor(decade) - 1), max=max(4, math.ceil(decade) + 1),
                            step=0.01, description=label, continuous_update=False,
                            style={"description_width": "initial"})
