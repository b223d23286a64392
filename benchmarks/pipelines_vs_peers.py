"""Cloudflow's four real pipelines, served by flowkit and by the alternatives, in one run.

Pipelines (benchmarks/pipelines/): image cascade (pretrained MobileNetV2 -> larger CNN when
unsure), video streams (detector -> two classifier branches -> outer join), translation
(language classifier -> raced seq2seq transformers), recommender (two dynamic lookups -> top-5).

Systems measured here, interleaved per pipeline:
  - in-process floor: every stage called directly in this process;
  - flowkit optimized (each pipeline's rules) and unoptimized (optimize=False), embedded-style
    LocalCluster of 2 single-threaded worker processes, through the Python API and over HTTP;
  - a hand-written dask.distributed pipeline: one chained future per stage, same cluster;
  - over HTTP, from .venv-peers (benchmarks/peers/setup.sh makes it; none is a flowkit
    dependency): a FastAPI server running all stages in one process (the HTTP floor), LitServe
    (one fused server), Ray Serve (one fused deployment, and a graph of one deployment per stage
    composed through DeploymentHandles).

Closed loop: p50 / p99 / p99.9 and CPU time per request (this process plus the workers). Open
loop: Poisson arrivals at rising rates, latency from the scheduled send time, client timeout 10 s;
goodput and the highest rate at which 99% of requests meet the pipeline's latency target.
--quick only checks that every system answers every pipeline correctly (CI runs it).

Run: .venv/bin/python benchmarks/pipelines_vs_peers.py [--quick] [--only cascade,video,...]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import RESULTS, open_loop, percentile, plot, save, table  # noqa: E402

import flowkit as fk  # noqa: E402
from peers import runner as peers  # noqa: E402
from pipelines import PIPELINES  # noqa: E402

RATES = {"cascade": [5, 10, 20, 30], "video": [20, 50, 100, 200], "translation": [10, 25, 50, 100],
         "recommender": [50, 100, 200, 400]}


def same(a: dict, b: dict) -> bool:
    """Equal outputs (floats within 1e-3 relative: peers run torch with other thread counts)."""
    return all((abs(a[k] - b[k]) <= 1e-3 * max(1.0, abs(b[k])) if isinstance(b[k], float) and a.get(k) is not None
                else a.get(k) == b[k]) for k in b)


def cpu_seconds(client, pids=()) -> float:
    """CPU seconds so far of this process, the dask workers, and the given servers' process trees."""
    import psutil

    here = psutil.Process().cpu_times()
    workers = client.run(lambda: sum(__import__("psutil").Process().cpu_times()[:2]))
    total = here.user + here.system + sum(workers.values())
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                t = proc.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_pipeline(name: str, client, quick: bool, ray_port, fastapi_port) -> tuple[list, list]:
    """One pipeline on every system. ``ray_port``/``fastapi_port``: (server pid, port) or None."""
    mod = importlib.import_module(f"pipelines.{name}")
    flow, store, reqs = mod.flow(), mod.store(), mod.requests(4 if quick else 40, seed=1)
    stored = {k: client.scatter(v, hash=False) for k, v in store.items()} if store else {}
    opt = fk.deploy(flow, cluster=client, optimize=mod.RULES or True)
    unopt = fk.deploy(flow, cluster=client, optimize=False)
    http, procs, pids = {}, [], {}
    try:
        for dep in (opt, unopt):
            for k, v in store.items():
                dep.put(k, v)
        systems = {
            "in-process floor": lambda r: mod.floor(r, store),
            "flowkit optimized": lambda r: opt.run([r]).records()[0],
            "flowkit unoptimized": lambda r: unopt.run([r]).records()[0],
            "dask chained futures": lambda r: mod.dask_pipeline(client, r, stored).result(),
        }
        http["flowkit optimized, HTTP"] = peers.HTTPSystem(opt.serve().port, f"/v1/flows/{name}/predict")
        if fastapi_port:
            http["FastAPI fused (HTTP floor)"] = peers.HTTPSystem(fastapi_port[1], f"/{name}")
            pids["FastAPI fused (HTTP floor)"] = [fastapi_port[0]]
        if peers.available():
            proc, port = peers.start("litserve", "--pipeline", name)
            procs.append(proc)
            http["LitServe fused, HTTP"] = peers.HTTPSystem(port, f"/{name}")
            pids["LitServe fused, HTTP"] = [proc.pid]
        if ray_port:
            http["Ray Serve fused, HTTP"] = peers.HTTPSystem(ray_port[1], f"/{name}/fused")
            http["Ray Serve graph, HTTP"] = peers.HTTPSystem(ray_port[1], f"/{name}/graph")
            pids["Ray Serve fused, HTTP"] = pids["Ray Serve graph, HTTP"] = [ray_port[0]]
        systems.update({k: s.call for k, s in http.items()})
        expected = [mod.floor(r, store) for r in reqs]
        for sys_name, call in systems.items():   # every system answers correctly (and warms up)
            for r, want in zip(reqs, expected):
                got = call(r)
                assert same(got, want), f"{name} / {sys_name}: {got} != {want}"
        if quick:
            return [{"pipeline": name, "system": s, "correct": True} for s in systems], []
        samples = {s: [] for s in systems}
        cpu = {s: 0.0 for s in systems}
        for _ in range(3):
            for sys_name, call in systems.items():
                c0 = cpu_seconds(client, pids.get(sys_name, ()))
                for r in reqs:
                    t0 = time.perf_counter()
                    call(r)
                    samples[sys_name].append(time.perf_counter() - t0)
                cpu[sys_name] += cpu_seconds(client, pids.get(sys_name, ())) - c0
        closed = []
        for s, lat in samples.items():
            ms = [x * 1000 for x in lat]
            closed.append({"pipeline": name, "system": s, "n": len(ms), "p50_ms": percentile(ms, 50),
                           "p99_ms": percentile(ms, 99), "p99.9_ms": percentile(ms, 99.9),
                           "cpu_ms_per_request": cpu[s] * 1000 / len(ms)})
        floor = closed[0]["p50_ms"]
        for r in closed:
            r["p50 vs floor"] = r["p50_ms"] / floor
        senders = {
            "flowkit optimized": lambda done, i=[0]: opt.submit([reqs[_next(i, len(reqs))]]).add_done_callback(lambda f: done()),
            "flowkit unoptimized": lambda done, i=[0]: unopt.submit([reqs[_next(i, len(reqs))]]).add_done_callback(lambda f: done()),
            "dask chained futures": lambda done, i=[0]: mod.dask_pipeline(client, reqs[_next(i, len(reqs))], stored)
            .add_done_callback(lambda f: done()),
        }
        for k, s in http.items():
            senders[k] = lambda done, i=[0], s=s: s.send(reqs[_next(i, len(reqs))], done)
        opened = []
        for rate in RATES[name]:
            for s, send in senders.items():
                r = open_loop(send, rate, 3.0, seed=rate, timeout=10.0, target_ms=mod.TARGET_MS)
                opened.append({"pipeline": name, "system": s, **r, "target_ms": mod.TARGET_MS})
                print(opened[-1], flush=True)
        return closed, opened
    finally:
        for s in http.values():
            s.close()
        for proc in procs:
            peers.stop(proc)
        opt.close()
        unopt.close()


def _next(counter: list, n: int) -> int:
    counter[0] += 1
    return counter[0] % n


def main(quick: bool = False, only: list[str] | None = None) -> dict:
    from distributed import Client, LocalCluster

    names = only or list(PIPELINES)
    closed, opened = [], []
    t0 = time.time()
    procs, ray_port, fastapi_port = [], None, None
    try:   # every server started here is stopped, also when a later one fails to start
        if peers.available():
            proc, port = peers.start("fastapi")
            procs.append(proc)
            fastapi_port = (proc.pid, port)
            proc, port = peers.start("ray", ready_path="/-/routes", ready=peers.ray_ready(names))
            procs.append(proc)
            ray_port = (proc.pid, port)
        else:
            print("peers not installed (bash benchmarks/peers/setup.sh): measuring flowkit, dask and the floor only")
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            client.run(lambda: sys.path.insert(0, str(Path(__file__).resolve().parent)))
            for name in names:
                c, o = run_pipeline(name, client, quick, ray_port, fastapi_port)
                closed += c
                opened += o
                print(table(c, list(c[0])), flush=True)
    finally:
        for proc in procs:
            peers.stop(proc)
    elapsed = time.time() - t0
    if quick:
        print(f"quick: every system answered every pipeline correctly ({elapsed:.0f} s)")
        return {"closed": closed}
    md = table(closed, ["pipeline", "system", "n", "p50_ms", "p99_ms", "p99.9_ms", "p50 vs floor", "cpu_ms_per_request"])
    md += "\n\n## open loop\n\n" + table(opened, ["pipeline", "system", "rate", "completed", "p50_ms", "p99_ms",
                                                  "target_ms", "within_target", "goodput"])
    systems = list(dict.fromkeys(r["system"] for r in opened))
    best = [{"pipeline": n, "system": s, "highest rate with 99% within target": max(
        [r["rate"] for r in opened if r["pipeline"] == n and r["system"] == s and r["within_target"] >= 0.99] or [0])}
        for n in names for s in systems]
    md += "\n\n" + table(best, ["pipeline", "system", "highest rate with 99% within target"])
    md += f"\n\nfull run: {elapsed / 60:.1f} min"
    print(md)
    save("pipelines" if not only else "pipelines_" + "_".join(names), {"closed": closed, "open": opened,
                                                                      "seconds": elapsed}, md)
    for name in names:
        plot(RESULTS / f"pipelines_{name}.png",
             {s: ([r["rate"] for r in opened if r["pipeline"] == name and r["system"] == s],
                  [min(r["p99_ms"], 20_000) for r in opened if r["pipeline"] == name and r["system"] == s])
              for s in systems},
             "offered load (req/s)", "p99 (ms)", f"{name}: p99 under open-loop load", logy=True)
    return {"closed": closed, "open": opened}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    main(args.quick, args.only.split(",") if args.only else None)
