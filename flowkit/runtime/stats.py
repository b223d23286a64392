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
