"""A cost model of one GPU: launch overhead, SM waves, processor sharing between concurrent kernels.

Pure functions of a ``DeviceProfile``. A kernel is a grid of CTAs; a *wave* is one CTA per
resident slot on every SM. A kernel costs ``fixed + waves × wave_time``, where a partly filled
last wave still costs half a wave or more (the sawtooth of the paper's Fig. 7). The three ways of
running R tenants' kernels:

- ``time``: one after another, with a tenant switch before each (time multiplexing);
- ``space``: launched back to back on separate streams; up to ``max_concurrent`` run at once and
  share the SMs (processor sharing), each slowed by ``stream_penalty``;
- ``spacetime``: one batched launch whose grid is all R grids (the super-kernel).

A mat-vec (a GEMM with a dimension of one, or a few) launched on its own runs as a memory-bound
gemv kernel spread over the whole GPU: short, but concurrent ones only contend for the same
bandwidth, so streams gain nothing over taking turns (the paper's RNN case, where time-only was
the next best). A batched GEMM has no such kernel: it pads the thin dimension to a full tile,
which is why stacking gains far less for mat-vecs than for square shapes.

>>> from flowkit.gpu.profiles import PROFILES
>>> v100 = PROFILES["v100"]
>>> t, s, st = (policy_seconds(p, Gemm(256, 128, 1152), 20, v100) for p in ("time", "space", "spacetime"))
>>> t > s > st
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .profiles import DeviceProfile

__all__ = ["Gemm", "kernel_seconds", "solo_seconds", "policy_seconds", "gflops", "sm_seconds"]


@dataclass(frozen=True)
class Gemm:
    """One tenant's GEMM ``C[M,N] = A[M,K] @ B[K,N]``."""

    m: int
    n: int
    k: int
    dtype: str = "fp32"

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k

    @property
    def bytes(self) -> float:
        size = 2 if self.dtype == "bf16" else 4
        return size * (self.m * self.k + self.k * self.n + self.m * self.n)

    def ctas(self, tile: int) -> int:
        return math.ceil(self.m / tile) * math.ceil(self.n / tile)

    @property
    def thin(self) -> bool:
        """A mat-vec (or nearly): solo, a library runs it as a gemv kernel, not as GEMM tiles."""
        return min(self.m, self.n) <= 8


def _wave_seconds(g: Gemm, p: DeviceProfile) -> float:
    """Time of one full wave: every SM runs ``blocks_per_sm`` tiles (compute or memory bound)."""
    tile_flops = 2.0 * p.tile * p.tile * g.k
    per_sm = p.peak(g.dtype) * p.efficiency / p.sms
    compute = tile_flops * p.blocks_per_sm / per_sm
    slots = p.sms * p.blocks_per_sm
    per_cta_bytes = g.bytes / max(1, g.ctas(p.tile))
    memory = per_cta_bytes * slots / (p.mem_gbs * 1e9)
    return max(compute, memory)


def kernel_seconds(g: Gemm, problems: int, p: DeviceProfile) -> float:
    """Device time of one launch computing ``problems`` copies of ``g`` (batched when > 1)."""
    slots = p.sms * p.blocks_per_sm
    waves = problems * g.ctas(p.tile) / slots
    full = math.floor(waves)
    tail = waves - full
    cost = full + (0.5 + 0.5 * tail if tail > 1e-9 else 0.0)
    return p.fixed_us * 1e-6 + max(cost, 0.5) * _wave_seconds(g, p)


def solo_seconds(g: Gemm, p: DeviceProfile) -> float:
    """Device time of one tenant's kernel launched on its own (time and space multiplexing)."""
    if g.thin:
        return p.gemv_us * 1e-6 + g.bytes / (p.mem_gbs * 1e9 * p.gemv_bandwidth)
    return kernel_seconds(g, 1, p)


def sm_seconds(g: Gemm, problems: int, p: DeviceProfile) -> float:
    """The work in ``problems`` copies of ``g`` as SM-seconds: device seconds with every SM busy.

    Divided by elapsed device time it is the fraction of SMs kept busy, which a GPU's own
    "utilization" (a kernel is running) hides: one small kernel at a time leaves most SMs idle.

    >>> from flowkit.gpu.profiles import PROFILES
    >>> v100, conv = PROFILES["v100"], Gemm(256, 128, 1152)
    >>> round(sm_seconds(conv, 1, v100) / kernel_seconds(conv, 1, v100), 2)   # one tenant: 8 of 160 CTA slots
    0.06
    >>> round(sm_seconds(conv, 20, v100) / kernel_seconds(conv, 20, v100), 2)  # 20 stacked: one full wave
    0.76
    """
    return problems * g.ctas(p.tile) / (p.sms * p.blocks_per_sm) * _wave_seconds(g, p)


def _space_seconds(g: Gemm, tenants: int, p: DeviceProfile) -> float:
    """Discrete-event processor sharing: launches every ``launch_us``; in-flight kernels share SMs."""
    slots = p.sms * p.blocks_per_sm
    demand = slots if g.thin else g.ctas(p.tile)   # a gemv kernel spreads over every SM
    solo = solo_seconds(g, p)
    launches = [i * p.launch_us * 1e-6 for i in range(tenants)]
    running: list[list[float]] = []  # [remaining solo-seconds of work]
    now, done, i = 0.0, 0, 0
    waiting = list(launches)
    while done < tenants:
        active = len(running)
        share = 1.0
        if active:
            share = min(1.0, slots / (active * demand)) / (p.stream_penalty if active > 1 else 1.0)
        next_finish = now + min(r[0] for r in running) / share if running else math.inf
        next_launch = waiting[i] if i < len(waiting) and active < p.max_concurrent else math.inf
        if next_launch == math.inf and next_finish == math.inf:
            next_launch = max(now, waiting[i])
        t = min(next_finish, max(now, next_launch))
        for r in running:
            r[0] -= (t - now) * share
        now = t
        finished = [r for r in running if r[0] <= 1e-12]
        running = [r for r in running if r[0] > 1e-12]
        done += len(finished)
        if i < len(waiting) and waiting[i] <= now + 1e-15 and len(running) < p.max_concurrent:
            running.append([solo])
            i += 1
    return now


def policy_seconds(policy: str, g: Gemm, tenants: int, p: DeviceProfile) -> float:
    """Time for ``tenants`` copies of ``g`` under ``policy`` (time | space | spacetime)."""
    if policy == "time":
        return tenants * (p.switch_us * 1e-6 + p.launch_us * 1e-6 + solo_seconds(g, p))
    if policy == "space":
        return _space_seconds(g, tenants, p)
    if policy == "spacetime":
        return p.launch_us * 1e-6 + kernel_seconds(g, tenants, p)
    raise ValueError(f"unknown policy {policy!r}; choose time, space or spacetime")


def gflops(policy: str, g: Gemm, tenants: int, p: DeviceProfile) -> float:
    return tenants * g.flops / policy_seconds(policy, g, tenants, p) / 1e9


