"""Cloudflow's four real pipelines (and the heavy variant), served by flowkit and by the
alternatives, with equal resources and each peer tuned as its own documentation recommends.

Pipelines (benchmarks/pipelines/): image cascade (pretrained MobileNetV2 -> larger CNN when
unsure), video streams (detector -> two classifier branches -> outer join), translation
(language classifier -> raced seq2seq transformers), recommender (two dynamic lookups -> top-5),
and heavy (MobileNetV2 at 224 px, batched).

Equal resources: every system serves from 2 processes (flowkit: a LocalCluster of 2
single-threaded workers; dask: the same cluster; FastAPI: uvicorn with 2 workers and a sync
endpoint; LitServe: 2 workers; Ray Serve: num_replicas=2), with 1 torch thread per process; only
the pipeline under test, and only the system under test, is running. The peers run from
.venv-peers (benchmarks/peers/setup.sh); their configuration is ``peers.servers.CONFIG`` and
docs/benchmarks.md says which of their documents each choice follows.

Harness, per pipeline and repetition (the systems' order alternates between repetitions):
  - Python API systems (in-process floor, flowkit optimized / unoptimized, hand-written dask
    futures): closed loop in this process (they have no HTTP front door).
  - HTTP systems (flowkit optimized over HTTP, FastAPI, LitServe, Ray Serve fused and composed):
    the load generator is a process of its own (``peers/cycling_loadgen.py``, i.e. loadgen.py
    cycling over the pipeline's requests). Closed loop: ``CLOSED`` sequential requests after a
    warm-up. Open loop: Poisson arrivals at rising rates, latency from the scheduled send time,
    a failure or a timeout (10 s) is a miss; each rate runs long enough that the repetitions
    together put >= 2,000 requests behind its p99; the sweep stops at the first rate that does not
    hold 99% within the pipeline's target (the "highest rate held" is monotone, and the lowest
    over the repetitions). Every distinct answer the load generator got is checked against the
    expected one: a rate with a wrong answer does not hold (--quick: it fails the run).
  - Between systems: the system is stopped, then the machine idles (``IDLE_S``); between rates
    it drains (``DRAIN_S``).
  - Per system: CPU utilization (cores busy, of its own processes) and peak RSS (their sum),
    sampled while it is measured.

--quick checks that every system answers every pipeline correctly and that the harness runs
(a short closed loop and one open-loop rate per HTTP system); CI runs it. It saves nothing.

Run: .venv/bin/python benchmarks/pipelines_vs_peers.py [--quick] [--only cascade,heavy,...] [--reps 3]
     [--systems "flowkit optimized, HTTP;FastAPI fused (HTTP floor)"] [--name NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import RESULTS, percentile, plot, save, table  # noqa: E402

import flowkit as fk  # noqa: E402
from flowkit.runtime.clusters import serving_settings  # noqa: E402
from peers import runner as peers  # noqa: E402
from pipelines import EXTRA, PIPELINES  # noqa: E402

# Each pipeline's open-loop rates rise toward what two cores can serve, so that the highest rate
# held tells the systems apart (the cascade's, 10-45/s until 2026-11-30, stopped at a quarter of it).
RATES = {"cascade": [25, 50, 100, 150], "video": [20, 50, 100, 200], "translation": [10, 25, 50, 100],
         "recommender": [50, 100, 200, 400], "heavy": [20, 40, 80, 160]}
CLOSED, WARMUP = 2000, 200          # closed-loop requests per system and repetition (>= 2,000 behind a p99)
OPEN_REQUESTS, MIN_SECONDS = 2000, 10.0   # per rate, over all repetitions together; and at least this long
TIMEOUT_S, DRAIN_S, IDLE_S = 10.0, 3.0, 10.0
LOADGEN = HERE / "peers" / "cycling_loadgen.py"
_loadgen_pids: set[int] = set()     # excluded from the systems' CPU and memory
_peer_pids: set[int] = set()        # peer servers started by this process (--quick): not flowkit's


def same(a: dict, b: dict) -> bool:
    """Equal outputs (floats within 1e-3 relative)."""
    return all((abs(a[k] - b[k]) <= 1e-3 * max(1.0, abs(b[k])) if isinstance(b[k], float) and a.get(k) is not None
                else a.get(k) == b[k]) for k in b)


# -- CPU and memory of a system's processes ---------------------------------------------------------------
class Monitor:
    """Samples ``procs()`` (psutil processes) every 0.25 s: CPU seconds used (so utilization, in
    cores) and the peak of their summed RSS, less ``baseline()`` bytes (what this benchmark's own
    process held before the system started: the floor's models, the expected answers)."""

    def __init__(self, procs, baseline=None):
        self.procs, self.cpu, self.peak, self.seen = procs, 0.0, 0, {}
        self.baseline = baseline or (lambda: 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        rss = 0
        for p in self.procs():
            if p.pid in _loadgen_pids:
                continue
            try:
                t = p.cpu_times()
                used = t.user + t.system
                rss += p.memory_info().rss
            except psutil.Error:
                continue
            before = self.seen.get(p.pid)
            self.seen[p.pid] = used
            if before is not None:
                self.cpu += max(0.0, used - before)
        self.peak = max(self.peak, rss - self.baseline())

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def __enter__(self):
        self._sample()
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.t0

    def result(self) -> dict:
        return {"cpu_util_cores": self.cpu / self.wall if self.wall else None, "peak_rss_mb": self.peak / 2**20}


def tree(pid: int):
    """A callable listing ``pid`` and its descendants (psutil processes)."""
    def procs():
        import psutil

        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
    return procs


# -- the load generator, in its own process -----------------------------------------------------------------
def loadgen(url: str, bodies: Path, *args: str) -> dict:
    proc = subprocess.Popen([sys.executable, str(LOADGEN), "--url", url, "--bodies", str(bodies),
                             "--timeout", str(TIMEOUT_S), *args], stdout=subprocess.PIPE, text=True)
    _loadgen_pids.add(proc.pid)
    try:
        out, _ = proc.communicate()
    finally:
        _loadgen_pids.discard(proc.pid)
    if proc.returncode:
        raise RuntimeError(f"loadgen exited with {proc.returncode}")
    return json.loads(out)


def wrong_answers(answers: dict, expected: list[dict]) -> list[str]:
    """The distinct answers a load generator got (``answers``: request index -> answers) that are
    not the expected ones: a system must still answer correctly under load, not only quickly."""
    bad = []
    for i, texts in answers.items():
        for text in texts:
            try:
                ok = same(peers.answer_row(text), expected[int(i)])
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                ok = False
            if not ok:
                bad.append(f"request {i}: {text[:200]}")
    return bad


def seconds_for(rate: float, reps: int, quick: bool) -> float:
    return 0.5 if quick else max(MIN_SECONDS, math.ceil(OPEN_REQUESTS / (rate * reps)))


def measure_http(name: str, sys_name: str, url: str, bodies: Path, expected: list[dict], procs, mod, reps: int,
                 quick: bool, baseline=None) -> dict:
    closed_n, warmup = (10, 2) if quick else (CLOSED, WARMUP)

    def checked(out: dict, what: str) -> int:
        bad = wrong_answers(out["answers"], expected)
        for b in bad[:3]:
            print(f"WRONG ANSWER {name} / {sys_name} ({what}): {b}", flush=True)
        assert not (quick and bad), f"{name} / {sys_name} answered wrongly under load: {bad[:3]}"
        return len(bad)

    with Monitor(procs, baseline) as mon:
        c = loadgen(url, bodies, "--closed", str(closed_n), "--warmup", str(warmup))
        c_wrong = checked(c, "closed loop")
        t_closed = time.perf_counter() - mon.t0
        cpu_closed = mon.cpu
        sweep = []
        for rate in RATES[name][:1] if quick else RATES[name]:
            time.sleep(DRAIN_S if not quick else 0.2)   # drain: nothing of the previous rate still running
            secs = seconds_for(rate, reps, quick)
            o = loadgen(url, bodies, "--rate", str(rate), "--seconds", str(secs), "--seed", str(rate))
            lat = [x for x in o["latencies_ms"] if x is not None]
            within = sum(1 for x in lat if x <= mod.TARGET_MS) / max(1, o["sent"])
            wrong = checked(o, f"{rate}/s")
            sweep.append({"pipeline": name, "system": sys_name, "rate": rate, "seconds": secs, "sent": o["sent"],
                          "completed": len(lat), "latencies_ms": lat, "within_target": within,
                          "wrong_answers": wrong})
            if within < 0.99 or wrong:
                break
    ms = c["latencies_ms"]
    return {"closed": {"pipeline": name, "system": sys_name, "n": len(ms), "failures": c["failures"],
                       "wrong_answers": c_wrong,
                       "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99) if not c["failures"] else float("inf"),
                       "p99.9_ms": percentile(ms, 99.9) if len(ms) >= 10_000 else None,
                       "cpu_ms_per_request": cpu_closed * 1000 / max(1, closed_n + warmup),
                       "closed_seconds": t_closed, **mon.result(),
                       # (the closed loop's alone: a system whose sweep stops early is not averaged
                       # over fewer, lighter rates than another's)
                       "cpu_util_cores": cpu_closed / t_closed if t_closed else None},
            "open": sweep}


def measure_api(name: str, sys_name: str, call, reqs: list, procs, quick: bool, baseline=None) -> dict:
    n = 10 if quick else CLOSED
    lat = []
    with Monitor(procs, baseline) as mon:
        for i in range(n):
            t0 = time.perf_counter()
            call(reqs[i % len(reqs)])
            lat.append((time.perf_counter() - t0) * 1000)
    return {"closed": {"pipeline": name, "system": sys_name, "n": n, "failures": 0, "p50_ms": percentile(lat, 50),
                       "p99_ms": percentile(lat, 99), "p99.9_ms": percentile(lat, 99.9) if n >= 10_000 else None,
                       "cpu_ms_per_request": mon.cpu * 1000 / n, **mon.result()}, "open": []}


# -- the systems: each a context manager that starts it (and only it), yields how to reach it, stops it -----
def _this_tree():
    """This process and its descendants (flowkit's client, its cluster), less the peer servers."""
    def procs():
        import psutil

        me = psutil.Process()
        out = [me]
        for child in me.children():
            if child.pid in _peer_pids or child.pid in _loadgen_pids:
                continue
            try:
                out += [child, *child.children(recursive=True)]
            except psutil.Error:
                pass
        return out
    return procs


@contextlib.contextmanager
def cluster():
    import dask
    from distributed import Client, LocalCluster

    def setup():
        import torch

        torch.set_num_threads(1)
        sys.path.insert(0, str(HERE))

    # set up as the workers of the clusters flowkit starts: uvloop's event loop (as the peers' uvicorn),
    # dask's statistical profiler off
    with dask.config.set(serving_settings()), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            Client(lc) as client:
        client.run(setup)
        yield client


class SharedCluster:
    """One dask cluster for the systems that run on one, started when the first of them starts and
    closed (``close``) before a system that does not use it: consecutive flowkit and dask systems
    share it (each with its own deployment), and no peer is measured beside it."""

    def __init__(self, keep: bool = False):
        self.stack, self.client, self.keep = None, None, keep
        self.rss_before = 0   # this process's RSS before the cluster (its scheduler, client) started

    def get(self):
        if self.client is None:
            import psutil

            self.rss_before = psutil.Process().memory_info().rss
            self.stack = contextlib.ExitStack()
            self.client = self.stack.enter_context(cluster())
        return self.client

    def close(self, final: bool = False) -> None:
        if self.keep and not final:   # --quick: one cluster for every system (answers are checked, not timed)
            return
        if self.stack is not None:
            self.stack.close()
        self.stack, self.client = None, None


def flowkit_group(name: str, mod, reqs: list, shared: SharedCluster):
    """The in-process floor and the systems on a dask cluster (``shared``). The memory of the
    systems on the cluster counts this process's growth since the cluster started (its scheduler
    and client), not what it held before (``baseline``)."""
    store = mod.store()

    def baseline():
        return shared.rss_before

    @contextlib.contextmanager
    def floor():
        import torch

        torch.set_num_threads(1)   # 1 torch thread, as every serving process has
        yield {"call": lambda r: mod.floor(r, store), "procs": lambda: [__import__("psutil").Process()]}

    def deployment(optimize, http: bool):
        @contextlib.contextmanager
        def system():
            client = shared.get()
            # tune_workers: as flowkit does on clusters it starts (see http_vs_fastapi.py)
            with fk.deploy(mod.flow(), cluster=client, optimize=optimize, tune_workers=True) as dep:
                for k, v in store.items():
                    dep.put(k, v, broadcast=True)   # as every peer process loads the whole store
                if not http:
                    yield {"call": lambda r: dep.run([r]).records()[0], "procs": _this_tree(), "baseline": baseline}
                    return
                with dep.serve() as server:
                    yield {"url": server.url + f"/v1/flows/{name}/predict", "procs": _this_tree(), "baseline": baseline}
        return system

    @contextlib.contextmanager
    def dask():
        client = shared.get()
        stored = {k: client.scatter(v, hash=False, broadcast=True) for k, v in store.items()}
        yield {"call": lambda r: mod.dask_pipeline(client, r, stored).result(), "procs": _this_tree(),
               "baseline": baseline}

    return dict(zip(FLOWKIT_SYSTEMS, [floor, deployment(mod.RULES or True, False), deployment(False, False), dask,
                                      deployment(mod.RULES or True, True),
                                      deployment({**(mod.RULES or {}), "compete": 1}, True)]))


FLOWKIT_SYSTEMS = ("in-process floor", "flowkit optimized", "flowkit unoptimized", "dask chained futures",
                   "flowkit optimized, HTTP", "flowkit unraced, HTTP")


ON_REQUEST = {"flowkit unraced, HTTP"}   # measured only when named (--systems): the race's cost (translation's;
                                          # the other pipelines race nothing, so it is "flowkit optimized, HTTP")


def start_peer(system: str, names: list[str], variants=("fused",), replicas: int = 2):
    """A peer server for ``names`` (each pipeline at /<name>, Ray's at /<name>/<variant>)."""
    args = ["--pipeline", ",".join(names), "--replicas", str(replicas)]
    if system == "ray":
        args += ["--variant", ",".join(variants)]
        return peers.start(system, *args, ready_path="/-/routes", ready=peers.ray_ready(names, variants))
    return peers.start(system, *args)


PEERS = {"FastAPI fused (HTTP floor)": ("fastapi", None), "LitServe fused, HTTP": ("litserve", None),
         "Ray Serve fused, HTTP": ("ray", "fused"), "Ray Serve graph, HTTP": ("ray", "graph")}


def peer(sys_name: str, name: str, running: dict | None):
    """The peer ``sys_name`` serving pipeline ``name``: started for its measurement and stopped after
    it (only this pipeline deployed), or, with ``running`` (--quick), the one already serving them all."""
    system, variant = PEERS[sys_name]
    path = f"/{name}/{variant}" if variant else f"/{name}"

    @contextlib.contextmanager
    def run():
        if running is not None:
            proc, port = running[system]
            yield {"url": f"http://127.0.0.1:{port}{path}", "procs": tree(proc.pid)}
            return
        proc, port = start_peer(system, [name], (variant,) if variant else ())
        try:
            yield {"url": f"http://127.0.0.1:{port}{path}", "procs": tree(proc.pid)}
        finally:
            peers.stop(proc)
    return run


def systems_for(name: str, mod, reqs: list, shared: SharedCluster, running: dict | None,
                chosen: list[str] | None = None) -> dict:
    """The systems measured: every one but those only measured when named (``ON_REQUEST``), or
    those ``chosen``, in that order."""
    out = flowkit_group(name, mod, reqs, shared)
    if peers.available():
        out.update({s: peer(s, name, running) for s in PEERS})
    if chosen is None:
        return {s: run for s, run in out.items() if s not in ON_REQUEST}
    return {s: out[s] for s in chosen if s in out}   # (checked against SYSTEMS in main; a peer may be missing)


def run_pipeline(name: str, reps: int, quick: bool, running: dict | None = None, load: bool = True,
                 shared: SharedCluster | None = None, systems: list[str] | None = None) -> list[dict]:
    """Every system on pipeline ``name`` (or those named in ``systems``), ``reps`` times;
    ``load=False`` (--quick, after the first pipeline) only checks the answers."""
    mod = importlib.import_module(f"pipelines.{name}")
    reqs = mod.requests(4 if quick else 64, seed=1)
    expected = [mod.floor(r, mod.store()) for r in reqs]
    bodies = Path(tempfile.mkdtemp()) / "bodies.json"
    bodies.write_text(json.dumps([json.dumps({"rows": [peers.encode_row(r)]}) for r in reqs]))
    mine = shared is None
    shared = shared or SharedCluster()
    chosen = systems_for(name, mod, reqs, shared, running, systems)
    runs = []
    try:
        for rep in range(reps):
            runs += _run_rep(name, mod, reqs, expected, bodies, chosen, shared, rep, reps, quick, load)
    finally:
        if mine:
            shared.close(final=True)
    return runs


def _run_rep(name, mod, reqs, expected, bodies, systems, shared, rep, reps, quick, load) -> list[dict]:
    runs = []
    order = list(systems) if rep % 2 == 0 else list(reversed(systems))
    on_cluster = {s for s in systems if s.startswith(("flowkit", "dask"))}
    for sys_name in order:
        if sys_name not in on_cluster:
            shared.close()   # no idle cluster beside the floor or a peer
        with systems[sys_name]() as s:
            if "url" in s:   # every system answers correctly (and warms up)
                port, path = s["url"].split("//")[1].split("/", 1)
                # (not timed: a first request may warm a model up on a loaded machine for long)
                client = peers.HTTPSystem(int(port.split(":")[1]), "/" + path, connections=1, timeout=300)
                call = client.call
            else:
                call = s["call"]
            for r, want in zip(reqs, expected):
                got = call(r)
                assert same(got, want), f"{name} / {sys_name}: {got} != {want}"
            if "url" in s:
                client.close()
            if not load:
                got = {"closed": {"pipeline": name, "system": sys_name, "n": 0, "failures": 0, "p50_ms": None,
                                  "p99_ms": None, "cpu_util_cores": None, "peak_rss_mb": 0.0}, "open": []}
            elif "url" in s:
                got = measure_http(name, sys_name, s["url"], bodies, expected, s["procs"], mod, reps, quick,
                                   s.get("baseline"))
            else:
                got = measure_api(name, sys_name, call, reqs, s["procs"], quick, s.get("baseline"))
        got["rep"] = rep
        runs.append(got)
        c = got["closed"]
        if load:
            print(f"{name} rep {rep} {sys_name}: p50 {c['p50_ms']:.3g} ms p99 {c['p99_ms']:.3g} ms, "
                  f"{c['cpu_util_cores']:.2f} cores, {c['peak_rss_mb']:.0f} MB; held "
                  f"{held_rate(got['open'])}", flush=True)
        time.sleep(0.2 if quick else IDLE_S)   # idle between systems
    return runs


def held_rate(sweep: list[dict]):
    best = None
    for r in sorted(sweep, key=lambda r: r["rate"]):
        if r["within_target"] < 0.99 or r["completed"] < r["sent"] or r.get("wrong_answers"):
            break
        best = r["rate"]
    return best


def summarize(name: str, runs: list[dict], reps: int) -> tuple[list, list]:
    """Per system: medians over repetitions with their spread (closed loop); per rate: the
    repetitions pooled (open loop), ``within_target`` the lowest over them (a repetition whose
    sweep stopped before a rate counts 0 there), so the highest rate held is the lowest."""
    closed, opened = [], []
    mod = importlib.import_module(f"pipelines.{name}")
    for s in dict.fromkeys(r["closed"]["system"] for r in runs):
        mine = [r for r in runs if r["closed"]["system"] == s]
        cs = [r["closed"] for r in mine]

        def med(k):
            vals = [c[k] for c in cs if c.get(k) is not None]
            return statistics.median(vals) if vals else None

        def spread(k):
            vals = [c[k] for c in cs if c.get(k) is not None]
            return f"{min(vals):.3g}-{max(vals):.3g}" if vals else None

        closed.append({"pipeline": name, "system": s, "reps": len(cs), "n": min(c["n"] for c in cs),
                       "failures": sum(c["failures"] for c in cs),
                       "wrong_answers": sum(c.get("wrong_answers", 0) for c in cs), "p50_ms": med("p50_ms"), "p50 spread": spread("p50_ms"),
                       "p99_ms": med("p99_ms"), "p99 spread": spread("p99_ms"), "p99.9_ms": med("p99.9_ms"),
                       "cpu_ms_per_request": med("cpu_ms_per_request"), "cpu_util_cores": med("cpu_util_cores"),
                       "peak_rss_mb": max(c["peak_rss_mb"] for c in cs)})
        for rate in RATES[name]:
            at = [[o for o in r["open"] if o["rate"] == rate] for r in mine]
            at = [a[0] for a in at if a]
            if not at:
                continue
            lat = [x for a in at for x in a["latencies_ms"]]
            sent, done = sum(a["sent"] for a in at), sum(a["completed"] for a in at)
            within = min(a["within_target"] for a in at) if len(at) == len(mine) else 0.0
            opened.append({"pipeline": name, "system": s, "rate": rate, "reps": len(at), "seconds": at[0]["seconds"],
                           "sent": sent, "completed": done, "wrong_answers": sum(a.get("wrong_answers", 0) for a in at),
                           "p50_ms": percentile(lat, 50),
                           "p99_ms": percentile(lat, 99) if done == sent else float("inf"),
                           "p99_n": len(lat), "target_ms": mod.TARGET_MS, "within_target": within,
                           "within_target_spread": f"{min(a['within_target'] for a in at):.3f}-"
                                                   f"{max(a['within_target'] for a in at):.3f}",
                           "goodput": sum(1 for x in lat if x <= mod.TARGET_MS) / (at[0]["seconds"] * len(at))})
    floor = next((c["p50_ms"] for c in closed if c["system"] == "in-process floor"), None)
    for c in closed:
        c["p50 vs floor"] = c["p50_ms"] / floor if floor and c["p50_ms"] is not None else None
    return closed, opened


def main(quick: bool = False, only: list[str] | None = None, reps: int = 3, name: str | None = None,
         systems: list[str] | None = None) -> dict:
    names = only or (list(PIPELINES) if quick else [*PIPELINES, *EXTRA])
    reps = 1 if quick else reps
    if not peers.available():
        print("peers not installed (bash benchmarks/peers/setup.sh): measuring flowkit, dask and the floor only")
    t0 = time.time()
    closed, opened, raw = [], [], []
    running, procs = None, []
    shared = SharedCluster(keep=True) if quick else None
    # --quick starts the three peers at once, from threads that live until they are stopped (a peer
    # ends when the thread that started it ends: servers.die_with_parent)
    starter = ThreadPoolExecutor(3)
    try:
        if quick and peers.available():   # --quick: one server per peer for every pipeline (starting
            running = {}                   # 4 servers per pipeline would not fit CI's time limit)
            t1 = time.time()
            kws = {"fastapi": {}, "litserve": {}, "ray": {"variants": ("fused", "graph")}}
            futures = {system: starter.submit(start_peer, system, names, replicas=1, **kw) for system, kw in kws.items()}
            for system, fut in futures.items():
                try:
                    running[system] = fut.result()
                finally:   # the others are stopped too when one fails
                    for f in futures.values():
                        if f.done() and f.exception() is None and f.result()[0] not in procs:
                            procs.append(f.result()[0])
                            _peer_pids.add(f.result()[0].pid)
            print(f"peers serving {len(names)} pipelines after {time.time() - t1:.0f} s", flush=True)
        for i, pipe in enumerate(names):
            _pipeline(pipe, reps, quick, running, i == 0, closed, opened, raw, shared, systems)
    finally:
        for proc in procs:
            peers.stop(proc)
            _peer_pids.discard(proc.pid)
        if shared is not None:
            shared.close(final=True)
        starter.shutdown(wait=True)
    elapsed = time.time() - t0
    return _finish(names, only, reps, quick, closed, opened, raw, elapsed, name)


def _pipeline(name, reps, quick, running, first, closed, opened, raw, shared, systems=None) -> None:
    t0 = time.time()
    runs = run_pipeline(name, reps, quick, running, load=first or not quick, shared=shared, systems=systems)
    print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    c, o = summarize(name, runs, reps)
    closed += c
    opened += o
    raw += [{"rep": r["rep"], "closed": r["closed"],
             "open": [{k: v for k, v in x.items() if k != "latencies_ms"} for x in r["open"]]} for r in runs]
    print(table(c, ["pipeline", "system", "n", "p50_ms", "p99_ms", "p99 spread", "cpu_util_cores", "peak_rss_mb"]),
          flush=True)


def _finish(names, only, reps, quick, closed, opened, raw, elapsed, name=None) -> dict:
    if quick:
        print(f"quick: every system answered every pipeline correctly ({elapsed:.0f} s)")
        return {"closed": [{"pipeline": c["pipeline"], "system": c["system"], "correct": True} for c in closed],
                "summary": closed, "open": opened}
    md = table(closed, ["pipeline", "system", "reps", "n", "p50_ms", "p50 spread", "p99_ms", "p99 spread", "p50 vs floor",
                        "cpu_ms_per_request", "cpu_util_cores", "peak_rss_mb"])
    md += "\n\n## open loop (repetitions pooled)\n\n" + table(opened, ["pipeline", "system", "rate", "reps", "sent", "completed",
                                                                        "p50_ms", "p99_ms", "target_ms", "within_target",
                                                                        "goodput"])
    md += f"\n\nfull run: {elapsed / 60:.1f} min"
    print(md)
    from peers.servers import CONFIG

    config = {"processes_per_system": 2, "torch_threads": 1, "reps": reps, "closed": CLOSED, "warmup": WARMUP,
              "open_requests_per_rate": OPEN_REQUESTS, "min_seconds": MIN_SECONDS, "timeout_s": TIMEOUT_S,
              "drain_s": DRAIN_S, "idle_s": IDLE_S, "rates": {n: RATES[n] for n in names}, "peers": CONFIG,
              "loadgen": "benchmarks/peers/cycling_loadgen.py (benchmarks/loadgen.py), its own process"}
    save(name or ("pipelines" if not only else "pipelines_" + "_".join(names)),
         {"closed": closed, "open": opened, "runs": raw, "seconds": elapsed, "config": config,
          "load_average_at_end": os.getloadavg()}, md)
    systems = list(dict.fromkeys(r["system"] for r in opened))
    for pipe in names:
        series = {}
        for s in systems:
            rows = sorted((r for r in opened if r["pipeline"] == pipe and r["system"] == s), key=lambda r: r["rate"])
            if rows:
                series[f"{s} p50"] = ([r["rate"] for r in rows], [r["p50_ms"] for r in rows])
                series[f"{s} p99"] = ([r["rate"] for r in rows], [min(r["p99_ms"], 20_000) for r in rows])
        plot(RESULTS / f"{name or 'pipelines'}_{pipe}.png", series, "offered load (req/s)", "latency (ms)",
             f"{pipe}: p50 and p99 under open-loop load", logy=True)
    return {"closed": closed, "open": opened}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default=None, help="save as results/NAME.json (and NAME_<pipeline>.png) rather than "
                    "pipelines[_<names>], which the docs' tables read (report.py)")
    ap.add_argument("--systems", default=None, help="only these systems, ';'-separated, in this order (as the "
                    "tables name them; 'flowkit unraced, HTTP' is measured only when named)")
    args = ap.parse_args()
    chosen = [s.strip() for s in args.systems.split(";")] if args.systems else None
    known = [*FLOWKIT_SYSTEMS, *PEERS]
    if chosen and not args.name:
        ap.error("--systems needs --name: a partial run must not replace the results the docs read")
    if chosen and any(s not in known for s in chosen):
        ap.error(f"unknown systems {[s for s in chosen if s not in known]}; there are: {'; '.join(known)}")
    main(args.quick, args.only.split(",") if args.only else None, args.reps, args.name, chosen)
