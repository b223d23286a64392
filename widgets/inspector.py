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

__all__ = ["Inspector", "explain_html"]


def explain_html(lines: list[str]) -> str:
    """The rewrites as an HTML list (pure)."""
    style = "font-family:Helvetica,Arial,sans-serif; font-size:13px; line-height:1.4"
    if not lines:
        return f"<p style='{style}'><i>No rewrites: the optimized plan is the original plan.</i></p>"
    items = "".join(f"<li style='margin-bottom:0.4em'><b>{html.escape(line.split(':', 1)[0])}</b>:"
                    f"{html.escape(line.split(':', 1)[1])}</li>" for line in lines)
    return f"<ol style='padding-left:1.2em; {style}'>{items}</ol>"


class Inspector(w.VBox):
    """``flow.inspect(**rules)``: before/after tabs, rule toggles, and the explanation."""

    def __init__(self, flow: fk.Flow, **rules):
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
        opt = self.optimized
        on = ", ".join(f"{k}={v}" for k, v in self.rules.items() if k in self.toggles)
        self.after.value = plan_to_svg(opt.plan, title=f"{self.flow.name}: optimized ({on})")
        self.explain.value = explain_html(opt.explain())

    def _changed(self, change) -> None:
        self.render()
