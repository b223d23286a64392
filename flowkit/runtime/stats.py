"""Per-stage counters and recent latencies, cheap enough to update on every request."""

from __future__ import annotations

import threading
from collections import Counter, deque

__all__ = ["StageStats", "percentile"]


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

    __slots__ = ("requests", "errors", "latencies", "counters", "batch_sizes", "lock")

    def __init__(self, window: int = 2048):
        self.requests = 0
        self.errors = 0
        self.latencies: deque = deque(maxlen=window)
        self.counters: Counter = Counter()
        self.batch_sizes: Counter = Counter()
        self.lock = threading.Lock()

    def record(self, seconds: float, ok: bool = True) -> None:
        with self.lock:
            self.requests += 1
            if ok:
                self.latencies.append(seconds)
            else:
                self.errors += 1

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "errors": self.errors, "latencies": list(self.latencies),
                    "counters": dict(self.counters), "batch_sizes": dict(self.batch_sizes)}
