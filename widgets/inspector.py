"""The DAG inspector: a flow's plan before and after optimization, with what each rewrite did.

A thin ipywidgets shell over the pure renderers: toggles for each rule, a Tab of the two
drawings, and the ``explain()`` list beside them. Changing a toggle re-renders only the
optimized view (``after.value`` and ``explain.value`` are reassigned).
"""

from __future__ import annotations

import html

import ipywidgets as w

import flowkit as fk
from flowkit.optimize import resolve_rules

from .render import plan_to_svg, problem_html

__all__ = ["Inspector", "explain_html", "slo_labels"]


def slo_labels(slo_plan) -> dict[str, str]:
    """``{stage: "predicted p50/p99 · batch · replicas"}`` from an ``SLOPlan`` (pure), for
    ``plan_to_svg(labels=...)`` and ``Inspector(labels=...)``. A stage deployed with more
    replicas than race (room for a live re-plan to race them) says how many of them race."""
    out = {}
    for s in slo_plan.prediction.stages:
        parts = [f"predicted p50 {s.p50_ms:.3g} ms · p99 {s.p99_ms:.3g} ms"]
        if s.max_batch > 1:
            parts.append(f"batch ≤ {s.max_batch} / {s.max_wait_ms:g} ms (~{s.batch_rows:.2g} rows)")
        deployed = slo_plan.knobs.deployed_of(s.name)
        if deployed > max(s.replicas, 1) and deployed > slo_plan.knobs.race_of(s.name):
            parts.append(f"{deployed} replicas deployed, {s.replicas} racing")
        elif s.replicas > 1:
            parts.append(f"{s.replicas} replicas race")
        out[s.name] = " · ".join(parts)
    return out


def explain_html(lines: list[str]) -> str:
    """The rewrites as an HTML list (pure)."""
    style = "font-family:Helvetica,Arial,sans-serif; font-size:13px; line-height:1.4"
    if not lines:
        return f"<p style='{style}'><i>No rewrites: the optimized plan is the original plan.</i></p>"
    items = "".join(f"<li style='margin-bottom:0.4em'><b>{html.escape(line.split(':', 1)[0])}</b>:"
                    f"{html.escape(line.split(':', 1)[1])}</li>" for line in lines)
    return f"<ol style='padding-left:1.2em; {style}'>{items}</ol>"


class Inspector(w.VBox):
    """``flow.inspect(**rules)``: before/after tabs, rule toggles, and the explanation.
    ``labels``: ``{stage or operator name: text}`` added to the optimized drawing's nodes (a
    latency objective's plan: ``slo_labels(dep.slo_plan)``); ``slo_plan``: draw that plan,
    labelled with its predictions, as the optimized view."""

    def __init__(self, flow: fk.Flow, *, labels=None, slo_plan=None, **rules):
        self.labels = dict(labels or {})
        self.slo_plan = slo_plan
        if slo_plan is not None:
            self.labels = {**slo_labels(slo_plan), **self.labels}
        self.flow = flow.original
        start = resolve_rules(rules)  # as fk.optimize reads them (compete=True is 2); unknown rules fail here
        self.toggles = {name: w.Checkbox(value=bool(start[name]), description=name, indent=False,
                                         layout=w.Layout(width="auto"))
                        for name in ("fusion", "whole", "locality", "batching")}
        self.toggles["compete"] = w.BoundedIntText(value=start["compete"], min=1, max=max(8, start["compete"]),
                                                   description="compete", layout=w.Layout(width="12em"))
        self.extra = {k: v for k, v in start.items() if k not in self.toggles}
        try:
            self.problem, plan = None, self.flow.plan
        except fk.FlowError as e:   # unfinished (two sinks, a grouped end): draw what there is
            self.problem, plan = str(e), self.flow.sketch()
        note = problem_html(self.problem) if self.problem else ""
        # the drawings take the whole pane, less their margins (they scale down, never up)
        self.before = w.HTML(note + plan_to_svg(plan, title=f"{self.flow.name}: as written"),
                             layout=w.Layout(width="auto"))
        self.after = w.HTML(layout=w.Layout(width="auto"))
        self.explain = w.HTML()
        self.tabs = w.Tab(children=[self.after, self.before], layout=w.Layout(width="100%"))
        self.tabs.titles = ("after optimization", "before")
        for t in self.toggles.values():
            t.observe(self._changed, names="value")
        heading = w.HTML("<b style='font-family:Helvetica,Arial,sans-serif'>What the optimizer did</b>")
        panel = w.VBox([heading, self.explain],
                       layout=w.Layout(width="32%", overflow="auto"))
        super().__init__([w.HBox(list(self.toggles.values())),
                          w.HBox([w.Box([self.tabs], layout=w.Layout(width="68%", overflow="hidden")), panel])])
        self.render()

    @property
    def rules(self) -> dict:
        return {**self.extra, **{k: t.value for k, t in self.toggles.items()}}

    @property
    def optimized(self) -> fk.Flow:
        return fk.optimize(self.flow, **self.rules)

    def render(self) -> None:
        if self.problem:
            self.after.value = problem_html(self.problem)
            self.explain.value = "<p><i>The optimizer runs once the flow has one output.</i></p>"
            self.tabs.selected_index = 1   # the drawing of what there is
            return
        if self.slo_plan is not None:
            p = self.slo_plan
            self.after.value = plan_to_svg(p.plan, title=f"{self.flow.name}: planned for p99 <= {p.slo_ms:g} ms at "
                                           f"{p.rate:g} req/s on {p.workers} worker{'s' if p.workers != 1 else ''}",
                                           labels=self.labels)
            self.explain.value = explain_html(p.explain())
            return
        opt = self.optimized
        on = ", ".join(f"{k}={v}" for k, v in self.rules.items() if k in self.toggles)
        self.after.value = plan_to_svg(opt.plan, title=f"{self.flow.name}: optimized ({on})", labels=self.labels)
        self.explain.value = explain_html(opt.explain())

    def _changed(self, change) -> None:
        self.render()
