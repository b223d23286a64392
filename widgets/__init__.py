"""flowkit's notebook layer (installed as ``flowkit_widgets``): renderers and widgets.

Renderers are pure functions (plan -> DOT -> SVG); widgets are thin ipywidgets shells over them.
The core reaches this package lazily (``flow.inspect()``); it never imports the core's callers.
"""

__all__ = ["inspect"]


def inspect(flow, **rules):
    """The DAG inspector widget for ``flow`` (before and after ``fk.optimize(flow, **rules)``)."""
    from .inspector import Inspector

    return Inspector(flow, **rules)
