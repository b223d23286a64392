"""dask's periodic housekeeping on a flowkit worker's event loop, against flowkit's HTTP latency.

A flowkit worker serves HTTP on the dask worker's own event loop (``runtime/ingress.py``), the
loop that also runs dask's periodic callbacks: the system monitor (psutil's CPU, memory, network
and disk counters, every 500 ms), the heartbeat to the scheduler, the statistical profiler's
trigger (every 10 ms) and the loop's tick. A request that arrives while one of them runs waits
for it. This serves the 3-stage image pipeline over HTTP (``dep.serve()``: a LocalCluster of 2
single-threaded workers, tuned as flowkit tunes the clusters it starts) under variants of dask's
configuration, driven by ``loadgen.py`` in its own process (a closed loop, then an open loop at
``--rate``), the variants alternating, ``--reps`` times:

- ``dask defaults``;
- ``quiet monitor``: ``distributed.admin.system-monitor.interval`` 10 s, disk counters off;
- ``no profiler``: ``distributed.worker.profile.enabled`` False;
- ``both``.

Run: .venv/bin/python benchmarks/dask_housekeeping.py [--reps 3] [--closed 2000] [--rate 400]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import percentile, save, table  # noqa: E402
from http_vs_fastapi import loadgen  # noqa: E402

QUIET_MONITOR = {"distributed.admin.system-monitor.interval": "10s", "distributed.admin.system-monitor.disk": False}
NO_PROFILER = {"distributed.worker.profile.enabled": False}
VARIANTS = {"dask defaults": {}, "quiet monitor": QUIET_MONITOR, "no profiler": NO_PROFILER,
            "both": {**QUIET_MONITOR, **NO_PROFILER}}


def what_runs(dask_worker) -> dict:
    """The worker's periodic callbacks and its monitor's interval: that the variant took."""
    import dask

    return {"periodic": sorted(dask_worker.periodic_callbacks),
            "monitor_interval": dask.config.get("distributed.admin.system-monitor.interval")}


def one_torch_thread():
    import torch

    torch.set_num_threads(1)


def run(variant: str, body: Path, closed: int, rate: float, seconds: float) -> dict:
    import dask
    from distributed import Client, LocalCluster

    import flowkit as fk
    from flowkit.demo import image_flow

    with dask.config.set(VARIANTS[variant]), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.run(one_torch_thread)
        took = next(iter(client.run(what_runs).values()))
        with fk.deploy(image_flow(), cluster=client, tune_workers=True) as dep, \
                dep.serve(where="workers") as server:
            url = server.url + "/v1/flows/classify/predict"
            c = loadgen(url, body, "--closed", str(closed), "--warmup", "200")
            o = loadgen(url, body, "--rate", str(rate), "--seconds", str(seconds), "--seed", "1")
    ms, lat = c["latencies_ms"], [x for x in o["latencies_ms"] if x is not None]
    row = {"variant": variant, "n": len(ms), "failures": c["failures"], "p50_ms": percentile(ms, 50),
           "p99_ms": percentile(ms, 99), "open_sent": o["sent"], "open_failed": o["sent"] - len(lat),
           "open_p50_ms": percentile(lat, 50), "open_p99_ms": percentile(lat, 99), "worker": took}
    print({k: v for k, v in row.items() if k != "worker"}, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--closed", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=400)
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    from flowkit.demo import sample_images

    body = Path(tempfile.mkdtemp()) / "body.json"
    body.write_text(json.dumps({"rows": [{"img": base64.b64encode(sample_images(1)[0]["img"]).decode()}]}))
    runs = []
    for rep in range(a.reps):
        order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
        runs += [dict(run(v, body, a.closed, a.rate, a.seconds), rep=rep) for v in order]
    summary = []
    for v in VARIANTS:
        rows = [r for r in runs if r["variant"] == v]

        def med(k):
            return statistics.median(r[k] for r in rows)

        def spread(k):
            return f"{min(r[k] for r in rows):.3g}-{max(r[k] for r in rows):.3g}"

        summary.append({"variant": v, "reps": len(rows), "failures": sum(r["failures"] + r["open_failed"] for r in rows),
                        "p50_ms": med("p50_ms"), "p50 spread": spread("p50_ms"), "p99_ms": med("p99_ms"),
                        "p99 spread": spread("p99_ms"), f"{a.rate:g}/s p99_ms": med("open_p99_ms"),
                        f"{a.rate:g}/s p99 spread": spread("open_p99_ms")})
    md = table(summary, list(summary[0]))
    md += (f"\n\nClosed loop: {a.closed} requests after 200 warm-up, per repetition; open loop: Poisson at "
           f"{a.rate:g} req/s for {a.seconds:g} s, latency from the scheduled time. Medians over the repetitions, "
           "their range beside them.")
    print(md)
    save("dask_housekeeping", {"summary": summary, "runs": runs, "variants": VARIANTS,
                               "config": {"workers": 2, "torch_threads": 1, "closed": a.closed, "rate": a.rate,
                                          "seconds": a.seconds, "reps": a.reps},
                               "load_average_at_end": os.getloadavg()}, md)


if __name__ == "__main__":
    main()
