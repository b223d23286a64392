"""What the re-planner (``replanner``) measures over its window: the rate of the requests
finished (over the whole window and over its last seconds, where a rise shows first), their
p99, and whether the late ones are more than chance gives at 1% late. Pure functions and a
record.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["Window", "window_rates", "beyond_chance", "P99_SAMPLES", "LATE_SHARE", "LATE_ALPHA", "RISE_S", "RISE_MIN"]

P99_SAMPLES = 100   # requests a measured p99 needs: with fewer, it is their slowest one or two
LATE_SHARE = 0.01   # the share of requests an objective on the p99 lets be late
RISE_S = 2.0        # a rise of the rate is judged over the window's last seconds (a Poisson load at the planned
                    # rate fills 2 s at x3 far beyond chance), so it is re-planned within seconds, not a window
RISE_MIN = 10       # ... over at least this many requests (at a trickle, a few would pass for x3 by chance)
LATE_ALPHA = 0.01   # how unlikely the late requests must be, were LATE_SHARE late, to call the p99 missed


def beyond_chance(late: int, requests: int, share: float = LATE_SHARE, alpha: float = LATE_ALPHA) -> bool:
    """Whether ``late`` of ``requests`` is more than chance gives when ``share`` of all requests
    are late: the binomial chance of that many or more is below ``alpha``. A p99 measured over a
    window is over the objective as soon as two of 150 requests are: at exactly 1% late that
    happens in about every other window, so it alone would re-plan a deployment holding its
    objective.

    >>> beyond_chance(2, 150), beyond_chance(5, 150), beyond_chance(6, 150), beyond_chance(13, 600)
    (False, False, True, True)
    >>> beyond_chance(100, 8192), beyond_chance(200, 8192), beyond_chance(800, 100_000)
    (False, True, False)
    """
    if late <= 0 or requests <= 0:
        return False
    # P(X < late) for X ~ Binomial(requests, share), term by term in logs (no huge integers,
    # no underflow of (1 - share) ** requests)
    log_term, step, below = requests * math.log1p(-share), math.log(share / (1 - share)), 0.0
    for i in range(min(late, requests + 1)):
        below += math.exp(log_term)
        if below > 1 - alpha:
            return True
        log_term += math.log((requests - i) / (i + 1)) + step if i < requests else 0.0
    return False


class Window(NamedTuple):
    """What the re-planner measured over its window: the rate of finished requests, the p99 of
    those ``judged`` (started since the planned workers were all there; nan with fewer than
    ``P99_SAMPLES``), and how many of those were ``late`` (over the objective); ``rate_now``:
    the rate over its last ``RISE_S`` seconds."""

    rate: float
    p99_ms: float
    requests: int
    late: int
    judged: int
    rate_now: float = math.nan   # the rate over the window's last RISE_S seconds (``window_rates``)


def window_rates(finished: list[float], end: float, span: float, rise_s: float = RISE_S) -> tuple[float, float]:
    """``(rate, rate_now)``: the requests ``finished`` (their finish times, s) per second over the
    ``span`` seconds up to ``end``, and over its last ``rise_s`` seconds (all of it when shorter).

    >>> window_rates([0.5 * i for i in range(6)] + [3.05 + 0.1 * i for i in range(20)], end=5.0, span=5.0)
    (5.2, 10.0)
    """
    rise = min(rise_s, span)
    return len(finished) / span, sum(1 for t in finished if t > end - rise) / rise
