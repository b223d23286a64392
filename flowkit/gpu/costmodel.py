"""A cost model of one GPU, built from a few cited device measurements (``profiles.py``), not fitted.

Pure functions of a ``DeviceProfile``. A GEMM kernel is a grid of thread blocks (CTAs), one per
``tile_m x tile_n`` output tile; each SM runs ``ctas_per_sm`` of them at a time, at ``sgemm_eff``
of its share of the peak rate, so a kernel takes ``ceil(CTAs / slots)`` waves of one tile's time,
or its operands' bytes over the memory bandwidth, whichever is longer (the wave quantization that
makes the paper's Fig. 7 a sawtooth). The host issues one launch every ``launch_us``. The three
ways of running R tenants' kernels (the paper's Fig. 6):

- ``time``: one stream; kernels run one after another, each once it is launched (launch-bound when
  kernels are shorter than a launch);
- ``space``: one stream per tenant; streams map onto ``connections`` hardware queues, so at most
  that many kernels are in flight; kernels in flight share the SMs (processor sharing);
- ``spacetime``: one batched launch whose grid is all R grids (the super-kernel).

A mat-vec (a GEMM with a dimension of at most 8) runs as a memory-bound gemv kernel (solo or
batched): its time is its bytes over the bandwidth, and concurrent ones share that bandwidth.

``predict_table1`` runs the paper's microbenchmark on a profile and ``table1_error`` compares it
with the paper's figures (``TABLE1``), which no constant was chosen to match: a held-out check.

>>> from flowkit.gpu.profiles import PROFILES
>>> v100 = PROFILES["v100"]
>>> t, s, st = (policy_seconds(p, Gemm(256, 128, 1152), 20, v100) for p in ("time", "space", "spacetime"))
>>> t > s > st
True
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from .profiles import DeviceProfile

__all__ = ["Gemm", "kernel_seconds", "solo_seconds", "policy_seconds", "gflops", "sm_seconds", "TABLE1",
           "TABLE1_RS", "predict_table1", "table1_error", "module_gemms", "LayerCosts", "structure_key"]


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

    @property
    def thin(self) -> bool:
        """A mat-vec (or nearly): the library runs it as a memory-bound gemv kernel, not as GEMM tiles."""
        return min(self.m, self.n) <= 8


def ctas(g: Gemm, p: DeviceProfile) -> int:
    """Thread blocks of one problem: one per output tile."""
    return math.ceil(g.m / p.tile_m) * math.ceil(g.n / p.tile_n)


def slots(p: DeviceProfile) -> int:
    return p.sms * p.ctas_per_sm


def tile_seconds(g: Gemm, p: DeviceProfile) -> float:
    """One thread block's tile, sharing its SM with ``ctas_per_sm - 1`` others."""
    per_sm = p.peak(g.dtype) * p.sgemm_eff / p.sms
    return 2.0 * p.tile_m * p.tile_n * g.k * p.ctas_per_sm / per_sm


def _memory_seconds(g: Gemm, problems: int, p: DeviceProfile) -> float:
    return problems * g.bytes / (p.mem_gbs * 1e9)


def kernel_seconds(g: Gemm, problems: int, p: DeviceProfile) -> float:
    """Device time of one launch computing ``problems`` copies of ``g`` (batched when > 1).

    >>> from flowkit.gpu.profiles import PROFILES
    >>> v100, conv = PROFILES["v100"], Gemm(256, 128, 1152)
    >>> [kernel_seconds(conv, r, v100) / kernel_seconds(conv, 1, v100) for r in (1, 20, 21, 40)]   # waves
    [1.0, 1.0, 2.0, 2.0]
    """
    memory = _memory_seconds(g, problems, p)
    if g.thin:
        return memory
    waves = math.ceil(problems * ctas(g, p) / slots(p))
    return max(waves * tile_seconds(g, p), memory)


def solo_seconds(g: Gemm, p: DeviceProfile) -> float:
    """Device time of one tenant's kernel launched on its own."""
    return kernel_seconds(g, 1, p)


def sm_seconds(g: Gemm, problems: int, p: DeviceProfile) -> float:
    """The work in ``problems`` copies of ``g`` as SM-seconds: device seconds with every SM busy.

    Divided by elapsed device time it is the fraction of SMs kept busy, which a GPU's own
    "utilization" (a kernel is running) hides: one small kernel at a time leaves most SMs idle.

    >>> from flowkit.gpu.profiles import PROFILES
    >>> v100, conv = PROFILES["v100"], Gemm(256, 128, 1152)
    >>> round(sm_seconds(conv, 1, v100) / kernel_seconds(conv, 1, v100), 2)   # one tenant: 4 of 80 SMs
    0.05
    >>> round(sm_seconds(conv, 20, v100) / kernel_seconds(conv, 20, v100), 2)  # 20 stacked: one full wave
    1.0
    """
    if g.thin:   # a gemv spreads over every SM, waiting on memory
        return _memory_seconds(g, problems, p)
    return problems * ctas(g, p) / slots(p) * tile_seconds(g, p)


def _time_seconds(g: Gemm, tenants: int, p: DeviceProfile) -> float:
    """One stream: kernel i is launched at (i+1)·launch and starts when launched and its predecessor is done."""
    launch, solo = p.launch_us * 1e-6, solo_seconds(g, p)
    return launch + tenants * solo if solo >= launch else tenants * launch + solo


def _space_seconds(g: Gemm, tenants: int, p: DeviceProfile) -> float:
    """Discrete events: kernel i is ready at (i+1)·launch on connection i mod C, behind the kernel
    before it there; kernels in flight share the SMs (or, for mat-vecs, the bandwidth)."""
    launch, solo = p.launch_us * 1e-6, solo_seconds(g, p)
    queues = max(1, min(p.connections, p.max_concurrent, tenants))
    demand, room = ctas(g, p), slots(p)

    def share(n: int) -> float:
        if g.thin:
            return 1.0 / n
        return min(1.0, max(room, demand) / (n * demand))

    finish: list[float | None] = [None] * tenants
    running: dict[int, float] = {}   # kernel -> remaining solo-seconds of work
    now, nxt, done = 0.0, 0, 0
    while done < tenants:
        while nxt < tenants and (nxt + 1) * launch <= now + 1e-15 and (nxt < queues or finish[nxt - queues] is not None):
            running[nxt] = solo
            nxt += 1
        rate = share(len(running)) if running else 0.0
        t_finish = now + min(running.values()) / rate if running else math.inf
        can_start = nxt < tenants and (nxt < queues or finish[nxt - queues] is not None)
        t_ready = max(now, (nxt + 1) * launch) if can_start else math.inf
        t = min(t_finish, t_ready)
        for i in running:
            running[i] -= (t - now) * rate
        now = t
        for i in [i for i, left in running.items() if left <= 1e-15]:
            del running[i]
            finish[i] = now
            done += 1
    return now


def policy_seconds(policy: str, g: Gemm, tenants: int, p: DeviceProfile) -> float:
    """Time for ``tenants`` copies of ``g`` under ``policy`` (time | space | spacetime)."""
    if policy == "time":
        return _time_seconds(g, tenants, p)
    if policy == "space":
        return _space_seconds(g, tenants, p)
    if policy == "spacetime":
        return p.launch_us * 1e-6 + kernel_seconds(g, tenants, p)
    raise ValueError(f"unknown policy {policy!r}; choose time, space or spacetime")


def gflops(policy: str, g: Gemm, tenants: int, p: DeviceProfile) -> float:
    return tenants * g.flops / policy_seconds(policy, g, tenants, p) / 1e9


# -- the held-out check: the paper's Table 1 -------------------------------------------------------

TABLE1 = {
    # arXiv:1901.00041, Table 1 (speedup of space-time over the next-best scheme at R = 10, 20 and the
    # geometric mean over 2 <= R <= 120) and the abstract (7.73x over time-only for the conv GEMM).
    "RNN mat-vec 512x512x1": {"shape": (512, 1, 512), "next": "time", "R=10": 1.21, "R=20": 2.14, "geomean": 2.48},
    "conv2_2 GEMM 256x128x1152": {"shape": (256, 128, 1152), "next": "space", "R=10": 1.68, "R=20": 2.88,
                                  "geomean": 3.23, "geomean over time": 7.73},
    "square 256^3": {"shape": (256, 256, 256), "next": "space", "R=10": 2.42, "R=20": 2.47, "geomean": 4.93},
}
TABLE1_RS = tuple(range(2, 121))
"""The tenant counts the geometric means are taken over (every R from 2 to 120)."""


def _geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def predict_table1(p: DeviceProfile, rs=TABLE1_RS) -> dict:
    """The model's Table 1 on ``p``: per shape, space-time's speedup over the paper's next-best
    scheme at R = 10 and 20 and its geometric mean over ``rs``, both geomean ratios, and which
    scheme the model finds next best.

    >>> from flowkit.gpu.profiles import PROFILES
    >>> pred = predict_table1(PROFILES["v100"])
    >>> sorted(pred["conv2_2 GEMM 256x128x1152"])
    ['R=10', 'R=20', 'geomean', 'geomean over space', 'geomean over time', 'model next best']
    """
    out = {}
    for name, paper in TABLE1.items():
        g = Gemm(*paper["shape"])
        ratio = {other: {r: policy_seconds(other, g, r, p) / policy_seconds("spacetime", g, r, p) for r in rs}
                 for other in ("space", "time")}
        over = {other: _geomean(ratio[other].values()) for other in ratio}
        nxt = paper["next"]
        out[name] = {"R=10": policy_seconds(nxt, g, 10, p) / policy_seconds("spacetime", g, 10, p),
                     "R=20": policy_seconds(nxt, g, 20, p) / policy_seconds("spacetime", g, 20, p),
                     "geomean": over[nxt], "geomean over space": over["space"], "geomean over time": over["time"],
                     "model next best": min(over, key=over.get)}
    return out


def table1_error(p: DeviceProfile, rs=TABLE1_RS) -> list[dict]:
    """Predicted vs the paper, one row per figure of Table 1 (and the abstract's 7.73x): the
    relative error ``predicted / paper - 1``. Reported, never tuned to."""
    pred = predict_table1(p, rs)
    rows = []
    for name, paper in TABLE1.items():
        for figure in ("R=10", "R=20", "geomean", "geomean over time"):
            if figure in paper:
                over = "time" if figure == "geomean over time" else paper["next"]
                rows.append({"workload": name, "figure": f"{figure.split(' over ')[0]}, over {over}-only",
                             "paper": paper[figure], "predicted": round(pred[name][figure], 2),
                             "error": round(pred[name][figure] / paper[figure] - 1, 3)})
    return rows


# -- the GEMMs a torch module runs, for the simulated backend ---------------------------------------

def _dtype(t) -> str:
    import torch

    return "bf16" if getattr(t, "dtype", None) in (torch.bfloat16, torch.float16) else "fp32"


def _rnn_gemms(mod, x, out) -> list[Gemm]:
    """An RNN layer as a GPU library runs it: per layer and direction, one GEMM for the input
    projection of every step, then one small GEMM per time step for the recurrence."""
    from torch import nn
    from torch.nn.utils.rnn import PackedSequence

    gates = {"LSTM": 4, "GRU": 3}.get(getattr(mod, "mode", ""), 1)
    if isinstance(mod, nn.RNNCellBase):
        rows = x.shape[0] if x.dim() == 2 else 1
        gates = 4 if isinstance(mod, nn.LSTMCell) else 3 if isinstance(mod, nn.GRUCell) else 1
        dt = _dtype(x)
        return [Gemm(rows, gates * mod.hidden_size, mod.input_size, dt),
                Gemm(rows, gates * mod.hidden_size, mod.hidden_size, dt)]
    if isinstance(x, PackedSequence):
        steps, batch, dt = len(x.batch_sizes), int(x.batch_sizes[0]), _dtype(x.data)
    else:
        dt = _dtype(x)
        if x.dim() == 2:
            steps, batch = x.shape[0], 1
        elif mod.batch_first:
            batch, steps = x.shape[0], x.shape[1]
        else:
            steps, batch = x.shape[0], x.shape[1]
    h, proj = mod.hidden_size, getattr(mod, "proj_size", 0)
    h_out = proj or h
    dirs = 2 if mod.bidirectional else 1
    gemms = []
    for layer in range(mod.num_layers):
        width = mod.input_size if layer == 0 else dirs * h_out
        for _ in range(dirs):
            gemms.append(Gemm(steps * batch, gates * h, width, dt))
            for _ in range(steps):
                gemms.append(Gemm(batch, gates * h, h_out, dt))
                if proj:
                    gemms.append(Gemm(batch, proj, h, dt))
    return gemms


def module_gemms(module, example) -> list[Gemm]:
    """The GEMM-shaped work of one forward pass of ``module`` on ``example``, in launch order:
    ``Linear``; convolutions (1-3d) as im2col GEMMs (a grouped one as one GEMM of the groups'
    rows); RNN, LSTM and GRU layers and cells step by step (``_rnn_gemms``). Other ops (pointwise,
    pooling, normalization, attention's matmuls called as functions) are not counted."""
    import torch
    from torch import nn

    shapes: list[Gemm] = []
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, nn.Linear):
            shapes.append(Gemm(x.numel() // x.shape[-1], mod.out_features, mod.in_features, _dtype(x)))
        elif isinstance(mod, convs):
            dims = len(mod.kernel_size)
            batched = out.dim() == dims + 2
            positions = math.prod(out.shape[-dims:]) * (out.shape[0] if batched else 1)
            k = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
            shapes.append(Gemm(positions * mod.groups, mod.out_channels // mod.groups, k, _dtype(x)))
        elif isinstance(mod, (nn.RNNBase, nn.RNNCellBase)):
            shapes.extend(_rnn_gemms(mod, x, out))

    kinds = (nn.Linear, nn.RNNBase, nn.RNNCellBase) + convs
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, kinds)]
    try:
        with torch.inference_mode():
            module(example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _plain(value) -> bool:
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    return isinstance(value, tuple) and all(_plain(v) for v in value)


def structure_key(module) -> tuple:
    """What a module's cost depends on: for it and every submodule, its path, class (module and
    qualified name), plain settings (ints, floats, strings, tuples of them: kernel sizes, strides,
    hidden sizes, ``batch_first``...) and the shapes and dtypes of its parameters and buffers.
    Two tenants of one architecture share a key; two different ``nn.Sequential`` do not."""
    parts = []
    for path, m in module.named_modules():
        settings = tuple(sorted((k, v) for k, v in vars(m).items()
                                if not k.startswith("_") and k != "training" and _plain(v)))
        tensors = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in
                        list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)) if t is not None)
        parts.append((path, type(m).__module__, type(m).__qualname__, settings, tensors))
    return tuple(parts)


def _input_key(x) -> tuple:
    if hasattr(x, "shape"):
        return (tuple(x.shape), str(getattr(x, "dtype", "")))
    if isinstance(x, (tuple, list)):
        return tuple(_input_key(v) for v in x)
    return (type(x).__name__,)


class LayerCosts:
    """A bounded cache of ``module_gemms``, keyed by the module's structure (``structure_key``) and
    the whole input's shape and dtype (batch, sequence length and all): tenants of one
    architecture trace once per input shape; least recently used entries go beyond ``maxsize``.

    >>> import torch
    >>> from torch import nn
    >>> costs = LayerCosts()
    >>> small = nn.Sequential(nn.Conv2d(3, 8, 3))
    >>> big = nn.Sequential(nn.Conv2d(3, 256, 3))
    >>> x = torch.randn(1, 3, 16, 16)
    >>> costs(small, x) == costs(big, x)
    False
    """

    def __init__(self, maxsize: int = 256):
        self.maxsize = maxsize
        self.entries: OrderedDict = OrderedDict()

    def __call__(self, module, x) -> list[Gemm]:
        key = (structure_key(module), _input_key(x))
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        gemms = self.entries[key] = module_gemms(module, x)
        while len(self.entries) > self.maxsize:
            self.entries.popitem(last=False)
        return gemms
