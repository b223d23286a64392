"""Live views: a deployment's plan with per-stage throughput and latency, refreshed a few times a
second while requests flow (``dep.dashboard()``)."""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as w

from .charts import line_chart_svg
from .render import plan_to_svg

__all__ = ["DeploymentView", "stage_rates", "objective_ms"]


def objective_ms(dep) -> float | None:
    """The deployment's latency objective (p99, ms), or None without one."""
    plan = getattr(dep, "_slo_plan", None)
    return float(plan.slo_ms) if plan is not None else None


def stage_rates(previous: dict, current: dict, seconds: float) -> dict:
    """Per-stage figures for the drawing: requests/s since the previous snapshot, p50, p99 (pure).

    >>> stage_rates({"a": {"requests": 10}}, {"a": {"requests": 30, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}}, 2.0)["a"]["rate"]
    10.0
    """
    out = {}
    for name, s in current.items():
        before = previous.get(name, {}).get("requests", s["requests"])
        out[name] = {**s, "rate": max(0.0, (s["requests"] - before) / seconds) if seconds > 0 else 0.0}
    return out


class DeploymentView(w.VBox):
    """The deployed plan annotated with live per-stage figures, a throughput chart and the dask
    dashboard link. ``refresh()`` updates once; ``start()``/``stop()`` run it every ``interval``
    seconds (a number: times are seconds unless their name ends in ``_ms``)."""

    def __init__(self, dep, interval: float = 0.3):
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
            raise TypeError(f"interval is in seconds, a number above 0 (0.3 for 300 ms), not {interval!r}")
        self.dep = dep
        self.interval = interval
        link = dep.dashboard_link
        self.header = w.HTML()
        self.link = w.HTML(f'<a href="{html.escape(link)}" target="_blank">dask dashboard</a>' if link else "")
        self.graph = w.HTML()
        self.chart = w.HTML()
        self.latency = w.HTML()   # end-to-end p50/p99 over time, with the objective (slo_ms) when there is one
        self._last: dict = {}
        self._last_t = time.monotonic()
        self._history: dict[str, list] = {}
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latency: dict[str, list] = {}
        super().__init__([w.HBox([self.header, self.link]), self.graph, self.chart, self.latency])
        self.refresh()

    def refresh(self) -> dict:
        df = self.dep.stats()
        current = {row["stage"]: {"requests": int(row["requests"]), "errors": int(row["errors"]),
                                  "p50_ms": float(row["p50_ms"]), "p99_ms": float(row["p99_ms"])}
                   for _, row in df.iterrows()}
        now = time.monotonic()
        figures = stage_rates(self._last, current, now - self._last_t)
        self._last, self._last_t = current, now
        e2e = figures.get("(end to end)", {})
        n = len(self.dep.workers)
        self.header.value = (f"<span style='font-family:Helvetica,Arial,sans-serif'><b>{html.escape(self.dep.name)}</b>"
                             f" · {n} worker{'' if n == 1 else 's'} · "
                             f"{e2e.get('rate', 0):.1f} req/s · p50 {e2e.get('p50_ms', float('nan')):.2f} ms · "
                             f"p99 {e2e.get('p99_ms', float('nan')):.2f} ms · {e2e.get('requests', 0)} requests</span> &nbsp;")
        self.graph.value = plan_to_svg(self.dep.plan, stats=figures)
        hist = self._history.setdefault("req/s", [])
        hist.append((now - self._t0, e2e.get("rate", 0.0)))
        del hist[:-300]
        self.chart.value = line_chart_svg(self._history, title="throughput (end to end)", unit="")
        for key in ("p50_ms", "p99_ms"):
            value = e2e.get(key, float("nan"))
            series = self._latency.setdefault(key[:3], [])
            if value == value:   # not nan: no requests yet
                series.append((now - self._t0, value))
            del series[:-300]
        slo = objective_ms(self.dep)
        self.latency.value = line_chart_svg(self._latency, title="latency (end to end)", unit=" ms",
                                            hlines={f"objective {slo:g} ms": slo} if slo else None)
        return figures

    def start(self) -> "DeploymentView":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True, name="flowkit-dashboard")
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if getattr(self.dep, "_closed", False):
                break
            try:
                self.refresh()
            except Exception:
                break
