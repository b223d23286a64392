"""flowkit over HTTP against FastAPI, equal resources: the 3-stage image pipeline (numpy
preprocessing, a small CNN, softmax), 2 serving processes each with 1 torch thread:

- FastAPI: uvicorn ``--workers 2``, a sync endpoint (``peers/fastapi_pipeline.py``; started by
  ``peers/fastapi_serve.py``, which corrects uvicorn's multi-worker TCP_NODELAY bug);
- flowkit, served by the workers: a LocalCluster of 2 single-threaded workers, ``dep.serve()``
  (each worker serves and runs the fused plan itself; the two share one port);
- flowkit, served by the client: the same deployment, ``dep.serve(where="client")``;
- flowkit served by the workers on asyncio's loop instead of uvloop (dask's default loop; the
  clusters flowkit starts use uvloop, as uvicorn does wherever uvloop is installed).

Only the system under test runs; the load generator (``loadgen.py``) is a process of its own.
Closed loop: ``--closed`` sequential requests (after 200 warm-up), p50/p99 (p99 from >= 2,000).
Open loop: Poisson arrivals from 100 req/s up, ``--seconds`` per rate, latency from the
scheduled time, failures and timeouts are misses; the sweep stops at the first rate that does
not hold 99% within 50 ms ("highest rate held" is monotone). ``--reps`` repetitions, alternating
the systems' order; medians and spreads over repetitions are reported.

Run: .venv/bin/python benchmarks/http_vs_fastapi.py [--quick]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import percentile, save, table  # noqa: E402
from peers.runner import free_port, peer_env  # noqa: E402

RATES = [100, 200, 300, 400, 500, 600, 800]


def loadgen(url: str, body: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "loadgen.py"), "--url", url, "--body", str(body), *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def measure(name: str, url: str, body: Path, closed: int, seconds: float) -> dict:
    print(f"-- {name}: closed loop", flush=True)
    c = loadgen(url, body, "--closed", str(closed), "--warmup", "200")
    ms = c["latencies_ms"]
    row = {"system": name, "n": len(ms), "failures": c["failures"], "p50_ms": percentile(ms, 50),
           "p99_ms": percentile(ms, 99)}
    sweep = []
    for rate in RATES:
        time.sleep(1.0)   # drain: nothing of the previous rate still running
        o = loadgen(url, body, "--rate", str(rate), "--seconds", str(seconds), "--seed", str(rate))
        lat = [x for x in o["latencies_ms"] if x is not None]
        within = sum(1 for x in lat if x <= 50) / max(1, o["sent"])
        sweep.append({"system": name, "rate": rate, "sent": o["sent"], "failed": o["sent"] - len(lat),
                      "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99) if len(lat) == o["sent"] else float("inf"),
                      "within_50ms": within})
        print(sweep[-1], flush=True)
        if within < 0.99:
            break
    held = [r["rate"] for r in sweep if r["within_50ms"] >= 0.99]
    row["held_rps"] = held[-1] if held and held == RATES[:len(held)] else 0
    return {"closed": row, "open": sweep}


def fastapi(body: Path, closed: int, seconds: float) -> dict:
    port = free_port()
    # (without what a LocalCluster started here left in this process's environment: peer_env)
    env = dict(peer_env(), PYTHONPATH=str(HERE.parent))
    # uvicorn --workers 2, with its TCP_NODELAY bug corrected (see peers/fastapi_serve.py)
    proc = subprocess.Popen([sys.executable, str(HERE / "peers" / "fastapi_serve.py"), str(port), "2"], env=env)
    try:
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the FastAPI server did not start")
                time.sleep(0.2)
        return measure("FastAPI (uvicorn --workers 2, sync endpoint)", f"http://127.0.0.1:{port}/predict", body,
                       closed, seconds)
    finally:
        proc.terminate()
        proc.wait(30)


def flowkit(body: Path, closed: int, seconds: float, loop: str = "uvloop",
            where: tuple[str, ...] = ("workers", "client")) -> list[dict]:
    """flowkit's rows: its workers set up as on the clusters flowkit starts (``serving_settings``:
    dask's profiler off) on the event loop ``loop`` (dask's ``distributed.admin.event-loop``:
    uvloop, as there, or asyncio), served ``where``."""
    import dask
    from distributed import Client, LocalCluster

    import flowkit as fk
    from flowkit.demo import image_flow
    from flowkit.runtime.clusters import serving_settings

    def one_torch_thread():
        import torch

        torch.set_num_threads(1)

    out = []
    with dask.config.set({**serving_settings(), "distributed.admin.event-loop": loop}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.run(one_torch_thread)
        # tune_malloc: as flowkit does on clusters it starts (dask's nanny sets MALLOC_TRIM_THRESHOLD_, which
        # makes torch map and unmap its buffers per call; the FastAPI processes run without it)
        with fk.deploy(image_flow(), cluster=client, tune_workers=True) as dep:
            for w in where:
                with dep.serve(where=w) as server:
                    out.append(measure(f"flowkit dep.serve(where={w!r})" + ("" if loop == "uvloop" else f", {loop} loop"),
                                       server.url + "/v1/flows/classify/predict", body, closed, seconds))
    return out


def flowkit_asyncio(body: Path, closed: int, seconds: float) -> list[dict]:
    """flowkit served by its workers on asyncio's own event loop (dask's default): uvloop's share."""
    return flowkit(body, closed, seconds, loop="asyncio", where=("workers",))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    from flowkit.demo import sample_images

    closed, seconds = (300, 2.0) if a.quick else (2000, 6.0)
    img = sample_images(1)[0]["img"]
    body = Path(tempfile.mkdtemp()) / "body.json"
    body.write_text(json.dumps({"rows": [{"img": base64.b64encode(img).decode()}]}))
    runs = []
    for rep in range(1 if a.quick else a.reps):
        order = [fastapi, flowkit, flowkit_asyncio] if rep % 2 == 0 else [flowkit_asyncio, flowkit, fastapi]
        for system in order:
            got = system(body, closed, seconds)
            runs += got if isinstance(got, list) else [got]
    systems = list(dict.fromkeys(r["closed"]["system"] for r in runs))
    summary = []
    for s in systems:
        rows = [r["closed"] for r in runs if r["closed"]["system"] == s]
        summary.append({"system": s, "reps": len(rows), "n": sum(r["n"] for r in rows),
                        "failures": sum(r["failures"] for r in rows),
                        "p50_ms": statistics.median(r["p50_ms"] for r in rows),
                        "p50 spread": f"{min(r['p50_ms'] for r in rows):.3g}-{max(r['p50_ms'] for r in rows):.3g}",
                        "p99_ms": statistics.median(r["p99_ms"] for r in rows),
                        "p99 spread": f"{min(r['p99_ms'] for r in rows):.3g}-{max(r['p99_ms'] for r in rows):.3g}",
                        "held_rps": min(r["held_rps"] for r in rows)})
    base = summary[0]
    for r in summary:
        r["p50 vs FastAPI"] = r["p50_ms"] / base["p50_ms"]
        r["p99 vs FastAPI"] = r["p99_ms"] / base["p99_ms"]
    md = table(summary, ["system", "reps", "n", "failures", "p50_ms", "p50 spread", "p99_ms", "p99 spread",
                         "p50 vs FastAPI", "p99 vs FastAPI", "held_rps"])
    md += ("\n\nheld_rps: the highest offered rate (Poisson, from 100 req/s up) with 99% of requests within "
           "50 ms, the lowest over the repetitions. Open-loop rows: see the JSON.")
    print(md)
    save("http_vs_fastapi", {"summary": summary, "runs": runs, "quick": a.quick,
                             "config": {"processes": 2, "torch_threads": 1, "closed": closed, "seconds": seconds,
                                        "event_loop": "uvloop (FastAPI: uvicorn's loop='auto'; flowkit: dask's "
                                                      "distributed.admin.event-loop), unless a row names another",
                                        "flowkit_worker_settings": "flowkit.runtime.clusters.serving_settings()",
                                        "reps": a.reps, "systems": systems},
                             "load_average_at_end": os.getloadavg()},   # (a shared machine: how busy it was)
         md)


if __name__ == "__main__":
    main()
