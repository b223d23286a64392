"""The garbage collector's full collections in a flowkit worker, with its heap frozen (what
``tune_workers`` does once the models are in: ``plugin.freeze_heap``) and without.

The 3-stage image pipeline served over HTTP by its workers (a LocalCluster of 2 single-threaded
workers, ``fk.deploy(..., tune_workers=True)``, ``dep.serve()``), driven open-loop (Poisson,
``--rate`` req/s for ``--seconds``, latency from the scheduled time) by ``loadgen.py`` in its
own process. "not frozen" is the same deployment with ``gc.unfreeze()`` run on its workers, so
the allocator setting is the same in both.
Each worker runs a full collection every ``--every`` seconds while the load runs (the collector
left alone runs one whenever the objects that survived since its last one reach a quarter of
those it kept then: minutes apart or seconds apart, depending on what the process does), timing
it. ``--reps`` repetitions, alternating the order.

Run: .venv/bin/python benchmarks/gc_pauses.py [--rate 500] [--seconds 20] [--reps 2]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import percentile, save, table  # noqa: E402
from http_vs_fastapi import loadgen  # noqa: E402


def collect_every(dask_worker, frozen: bool, every: float, runs: int) -> int:
    """Unfreeze this worker's heap unless ``frozen``; then, from a thread of its own, run a full
    collection every ``every`` seconds, ``runs`` times, timing each (a full collection holds the
    GIL, so the worker's event loop waits for it as for one the collector starts itself). The
    objects the collector tracks (frozen ones are not)."""
    import gc
    import threading
    import time

    if not frozen:
        gc.unfreeze()
    pauses = dask_worker.__dict__["_gc_pauses"] = []

    def collect():
        for _ in range(runs):
            time.sleep(every)   # (a benchmark's pacing, not a wait for a condition)
            t0 = time.perf_counter()
            gc.collect()
            pauses.append(time.perf_counter() - t0)

    threading.Thread(target=collect, daemon=True, name="gc-pauses").start()
    return len(gc.get_objects())


def full_collections(dask_worker) -> list:
    return list(dask_worker.__dict__.get("_gc_pauses", []))


def one(frozen: bool, body: Path, rate: float, seconds: float, every: float, seed: int) -> dict:
    from distributed import Client, LocalCluster

    import flowkit as fk
    from flowkit.demo import image_flow

    def one_torch_thread():
        import torch

        torch.set_num_threads(1)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.run(one_torch_thread)
        with fk.deploy(image_flow(), cluster=client, tune_workers=True) as dep, dep.serve() as server:
            url = server.url + "/v1/flows/classify/predict"
            loadgen(url, body, "--closed", "300", "--warmup", "200")
            runs = max(1, int(seconds // every) - 1)
            tracked = client.run(collect_every, frozen=frozen, every=every, runs=runs)
            o = loadgen(url, body, "--rate", str(rate), "--seconds", str(seconds), "--seed", str(seed))
            pauses = [p * 1000 for ps in client.run(full_collections).values() for p in ps]
    lat = [x for x in o["latencies_ms"] if x is not None]
    return {"heap": "frozen" if frozen else "not frozen", "tracked_objects_per_worker": max(tracked.values()),
            "sent": o["sent"], "failed": o["sent"] - len(lat), "full_collections": len(pauses),
            "longest_collection_ms": max(pauses, default=0.0),
            "within_50ms": sum(1 for x in lat if x <= 50) / max(1, o["sent"]),
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99) if len(lat) == o["sent"] else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--every", type=float, default=5, help="seconds between full collections on each worker")
    a = ap.parse_args()
    from flowkit.demo import sample_images

    img = sample_images(1)[0]["img"]
    body = Path(tempfile.mkdtemp()) / "body.json"
    body.write_text(json.dumps({"rows": [{"img": base64.b64encode(img).decode()}]}))
    runs = []
    for rep in range(a.reps):
        for frozen in ((False, True) if rep % 2 == 0 else (True, False)):
            runs.append({"rep": rep, **one(frozen, body, a.rate, a.seconds, a.every, seed=rep)})
            print(runs[-1], flush=True)
            time.sleep(2)
    md = table(runs, ["heap", "rep", "tracked_objects_per_worker", "sent", "failed", "full_collections",
                      "longest_collection_ms", "within_50ms", "p50_ms", "p99_ms"])
    md += (f"\n\nOpen loop at {a.rate:g} req/s for {a.seconds:g} s per run, 2 workers serving HTTP; "
           f"a full collection run on each worker every {a.every:g} s (a collector left alone runs one whenever the "
           "objects that survived since its last one reach a quarter of those it kept then); "
           "full_collections and longest_collection_ms: those collections, both workers.")
    print(md)
    save("gc_pauses", {"runs": runs, "config": vars(a), "load_average_at_end": os.getloadavg()}, md)


if __name__ == "__main__":
    main()
