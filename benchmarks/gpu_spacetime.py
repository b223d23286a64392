"""The paper's Table 1 workloads on a chosen device: time vs space vs space-time multiplexing.

For R tenants, each with its own operands:
  - the three GEMM shapes of arXiv:1901.00041 (ResNet-18 conv2_2 im2col M=256 N=128 K=1152,
    square 256^3, RNN mat-vec 512x512 . 512x1),
  - a ResNet-18-style basic block (two 3x3 convs, 64 channels, 28x28, batch 1 per tenant),
under time (one after another), space (concurrent: threads on the CPU, streams on a GPU) and
spacetime (one batched launch: bmm for GEMMs, a stack_module_state + vmap program for the block),
in FP32 (TF32 off, as the paper) and BF16.

What each device means:
  - ``cpu``: *measured* on this machine. Per workload and R, each policy runs ``--warmup`` times,
    then ``--reps`` (>= 15) timed repetitions, interleaved (one of each policy per repetition, the
    order rotating) so that a load change on a shared machine hits every policy alike. Reported:
    the median with its IQR and min-max; a ratio is the median of the per-repetition ratios (adjacent
    samples, so slow load drift cancels), with their IQR. Torch runs one intra-op thread
    (``--threads``) and the process is pinned to one core (``--cores``): the "device" is one core,
    and the policies differ only in how they multiplex tenants onto it (on a machine shared with
    other work, a second core comes and goes and moves the ratios by more than 15%). Samples shorter
    than 10 ms repeat the call. ``--compare OLD.json`` records how far each geomean ratio moved from an
    earlier run (run-to-run agreement).
  - ``sim:v100`` / ``sim:h200``: *modeled* (flowkit.gpu.costmodel with the cited constants of
    flowkit/gpu/profiles.py), plus the model's prediction of Table 1 against the paper's figures.
  - ``cuda``: measured on a GPU (CUDA-event medians for the GEMMs). Has never run yet.

  .venv/bin/python benchmarks/gpu_spacetime.py --device cpu|sim:v100|sim:h200|cuda [--reps 15] [--compare OLD.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import RESULTS, plot, save, table  # noqa: E402

from flowkit.gpu import Gemm, make_backend  # noqa: E402
from flowkit.gpu.backends import SimBackend  # noqa: E402
from flowkit.gpu.costmodel import TABLE1, kernel_seconds, policy_seconds, table1_error  # noqa: E402

SHAPES = {name: paper["shape"] for name, paper in TABLE1.items()}
BLOCK = "ResNet-18 basic block (64ch, 28x28)"
POLICIES = ("time", "space", "spacetime")
RS = {"cpu": [1, 2, 5, 10, 20], "sim": [1, 2, 5, 10, 20, 32, 40, 64, 80, 120], "cuda": [1, 2, 5, 10, 20, 32, 40, 64, 80, 120]}


def geomean(xs):
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def quartiles(xs) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def interleaved(fns: dict, reps: int, warmup: int, sync, min_sample: float = 0.010) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``: ``warmup`` untimed calls each, then ``reps`` rounds of
    one timed sample each, the order rotating from round to round. A sample repeats a call that
    is shorter than ``min_sample`` enough times to last that long (timer and scheduler noise)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
        sync()
    inner = {}
    for n in names:
        t0 = time.perf_counter()
        fns[n]()
        sync()
        inner[n] = max(1, math.ceil(min_sample / max(time.perf_counter() - t0, 1e-7)))
    out = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            t0 = time.perf_counter()
            for _ in range(inner[n]):
                fns[n]()
            sync()
            out[n].append((time.perf_counter() - t0) / inner[n])
    return out


def gemm_fns(backend, g: Gemm, tenants: int) -> dict:
    """The three policies over R tenants' GEMMs, on preallocated operands (as the paper)."""
    import torch

    dt_ = torch.bfloat16 if g.dtype == "bf16" else torch.float32
    a = torch.randn(tenants, g.m, g.k, dtype=dt_, device=backend.device)
    b = torch.randn(tenants, g.k, g.n, dtype=dt_, device=backend.device)
    c = torch.empty(tenants, g.m, g.n, dtype=dt_, device=backend.device)

    def time_():
        for i in range(tenants):
            torch.mm(a[i], b[i], out=c[i])

    def space():
        list(backend.pool.map(lambda i: torch.mm(a[i], b[i], out=c[i]), range(tenants)))

    def spacetime():
        torch.bmm(a, b, out=c)

    return {"time": time_, "space": space, "spacetime": spacetime}


def block_fns(backend, tenants: int, dtype: str) -> dict:
    """R ResNet-18-style blocks (two 3x3 convs, 64 channels) under each policy, through the backend."""
    import torch
    from torch import nn

    dt_ = torch.bfloat16 if dtype == "bf16" else torch.float32

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.ReLU(),
                             nn.Conv2d(64, 64, 3, padding=1, bias=False)).to(backend.device, dt_).eval()

    models = [make(i) for i in range(tenants)]
    xs = torch.randn(tenants, 1, 64, 28, 28, device=backend.device, dtype=dt_)
    stacked = backend.stack(tuple(range(tenants)), models)
    return {"time": lambda: [backend.forward(m, x) for m, x in zip(models, xs)],
            "space": lambda: backend.forward_concurrent(list(zip(models, xs))),
            "spacetime": lambda: backend.forward_stacked(stacked, xs)}


def block_gemms(dtype: str) -> list[Gemm]:
    return [Gemm(28 * 28, 64, 576, dtype), Gemm(28 * 28, 64, 576, dtype)]


def modeled(backend: SimBackend, name: str, policy: str, tenants: int, dtype: str) -> float:
    p = backend.profile
    if name == BLOCK:
        if policy == "spacetime":
            return sum(p.launch_us * 1e-6 + kernel_seconds(g, tenants, p) for g in block_gemms(dtype))
        return sum(policy_seconds(policy, g, tenants, p) for g in block_gemms(dtype))
    return policy_seconds(policy, Gemm(*SHAPES[name], dtype), tenants, p)


def provenance() -> dict:
    import torch

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except Exception:
            return ""

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except Exception:
        pass
    return {"commit": git("rev-parse", "HEAD") or os.environ.get("FLOWKIT_COMMIT", "unknown"),
            "date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": f"{platform.machine()} {cpu}".strip(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cores_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def main(device: str, reps: int = 21, warmup: int = 3, compare: str | None = None, rs=None, out: str | None = None,
         threads: int | None = 1, cores: int | None = 1) -> dict:
    import torch

    kind = "sim" if device.startswith("sim") else device
    if kind == "cpu":
        if cores and hasattr(os, "sched_setaffinity"):   # the "device" is these cores, for every policy alike
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
        if threads:
            torch.set_num_threads(threads)   # intra-op threads; the space policy's pool runs beside them
    backend = make_backend(device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # FP32 means FP32, as in the paper
        torch.backends.cudnn.allow_tf32 = False
    rs = list(rs or RS[kind])
    meta = provenance()
    rows, summary = [], []
    t_start = time.time()
    for dtype in ("fp32", "bf16"):
        for name in list(SHAPES) + [BLOCK]:
            per_r = {}
            for r in rs:
                flops = r * (sum(g.flops for g in block_gemms(dtype)) if name == BLOCK else Gemm(*SHAPES[name]).flops)
                if kind == "sim":
                    secs = {p: [modeled(backend, name, p, r, dtype)] for p in POLICIES}
                elif kind == "cuda" and name != BLOCK:
                    g = Gemm(*SHAPES[name], dtype)
                    secs = {p: [backend.gemm_seconds(p, g, r, 50)] for p in POLICIES}
                else:
                    fns = block_fns(backend, r, dtype) if name == BLOCK else gemm_fns(backend, Gemm(*SHAPES[name], dtype), r)
                    secs = interleaved(fns, reps, warmup, backend.synchronize)
                per_r[r] = secs
                row = {"dtype": dtype, "workload": name, "R": r, "n": len(secs["time"])}
                for p in POLICIES:
                    q1, med, q3 = quartiles(secs[p]) if len(secs[p]) > 1 else (secs[p][0],) * 3
                    row[p] = {"median_s": med, "iqr_s": [q1, q3], "min_s": min(secs[p]), "max_s": max(secs[p]),
                              "gflops": flops / med / 1e9}
                for other in ("space", "time"):
                    per_rep = [o / s for o, s in zip(secs[other], secs["spacetime"])]
                    q1, _, q3 = quartiles(per_rep) if len(per_rep) > 1 else (per_rep[0],) * 3
                    row[f"spacetime/{other}"] = statistics.median(per_rep)   # adjacent samples: drift cancels
                    row[f"spacetime/{other} per-rep IQR"] = [q1, q3]
                rows.append(row)
            mine = [x for x in rows if x["dtype"] == dtype and x["workload"] == name]
            paper = TABLE1.get(name, {}) if dtype == "fp32" else {}
            entry = {"dtype": dtype, "workload": name,
                     "spacetime/space": geomean(x["spacetime/space"] for x in mine),
                     "spacetime/time": geomean(x["spacetime/time"] for x in mine),
                     "paper spacetime/space": paper.get("geomean", "") if paper.get("next") == "space" else "",
                     "paper spacetime/time": paper.get("geomean over time", paper.get("geomean", ""))
                     if paper.get("next") == "time" or "geomean over time" in paper else "",
                     "peak spacetime GFLOP/s": max(x["spacetime"]["gflops"] for x in mine)}
            summary.append(entry)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()}, flush=True)
            if dtype == "fp32":
                plot(RESULTS / f"gpu_spacetime_{device.replace(':', '_')}_{name.split()[0]}.png",
                     {p: (rs, [x[p]["gflops"] for x in mine]) for p in POLICIES}, "concurrent tenants R", "GFLOP/s",
                     f"{name} on {backend.name} (FP32, {'modeled' if kind == 'sim' else 'median'})", logy=True)
    elapsed = time.time() - t_start
    what = {"sim": "MODELED by flowkit.gpu.costmodel (cited constants in flowkit/gpu/profiles.py); nothing measured",
            "cpu": f"MEASURED on this CPU: median of {reps} interleaved repetitions (each at least 10 ms) after {warmup} "
                   f"warm-up rounds, {torch.get_num_threads()} intra-op thread(s) on {meta['cores_used']} core(s); a ratio is the median of the "
                   "per-repetition ratios",
            "cuda": "MEASURED on a GPU (CUDA events, median of 50)"}[kind]
    md = f"{what}.\n\n" + json.dumps(meta) + "\n\n## geometric means over R = " + ", ".join(map(str, rs)) + "\n\n"
    md += table(summary, ["dtype", "workload", "spacetime/space", "spacetime/time", "paper spacetime/space",
                          "paper spacetime/time", "peak spacetime GFLOP/s"])
    payload = {"what": what, "provenance": meta, "device": backend.name, "reps": reps if kind == "cpu" else None,
               "warmup": warmup if kind == "cpu" else None, "rs": rs, "summary": summary, "rows": rows,
               "seconds": elapsed}
    if kind == "sim":
        err = table1_error(backend.profile)
        payload["table1_prediction"] = err
        md += ("\n\n## Table 1 predicted by the model vs the paper (V100; R = 10, 20 and the geomean over every R "
               "from 2 to 120)\n\n" + table(err, ["workload", "figure", "paper", "predicted", "error"]))
        if backend.profile.name != "V100":
            md += "\n\n(The paper's figures are a V100's; on this device they are a reference, not a target.)"
    if compare:
        old = json.loads(Path(compare).read_text())
        agreement = []
        for new in summary:
            prev = next((o for o in old["summary"] if o["dtype"] == new["dtype"] and o["workload"] == new["workload"]), None)
            if prev:
                for k in ("spacetime/space", "spacetime/time"):
                    agreement.append({"dtype": new["dtype"], "workload": new["workload"], "ratio": k,
                                      "previous run": prev[k], "this run": new[k], "change": new[k] / prev[k] - 1})
        worst = max(abs(a["change"]) for a in agreement)
        payload["run_to_run"] = {"previous": old.get("provenance", old.get("meta")), "rows": agreement,
                                 "max_abs_change": worst, "within_15_percent": worst <= 0.15}
        md += (f"\n\n## Run-to-run agreement with {Path(compare).name} (started {payload['run_to_run']['previous'].get('date')}): "
               f"largest change {worst:+.1%} of a geomean ratio\n\n"
               + table(agreement, ["dtype", "workload", "ratio", "previous run", "this run", "change"]))
    per_r = [{"dtype": x["dtype"], "workload": x["workload"], "R": x["R"],
              **{f"{p} GFLOP/s": x[p]["gflops"] for p in POLICIES},
              **({f"{p} IQR ms": "%.3g-%.3g" % tuple(1000 * v for v in x[p]["iqr_s"]) for p in POLICIES}
                 if kind == "cpu" else {})} for x in rows]
    cols = ["dtype", "workload", "R", *(f"{p} GFLOP/s" for p in POLICIES)]
    md += "\n\n## per R (median)\n\n" + table(per_r, cols + ([f"{p} IQR ms" for p in POLICIES] if kind == "cpu" else []))
    md += f"\n\ndevice: {backend.name}; ran in {elapsed:.1f} s"
    print(md)
    save(out or f"gpu_spacetime_{device.replace(':', '_')}", payload, md)
    return payload


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="sim:v100", help="sim:v100 | sim:h200 | cuda | cpu")
    ap.add_argument("--reps", type=int, default=21, help="timed repetitions per cell (cpu; at least 15)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (0: torch's default)")
    ap.add_argument("--cores", type=int, default=1, help="CPU cores the benchmark may run on (0: all)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compare", help="an earlier run's JSON: record how far each geomean ratio moved")
    ap.add_argument("--rs", type=lambda s: [int(x) for x in s.split(",")], help="tenant counts, e.g. 1,2,10")
    ap.add_argument("--out", help="results name (default gpu_spacetime_<device>)")
    args = ap.parse_args()
    if args.device == "cpu" and args.reps < 15:
        ap.error("--reps must be at least 15 on the CPU")
    main(args.device, args.reps, args.warmup, args.compare, args.rs, args.out, args.threads, args.cores)
