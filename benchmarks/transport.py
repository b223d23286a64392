"""The session transport on the request path: the framed TCP listener (``runtime/framed.py``)
against dask's own comm, side by side in one run (issue: keep a private transport only if dask's
costs more than 10% of the deployed p50).

Two deployments of each flow on one embedded-style cluster (2 worker processes), one whose
sessions use the framed listener and one on dask's comm (``FLOWKIT_FRAMED=0`` when its router
starts); closed loop, interleaved rounds, p50/p99 of ``dep.run``. Flows: a no-op (the transport
alone) and the 3-stage image pipeline.

Run: .venv/bin/python benchmarks/transport.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import percentile, save, table, time_calls  # noqa: E402

import flowkit as fk  # noqa: E402
from flowkit.demo import image_flow, sample_images  # noqa: E402


def identity(row) -> int:
    return row["x"]


def noop_flow() -> fk.Flow:
    flow = fk.Flow("noop", {"x": int})
    flow.map(identity, names=["y"])
    return flow


def main(quick: bool) -> None:
    from distributed import Client, LocalCluster

    n, rounds = (200, 2) if quick else (1000, 4)
    img = sample_images(1)[0]
    rows = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        for name, build, x in (("no-op", noop_flow, {"x": [1]}), ("3-stage image", image_flow, [img])):
            deps = {}
            for transport, flag in (("framed", "1"), ("dask comm", "0")):
                os.environ["FLOWKIT_FRAMED"] = flag
                deps[transport] = fk.deploy(build(), cluster=client, tune_workers=True)
            os.environ.pop("FLOWKIT_FRAMED")
            samples = {t: [] for t in deps}
            for _ in range(rounds):
                for t, dep in deps.items():
                    samples[t] += time_calls(lambda dep=dep: dep.run(x), n // rounds)
            for dep in deps.values():
                dep.close()
            ms = {t: [s * 1000 for s in v] for t, v in samples.items()}
            p50 = {t: percentile(v, 50) for t, v in ms.items()}
            for t in deps:
                rows.append({"flow": name, "transport": t, "n": len(ms[t]), "p50_ms": p50[t],
                             "p99_ms": percentile(ms[t], 99),
                             "dask comm costs (p50)": f"{(p50['dask comm'] - p50['framed']) / p50['framed'] * 100:+.0f}%"})
            print(rows[-2:], flush=True)
    md = table(rows, ["flow", "transport", "n", "p50_ms", "p99_ms", "dask comm costs (p50)"])
    print(md)
    save("transport", {"rows": rows, "quick": quick}, md)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
