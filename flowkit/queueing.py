"""Queueing formulas behind the latency model (``flowkit.latency_model``): the probability an
arrival waits (Erlang C) and the tail of its wait. Pure functions of a queue's load and its
service times' mean and variability.
"""

from __future__ import annotations

import math

__all__ = ["erlang_c", "wait_tail"]


def erlang_c(c: int, a: float) -> float:
    """The probability an arrival waits in an M/M/c queue with offered load ``a`` (< c).

    >>> round(erlang_c(1, 0.5), 3), round(erlang_c(2, 1.0), 3), erlang_c(2, 2.0)
    (0.5, 0.333, 1.0)
    """
    if a >= c:
        return 1.0
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    rho = a / c
    return b / (1 - rho * (1 - b))


def wait_tail(lam: float, mean: float, cs2: float) -> tuple[float, float]:
    """The waiting time's tail in a queue with Poisson arrivals at ``lam`` per ms and service
    times of ``mean`` ms and squared coefficient of variation ``cs2``: ``(θ, k)`` such that a
    wait beyond ``t`` ms has a probability of about ``k·ρ·exp(-θt)``. ``predict`` passes an
    M/G/c queue's demand divided by c (one server c times as fast) and puts Erlang C's
    probability of waiting in place of ρ.

    A service steadier than exponential (``cs2 < 1``) is taken as gamma-distributed and its
    tail is Cramér–Lundberg's: ``θ > 0`` solves ``λ(E[exp(θS)] - 1) = θ`` and
    ``kρ = (1 - ρ) / (λE[S·exp(θS)] - 1)`` — its queue clears faster than an exponential tail of
    the same mean says, but once a request waits it waits more often than ρ says (``k > 1``).
    Otherwise the tail is exponential with Allen–Cunneen's mean ``E[S]/(1-ρ)·(1+cs2)/2`` (``k =
    1``): for a heavier tail than exponential the asymptote lies too far out to describe the p99.
    Both are exact for M/M/c (``θ = cμ - λ``). Only the mean and variance are used: the
    profile's few hundred samples say little of the far tail that an empirical transform would
    lean on. ``(inf, 0)``: no requests or no work.

    >>> [round(x, 2) for x in wait_tail(0.5, 1.0, 1.0)]     # M/M/1: mu - lambda, 1
    [0.5, 1.0]
    >>> [round(x, 2) for x in wait_tail(0.12, 2.0, 0.0)]    # M/D/1, 24% busy
    [1.2, 1.93]
    >>> [round(x, 3) for x in wait_tail(0.12, 2.0, 4.0)]    # variable: Allen-Cunneen's mean, 6.58 ms
    [0.152, 1.0]
    """
    rho = lam * mean
    if lam <= 0 or mean <= 0:
        return math.inf, 0.0
    if cs2 >= 1:
        return (1 - rho) / mean * 2 / (1 + cs2), 1.0
    # E[exp(θS)]: exp(θ·mean) when steady; (1 - scale·θ)^-shape for a gamma of shape 1/cs2, scale mean·cs2
    shape, scale = (math.inf, 0.0) if cs2 < 1e-9 else (1 / cs2, mean * cs2)

    def log_mgf(th: float) -> float:
        return th * mean if scale == 0 else -shape * math.log1p(-min(scale * th, 1 - 1e-16))

    def excess(th: float) -> float:   # λ(E[e^θS] − 1) − θ: below zero between 0 and the root
        return lam * math.expm1(min(log_mgf(th), 700.0)) - th

    lo, hi = 0.0, 1 / mean   # (the root lies below the transform's pole, 1/scale: approach it by halves)
    for _ in range(200):
        if excess(hi) >= 0:
            break
        lo, hi = hi, (hi * 2 if scale == 0 else hi + (1 / scale - hi) / 2)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    theta = (lo + hi) / 2
    slope = lam * math.exp(min(log_mgf(theta), 700.0)) * mean / max(1 - scale * theta, 1e-16) - 1   # λE[S·e^θS] − 1
    return theta, ((1 - rho) / slope / rho if slope > 0 else 1.0)
