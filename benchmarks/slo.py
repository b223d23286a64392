"""Latency objectives, predicted against measured (issue 18; a first slice of the benchmark).

A synthetic cascade — a CPU-bound preprocessing step, a batching model whose batch costs a
fixed part plus a part per row, a high-variance (lognormal) remote call, a small CPU-bound
post-processing step — is profiled on a worker (``fk.profile``), planned for each objective
and rate (``fk.deploy(flow, slo_ms=..., rate=...)``), and driven by open-loop Poisson arrivals
at that rate (each latency counted from its scheduled time, so a backlog is not hidden). It
reports, per case: the plan (workers, batch, wait, race width), planning time, predicted and
measured end-to-end p99, the share of requests within the objective, and per stage the
predicted and measured p99. An objective the planner refuses is reported with its message.

Not yet here (see docs/slo.md): the defaults and grid-search baselines, Ray Serve, a ×3 rate
step, the recommender pipeline. The load runs in the client's process (not a separate one as
benchmarks/loadgen.py does), which adds its own scheduling noise on a 2-core machine.

    python benchmarks/slo.py [--seconds 10] [--cases 60:40,60:120,15:40]
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

import numpy as np

import flowkit as fk

RESULTS = Path(__file__).parent / "results"


def prep(row):
    t0 = time.thread_time()
    while time.thread_time() - t0 < 0.0005:
        pass
    return row["x"] + 1


def model(table):
    time.sleep(0.004 + 0.0004 * len(table))
    return [r["y"] * 2 for r in table]


def remote(row):
    time.sleep(min(0.05, random.lognormvariate(np.log(0.003), 0.7)))
    return row["m"] - 1


def post(row):
    return row["t"]


def cascade() -> fk.Flow:
    f = fk.Flow("slo_cascade", {"x": int})
    f.map(prep, names=["y"]).map(model, names=["m"], batching=True) \
        .map(remote, names=["t"], high_variance=True).map(post, names=["z"])
    return f


def drive(dep, rate: float, seconds: float, seed: int = 0) -> tuple[list[float], int]:
    """Poisson arrivals at ``rate`` for ``seconds``; latencies (ms, from the scheduled time) and
    the number refused (fk.Overloaded) or failed."""
    rng = random.Random(seed)
    lat, failed, lock, done = [], [0], threading.Lock(), threading.Event()
    pending = [0]
    start = time.perf_counter()
    t = 0.0
    while t < seconds:
        t += rng.expovariate(rate)
        delay = start + t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        scheduled = start + t

        def finished(fut, scheduled=scheduled):
            with lock:
                if fut.exception() is None:
                    lat.append((time.perf_counter() - scheduled) * 1000)
                else:
                    failed[0] += 1
                pending[0] -= 1
                if pending[0] == 0:
                    done.set()

        try:
            with lock:
                pending[0] += 1
            dep.submit({"x": [int(t * 1000)]}).add_done_callback(finished)
        except fk.Overloaded:
            with lock:
                pending[0] -= 1
                failed[0] += 1
    with lock:
        if pending[0] == 0:
            done.set()
    done.wait(60)
    return lat, failed[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--cases", default="60:40,60:120,15:40", help="slo_ms:rate, comma separated")
    ap.add_argument("--workers", type=int, default=2, help="the cluster's workers (the planner's maximum)")
    args = ap.parse_args()
    from distributed import Client, LocalCluster

    flow = cascade()
    out = {"cases": [], "seconds": args.seconds, "date": time.strftime("%Y-%m-%d %H:%M")}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        t0 = time.perf_counter()
        prof = fk.profile(flow, {"x": [1, 2, 3]}, cluster=client, batch_sizes=(1, 2, 4, 8, 16), repeats=30)
        out["profile_s"] = time.perf_counter() - t0
        print(prof.table().to_string(index=False))
        for case in args.cases.split(","):
            slo, rate = map(float, case.split(":"))
            row = {"slo_ms": slo, "rate": rate}
            try:
                dep = fk.deploy(flow, cluster=client, slo_ms=slo, rate=rate, profile=prof)
            except fk.SLOUnreachable as e:
                row["refused"] = str(e)
                print(f"\n== {slo:g} ms at {rate:g} req/s: refused: {e}")
                out["cases"].append(row)
                continue
            with dep:
                dep.map([{"x": [i]} for i in range(20)], progress=False)   # warm-up
                lat, failed = drive(dep, rate, args.seconds)
                plan = dep.slo_plan
                table = plan.table()
            lat_a = np.array(lat)
            row.update(workers=plan.workers, knobs=repr(plan.knobs), planning_s=plan.planning_s,
                       evaluated=plan.evaluated, predicted_p99_ms=plan.prediction.p99_ms,
                       measured_p99_ms=float(np.percentile(lat_a, 99)) if len(lat_a) else None,
                       measured_p50_ms=float(np.percentile(lat_a, 50)) if len(lat_a) else None,
                       within_slo=float((lat_a <= slo).mean()) if len(lat_a) else 0.0, requests=len(lat),
                       refused_or_failed=failed, explain=plan.explain(),
                       stages=table.drop(columns=[c for c in table.columns if c == "utilization"])
                       .to_dict(orient="records"))
            print(f"\n== {slo:g} ms at {rate:g} req/s: {plan.workers} workers; predicted p99 "
                  f"{row['predicted_p99_ms']:.3g} ms, measured (open loop) {row['measured_p99_ms']:.3g} ms; "
                  f"{row['within_slo']:.1%} within; planned in {plan.planning_s:.2f} s")
            print("\n".join(plan.explain()))
            print(table.to_string(index=False))
            out["cases"].append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "slo.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
