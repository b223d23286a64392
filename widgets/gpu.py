"""The live GPU chart: the GPU plugin's samples (utilization, SMs busy, memory, per-tenant
throughput, queue depth) drawn as SVG line charts, fed from the ``flowkit-gpu`` worker events."""

from __future__ import annotations

import threading
from collections import deque

import ipywidgets as w

from .charts import line_chart_svg

__all__ = ["GPUChart"]


class GPUChart(w.VBox):
    """``GPUChart(client)`` subscribes to the plugin's events; ``GPUChart()`` is fed by ``add(sample)``."""

    def __init__(self, client=None, window: int = 240, topic: str = "flowkit-gpu"):
        self.window = window
        self.runs: dict = {}   # worker (None for a local scheduler) -> its current run's samples
        self.lock = threading.Lock()
        self.util = w.HTML()
        self.tenants = w.HTML()
        self.queue = w.HTML()
        self.title = w.HTML("<b>GPU</b> (waiting for samples)")
        super().__init__([self.title, w.HBox([self.util, self.queue]), self.tenants])
        self.client = client
        self.topic = topic
        if client is not None:
            client.subscribe_topic(topic, self._event)

    def _event(self, event) -> None:
        msg = event[1] if isinstance(event, tuple) else event
        if isinstance(msg, dict):
            self.add(msg)

    def add(self, sample: dict) -> None:
        """Draw one more sample: the chart shows the run of the worker that reported last. A sample
        from another run of a worker's scheduler (its clock went back, another policy or backend)
        starts that worker's chart afresh instead of drawing over the last run."""
        with self.lock:
            run = self.runs.setdefault(sample.get("worker"), deque(maxlen=self.window))
            last = run[-1] if run else None
            if last is not None and (sample.get("time", 0) < last.get("time", 0) or
                                     (sample.get("policy"), sample.get("backend")) !=
                                     (last.get("policy"), last.get("backend"))):
                run.clear()
            run.append(sample)
            samples = list(run)
        self.render(samples)

    def render(self, samples: list[dict]) -> None:
        if not samples:
            return
        last = samples[-1]
        t = [s.get("time", i) for i, s in enumerate(samples)]
        util = {"utilization": list(zip(t, [s.get("nvml_utilization", s.get("utilization", 0.0)) for s in samples]))}
        util["memory"] = list(zip(t, [100.0 * s.get("memory_used", 0) / s["memory_total"] if s.get("memory_total") else 0.0
                                      for s in samples]))
        for key, label in (("sm_utilization", "SMs busy"), ("sm_occupancy", "SM occupancy")):
            if any(key in s for s in samples):   # SM figures: GPM on a real GPU, the model on a simulated one
                util[label] = list(zip(t, [s.get(key, 0.0) for s in samples]))
        self.util.value = line_chart_svg(util, title="utilization and memory", unit="%", ymax=100)
        self.queue.value = line_chart_svg({"queued requests": list(zip(t, [s.get("queue", 0) for s in samples]))},
                                          title="queue depth")
        names = sorted({n for s in samples for n in s.get("throughput", {})})
        self.tenants.value = line_chart_svg({n.split(".")[-1]: list(zip(t, [s.get("throughput", {}).get(n, 0.0) for s in samples]))
                                             for n in names}, title="per-tenant throughput (rows/s)", width=920)
        where = f" · worker {last['worker']} (of {len(self.runs)} reporting)" if last.get("worker") else ""
        self.title.value = (f"<b>GPU</b>{where} · backend {last.get('backend', '?')} · policy {last.get('policy', '?')} · "
                            f"{len(samples)} samples")

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.unsubscribe_topic(self.topic)
            except Exception:
                pass
        super().close()
