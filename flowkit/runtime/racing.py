"""Competitive execution's decisions, as pure functions: when a race hedges instead of racing
at once, and when hedging stops paying. The executor (``execution.Execution._race``) runs the
replicas; it asks these.
"""

from __future__ import annotations

from typing import Sequence

from .stats import percentile

__all__ = ["HEDGE_CPU_SHARE", "HEDGE_MIN_WINS", "HEDGE_PROBE", "hedge_after", "hedges_losing"]

HEDGE_CPU_SHARE = 0.5   # replicas of a stage computing at least this share of its time are hedged
HEDGE_MIN_WINS = 0.1    # a stage's hedges stop while fewer than this share of its recent ones won
HEDGE_PROBE = 10        # ... but one race in this many still hedges, to notice when they would win again


def hedge_after(cpu_share: float | None, race_latencies: Sequence[float]) -> float | None:
    """Seconds to give a race's first replica alone before starting the others (None: race at
    once): the race's recent p95 (of its last 200, once it has 20) when the replica is measured
    to compute at least ``HEDGE_CPU_SHARE`` of its time. Racing a computation from the start
    doubles its demand for cores ("The Tail at Scale"); stages that mostly wait race at once.

    >>> hedge_after(0.9, [0.01] * 40), hedge_after(0.1, [0.01] * 40), hedge_after(0.9, [0.01] * 5)
    (0.01, None, None)
    """
    if cpu_share is None or cpu_share < HEDGE_CPU_SHARE or len(race_latencies) < 20:
        return None
    return percentile(list(race_latencies)[-200:], 95)


def hedges_losing(wins: Sequence[bool]) -> bool:
    """Whether fewer than ``HEDGE_MIN_WINS`` of a stage's recent hedges (at least 10) beat the
    replica they backed up: its variance is then the input's own (a slow input is slow on every
    replica), and a hedge only takes a core from other requests.

    >>> hedges_losing([False] * 12), hedges_losing([False] * 9 + [True] * 3), hedges_losing([False] * 5)
    (True, False, False)
    """
    return len(wins) >= 10 and sum(wins) < HEDGE_MIN_WINS * len(wins)
