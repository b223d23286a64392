"""flowkit's notebook layer (installed as ``flowkit_widgets``): renderers and widgets.

Renderers are pure functions (plan -> DOT -> SVG); widgets are thin ipywidgets shells over them.
The core reaches this package lazily (``flow.inspect()``); it never imports the core's callers.
"""

__all__ = ["inspect", "explore_slo"]


def inspect(flow, **rules):
    """The DAG inspector widget for ``flow`` (before and after ``fk.optimize(flow, **rules)``)."""
    from .inspector import Inspector

    return Inspector(flow, **rules)


def explore_slo(source, profile=None, **kw):
    """Sliders for a latency objective and a rate over the plan they give (``slo.SLOExplorer``):
    ``explore_slo(flow, profile, slo_ms=50, rate=200)``, or ``explore_slo(dep)`` for a deployment
    with an objective, with a button that re-plans it live."""
    from .slo import SLOExplorer

    return SLOExplorer(source, profile, **kw)
