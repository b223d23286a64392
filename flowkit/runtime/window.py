"""What the re-planner (``replanner``) measures over its window: the rate of the requests
finished (over the whole window and over its last seconds, where a rise shows first), their
p99 with the second that held the most late requests set aside where the rest are on time
(``judge``: one stall is not the plan's shortfall), and whether the late ones are more than
chance gives at 1% late. Pure functions and a record.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["Window", "Stall", "judge", "window_rates", "beyond_chance", "P99_SAMPLES", "LATE_SHARE", "LATE_ALPHA",
           "RISE_S", "RISE_MIN", "STALL_S"]

P99_SAMPLES = 100   # requests a measured p99 needs: with fewer, it is their slowest one or two
LATE_SHARE = 0.01   # the share of requests an objective on the p99 lets be late
RISE_S = 2.0        # a rise of the rate is judged over the window's last seconds (a Poisson load at the planned
                    # rate fills 2 s at x3 far beyond chance), so it is re-planned within seconds, not a window
RISE_MIN = 10       # ... over at least this many requests (at a trickle, a few would pass for x3 by chance)
STALL_S = 1.0       # the span of starts judge() sets aside: the one holding the most late requests
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


class Stall(NamedTuple):
    """The ``STALL_S`` seconds of starts that held the most late requests (``judge``): from
    ``start`` (s, the requests' clock), ``requests`` of which ``late``."""

    start: float
    requests: int
    late: int


class Window(NamedTuple):
    """What the re-planner measured over its window: the rate of finished requests, the p99 of
    those ``judged`` (started since the planned workers were all there, less those of the
    ``stall`` set aside, if any; nan with fewer than ``P99_SAMPLES``), and how many of
    those were ``late`` (over the objective); ``rate_now``: the rate over its last ``RISE_S``
    seconds."""

    rate: float
    p99_ms: float
    requests: int
    late: int
    judged: int
    rate_now: float = math.nan   # the rate over the window's last RISE_S seconds (``window_rates``)
    stall: Stall | None = None   # the second of starts set aside (``judge``)


def judge(requests: list[tuple[float, float]], slo_ms: float,
          stall_s: float = STALL_S) -> tuple[float, int, int, Stall | None]:
    """``(p99_ms, late, judged, stall)`` of ``requests`` (``(start, latency)``, s): where the
    late ones crowd into one ``stall_s`` span of starts and the rest — ``P99_SAMPLES`` or more —
    are no more than ``LATE_SHARE`` late, that span is set aside (``stall``) and the rest judged;
    otherwise all of them (``stall`` None). One stall — a core that slept, the host taking the
    CPU away, a garbage collection — makes a second's requests late together and alone puts a
    window's p99 over the objective, which would calibrate the model by it for good; a plan
    short of its load has late requests in the other seconds too, and is judged whole. The p99 is over the requests
    judged, nan with fewer than ``P99_SAMPLES``.

    >>> steady = [(i / 100, 0.005) for i in range(500)]         # 5 s at 100 req/s, 5 ms each
    >>> stalled = [(s, 0.060 if 200 <= i < 240 else t) for i, (s, t) in enumerate(steady)]   # 40 late in 0.4 s
    >>> p99, late, judged, stall = judge(stalled, 25)
    >>> round(p99, 1), late, judged, stall
    (5.0, 0, 400, Stall(start=2.0, requests=100, late=40))
    >>> short = [(s, 0.030 if i % 20 == 0 else t) for i, (s, t) in enumerate(steady)]   # 5% late, all along
    >>> p99, late, judged, stall = judge(short, 25)
    >>> round(p99, 1), late, judged, stall
    (30.0, 25, 500, None)
    >>> judge(stalled[150:300], 25)[1:]   # too few beside the stall to judge without it: all judged
    (40, 150, None)
    >>> judge(steady[:50], 25)[0], judge([], 25)
    (nan, (nan, 0, 0, None))
    """
    late_starts = sorted(s for s, t in requests if t * 1000 > slo_ms)
    stall, kept = None, sorted(t for _, t in requests)
    if late_starts:   # the span of stall_s from a late start that holds the most late starts
        most, start, j = 0, 0.0, 0
        for i, s in enumerate(late_starts):   # (late_starts[j..i]: those less than stall_s before the i-th)
            while s - late_starts[j] >= stall_s:
                j += 1
            if i - j + 1 > most:
                most, start = i - j + 1, late_starts[j]
        inside = [t for s, t in requests if 0 <= s - start < stall_s]
        rest = sorted(t for s, t in requests if not 0 <= s - start < stall_s)
        if len(rest) >= P99_SAMPLES and sum(1 for t in rest if t * 1000 > slo_ms) <= LATE_SHARE * len(rest):
            stall, kept = Stall(start, len(inside), sum(1 for t in inside if t * 1000 > slo_ms)), rest
    late = sum(1 for t in kept if t * 1000 > slo_ms)
    p99 = kept[math.ceil(0.99 * len(kept)) - 1] * 1000 if len(kept) >= P99_SAMPLES else math.nan
    return p99, late, len(kept), stall


def window_rates(finished: list[float], end: float, span: float, rise_s: float = RISE_S) -> tuple[float, float]:
    """``(rate, rate_now)``: the requests ``finished`` (their finish times, s) per second over the
    ``span`` seconds up to ``end``, and over its last ``rise_s`` seconds (all of it when shorter).

    >>> window_rates([0.5 * i for i in range(6)] + [3.05 + 0.1 * i for i in range(20)], end=5.0, span=5.0)
    (5.2, 10.0)
    """
    rise = min(rise_s, span)
    return len(finished) / span, sum(1 for t in finished if t > end - rise) / rise
