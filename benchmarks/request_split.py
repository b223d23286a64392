"""Where a request's time goes on the worker that serves it over HTTP, phase by phase, for the
median request and for the slowest 1% (the p99 tail).

``--pipeline image`` (default): the pipeline and body of ``http_vs_fastapi.py`` (the 3-stage
image flow); ``--pipeline video``: the video pipeline of ``pipelines_vs_peers.py`` (a 30-frame
clip, about 120 kB of JSON per request), optimized as that benchmark serves it;
``--pipeline translation``: its translation pipeline, one 12-word sentence, raced as it serves
it (``--variants unraced`` serves it unraced). 2 single-threaded
workers set up as the clusters flowkit starts set them up, ``dep.serve()``. Each worker records
a timestamp as a request passes each step of its path (by wrapping those steps in this script;
nothing in flowkit changes), and every garbage collection. The load generator (its own process)
sends ``--closed`` requests one after another on one keep-alive connection, so one worker
serves them, in order, and its n-th traced request is the client's n-th: the client's time
minus the worker's handler time is what lies outside the handler (the client, the kernel, and
uvicorn's reading of the request line and headers and writing of the answer).

Phases, in the order a request passes them:

- read body: from the handler's start (headers parsed) to the whole body read
- decode: JSON parsed, rows decoded into the schema's types
- submit: the table made and the request's task created (``LocalEndpoint.submit``)
- task start: until that task runs and hands the plan to the deployment's thread pool
- thread wake: until the pool's thread starts the plan
- plan: the plan, in that thread
- loop wake: until the event loop resumes the request after the thread finished
- between stages: where the plan goes to the thread a stage at a time (a race), the loop's time
  from one stage's return to the next stage's hand-off (the thread phases are then summed)
- to handler: until the handler has the answer
- encode: the answer encoded as JSON
- count: counting and timing it (``HTTPServer._counted``)
- outside handler: the client's time minus all of the above

Each of ``VARIANTS`` (flowkit's serving settings; those with dask's own intervals for the periodic
housekeeping that they make rarer; a shorter switch interval for the interpreter lock on the
workers; the heartbeats dask sets instead of the tuned workers' rarer ones; ``--variants``
picks) runs ``--reps`` times, alternating. The pipeline's in-process floor (its stages as plain
calls, no flowkit) is timed on a worker after each run, on the same request, back to back: what
the plan phase costs beyond the computation itself, at most.

Run: .venv/bin/python benchmarks/request_split.py [--pipeline image|video|translation] [--closed 3000] [--reps 3]
     [--variants "serving settings"] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import percentile, save, table  # noqa: E402

from flowkit.runtime.plugin import HEARTBEAT_S  # noqa: E402

#: the steps of a hand-off to the deployment's thread and back (once per stage handed over)
HOPS = ["to thread", "thread start", "thread end", "back on loop"]
STEPS = ["entry", "body read", "decoded", "submitted", "answer", "encoded", "answered"]   # (and the HOPS between)
COLUMNS = ["p50_ms", "p99_ms", "slowest 1% excess_ms"]
PHASES = ["read body", "decode", "submit", "task start", "thread wake", "plan", "loop wake", "to handler",
          "encode", "count"]


def install_tracing() -> None:
    """On a worker: wrap each step of the HTTP request path to record ``(step, perf_counter())``,
    and every garbage collection, in ``flowkit.runtime.http._trace``."""
    import gc
    import itertools
    import time

    from flowkit.runtime import executor, http, ingress

    trace: list = []
    http._trace = trace
    now = time.perf_counter

    def after(fn, step):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            trace.append((step, now()))
            return out
        return wrapped

    gc.callbacks.append(lambda phase, info: trace.append((f"gc {phase}", now(), info["generation"])))

    read_body = http.read_body

    async def traced_read_body(*a, **k):
        out = await read_body(*a, **k)
        trace.append(("body read", now()))
        return out

    http.read_body = traced_read_body
    http.decode_rows = after(http.decode_rows, "decoded")
    http.encode_table = after(http.encode_table, "encoded")
    ingress.LocalEndpoint.submit = after(ingress.LocalEndpoint.submit, "submitted")

    in_thread = executor.WorkerDeployment.in_thread

    hops = itertools.count()

    async def traced_in_thread(self, fn, *args, **kw):
        hop = next(hops)   # (a hand-off's four steps carry its number: a cancelled one's thread ends late)

        def run(*a):
            trace.append(("thread start", now(), hop))
            try:
                return fn(*a)
            finally:
                trace.append(("thread end", now(), hop))
        trace.append(("to thread", now(), hop))
        try:
            return await in_thread(self, run, *args, **kw)
        finally:
            trace.append(("back on loop", now(), hop))

    executor.WorkerDeployment.in_thread = traced_in_thread

    answer = http.HTTPServer._answer_or_hang_up

    async def traced_answer(self, *a, **k):
        try:
            return await answer(self, *a, **k)
        finally:
            trace.append(("answer", now()))

    http.HTTPServer._answer_or_hang_up = traced_answer

    counted = http.HTTPServer._counted

    def traced_counted(self, endpoint):
        inner = counted(self, endpoint)

        async def counting(request):
            trace.append(("entry", now()))
            try:
                return await inner(request)
            finally:
                trace.append(("answered", now()))
        return counting

    http.HTTPServer._counted = traced_counted


def take_trace() -> list:
    from flowkit.runtime import http

    return list(getattr(http, "_trace", []))


def requests_of(trace: list) -> list[dict | None]:
    """Each answered request, in order: its steps (``{step: time}``), its hand-offs to the plan's
    thread (each ``{step: time}`` of ``HOPS``, in order) and the garbage collections during it
    (``gc_ms`` by generation), from ``entry`` to ``answered``; None for one left out (kept in
    place, to pair requests with the client's): a step or hand-off not seen whole, or a hand-off
    whose thread ran on after the loop took the request back (a raced replica that lost: its
    steps do not split the request's time)."""
    out, cur, gc_started, owner = [], None, None, {}
    for ev in trace:
        step, t = ev[0], ev[1]
        if step in HOPS:   # (a hop's later steps may come after its request was answered)
            if step == "to thread" and cur is not None:
                owner[ev[2]] = cur["hops"].setdefault(ev[2], {})
            if ev[2] in owner:
                owner[ev[2]][step] = t
        elif step == "entry":
            cur = {"steps": {"entry": t}, "hops": {}, "gc_ms": {}}
        elif cur is None:
            continue
        elif step == "gc start":
            gc_started = t
        elif step == "gc stop":
            if gc_started is not None:
                gen = ev[2]
                cur["gc_ms"][gen] = cur["gc_ms"].get(gen, 0.0) + (t - gc_started) * 1000
            gc_started = None
        else:
            cur["steps"].setdefault(step, t)
            if step == "answered":
                out.append(cur)
                cur = None
    whole: list[dict | None] = []
    for r in out:
        hops = sorted(r["hops"].values(), key=lambda h: h.get("to thread", 0.0))
        ok = hops and all(s in r["steps"] for s in STEPS) and \
            all(len(h) == len(HOPS) and h["thread end"] <= h["back on loop"] for h in hops)
        whole.append({**r, "hops": hops} if ok else None)
    return whole


def phases_of(req: dict) -> dict:
    """Each phase's milliseconds (they add up to the handler's time); where the plan went to the
    thread more than once (a stage at a time), the thread's phases are summed over the hand-offs
    and the loop's time from one's return to the next is ``between stages``."""
    s, hops = req["steps"], req["hops"]
    ms = {name: (s[b] - s[a]) * 1000 for name, a, b in
          zip(PHASES[:3], STEPS, STEPS[1:4])}   # read body, decode, submit
    ms["task start"] = (hops[0]["to thread"] - s["submitted"]) * 1000
    for name, a, b in zip(("thread wake", "plan", "loop wake"), HOPS, HOPS[1:]):
        ms[name] = sum(h[b] - h[a] for h in hops) * 1000
    ms["between stages"] = sum(nxt["to thread"] - h["back on loop"] for h, nxt in zip(hops, hops[1:])) * 1000
    ms["to handler"] = (s["answer"] - hops[-1]["back on loop"]) * 1000
    ms["encode"] = (s["encoded"] - s["answer"]) * 1000
    ms["count"] = (s["answered"] - s["encoded"]) * 1000
    ms["handler"] = (s["answered"] - s["entry"]) * 1000
    ms["gc"] = sum(req["gc_ms"].values())
    return ms


def split(client_ms: list[float], reqs: list[dict | None]) -> tuple[list[dict], dict]:
    """The phase table (p50, p99, mean over all requests, mean over the slowest 1% by the
    client's time, and that excess over the median request) and a summary; the last requests the
    client and the worker both saw, paired in order, less those ``requests_of`` left out."""
    n = min(len(client_ms), len(reqs))
    pairs = [(c, r) for c, r in zip(client_ms[-n:], reqs[-n:]) if r is not None]
    left_out, client_all = n - len(pairs), client_ms[-n:]
    n = len(pairs)
    client_ms, reqs = [c for c, _ in pairs], [r for _, r in pairs]
    rows = []
    for c, r in pairs:
        ph = phases_of(r)
        ph["outside handler"] = c - ph["handler"]
        ph["client"] = c
        rows.append(ph)
    slow = sorted(range(n), key=lambda i: client_ms[i])[-max(1, n // 100):]
    names = PHASES + ["between stages", "gc", "handler", "outside handler", "client"]
    table_rows = []
    for name in names:
        vals = [r[name] for r in rows]
        tail = [rows[i][name] for i in slow]
        p50 = percentile(vals, 50)
        table_rows.append({"phase": name, "p50_ms": p50, "p99_ms": percentile(vals, 99),
                           "mean_ms": sum(vals) / n, "slowest 1% mean_ms": sum(tail) / len(tail),
                           "slowest 1% excess_ms": sum(tail) / len(tail) - p50})
    gcs = [i for i in range(n) if rows[i]["gc"] > 0]
    summary = {"requests": n, "left_out": left_out, "slowest": len(slow),
               "slowest_with_gc": sum(1 for i in slow if rows[i]["gc"] > 0),
               "requests_with_gc": len(gcs),
               "full_collections": sum(1 for r in reqs if 2 in r["gc_ms"]),
               "client_p50_ms": percentile(client_all, 50), "client_p99_ms": percentile(client_all, 99)}
    return table_rows, summary


#: dask's own intervals for what ``serving_settings()`` makes rarer
DASK_HOUSEKEEPING = {"distributed.admin.tick.interval": "20ms", "distributed.worker.memory.monitor-interval": "100ms",
                     "distributed.admin.system-monitor.interval": "500ms"}
#: the interpreter's switch interval tried on the workers (``--variants "switch interval"``): how
#: long a thread holding the GIL keeps it once another asks (Python's default: 5 ms)
SWITCH_INTERVAL_S = 0.0002
VARIANTS = {"serving settings": {}, "dask's housekeeping": DASK_HOUSEKEEPING,
            "switch interval": {"switch_interval_s": SWITCH_INTERVAL_S},
            "dask's heartbeats": {"dask_heartbeats": True}, "unraced": {"rules": {"compete": 1}}}


DESCRIBED = {"serving settings": "`serving_settings()`",
             "dask's housekeeping": f"those with dask's own intervals {DASK_HOUSEKEEPING}",
             "switch interval": f"serving settings with `sys.setswitchinterval({SWITCH_INTERVAL_S})` on the workers",
             "dask's heartbeats": "serving settings with the workers' heartbeats to the scheduler as dask sets "
                                  "them (0.5 s up to 10 workers) instead of the tuned workers' "
                                  f"{HEARTBEAT_S:g} s (`plugin.HEARTBEAT_S`)",
             "unraced": "serving settings, the pipeline's rules with `compete=1` (no race)"}


def dask_heartbeats(dask_worker) -> None:
    """This tuned worker heartbeats as the scheduler asks again (``compat.heartbeat_at_least``)."""
    from flowkit.runtime.compat import heartbeat_at_least

    heartbeat_at_least(dask_worker, None)


def set_switch_interval(seconds: float) -> None:
    sys.setswitchinterval(seconds)


def image_pipeline():
    """(flow, optimize, request row, the in-process floor): the 3-stage image flow."""
    from flowkit.demo import TinyResNet, image_flow, postprocess, preprocess, sample_images

    model = TinyResNet()   # (FastAPI's app in http_vs_fastapi.py computes as this floor does)
    return image_flow(), True, sample_images(1)[0], lambda r: postprocess({"logits": model({"x": preprocess(r)})})


def video_pipeline():
    """The same for the video pipeline, optimized as pipelines_vs_peers.py serves it."""
    from pipelines import video

    store = video.store()
    return video.flow(), video.RULES, video.requests(1)[0], lambda r: video.floor(r, store)


def translation_pipeline():
    """The same for the translation pipeline (served with its RULES; ``unraced`` forces
    ``compete=1``), on a request of 12 words, the middle of the benchmark's 4 to 19."""
    from pipelines import translation

    row = next(r for r in translation.requests(100) if len(r["text"].split()) == 12)
    return translation.flow(), translation.RULES, row, lambda r: translation.floor(r, {})


PIPELINES = {"image": image_pipeline, "video": video_pipeline, "translation": translation_pipeline}


FLOOR_N = 600   # calls of the in-process floor timed after each run


def time_floor(pipeline: str, n: int = FLOOR_N) -> tuple[float, float]:
    """On a worker: the p50 and p99 milliseconds of ``pipeline``'s in-process floor on its request."""
    import time

    _, _, row, floor = PIPELINES[pipeline]()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        floor(row)
        times.append((time.perf_counter() - t0) * 1000)
    return percentile(times, 50), percentile(times, 99)


def run_once(pipeline: str, body: Path, closed: int, settings: dict) -> tuple[list[dict], dict]:
    """One cluster with ``serving_settings()`` and ``settings`` over them: the split of
    ``closed`` requests."""
    import dask
    from distributed import Client, LocalCluster

    import flowkit as fk
    from flowkit.runtime.clusters import serving_settings
    from http_vs_fastapi import loadgen

    def set_up():
        import torch

        torch.set_num_threads(1)
        sys.path.insert(0, str(HERE))

    dask_settings = {k: v for k, v in settings.items() if k.startswith("distributed.")}
    with dask.config.set({**serving_settings(), **dask_settings}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.run(set_up)
        client.run(install_tracing)
        if "switch_interval_s" in settings:
            client.run(set_switch_interval, settings["switch_interval_s"])
        flow, optimize, _, _ = PIPELINES[pipeline]()
        if "rules" in settings:
            if optimize is False:
                raise SystemExit(f"the {pipeline} pipeline is served unoptimized: no rules to change")
            optimize = {**(optimize if isinstance(optimize, Mapping) else {}), **settings["rules"]}
        with fk.deploy(flow, cluster=client, optimize=optimize, tune_workers=True) as dep, dep.serve() as server:
            if settings.get("dask_heartbeats"):
                client.run(dask_heartbeats)
            got = loadgen(f"{server.url}/v1/flows/{flow.name}/predict", body, "--closed", str(closed), "--warmup", "200")
            traces = client.run(take_trace)
        floors = client.run(time_floor, pipeline)
    worker, reqs = max(((w, requests_of(t)) for w, t in traces.items()), key=lambda wt: len(wt[1]))
    rows, summary = split(got["latencies_ms"], reqs)   # (one connection: one worker served them)
    return rows, {**summary, "floor_p50_ms": floors[worker][0], "floor_p99_ms": floors[worker][1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--closed", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pipeline", choices=sorted(PIPELINES), default="image")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS)[:2])
    ap.add_argument("--name", help="the results' name (default: request_split, request_split_<pipeline> but for image)")
    a = ap.parse_args()

    closed, reps = (300, 1) if a.quick else (a.closed, a.reps)
    body = Path(tempfile.mkdtemp()) / "body.json"
    row = PIPELINES[a.pipeline]()[2]
    body.write_text(json.dumps({"rows": [{k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
                                          for k, v in row.items()}]}))
    runs = []
    for rep in range(reps):   # (the variants alternate)
        for variant in (a.variants if rep % 2 == 0 else a.variants[::-1]):
            rows, summary = run_once(a.pipeline, body, closed, VARIANTS[variant])
            runs.append({"variant": variant, "rep": rep, "phases": rows, "summary": summary})
            print(variant, rep, {k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}, flush=True)
    out = []
    for variant in a.variants:
        mine = [r for r in runs if r["variant"] == variant]
        for i, name in enumerate(r["phase"] for r in mine[0]["phases"]):
            vals = {c: statistics.median(r["phases"][i][c] for r in mine) for c in COLUMNS}
            out.append({"variant": variant, "phase": name, **vals})
    md = table(out, ["variant", "phase", *COLUMNS])
    md += (f"\n\nMedians over {reps} repetitions (the variants alternating) of {closed} requests each, one after "
           "another on one connection (one worker served them). Excess: the mean of the slowest 1% by the "
           "client's time minus the phase's median. Garbage collections: see the JSON (`summary`). Variants: "
           + "; ".join(f"{v} = {DESCRIBED[v]}" for v in a.variants)
           + ". The pipeline's in-process floor on the same request, on the worker that served "
           f"them, {FLOOR_N} calls back to back after each run: p50 "
           f"{statistics.median(r['summary']['floor_p50_ms'] for r in runs):.3g} ms, p99 "
           f"{statistics.median(r['summary']['floor_p99_ms'] for r in runs):.3g} ms (medians over the runs).")
    print(md)
    name = a.name or ("request_split" if a.pipeline == "image" else f"request_split_{a.pipeline}")
    pipelines = {"image": "flowkit.demo.image_flow (http_vs_fastapi's)",
                 "video": "pipelines.video, optimized with its RULES (pipelines_vs_peers's)",
                 "translation": "pipelines.translation, optimized with its RULES (pipelines_vs_peers's)"}
    save(name, {"phases": out, "runs": runs, "quick": a.quick,
                "config": {"workers": 2, "threads_per_worker": 1, "torch_threads": 1, "closed": closed, "reps": reps,
                           "variants": {v: VARIANTS[v] for v in a.variants}, "pipeline": pipelines[a.pipeline],
                           "worker_settings": "flowkit.runtime.clusters.serving_settings(), tune_workers=True"}}, md)


if __name__ == "__main__":
    main()
