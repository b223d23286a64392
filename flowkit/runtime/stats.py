"""Per-stage counters and recent latencies, cheap enough to update on every request."""

from __future__ import annotations

import threading
from collections import Counter, deque

__all__ = ["StageStats", "percentile", "stats_frame", "SERVED", "STORE"]

SERVED = "__served__"   # a worker's own HTTP requests, end to end (see ingress)
STORE = "__store__"     # a worker's dynamic lookups: local or remote


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN when there are no values.

    >>> percentile([1, 2, 3, 4], 50), percentile([], 99) != percentile([], 99)
    (2.5, True)
    """
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class StageStats:
    """Counts and the last ``window`` latencies (seconds) of one stage, plus free-form counters."""

    __slots__ = ("requests", "errors", "latencies", "cpu", "counters", "batch_sizes", "lock")

    def __init__(self, window: int = 2048):
        self.requests = 0
        self.errors = 0
        self.latencies: deque = deque(maxlen=window)
        self.cpu: deque = deque(maxlen=64)   # (cpu seconds, wall seconds) of the last calls measured
        self.counters: Counter = Counter()
        self.batch_sizes: Counter = Counter()
        self.lock = threading.Lock()

    def record(self, seconds: float, ok: bool = True, cpu: float | None = None) -> None:
        with self.lock:
            self.requests += 1
            if ok:
                self.latencies.append(seconds)
                if cpu is not None:
                    self.cpu.append((cpu, seconds))
            else:
                self.errors += 1

    def cpu_share(self) -> float | None:
        """The share of recent wall time spent computing in the calling thread (1: CPU-bound,
        near 0: waiting on sleep, I/O or a device); None before 16 measured calls.

        >>> s = StageStats()
        >>> for _ in range(16): s.record(0.010, cpu=0.009)
        >>> round(s.cpu_share(), 2)
        0.9
        """
        with self.lock:
            if len(self.cpu) < 16:
                return None
            wall = sum(w for _, w in self.cpu)
            return sum(c for c, _ in self.cpu) / wall if wall > 0 else None

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "errors": self.errors, "latencies": list(self.latencies),
                    "counters": dict(self.counters), "batch_sizes": dict(self.batch_sizes)}


def stats_frame(plan, snapshots: list[dict], client: dict | None = None):
    """``dep.stats()``'s table from the workers' snapshots (``WorkerDeployment.snapshot``) and the
    client's own end-to-end statistics: a first ``(end to end)`` row — the requests the client
    sent plus those workers served over HTTP themselves — then one row per stage of ``plan``,
    with the workers where it ran, its batch sizes and its counters (a stage with dynamic
    lookups gets the store's counters too)."""
    import pandas as pd

    merged: dict[str, dict] = {}
    for snap in snapshots:
        for stage, s in snap["stages"].items():
            m = merged.setdefault(stage, _empty())
            _add(m, s)
            ran_here = set(s["counters"]) - {"sent to another worker"}   # (that one counts a hand-on)
            if s["requests"] or ran_here or s["batch_sizes"]:
                m["workers"].append(snap["worker"])
    e2e = merged.get(SERVED, _empty())
    if client is not None and (client["requests"] or client["counters"]):
        _add(e2e, client)
        e2e["workers"] = ["client"] + e2e["workers"]
    rows = [_row("(end to end)", e2e)]
    lookups = merged.get(STORE, _empty())["counters"]
    for op in plan.stages():
        m = merged.get(op.name, _empty())
        if any(getattr(x, "dynamic", False) for x in getattr(op, "members", (op,))):
            m["counters"] = {**lookups, **m["counters"]}
        rows.append(_row(op.name, m))
    df = pd.DataFrame(rows).set_index("stage", drop=False)
    df.index.name = None
    return df


def _empty() -> dict:
    return {"requests": 0, "errors": 0, "latencies": [], "workers": [], "counters": {}, "batch_sizes": {}}


def _add(m: dict, s: dict) -> None:
    m["requests"] += s["requests"]
    m["errors"] += s["errors"]
    m["latencies"] += s["latencies"]
    for k, v in s["counters"].items():
        m["counters"][k] = m["counters"].get(k, 0) + v
    for k, v in s["batch_sizes"].items():
        m["batch_sizes"][int(k)] = m["batch_sizes"].get(int(k), 0) + v


def _row(stage: str, m: dict) -> dict:
    ms = [s * 1000 for s in m["latencies"]]
    row = {"stage": stage, "requests": m["requests"], "errors": m["errors"], "p50_ms": percentile(ms, 50),
           "p99_ms": percentile(ms, 99), "workers": ", ".join(m["workers"])}
    if m["batch_sizes"]:
        row["batch_sizes"] = dict(sorted(m["batch_sizes"].items()))
    return {**row, **m["counters"]}
