"""Latency objectives: the planned deployment against defaults, an exhaustive grid search and
Ray Serve's autoscaling, and a ×3 rate step (issue 18, item 5).

Two synthetic pipelines (benchmarks/slo_pipelines.py: sleeps and spins, so they run anywhere):
``cascade`` (a CPU step, a batching model, a high-variance remote call, a small post step) and
``recommender`` (a CPU-light step, two dynamic lookups of objects stored with ``dep.put``, a
small batching top-k); and, not in the default run, ``scorer`` (a CPU-bound batching model and a
high-variance remote call: the case for room to race, ``--only scorer``) and ``fetcher`` (a
blocking call to a remote service: the case for a scale-out, ``--only fetcher``). Each is
profiled once (``fk.profile`` on a one-worker LocalCluster; its
time is reported apart from planning), then for every case (objective ``slo_ms`` : ``rate``):

- **planned**: ``fk.deploy(flow, slo_ms=, rate=, profile=, max_workers=W)`` on the embedded
  cluster, which flowkit scales to the planned workers (and, under load, may scale past them:
  the workers used are sampled every 0.5 s while driven). Reported: the plan, its planning time
  (``slo_plan.planning_s``), predicted against measured p99 (and per stage), the share of
  requests within the objective, the workers used; a refused objective with its message.
- **defaults**: ``fk.deploy(flow, cluster=client)`` with no objective (the default optimizer)
  on a LocalCluster of all W workers.
- **grid search**: every combination of the knobs the planner chooses — workers 1..W, fusion on
  and off (one candidate when nothing fuses), each batching stage's ``(max_batch, max_wait_ms)``
  from ``--grid-batches`` × ``--grid-waits`` (batch 1: not batched), race width 1..2 for each
  high-variance stage (at most the workers) — each applied as ``plan_slo`` applies a plan
  (``apply_knobs`` on the optimizer's candidate), deployed with ``optimize=False`` on a
  LocalCluster of exactly that many workers, warmed up and driven for ``--grid-seconds``. The
  configurations are measured once per rate and judged for each objective at that rate. Best:
  the fewest workers with >= 99% of requests within the objective, ties by p99 (misses as
  infinitely late). Its search time is the sum of its configurations' deploy + warm-up +
  measure + close times (``grid_search_s``; ``grid_search_to_best_s``: the same sum through the
  best's worker count, what a search stopping at the first worker count that holds would cost;
  cluster starts are not counted in either). Each case's best is then driven again for as long
  as the planned deployment (``--seconds``; ``grid.confirmed``): a few seconds' judgement can
  pass a configuration that a longer run does not.
- **Ray Serve** (``--ray``, not in the default run: Ray's start-up on a busy 2-core machine takes
  minutes): the same stages fused in one deployment (``@serve.batch`` for the batching stage) with
  Ray's autoscaling (1..W replicas, ``target_ongoing_requests`` 2), started from .venv-peers by
  benchmarks/slo_ray.py and driven over HTTP by a load generator in its own process.

Over HTTP (``--load http``) each measured deployment also reports its requests as its workers'
endpoints timed them (``server_p99_ms``: from a request's arrival at the handler to its answer's
bytes; the load generator, the kernel's network stack and uvicorn's header parsing left out):
what the deployment itself spent, beside what the client saw; and how late the load generator
sent them (``sender_late_p99_ms``: its sender thread waking from its sleep until the scheduled
time, or every sender busy; every latency includes it, as it counts from the schedule). Ray
Serve's rows have neither (its load is sent by ``ray_case``, which keeps only the latencies).

And per pipeline a **×3 rate step** (``--step slo:rate``): the planned deployment (its
re-planner running every 1 s) driven at the rate for ``--step-before`` seconds, then at 3× for
``--step-after`` seconds; per 1-s window (of scheduled send time) the p99 (misses as infinitely
late), the share within the objective and the workers; the time from the step until a window's
p99 is back within the objective and stays there (None: never within the run); and each
re-plan (``dep.slo_plan.replans``) with its time relative to the step.

The load: open-loop Poisson arrivals, each latency from its scheduled send time, cycling over the
same 200 requests for every system; a request refused (503 / ``fk.Overloaded``), failed or
unanswered counts as a miss (it stays in the denominator). With ``--load http`` (the default)
flowkit serves over HTTP from its workers (``dep.serve()``, which the re-planner and the
autoscaler see) and the load comes from load generators in processes of their own
(``slo_drive.drive_http``), as Ray Serve's does: both systems are driven the same way. With
``--load api`` the load is sent with ``dep.submit`` from the client's process (no HTTP; it adds
the client's own scheduling noise on a 2-core machine).

    python benchmarks/slo.py --ray                # the full run: about 25 min on 2 cores (20 without --ray)
    python benchmarks/slo.py --quick              # a smoke run: tiny durations, writes nothing to results/
    python benchmarks/slo.py --only cascade --cases 60:40 --no-grid --no-step
    python benchmarks/slo.py --only scorer --cases 30:20 --no-grid --step 30:20 --name slo_scorer_step
    python benchmarks/slo.py --only fetcher --cases 50:25 --no-grid --step 50:25 --step-after 20 --name slo_fetcher
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flowkit as fk  # noqa: E402
import hog  # noqa: E402
import slo_drive  # noqa: E402
import slo_pipelines as P  # noqa: E402
from _report import python_loop_ms  # noqa: E402
from flowkit.planner import Knobs, apply_knobs, stage_specs  # noqa: E402
from flowkit.runtime.clusters import serving_settings  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent


# -- deploying and measuring --------------------------------------------------------------------
DRIVES = {"http": slo_drive.drive_http, "api": slo_drive.drive}   # --load: how the load is sent (slo_drive)

def _put_store(dep, name: str) -> None:
    for k, v in P.PIPELINES[name]["store"]().items():
        dep.put(k, v)


def _warm(dep, name: str, n: int = 20) -> None:
    dep.map([P.PIPELINES[name]["request"](i) for i in range(n)], progress=False, return_exceptions=True)


def measure(make_dep, name: str, phases, drive, seed: int = 0, spell=None) -> tuple[dict, "slo_drive.Run", object, dict]:
    """Deploy (``make_dep()``), store the pipeline's objects, warm up, ``drive`` ``phases``
    (``slo_drive.drive`` or ``drive_http``) — with ``spell`` ``(from_s, seconds, procs)``,
    ``procs`` CPU hogs spinning from ``from_s`` into the load for ``seconds`` (a slow spell);
    returns (times, run, the deployment's slo_plan or None, ``{"stalls": what its re-planner set
    aside as [wall-clock start, requests, late], "spell": [wall-clock start, end] or None}``)
    with the deployment closed. The times leave out the harness's own lead (``Run.lead_s``:
    load generator processes starting), which a grid search would not spend."""
    t0 = time.perf_counter()
    dep = make_dep()
    times = {}
    try:
        _put_store(dep, name)
        times["deploy_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        _warm(dep, name)
        times["warm_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        with slow_spell(spell) as spelled:
            run = drive(dep, P.PIPELINES[name]["request"], phases, seed)
        times["measure_s"] = time.perf_counter() - t2 - run.lead_s
        plan = dep.slo_plan
        live = {"stalls": [[at, st.requests, st.late] for at, st in list(dep.replanner.stalls)] if dep.replanner else [],
                "spell": spelled or None}
    finally:
        t3 = time.perf_counter()
        dep.close()
        times["close_s"] = time.perf_counter() - t3
    times["total_s"] = time.perf_counter() - t0 - run.lead_s
    return times, run, plan, live


@contextlib.contextmanager
def slow_spell(spell):
    """``spell`` ``(from_s, seconds, procs)``: ``procs`` processes spinning (``hog.start_hog``)
    from ``from_s`` after the load's start (``slo_drive.LEAD_S`` from now) for ``seconds``;
    yields the list that gets the spell's wall-clock start and end. None: nothing."""
    happened: list = []
    if not spell:
        yield happened
        return
    at, seconds, procs = spell
    done, spinning = threading.Event(), []

    def run():
        if done.wait(slo_drive.LEAD_S + at):
            return
        happened.append(time.time())
        spinning.extend(hog.start_hog(procs))
        done.wait(seconds)
        hog.stop_hog(spinning)
        happened.append(time.time())

    thread = threading.Thread(target=run, name="slow-spell", daemon=True)
    thread.start()
    try:
        yield happened
    finally:
        done.set()
        thread.join(15)
        hog.stop_hog(spinning)
        if len(happened) == 1:   # (the case ended during its spell: it ended then)
            happened.append(time.time())


def parse_spell(text: str) -> tuple[float, float, int]:
    """``--spell FROM:SECONDS:PROCS`` as ``(from_s, seconds, procs)``."""
    try:
        at, seconds, procs = text.split(":")
        spell = float(at), float(seconds), int(procs)
    except ValueError:
        spell = (-1.0,)
    if min(spell) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: FROM:SECONDS:PROCS, e.g. 15:15:2")
    return spell


def grid_configs(flow, prof, workers: int, batches, waits, races):
    """(knobs, flow to deploy) for every combination on ``workers`` workers."""
    seen = set()
    for fusion in (True, False):
        cand = fk.optimize(flow, fusion=fusion, compete=1, batching=True).plan
        specs = stage_specs(cand, prof)
        names = tuple(s.name for s in specs)
        if names in seen:
            continue   # nothing to fuse: one candidate (as plan_slo)
        seen.add(names)
        bopts = [[(s.name, 1, 0.0)] + [(s.name, b, w) for b in batches if 1 < b <= s.max_batch for w in waits]
                 for s in specs if s.batching]
        ropts = [[(s.name, k) for k in races if k <= workers] for s in specs if s.high_variance]
        for bs in itertools.product(*bopts):
            for rs in itertools.product(*ropts):
                knobs = Knobs(fusion, tuple(bs), tuple(rs), workers)
                yield knobs, fk.Flow.from_plan(apply_knobs(cand, knobs), original=flow)


def describe(knobs: Knobs) -> str:
    parts = [f"{knobs.workers}w", "fused" if knobs.fusion else "unfused"]
    parts += [f"{s} b{b}/{w:g}ms" if b > 1 else f"{s} b1" for s, b, w in knobs.batch]
    parts += [f"{s} race{k}" for s, k in knobs.race if k > 1]
    return ", ".join(parts)


def confirm_grid_best(grid, grid_flows, confirmed, cases, workers, client, args) -> None:
    """Drive each case's grid best found on ``workers`` workers again for as long as the planned
    deployment is driven (``args.seconds``; the grid judged it on ``args.grid_seconds``), once per
    (pipeline, rate, configuration): ``confirmed[pipeline, rate, knobs]``."""
    for n in grid:
        for slo, rate in cases:
            best, _, _ = grid_best(grid[n][rate], slo)
            if best is None or best["workers"] != workers or (n, rate, best["knobs"]) in confirmed:
                continue
            flow = grid_flows[n, workers, best["knobs"]]
            times, run, _, _ = measure(lambda: fk.deploy(flow, cluster=client, optimize=False), n,
                                       [(args.seconds, rate)], DRIVES[args.load])
            confirmed[n, rate, best["knobs"]] = {"times": times, "server": run.server_summary(),
                                                 "by_slo": {s: run.summary(s) for s in sorted({s for s, _ in cases})}}
            print(f"   grid best {n} @ {rate:g}/s again for {args.seconds:g} s: {best['config']}: "
                  + ", ".join(f"{g['within_slo']:.1%} within {s:g} ms"
                              for s, g in confirmed[n, rate, best["knobs"]]["by_slo"].items()))


def grid_best(configs: list[dict], slo: float) -> tuple[dict | None, float, float]:
    """(best configuration for ``slo``, total search s, search s through the best's workers)."""
    total = sum(c["times"]["total_s"] for c in configs)
    held = [c for c in configs if c["by_slo"][slo]["within_slo"] >= 0.99]
    if not held:
        return None, total, total
    best = min(held, key=lambda c: (c["workers"], c["by_slo"][slo]["p99_all_ms"]))
    to_best = sum(c["times"]["total_s"] for c in configs if c["workers"] <= best["workers"])
    return best, total, to_best


# -- Ray Serve ----------------------------------------------------------------------------------
def ray_case(name: str, rate: float, seconds: float, slos, workers: int) -> dict:
    """Ray Serve with autoscaling (benchmarks/slo_ray.py in .venv-peers), warmed up by 50
    requests one after another, then driven at ``rate`` over HTTP by a load generator in its own
    process, with the bodies and schedule flowkit gets with ``--load http`` (``slo_drive.http_load``)."""
    from peers import runner

    if not runner.available():
        return {"skipped": ".venv-peers is missing (benchmarks/peers/setup.sh)"}
    tmp = Path(tempfile.mkdtemp(prefix="slo_ray_"))
    port = runner.free_port()
    log = open(tmp / "ray.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(runner.PEERS_PY), str(HERE / "slo_ray.py"), "--port", str(port), "--pipeline", name,
                             "--max-replicas", str(workers), "--replicas-file", str(tmp / "replicas.json")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=runner.peer_env())
    try:
        deadline = time.time() + 600
        while True:   # ready once its route is served
            if proc.poll() is not None:
                raise RuntimeError(f"slo_ray.py exited with {proc.returncode}; see {log.name}")
            if time.time() > deadline:
                raise RuntimeError(f"slo_ray.py not ready within 600 s; see {log.name}")
            try:
                status, body = runner._get(port, "/-/routes")
                if status == 200 and f"/{name}" in json.loads(body):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(1)
        start_s = time.perf_counter() - t0
        url, bodies = f"http://127.0.0.1:{port}/{name}", slo_drive.write_bodies(tmp / "bodies.json",
                                                                                P.PIPELINES[name]["request"])
        subprocess.run([sys.executable, str(slo_drive.LOADGEN), "--url", url, "--bodies", str(bodies),
                        "--closed", "50", "--warmup", "0"], capture_output=True, timeout=300)
        at = json.loads((tmp / "replicas.json").read_text())[-1][0] if (tmp / "replicas.json").exists() else 0
        _, lat, _ = slo_drive.http_load(url, bodies, [(seconds, rate)], 0, time.time() + slo_drive.LEAD_S, 20.0)
        seen = json.loads((tmp / "replicas.json").read_text()) if (tmp / "replicas.json").exists() else []
        during = [n for t, n in seen if t >= at and n is not None] or [0]
        out = {"by_slo": {s: slo_drive.summarize(lat, s) for s in slos}, "start_s": start_s,
               "workers_mean": float(np.mean(during)), "workers_max": int(max(during))}
    finally:
        runner.stop(proc)
        log.close()
    shutil.rmtree(tmp, ignore_errors=True)   # (kept, with Ray's log, when it failed)
    return out


# -- the run ------------------------------------------------------------------------------------
def parse_cases(text: str) -> list[tuple[float, float]]:
    return [tuple(map(float, c.split(":"))) for c in text.split(",") if c]


def meta(args) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    return {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "args": vars(args),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "python_loop_ms": python_loop_ms(),   # (the machine's speed at the start: see _report.python_loop_ms)
            "load": ("open-loop Poisson over HTTP to the workers (dep.serve) from load generators' own processes, "
                     if args.load == "http" else "open-loop Poisson from the client's process (dep.submit), ")
                    + f"cycling over {slo_drive.BODIES} requests' rows (Ray Serve's: the same bodies over HTTP); "
                    "latency from the scheduled time; refused, failed and unanswered requests count as misses"}


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--only", default="cascade,recommender")
    ap.add_argument("--cases", default="25:30,25:60,25:120,60:30,60:60,60:120", help="slo_ms:rate, comma separated")
    ap.add_argument("--workers", type=int, default=2, help="W: the most workers any system may use")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds each planned / defaults / Ray case is driven")
    ap.add_argument("--grid-seconds", type=float, default=5.0, help="seconds each grid configuration is driven")
    ap.add_argument("--grid-batches", default="1,4,16")
    ap.add_argument("--grid-waits", default="1,5", help="max_wait_ms values of the grid")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--no-step", action="store_true")
    ap.add_argument("--step", default="60:30", help="slo_ms:rate of the x3 rate step")
    ap.add_argument("--step-before", type=float, default=5.0)
    ap.add_argument("--step-after", type=float, default=15.0)
    ap.add_argument("--load", choices=sorted(DRIVES), default="http",
                    help="http: over HTTP to the workers from load generators' own processes (as Ray's); "
                         "api: dep.submit from this process")
    ap.add_argument("--ray", action="store_true", help="also Ray Serve with autoscaling (.venv-peers)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny durations, nothing written to results/")
    ap.add_argument("--charts", action="store_true", help="only draw the charts again from results/slo.json")
    ap.add_argument("--name", default="slo", help="results/<name>.json and .md (charts: only for the default, slo)")
    ap.add_argument("--spell", default=None, type=parse_spell, metavar="FROM:SECONDS:PROCS",
                    help="a slow spell in every defaults and planned case: PROCS CPU hogs spinning from FROM s "
                         "into the load for SECONDS s (the re-planner calibrating on it, then easing)")
    args = ap.parse_args()
    spell = args.spell
    if args.charts:
        for path in charts(json.loads((RESULTS / "slo.json").read_text()), RESULTS):
            print("wrote", path)
        return
    if args.quick:
        args.seconds, args.grid_seconds = min(args.seconds, 1.5), min(args.grid_seconds, 1.0)
        args.grid_batches, args.grid_waits = "1,8", "2"
        args.step_before, args.step_after = min(args.step_before, 2.0), min(args.step_after, 4.0)
        if args.cases == ap.get_default("cases"):   # loose: a 10-repeat profile on a busy machine has long tails
            args.cases = "200:40"
        if args.step == ap.get_default("step"):
            args.step = "200:20"
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in P.PIPELINES:
            ap.error(f"--only: no pipeline {n!r} (there are {', '.join(P.PIPELINES)})")
    cases = parse_cases(args.cases)
    slos = sorted({s for s, _ in cases})
    rates = sorted({r for _, r in cases})
    W = args.workers
    batches = [int(b) for b in args.grid_batches.split(",")]
    waits = [float(w) for w in args.grid_waits.split(",")]
    out: dict = {"meta": meta(args), "pipelines": {}}
    flows = {n: P.PIPELINES[n]["flow"]() for n in names}
    profiles, grid, defaults, cluster_s = {}, {n: {r: [] for r in rates} for n in names}, {n: {} for n in names}, {}
    grid_flows, confirmed = {}, {}   # (pipeline, workers, knobs) -> its flow; (pipeline, rate, knobs) -> a long run
    import dask
    from distributed import Client, LocalCluster

    started = time.perf_counter()
    for w in range(1, W + 1):
        if w not in (1, W) and args.no_grid:
            continue
        t0 = time.perf_counter()
        with dask.config.set(serving_settings()), \
                LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=":0",
                             silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            cluster_s[w] = time.perf_counter() - t0
            if w == 1:
                for n in names:
                    t1 = time.perf_counter()
                    profiles[n] = fk.profile(flows[n], P.sample(n), cluster=client, batch_sizes=(1, 2, 4, 8, 16),
                                             repeats=10 if args.quick else 30, one_row_runs=30 if args.quick else 200,
                                             store=P.PIPELINES[n]["store"]())
                    out["pipelines"].setdefault(n, {})["profile_s"] = time.perf_counter() - t1
                    out["pipelines"][n]["profile"] = profiles[n].table().to_dict("records")   # (the request path's too)
                    print(f"== {n}: profiled in {time.perf_counter() - t1:.1f} s")
                    print(profiles[n].table().to_string(index=False))
                if not args.no_grid:   # what the grid will cost, before it starts
                    k = sum(1 for n in names for ww in range(1, W + 1)
                            for _ in grid_configs(flows[n], profiles[n], ww, batches, waits, (1, 2))) * len(rates)
                    print(f"== grid: {k} configurations x ({args.grid_seconds:g} s + ~1.5 s to deploy, warm up and "
                          f"close) = about {k * (args.grid_seconds + 1.5) / 60:.0f} min")
            if not args.no_grid:
                for n in names:
                    for rate in rates:
                        for knobs, planned in grid_configs(flows[n], profiles[n], w, batches, waits, (1, 2)):
                            times, run, _, _ = measure(lambda: fk.deploy(planned, cluster=client, optimize=False),
                                                       n, [(args.grid_seconds, rate)], DRIVES[args.load])
                            grid_flows[n, w, repr(knobs)] = planned
                            grid[n][rate].append({"knobs": repr(knobs), "config": describe(knobs), "workers": w,
                                                  "times": times, "server": run.server_summary(),
                                                  "by_slo": {s: run.summary(s) for s in slos}})
                            s0 = grid[n][rate][-1]["by_slo"][slos[0]]
                            print(f"   grid {n} @ {rate:g}/s: {describe(knobs)}: p99 {s0['p99_all_ms']:.3g} ms, "
                                  + ", ".join(f"{g['within_slo']:.1%} within {s:g} ms" for s, g in
                                              grid[n][rate][-1]["by_slo"].items()) + f" ({times['total_s']:.1f} s)")
                confirm_grid_best(grid, grid_flows, confirmed, cases, w, client, args)
            if w == W:
                for n in names:
                    for rate in rates:
                        times, run, _, live = measure(lambda: fk.deploy(flows[n], cluster=client), n,
                                                      [(args.seconds, rate)], DRIVES[args.load], spell=spell)
                        defaults[n][rate] = {"workers": W, "times": times, "server": run.server_summary(),
                                             "by_slo": {s: run.summary(s) for s in slos}, "spell": live["spell"],
                                             "windows": {s: slo_drive.windows(run, s) for s in slos},
                                             "wall_start": run.wall_start}
                        print(f"   defaults {n} @ {rate:g}/s on {W} workers: p99 "
                              f"{defaults[n][rate]['by_slo'][slos[0]]['p99_all_ms']:.3g} ms")
    out["meta"]["cluster_start_s"] = cluster_s

    for n in names:
        rows = out["pipelines"][n].setdefault("cases", [])
        for slo, rate in cases:
            row = {"slo_ms": slo, "rate": rate}
            try:
                times, run, plan, live = measure(
                    lambda: fk.deploy(flows[n], slo_ms=slo, rate=rate, profile=profiles[n], max_workers=W), n,
                    [(args.seconds, rate)], DRIVES[args.load], spell=spell)
                table = plan.table()
                s = run.summary(slo)
                row["planned"] = {
                    "workers": plan.workers, **run.workers_used(), "knobs": repr(plan.knobs),
                    "planning_s": plan.planning_s, "evaluated": plan.evaluated, "times": times,
                    "predicted_p99_ms": plan.prediction.p99_ms, **s, **run.server_summary(),
                    "p99_error": plan.prediction.p99_ms / s["p99_all_ms"] - 1 if s["p99_all_ms"] else None,
                    "replans": [str(r) for r in plan.replans], "explain": plan.explain(), **live,
                    # per 1-s window of scheduled time (from wall_start): whether late requests came
                    # in a burst (a stall) or spread (a plan short of the load) before a re-plan
                    "windows": slo_drive.windows(run, slo), "wall_start": run.wall_start,
                    "stages": table.drop(columns=[c for c in table.columns if c == "utilization"]).to_dict("records")}
            except fk.SLOUnreachable as e:
                row["planned"] = {"refused": str(e), "holds_rate": e.holds_rate, "best_p99_ms": e.best_p99_ms}
            if rate in defaults[n]:
                d = defaults[n][rate]
                row["defaults"] = {"workers": d["workers"], **d["by_slo"][slo], **d["server"], "times": d["times"]}
                if spell:
                    row["defaults"].update(spell=d["spell"], windows=d["windows"][slo], wall_start=d["wall_start"])
            if not args.no_grid:
                best, total, to_best = grid_best(grid[n][rate], slo)
                row["grid"] = {"configs": len(grid[n][rate]), "grid_search_s": total, "grid_search_to_best_s": to_best,
                               "best": None if best is None else {"config": best["config"], "knobs": best["knobs"],
                                                                  "workers": best["workers"], **best["by_slo"][slo],
                                                                  **best["server"]}}
                again = None if best is None else confirmed.get((n, rate, best["knobs"]))
                if again is not None:
                    row["grid"]["confirmed"] = {"seconds": args.seconds, **again["by_slo"][slo], **again["server"]}
            if args.ray:
                row["ray"] = ray_for(n, rate, args, slos, W)[slo]
            row["goals"] = goals(row)
            rows.append(row)
            print_case(n, row)
        if not args.no_grid:
            out["pipelines"][n]["grid"] = {str(r): cs for r, cs in grid[n].items()}
        if not args.no_step:
            out["pipelines"][n]["step"] = step(n, flows[n], profiles[n], args, W)
    out["meta"]["wall_s"] = time.perf_counter() - started
    if args.quick:
        dest = Path(tempfile.gettempdir()) / "slo_quick"
        print(f"\n(--quick: nothing written to {RESULTS}; the JSON and table are in {dest})")
    else:
        dest = RESULTS
    dest.mkdir(exist_ok=True)
    (dest / f"{args.name}.json").write_text(json.dumps(out, indent=1, default=str))
    md = markdown(out)
    (dest / f"{args.name}.md").write_text(md)
    if args.name == "slo":
        charts(out, dest)
    print("\n" + md)


_RAY_CACHE: dict = {}


def ray_for(name, rate, args, slos, W) -> dict:
    key = (name, rate)
    if key not in _RAY_CACHE:
        try:
            r = ray_case(name, rate, args.seconds, slos, W)
        except Exception as e:   # a peer that does not start is reported, not fatal
            r = {"skipped": f"{type(e).__name__}: {e}"}
        _RAY_CACHE[key] = r
    r = _RAY_CACHE[key]
    return {s: ({"skipped": r["skipped"]} if "skipped" in r else
                {**r["by_slo"][s], "workers_mean": r["workers_mean"], "workers_max": r["workers_max"],
                 "start_s": r["start_s"]}) for s in slos}


def step(name, flow, prof, args, W) -> dict:
    slo, rate = parse_cases(args.step)[0]
    S1, S2 = args.step_before, args.step_after
    try:
        times, run, plan, live = measure(lambda: fk.deploy(flow, slo_ms=slo, rate=rate, profile=prof, max_workers=W),
                                         name, [(S1, rate), (S2, 3 * rate)], DRIVES[args.load])
    except fk.SLOUnreachable as e:
        return {"slo_ms": slo, "rate": rate, "refused": str(e)}
    wins = slo_drive.windows(run, slo)
    rec = slo_drive.recovery_s(wins, S1, slo)
    step_wall = run.wall_start + S1
    out = {"slo_ms": slo, "rate": rate, "after_rate": 3 * rate, "before_s": S1, "after_s": S2,
           "recovery_s": rec, "before": run.summary(slo, 0, S1), "after": run.summary(slo, S1),
           "windows": wins, "workers_planned_final": plan.workers, "times": times,
           "stalls": [[at - step_wall, n, late] for at, n, late in live["stalls"]],
           "replans": [{"at_s": r.at - step_wall, "reason": r.reason, "changes": [list(map(str, c)) for c in r.changes],
                        "applied": list(r.applied)} for r in plan.replans]}
    print(f"\n== {name}: x3 rate step {rate:g} -> {3 * rate:g} req/s at p99 <= {slo:g} ms: "
          + (f"back within the objective after {rec:.0f} s" if rec is not None else "never back within") +
          f" ({out['after']['within_slo']:.1%} within after the step)")
    for w in wins:
        print(f"   t={w['t'] - S1:+5.0f} s  {w['requests']:4d} req  p99 {w['p99_ms']:8.3g} ms  "
              f"{w['within_slo']:6.1%} within  workers {w['workers']}")
    for r in out["replans"]:
        print(f"   re-plan at {r['at_s']:+.1f} s: {r['reason']}; {'; '.join(r['applied'])}")
    for at, n, late in out["stalls"]:
        print(f"   stall set aside at {at:+.1f} s: {late} late of {n} requests started within a second")
    return out


def goals(row) -> dict:
    p, g = row.get("planned", {}), (row.get("grid") or {}).get("best")
    if "refused" in p or not p:
        return {"refused": True}
    out = {"within_99": p["within_slo"] >= 0.99,
           "p99_within_20pct": p["p99_error"] is not None and abs(p["p99_error"]) <= 0.2}
    if g is not None:
        out["workers_le_grid"] = p["workers_max"] <= g["workers"]
        if "confirmed" in row["grid"]:   # whether the grid's best holds when driven as long as the planned
            out["grid_best_confirmed"] = row["grid"]["confirmed"]["within_slo"] >= 0.99
        out["planning_lt_tenth_grid"] = p["planning_s"] < row["grid"]["grid_search_s"] / 10
    return out


def _f(v, fmt=".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def print_case(name, row) -> None:
    slo, rate = row["slo_ms"], row["rate"]
    p = row["planned"]
    print(f"\n== {name}: p99 <= {slo:g} ms at {rate:g} req/s")
    if "refused" in p:
        print(f"   planned: refused: {p['refused']}")
    else:
        print(f"   planned: {p['workers']} workers planned (used: mean {p['workers_mean']:.2g}, "
              f"max {p['workers_max']}); "
              f"predicted p99 {p['predicted_p99_ms']:.3g} ms, measured {_f(p['p99_all_ms'])} ms; "
              f"{p['within_slo']:.1%} within; planned in {p['planning_s']:.2f} s")
    if "defaults" in row:
        d = row["defaults"]
        print(f"   defaults: {d['workers']} workers; p99 {_f(d['p99_all_ms'])} ms; {d['within_slo']:.1%} within")
    if "grid" in row:
        g = row["grid"]
        b = g["best"]
        print(f"   grid: {g['configs']} configurations in {g['grid_search_s']:.1f} s: "
              + (f"best {b['config']}: p99 {_f(b['p99_all_ms'])} ms, {b['within_slo']:.1%} within" if b else
                 "none holds 99% within the objective"))
    if "ray" in row:
        r = row["ray"]
        print("   Ray Serve: " + (r["skipped"] if "skipped" in r else
                                  f"p99 {_f(r['p99_all_ms'])} ms; {r['within_slo']:.1%} within; replicas mean "
                                  f"{r['workers_mean']:.2g}, max {r['workers_max']}"))
    print(f"   goals: {row['goals']}")


SYSTEMS = (("planned", "planned"), ("defaults", "defaults"), ("grid", "grid best"), ("ray", "Ray Serve autoscaling"))


def charts(out, dest: Path) -> list[Path]:
    """The run's pictures (PNG, in ``dest``): ``slo_predicted.png``, the planned deployments'
    predicted against measured p99 (the 20% band shaded); ``slo_attainment.png``, the share
    within the objective per case and system (the 99% goal marked); ``slo_step.png``, each
    pipeline's p99 per 1-s window through the ×3 rate step, with the objective."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no charts)")
        return []
    made = []
    pipes = out["pipelines"]
    # predicted against measured
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    top = 1.0
    for (n, pipe), marker in zip(pipes.items(), "os^"):
        pts = [(r["planned"]["predicted_p99_ms"], r["planned"]["p99_all_ms"], r["slo_ms"])
               for r in pipe.get("cases", []) if "refused" not in r["planned"]]
        for slo, fill in ((min(p[2] for p in pts), "full"), (max(p[2] for p in pts), "none")) if pts else ():
            xs, ys = [p[0] for p in pts if p[2] == slo], [p[1] for p in pts if p[2] == slo]
            ax.scatter(xs, ys, marker=marker, label=f"{n}, objective {slo:g} ms",
                       facecolors="none" if fill == "none" else None, edgecolors="C0" if n == "cascade" else "C1",
                       color="C0" if n == "cascade" else "C1")
        top = max([top] + [v for p in pts for v in p[:2] if math.isfinite(v)])
    lim = (1.0, top * 1.3)
    xs = np.geomspace(*lim, 50)
    ax.plot(xs, xs, color="grey", lw=1)
    ax.fill_between(xs, xs / 1.2, xs * 1.2, color="grey", alpha=0.15, label="within 20%")
    ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim, xlabel="predicted p99 (ms)", ylabel="measured p99 (ms)",
           title="the planner's p99 against the run's")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(dest / "slo_predicted.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)
    # attainment
    rows = [(n, r) for n, pipe in pipes.items() for r in pipe.get("cases", [])]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(rows)), 4.2))
        width = 0.8 / len(SYSTEMS)
        for i, (key, label) in enumerate(SYSTEMS):
            vals = []
            for _, r in rows:
                got = r.get(key) or {}
                got = got.get("best") if key == "grid" else got
                vals.append(100 * got["within_slo"] if got and "within_slo" in got else math.nan)
            ax.bar(np.arange(len(rows)) + (i - (len(SYSTEMS) - 1) / 2) * width, vals, width, label=label)
        ax.axhline(99, color="k", lw=1, ls="--", label="goal: 99%")
        ax.set_xticks(np.arange(len(rows)), [f"{n}\n{r['slo_ms']:g} ms\n{r['rate']:g}/s" for n, r in rows],
                      fontsize=7)
        ax.set(ylim=(60, 100.5), ylabel="% of requests within the objective", title="attainment per case")
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        made.append(dest / "slo_attainment.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    # the x3 step
    steps = {n: pipe["step"] for n, pipe in pipes.items() if pipe.get("step") and "windows" in pipe["step"]}
    if steps:
        fig, axes = plt.subplots(1, len(steps), figsize=(5.2 * len(steps), 3.8), squeeze=False)
        for ax, (n, st) in zip(axes[0], steps.items()):
            w = st["windows"]
            t0 = st["before_s"]
            ax.plot([x["t"] - t0 for x in w], [x["p99_ms"] for x in w], marker="o", ms=3, label="p99 per 1-s window")
            ax.axhline(st["slo_ms"], color="k", ls="--", lw=1, label=f"objective {st['slo_ms']:g} ms")
            ax.axvline(0, color="C3", lw=1, label=f"{st['rate']:g} -> {st['after_rate']:g} req/s")
            finite = [x["p99_ms"] for x in w if x["p99_ms"] is not None and math.isfinite(x["p99_ms"])]
            ax.set(ylim=(0, 1.15 * max(finite + [st["slo_ms"]])), xlabel="s from the step", ylabel="p99 (ms)",
                   title=f"{n}: x3 rate step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        made.append(dest / "slo_step.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


COLUMNS = ("pipeline", "objective", "rate", "system", "workers", "within objective", "p99 (misses: inf)",
           "p99 at the workers", "sent late, p99", "predicted p99", "planning / search s")


def markdown(out) -> str:
    m = out["meta"]
    lines = [f"# benchmarks/slo.py — {m['date']}, commit {str(m['commit'])[:10]}, {m['cpu_count']} cores",
             "", f"Arguments: `{json.dumps({k: v for k, v in m['args'].items()})}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]

    def line(*cells) -> str:   # (the cells after the last one given stay empty)
        return "|" + "".join(f" {c} |" if str(c) else " |" for c in cells + ("",) * (len(COLUMNS) - len(cells)))

    def measured(x) -> tuple:   # within, p99, the workers' p99, the sender's lateness
        return (f"{x['within_slo']:.1%}", _f(x["p99_all_ms"]), _f(x.get("server_p99_ms")),
                _f(x.get("sender_late_p99_ms")))

    steps = []
    for n, pipe in out["pipelines"].items():
        for row in pipe.get("cases", []):
            head = (n, f"{row['slo_ms']:g} ms", f"{row['rate']:g}/s")
            p = row["planned"]
            lines.append(line(*head, "planned", "refused") if "refused" in p else
                         line(*head, "planned", f"{p['workers']} (max {p['workers_max']})", *measured(p),
                              f"{p['predicted_p99_ms']:.3g}",
                              f"{p['planning_s']:.2f} (+ profile {pipe.get('profile_s', 0):.1f})"))
            if "defaults" in row:
                lines.append(line(*head, "defaults", row["defaults"]["workers"], *measured(row["defaults"])))
            if "grid" in row:
                g, b = row["grid"], row["grid"]["best"]
                lines.append(line(*head, f"grid best ({b['config']})", b["workers"], *measured(b), "",
                                  f"{g['grid_search_s']:.1f} ({g['configs']} configs; "
                                  f"{g['grid_search_to_best_s']:.1f} to the best's workers)") if b else
                             line(*head, "grid best (none holds)", "-", "", "", "", "", "", f"{g['grid_search_s']:.1f}"))
                c = g.get("confirmed")
                if c:
                    lines.append(line(*head, f"grid best, driven {c['seconds']:g} s", b["workers"], *measured(c)))
            if "ray" in row:
                r = row["ray"]
                lines.append(line(*head, "Ray Serve autoscaling",
                                  f"{r.get('workers_mean', 0):.2g} (max {r.get('workers_max')})",
                                  _f(r.get("within_slo"), ".1%"), _f(r.get("p99_all_ms")))
                             if "skipped" not in r else line(*head, "Ray Serve", f"skipped: {r['skipped']}"))
        st = pipe.get("step")
        if st and "refused" not in st:
            rec = "never" if st["recovery_s"] is None else f"{st['recovery_s']:.0f} s"
            steps += [f"- {n}: ×3 rate step {st['rate']:g} → {st['after_rate']:g} req/s "
                      f"at p99 <= {st['slo_ms']:g} ms: "
                          f"back within after {rec}; {st['after']['within_slo']:.1%} within after the step; "
                          f"{len(st['replans'])} re-plans "
                          + ", ".join(f"{r['at_s']:+.1f} s" for r in st["replans"]) + " from the step"]
    return "\n".join(lines + ([""] + steps if steps else [])) + "\n"


if __name__ == "__main__":
    main()
