"""The paper's Table 1 on a chosen device: time vs space vs space-time multiplexing.

For R tenants in {1, 2, 5, 10, 20, 32, 40, 64, 80, 120}, each with its own operands:
  - the three GEMM shapes of arXiv:1901.00041 (ResNet-18 conv2_2 im2col M=256 N=128 K=1152,
    square 256^3, RNN mat-vec 512x512 . 512x1),
  - a ResNet-18-style basic block (two 3x3 convs, 64 channels, 28x28, batch 1 per tenant),
under time (one after another), space (concurrent streams) and spacetime (one batched launch:
bmm for GEMMs, a stack_module_state + vmap program for the block), in FP32 with TF32 off (as the
paper) and in BF16. Reports GFLOP/s per R and the geometric-mean ratios, as a table, JSON and a plot.

  .venv/bin/python benchmarks/gpu_spacetime.py --device sim:v100|sim:h200|cuda|cpu [--quick]

Goal on an H200: space-time >= 3.23x space-only and >= 7.73x time-only (conv GEMM geomean, the
paper's V100 figures). On sim:v100: the paper's ordering and ratios within 25%.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import RESULTS, plot, save, table  # noqa: E402

from flowkit.gpu import Gemm, make_backend  # noqa: E402
from flowkit.gpu.backends import SimBackend  # noqa: E402

SHAPES = {"conv2_2 GEMM 256x128x1152": (256, 128, 1152), "square 256^3": (256, 256, 256),
          "RNN mat-vec 512x512x1": (512, 1, 512)}
PAPER = {"conv2_2 GEMM 256x128x1152": {"space": 3.23, "time": 7.73}, "square 256^3": {"space": 4.93},
         "RNN mat-vec 512x512x1": {"time": 2.48}}
POLICIES = ("time", "space", "spacetime")


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def block_seconds(backend, policy: str, tenants: int, dtype: str, iters: int) -> tuple[float, float]:
    """Seconds per round and FLOPs for R ResNet-18-style blocks (real torch; sim models it)."""
    import torch
    from torch import nn

    from flowkit.gpu.costmodel import kernel_seconds, policy_seconds

    convs = [Gemm(28 * 28, 64, 576, dtype), Gemm(28 * 28, 64, 576, dtype)]
    flops = tenants * sum(g.flops for g in convs)
    if isinstance(backend, SimBackend):
        p = backend.profile
        if policy == "spacetime":
            return sum(p.launch_us * 1e-6 + kernel_seconds(g, tenants, p) for g in convs), flops
        return sum(policy_seconds(policy, g, tenants, p) for g in convs), flops
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.ReLU(),
                             nn.Conv2d(64, 64, 3, padding=1, bias=False)).to(backend.device, dt).eval()

    models = [make(i) for i in range(tenants)]
    xs = torch.randn(tenants, 1, 64, 28, 28, device=backend.device, dtype=dt)
    stacked = backend.stack(tuple(range(tenants)), models) if policy == "spacetime" else None

    def once():
        if policy == "spacetime":
            backend.forward_stacked(stacked, xs)
        elif policy == "space":
            backend.forward_concurrent(list(zip(models, xs)))
        else:
            for m, x in zip(models, xs):
                backend.forward(m, x)

    for _ in range(3):   # warm up; on CUDA the second stacked call captures its graph, later ones replay
        once()
    backend.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        once()
    backend.synchronize()
    return (time.perf_counter() - t0) / iters, flops


def sm_busy(backend, g: Gemm, tenants: int, seconds: float = 0.5) -> dict:
    """NVML GPM's SM utilization and occupancy (%) while each policy runs ``tenants`` copies of ``g``
    for about ``seconds`` (a GPU with GPM only; {} elsewhere). Rough: the window includes the
    operands' allocation between rounds."""
    from flowkit.gpu.monitor import GpmSampler, nvml_handle

    try:
        gpm = GpmSampler(*nvml_handle())
    except Exception as e:   # no NVML, no GPM (pre-Hopper, a sandbox): say so, measure nothing
        print(f"GPM not available: {e!r}", flush=True)
        return {}
    out = {}
    for policy in POLICIES:
        gpm.read()
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            backend.gemm_seconds(policy, g, tenants, iters=20)
        backend.synchronize()
        out[policy] = gpm.read()
        print(f"SMs busy under {policy}: {out[policy]}", flush=True)
    return out


def main(device: str, quick: bool = False) -> dict:
    import torch

    backend = make_backend(device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # FP32 means FP32, as in the paper
        torch.backends.cudnn.allow_tf32 = False
    rs = [1, 2, 5, 10, 20, 32, 40, 64, 80, 120] if not quick else [1, 2, 10, 20, 40]
    if device == "cpu" and not quick:
        rs = [1, 2, 5, 10, 20, 32, 40]
    iters = {"cuda": 50, "cpu": 3}.get(device, 1)
    dtypes = ["fp32", "bf16"]
    rows, summary = [], []
    t_start = time.time()
    for dtype in dtypes:
        workloads = list(SHAPES) + ["ResNet-18 basic block (64ch, 28x28)"]
        for name in workloads:
            series = {p: [] for p in POLICIES}
            for r in rs:
                for policy in POLICIES:
                    if name in SHAPES:
                        g = Gemm(*SHAPES[name], dtype)
                        secs = backend.gemm_seconds(policy, g, r, iters)
                        flops = r * g.flops
                    else:
                        secs, flops = block_seconds(backend, policy, r, dtype, iters)
                    gf = flops / secs / 1e9
                    series[policy].append(gf)
                    rows.append({"dtype": dtype, "workload": name, "R": r, "policy": policy, "GFLOP/s": gf})
            ratio_space = geomean([a / b for a, b in zip(series["spacetime"], series["space"])])
            ratio_time = geomean([a / b for a, b in zip(series["spacetime"], series["time"])])
            paper = PAPER.get(name, {}) if dtype == "fp32" else {}
            summary.append({"dtype": dtype, "workload": name, "spacetime/space": ratio_space, "spacetime/time": ratio_time,
                            "paper spacetime/space": paper.get("space", ""), "paper spacetime/time": paper.get("time", ""),
                            "peak spacetime GFLOP/s": max(series["spacetime"])})
            print(summary[-1], flush=True)
            if dtype == "fp32":
                plot(RESULTS / f"gpu_spacetime_{device.replace(':', '_')}_{name.split()[0]}.png",
                     {p: (rs, series[p]) for p in POLICIES}, "concurrent tenants R", "GFLOP/s",
                     f"{name} on {backend.name} (FP32)", logy=True)
    sm = sm_busy(backend, Gemm(*SHAPES["conv2_2 GEMM 256x128x1152"]), 40) if device == "cuda" else {}
    elapsed = time.time() - t_start
    md = "## geometric means over R = " + ", ".join(map(str, rs)) + "\n\n"
    md += table(summary, ["dtype", "workload", "spacetime/space", "spacetime/time", "paper spacetime/space",
                          "paper spacetime/time", "peak spacetime GFLOP/s"])
    per_r = [{"dtype": r["dtype"], "workload": r["workload"], "R": r["R"],
              **{p: next(x["GFLOP/s"] for x in rows if x["dtype"] == r["dtype"] and x["workload"] == r["workload"]
                         and x["R"] == r["R"] and x["policy"] == p) for p in POLICIES}}
             for r in rows if r["policy"] == "time"]
    md += "\n\n## GFLOP/s per R\n\n" + table(per_r, ["dtype", "workload", "R", *POLICIES])
    if sm:
        md += "\n\n## SMs busy while each policy runs 40 tenants' conv GEMMs (NVML GPM, FP32)\n\n"
        md += table([{"policy": p, **v} for p, v in sm.items()], ["policy", "sm_utilization", "sm_occupancy"])
    md += f"\n\ndevice: {backend.name}; ran in {elapsed:.1f} s"
    print(md)
    save(f"gpu_spacetime_{device.replace(':', '_')}", {"device": backend.name, "rows": rows, "summary": summary,
                                                       "seconds": elapsed, "quick": quick, "sm_busy": sm}, md)
    return {"summary": summary}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="sim:v100", help="sim:v100 | sim:h200 | cuda | cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    main(args.device, args.quick)
