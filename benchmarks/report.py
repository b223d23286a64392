"""Writes the measured parts of the docs from ``benchmarks/results/*.json`` -- and checks them.

    .venv/bin/python benchmarks/report.py            # rewrite every report block (and figure)
    .venv/bin/python benchmarks/report.py --check    # exit 1 when a doc disagrees with the results
    .venv/bin/python benchmarks/report.py --models   # count the pipelines' models' FLOPs -> results/models.json

A doc holds generated text between marker comments::

    <!-- report:NAME -->
    ...written by BLOCKS[NAME] from the results...
    <!-- /report:NAME -->

``--check`` fails when a block's text differs from what the results give, when a block's name is
unknown, when a result a block reads is missing, uncommitted or changed since its commit, or when a
measured section (docs/benchmarks.md whole; the "Measured" parts of serving.md, deploy.md and
optimizations.md) has a measurement (a number with ms, x, req/s, %...) outside a report block: every
number there must come from a committed result. tests/test_report.py runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
DOCS = ROOT / "docs"
DOC_FILES = ("benchmarks.md", "serving.md", "deploy.md", "optimizations.md")
BLOCK = re.compile(r"<!-- report:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->", re.S)
# a measurement written by hand: a number with a unit of time, rate, size or ratio
MEASUREMENT = re.compile(r"(?<![\w.])\d[\d,.]*\s*(?:ms|µs|us|s\b|×|x\b|req/s|%|GFLOPs|MB|KB)")


class Missing(Exception):
    """A result a block needs is not there."""


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise Missing(f"benchmarks/results/{name}.json")
    return json.loads(path.read_text())


# -- formatting ------------------------------------------------------------------------------------------
def num(v, digits: int = 3) -> str:
    """A measured value, to ``digits`` significant figures (integers above 1000 whole)."""
    if v is None:
        return "—"
    if isinstance(v, float) and v != v:
        return "—"
    if v == float("inf"):
        return "∞"
    if isinstance(v, int) or abs(v) >= 10 ** digits:
        return f"{v:,.0f}" if abs(v) >= 10000 else f"{v:.0f}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits - 1}f}" if abs(v) >= 0.01 else f"{v:.2g}"


def ratio(a, b) -> str:
    return f"{num(a / b)}×" if a and b else "—"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def provenance(name, d: dict | None = None) -> str:
    """Where a block's numbers come from: the file, its date and commit, the machine (one line
    per file when ``name`` is several)."""
    if isinstance(name, tuple):
        return "\n".join(provenance(n, load(n)) for n in name)
    meta = d.get("meta", {})
    commit = meta.get("commit")
    where = f"commit `{commit[:10]}`" + (" (uncommitted changes)" if meta.get("dirty") else "") if commit else \
        "commit not recorded (run before results recorded it)"
    machine = meta.get("cpu_model") or meta.get("machine", "?")
    speed = (f"; the machine's speed: a million additions in a Python loop took {num(meta['python_loop_ms'])} ms"
             if meta.get("python_loop_ms") else "")
    return (f"*Source: `benchmarks/results/{name}.json`, {meta.get('date', '?')}, {where}; "
            f"{machine}, {meta.get('cpus', '?')} CPUs, Python {meta.get('python', '?')}{speed}.*")


def held(rows: list[dict], key: str = "within_target", need: float = 0.99):
    """The highest rate held, monotone: the sweep stops at the first rate that fails (failures and
    timeouts count as misses, a wrong answer fails the rate). None when the lowest rate fails."""
    best = None
    for r in sorted(rows, key=lambda r: r["rate"]):
        ok = (r.get(key, 0) >= need and r.get("completed", r.get("sent")) == r.get("sent") and not r.get("errors")
              and not r.get("wrong_answers"))
        if not ok:
            break
        best = r["rate"]
    return best


# -- docs/benchmarks.md -----------------------------------------------------------------------------------
PIPELINE_ORDER = ("cascade", "video", "translation", "recommender", "heavy")


def pipeline_files() -> tuple[str, ...]:
    """The pipelines results written by the current harness (it records repetitions):
    ``pipelines.json`` (a full run) and ``pipelines_<names>.json`` (``--only``), newest first."""
    found = []
    for path in RESULTS.glob("pipelines*.json"):
        d = json.loads(path.read_text())
        if d.get("closed") and "reps" in d["closed"][0]:
            found.append((d.get("meta", {}).get("date", ""), path.stem))
    return tuple(name for _, name in sorted(found, reverse=True))


def _pipelines() -> tuple[tuple[str, ...], dict]:
    """Every pipeline's rows from the newest run that measured it (``pipeline_files``)."""
    names = pipeline_files()
    if not names:
        raise Missing("benchmarks/results/pipelines*.json (by the current harness)")
    merged: dict = {"closed": [], "open": []}
    seen: set = set()
    used = []
    for name in names:
        d = load(name)
        new = {r["pipeline"] for r in d["closed"]} - seen
        if new:
            used.append(name)
            for part in ("closed", "open"):
                merged[part] += [r for r in d[part] if r["pipeline"] in new]
            seen |= new
    rank = {p: i for i, p in enumerate(PIPELINE_ORDER)}
    for part in ("closed", "open"):
        merged[part].sort(key=lambda r: rank.get(r["pipeline"], len(rank)))   # (stable: systems keep their order)
    return tuple(used), merged


def block_models() -> str:
    d = load("models")
    rows = [[m["model"], m["pipeline"], m["sized_as"], m["input"], num(m["gflops"]), num(m["params_m"])]
            for m in d["models"]]
    return "\n".join([table(["model", "pipeline", "weights / sized as", "input", "GFLOPs per call", "parameters (M)"],
                            rows), "", provenance("models", d)])


def block_pipelines_closed() -> str:
    name, d = _pipelines()
    n = sorted({r["n"] for r in d["closed"]})
    note = (f"Closed loop, one request at a time, {n[0]}" + (f"–{n[-1]}" if len(n) > 1 else "")
            + " requests per system. A p99 needs at least 2,000 requests to be more than a few samples"
            + (" — this run has fewer, so read its p99 as a rough tail." if n[0] < 2000 else "."))
    if "reps" not in d["closed"][0]:   # results written before repetitions, CPU utilization and memory
        rows = [[r["pipeline"], r["system"], r["n"], num(r["p50_ms"]), num(r["p99_ms"]),
                 num(r["p50 vs floor"]), num(r.get("cpu_ms_per_request"))] for r in d["closed"]]
        return "\n".join([note, "", table(["pipeline", "system", "n", "p50 ms", "p99 ms", "p50 / floor", "CPU ms / req"],
                                          rows), "", provenance(name, d)])
    reps = sorted({r["reps"] for r in d["closed"]})
    note += (f" Each value is the median over {reps[-1]} repetitions (the range across them beside it); CPU is the "
             "system's own processes, in cores busy while measured (of 2), and memory their summed peak RSS.")
    rows = [[r["pipeline"], r["system"], r["n"], num(r["p50_ms"]), r["p50 spread"], num(r["p99_ms"]), r["p99 spread"],
             num(r["p50 vs floor"]), num(r.get("cpu_ms_per_request")), num(r.get("cpu_util_cores")),
             num(r.get("peak_rss_mb"))] for r in d["closed"]]
    return "\n".join([note, "", table(["pipeline", "system", "n per rep", "p50 ms", "p50 range", "p99 ms", "p99 range",
                                       "p50 / floor", "CPU ms / req", "CPU cores", "peak RSS MB"], rows),
                      "", provenance(name, d)])


def _systems(d) -> list[str]:
    seen = []
    for r in d["open"]:
        if r["system"] not in seen:
            seen.append(r["system"])
    return seen


def block_pipelines_open() -> str:
    name, d = _pipelines()
    pipes = list(dict.fromkeys(r["pipeline"] for r in d["open"]))
    systems = _systems(d)
    rows = []
    for p in pipes:
        mine = [r for r in d["open"] if r["pipeline"] == p]
        rates = sorted({r["rate"] for r in mine})
        target = mine[0].get("target_ms")
        cells = []
        for s in systems:
            runs = [r for r in mine if r["system"] == s]
            best = held(runs) if runs else None
            cells.append("—" if not runs else "none" if best is None else num(best))
        rows.append([f"{p} ({num(target)} ms; {num(rates[0])}–{num(rates[-1])}/s)"] + cells)
    secs = sorted({r.get("seconds") or round(r["sent"] / r["rate"]) for r in d["open"] if r["rate"]})
    per_rate = f"{num(secs[0])} s per rate" if len(secs) == 1 else f"{num(secs[0])}–{num(secs[-1])} s per rate"
    if "reps" in d["open"][0]:
        per_rate += (", long enough for 2,000 requests per rate over the repetitions together; held in every "
                     "repetition; the load generator a process of its own")
    return "\n".join([
        f"Open loop (Poisson arrivals, latency from the scheduled send time, {per_rate}): the highest "
        "rate held — 99% of requests within the pipeline's target, no failures — counting up from the lowest rate and "
        "stopping at the first rate that fails.", "",
        table(["pipeline (target; rates tried)"] + systems, rows), "", provenance(name, d)])


def _is_flowkit_http(s: str) -> bool:
    return s.startswith("flowkit") and "HTTP" in s


def _is_peer_http(s: str) -> bool:
    return "HTTP" in s and not s.startswith("flowkit")


def block_pipelines_headline() -> str:
    """flowkit over HTTP against the best peer over HTTP (lowest closed-loop p99), per pipeline."""
    name, d = _pipelines()
    rows, losses = [], []
    for p in dict.fromkeys(r["pipeline"] for r in d["closed"]):
        mine = [r for r in d["closed"] if r["pipeline"] == p]
        fk = next((r for r in mine if _is_flowkit_http(r["system"])), None)
        peers = [r for r in mine if _is_peer_http(r["system"])]
        if fk is None or not peers:
            continue
        best = min(peers, key=lambda r: r["p99_ms"])
        runs = {s: [r for r in d["open"] if r["pipeline"] == p and r["system"] == s] for s in (fk["system"], best["system"])}
        rate_fk, rate_peer = held(runs[fk["system"]]), held(runs[best["system"]])
        mine_at = {r["rate"]: r["p99_ms"] for r in runs[fk["system"]]}
        # the rates the peer holds at which flowkit's open-loop p99 is higher than the peer's
        higher = [r["rate"] for r in sorted(runs[best["system"]], key=lambda r: r["rate"])
                  if rate_peer and r["rate"] <= rate_peer and mine_at.get(r["rate"], math.inf) > r["p99_ms"]]
        rows.append([p, best["system"], f"{num(fk['p50_ms'])} / {num(best['p50_ms'])}",
                     f"{num(fk['p99_ms'])} / {num(best['p99_ms'])}", ratio(fk["p99_ms"], best["p99_ms"]),
                     f"{num(rate_fk) if rate_fk else 'none'} / {num(rate_peer) if rate_peer else 'none'}",
                     ", ".join(num(r) for r in higher) or "none"])
        if fk["p99_ms"] > best["p99_ms"] or (rate_peer or 0) > (rate_fk or 0) or higher:
            losses.append(p)
    out = [table(["pipeline", "best peer (lowest p99, HTTP)", "p50 ms flowkit / peer", "p99 ms flowkit / peer",
                  "flowkit p99 / peer p99", "highest rate held flowkit / peer",
                  "open loop: rates the peer holds with flowkit's p99 higher (req/s)"], rows), ""]
    out.append(("flowkit loses to the best peer on: " + ", ".join(losses) + " (a higher closed-loop p99, a lower "
                "rate held, or a higher open-loop p99 at a rate the peer holds).")
               if losses else "flowkit leads the best peer on every pipeline in this run.")
    out += ["", provenance(name, d)]
    return "\n".join(out)


def block_pipelines_figures() -> str:
    name, d = _pipelines()
    lines = []
    for p in dict.fromkeys(r["pipeline"] for r in d["open"]):
        lines.append(f"![{p}: p50 and p99 against offered rate](../benchmarks/results/report_{p}.png)")
    return "\n".join(lines)


def figures_pipelines(write: bool) -> list[Path]:
    """One PNG per pipeline: p50 and p99 against offered rate, every system (``_pipelines``)."""
    try:
        _, d = _pipelines()
    except Missing:
        return []
    paths = []
    for p in dict.fromkeys(r["pipeline"] for r in d["open"]):
        path = RESULTS / f"report_{p}.png"
        paths.append(path)
        if not write:
            continue
        series = {}
        for s in _systems(d):
            runs = sorted((r for r in d["open"] if r["pipeline"] == p and r["system"] == s), key=lambda r: r["rate"])
            if runs:
                series[f"{s} p50"] = ([r["rate"] for r in runs], [r["p50_ms"] for r in runs])
                series[f"{s} p99"] = ([r["rate"] for r in runs], [min(r["p99_ms"], 1e5) for r in runs])
        sys.path.insert(0, str(BENCH))
        try:
            from _report import plot
        finally:
            sys.path.remove(str(BENCH))
        plot(path, series, "offered rate (req/s)", "latency (ms)", f"{p}: p50 and p99 against offered rate", logy=True)
    return paths


# -- docs/serving.md ----------------------------------------------------------------------------------------
def block_http() -> str:
    d = load("http_vs_fastapi")
    summary = d["summary"]
    base = summary[0]
    rows = [[r["system"], r["reps"], r["n"], r["failures"], num(r["p50_ms"]), r["p50 spread"], num(r["p99_ms"]),
             r["p99 spread"], ratio(r["p50_ms"], base["p50_ms"]), ratio(r["p99_ms"], base["p99_ms"]),
             f"{num(r['held_rps'])} req/s" if r["held_rps"] else "none"] for r in summary]
    cfg = d.get("config", {})
    load_avg = d.get("load_average_at_end")
    return "\n".join([
        f"The 3-stage image pipeline, {cfg.get('processes', 2)} serving processes per system with "
        f"{cfg.get('torch_threads', 1)} torch thread each, the load generator in its own process; closed loop "
        f"({num(cfg.get('closed', 0))} requests per repetition, medians over repetitions and their spread), then "
        f"open loop (Poisson from 100 req/s up, {num(cfg.get('seconds', 0))} s per rate, stopping at the first rate "
        "that fails):", "",
        table(["system", "reps", "n", "failures", "p50 ms", "p50 spread", "p99 ms", "p99 spread", "p50 vs first",
               "p99 vs first", "held (99% within 50 ms)"], rows), "",
        (f"Load average when the run ended: {', '.join(num(x) for x in load_avg)} on {d.get('meta', {}).get('cpus', '?')} "
         "CPUs (the machine was shared with other work).") if load_avg else "", "", provenance("http_vs_fastapi", d)])


# -- docs/deploy.md ------------------------------------------------------------------------------------------
def block_overhead() -> str:
    d = load("overhead")
    closed = {r["system"]: r for r in d["closed_loop"]}
    rows = [[s, r["n"], num(r["p50_ms"]), num(r["p99_ms"])] for s, r in closed.items()]
    fk = closed.get("flowkit deployment (fused)")
    chained = next((r for s, r in closed.items() if "chained" in s), None)
    systems = list(dict.fromkeys(r["system"] for r in d["open_loop"]))
    best = {s: held([r for r in d["open_loop"] if r["system"] == s], key="within_50ms") for s in systems}
    out = ["Closed loop, the 3-stage image pipeline:", "", table(["system", "n", "p50 ms", "p99 ms"], rows), ""]
    if fk and chained:
        out.append(f"flowkit's p50 is {num(fk['p50_ms'])} ms, {ratio(chained['p50_ms'], fk['p50_ms'])} lower than "
                   f"chained dask futures ({num(chained['p50_ms'])} ms).")
    out.append("Open loop (Poisson, latency from the scheduled send time), the highest rate held with 99% of "
               "requests within 50 ms and no failures: "
               + "; ".join(f"{s}: {num(b) if b else 'none'} req/s" for s, b in best.items()) + ".")
    out += ["", provenance("overhead", d)]
    return "\n".join(out)


def block_fusion() -> str:
    d = load("fusion")
    rows = [[r["payload"], r["maps"], num(r["fused ms"]), num(r["unfused ms"]), num(r["dask chained futures ms"]),
             num(r["fused vs 1 map"])] for r in d["rows"]]
    hops = "; ".join(f"{p}: fused {num(h['fused'])} ms, unfused {num(h['unfused'])} ms, chained futures "
                     f"{num(h['dask chained futures'])} ms" for p, h in d["per_hop_ms"].items())
    return "\n".join(["Fusion, median ms, a chain of maps fused, unfused, and as chained dask futures:", "",
                      table(["payload", "maps", "fused ms", "unfused ms", "chained futures ms", "fused vs 1 map"], rows),
                      "", f"Cost per extra map (slope): {hops}.", "", provenance("fusion", d)])


def block_transport() -> str:
    d = load("transport")
    rows = [[r["flow"], r["transport"], r["n"], num(r["p50_ms"]), num(r["p99_ms"])] for r in d["rows"]]
    extra = []
    for f in dict.fromkeys(r["flow"] for r in d["rows"]):
        t = {r["transport"]: r for r in d["rows"] if r["flow"] == f}
        if "framed" in t and "dask comm" in t:
            extra.append(f"{f}: dask's comm costs {ratio(t['dask comm']['p50_ms'], t['framed']['p50_ms'])} the framed p50")
    return "\n".join(["The request path's transport, deployed, closed loop:", "",
                      table(["flow", "transport", "n", "p50 ms", "p99 ms"], rows), "", "; ".join(extra) + ".", "",
                      provenance("transport", d)])


# -- docs/optimizations.md -------------------------------------------------------------------------------------
def block_compete() -> str:
    d = load("compete")
    rows = [[r["scale s"], r["extra replicas"], r["n"], num(r["p50_ms"]), num(r["p99_ms"]), num(r["p50 vs none"]),
             num(r["p99 vs none"])] for r in d["rows"]]
    goal = next((r for r in d["rows"] if r["scale s"] == 4 and r["extra replicas"] == 2), None)
    out = [table(["scale s", "extra replicas", "n", "p50 ms", "p99 ms", "p50 vs none", "p99 vs none"], rows), ""]
    if goal:
        out.append(f"Goal: p99 with 2 extra replicas at most 0.6× of none at s = 4 — {num(goal['p99 vs none'])}× "
                   f"({'met' if goal['p99 vs none'] <= 0.6 else 'not met'}); p50 {num(goal['p50 vs none'])}× of none.")
    out += ["", provenance("compete", d), "", "![compete](../benchmarks/results/compete.png)"]
    return "\n".join(out)


def block_batching() -> str:
    d = load("batching")
    rates = sorted({r["rate"] for r in d["rows"]})
    by = {(r["system"], r["rate"]): r for r in d["rows"]}
    rows = []
    for rate in rates:
        on, off = by.get(("batching on", rate)), by.get(("batching off", rate))
        rows.append([rate, num(on["p50_ms"]) if on else "—", num(on["p99_ms"]) if on else "—",
                     num(off["p50_ms"]) if off else "—", num(off["p99_ms"]) if off else "—",
                     num(off["throughput"]) if off else "—"])
    best = {s: held([r for r in d["rows"] if r["system"] == s], key="within_50ms") for s in ("batching on", "batching off")}
    on, off = best["batching on"], best["batching off"]
    out = [table(["offered req/s", "on: p50 ms", "on: p99 ms", "off: p50 ms", "off: p99 ms", "off: completed/s"], rows), "",
           f"Highest rate held (99% within 50 ms, no failures, counting up): {num(on) if on else 'none'} req/s with "
           f"batching, {num(off) if off else 'none'} without"
           + (f": {ratio(on, off)} (goal at least 3×: {'met' if on / off >= 3 else 'not met'})." if on and off else "."),
           "", provenance("batching", d), "", "![batching](../benchmarks/results/batching.png)"]
    return "\n".join(out)


def block_batch_cost() -> str:
    d = load("batch_cost")
    rows = [[r["batch"], r["calls"], num(r["ms_per_image"]), f"{num(r['p10_ms'])}-{num(r['p90_ms'])}",
             f"{num(r['vs_batch_1'])}×", num(r["images_per_s_one_core"])] for r in d["batches"]]
    return "\n".join([table(["batch", "calls", "ms per image (median)", "p10-p90", "vs batch 1", "images/s on one core"],
                            rows), "", provenance("batch_cost", d)])


def block_request_split(name: str) -> str:
    """Where a request's time went on the worker serving it (``request_split.py``), per variant:
    the client's and the plan's percentiles, the rest of the path (the mean client time less the
    mean plan time: means add up, percentiles do not), where the slowest 1% lost their time, and the
    same stages called as plain functions on that worker."""
    d = load(name)

    def phase(run, name, col):
        return next(r[col] for r in run["phases"] if r["phase"] == name)

    def med(runs, name, col):
        return statistics.median(phase(run, name, col) for run in runs)

    rows = []
    for variant in dict.fromkeys(r["variant"] for r in d["runs"]):
        runs = [r for r in d["runs"] if r["variant"] == variant]
        path = statistics.median(phase(run, "client", "mean_ms") - phase(run, "plan", "mean_ms") for run in runs)
        floor = [statistics.median(r["summary"][k] for r in runs) if all(k in r["summary"] for r in runs) else None
                 for k in ("floor_p50_ms", "floor_p99_ms")]
        rows.append([variant, len(runs), num(med(runs, "client", "p50_ms")), num(med(runs, "client", "p99_ms")),
                     num(med(runs, "plan", "p50_ms")), num(med(runs, "plan", "p99_ms")), num(path),
                     f"{num(med(runs, 'client', 'slowest 1% excess_ms'))} / {num(med(runs, 'plan', 'slowest 1% excess_ms'))}",
                     num(floor[0]), num(floor[1])])
    return "\n".join([
        f"{d['config']['closed']} requests a run, one after another on one connection (one worker serves them); "
        "each value the median over the runs. Path outside the plan: the mean client time less the mean "
        "time in the plan (reading, decoding, the hand-offs to the plan's thread and back, the loop's time "
        "between a plan's stages, encoding, the kernel and the client). Floor: the same stages called as plain functions on that worker, "
        "back to back after each run.",
        "", table(["variant", "runs", "client p50 ms", "client p99 ms", "plan p50 ms", "plan p99 ms",
                   "path outside the plan, mean ms", "slowest 1%: excess ms, client / in the plan",
                   "floor p50 ms", "floor p99 ms"], rows),
        "", provenance(name, d)])


def block_side_by_side(name: str) -> str:
    """A few systems on one pipeline, their repetitions taking turns (``pipelines_vs_peers.py
    --systems ... --name``): closed loop, then each open-loop rate's pooled p50 / p99 and share
    within the target, and the highest rate held."""
    d = load(name)
    closed = [[r["system"], r["n"], num(r["p50_ms"]), r["p50 spread"], num(r["p99_ms"]), r["p99 spread"],
               num(r.get("cpu_util_cores"))] for r in d["closed"]]
    systems = _systems(d)
    rates = sorted({r["rate"] for r in d["open"]})
    cell = {(r["system"], r["rate"]): r for r in d["open"]}

    def at(system, rate):
        r = cell.get((system, rate))
        return "—" if r is None else f"{num(r['p50_ms'])} / {num(r['p99_ms'])} ({r['within_target']:.1%})"

    opened = [[f"{num(rate)}/s"] + [at(s, rate) for s in systems] for rate in rates]
    best = {s: held([r for r in d["open"] if r["system"] == s]) for s in systems}
    opened.append(["highest rate held"] + ["none" if best[s] is None else num(best[s]) for s in systems])
    target = d["open"][0].get("target_ms") if d["open"] else None
    pipe = d["closed"][0]["pipeline"]
    reps = d["config"]["reps"]
    return "\n".join([
        f"Closed loop: the median over {reps} repetitions (the range across them beside it), the systems taking "
        "turns within each repetition.", "",
        table(["system", "n per rep", "p50 ms", "p50 range", "p99 ms", "p99 range", "CPU cores"], closed), "",
        f"Open loop: p50 / p99 ms of the repetitions pooled (the lowest share within {num(target)} ms over the "
        "repetitions: 0 where a repetition's sweep had stopped below that rate); a rate is held where every "
        "repetition had 99% within and no failure, counting up from the lowest.", "",
        table(["rate"] + systems, opened), "", provenance(name, d), "",
        f"![{pipe}: p50 and p99 against offered rate, side by side](../benchmarks/results/{name}_{pipe}.png)"])


def block_locality() -> str:
    out = []
    for name, link in (("locality", "loopback"), ("locality_10gbit", "10 Gbit/s link")):
        try:
            d = load(name)
        except Missing:
            out.append(f"{link}: not measured (no `benchmarks/results/{name}.json`).")
            continue
        rows = [[r["key"], r["size"], "on" if r["locality"] else "off", r["n"], num(r["p50_ms"]), num(r["p99_ms"]),
                 f"{r['local lookups']} / {r['remote lookups']}"] for r in d["rows"]]
        gains = []
        for key in dict.fromkeys(r["key"] for r in d["rows"]):
            for size in dict.fromkeys(r["size"] for r in d["rows"]):
                t = {r["locality"]: r for r in d["rows"] if r["key"] == key and r["size"] == size}
                if True in t and False in t and size == "4 MB":
                    gains.append(f"key {key}: {ratio(t[False]['p50_ms'], t[True]['p50_ms'])} lower median at 4 MB")
        out += [f"**{link}**", "", table(["key", "size", "locality", "n", "p50 ms", "p99 ms", "local / remote lookups"], rows),
                "", ("; ".join(gains) + " (goal at least 2×).") if gains else "", "", provenance(name, d), "",
                f"![{name}](../benchmarks/results/{name}.png)", ""]
    return "\n".join(out).rstrip()


def block_autoscaling() -> str:
    d = load("autoscaling")
    per = d["per_second"]
    step = next((p["second"] for p in per if p["throughput"] > 1.5 * max(1, per[0]["throughput"]) and p["second"] > 0), None)
    after = [p for p in per if step is not None and step <= p["second"] < step + 20 and p["p99_ms"] == p["p99_ms"]]
    worst = max(after, key=lambda p: p["p99_ms"]) if after else None
    lines = [f"- the second worker joined {num(d['grew_s'])} s after the step; p99 recovered within "
             f"{num(d['recovered_s'])} s;"]
    if worst:
        lines.append(f"- the worst one-second p99 after the step was {num(worst['p99_ms'])} ms (second {worst['second']}, "
                     f"{worst['workers']} worker{'s' if worst['workers'] > 1 else ''});")
    lines.append(f"- back to one worker {num(d['shrank_s'])} s after the load stopped.")
    return "\n".join(lines + ["", provenance("autoscaling", d), "", "![autoscaling](../benchmarks/results/autoscaling.png)"])


BLOCKS = {
    "models": (block_models, ("models",)),
    "pipelines-closed": (block_pipelines_closed, pipeline_files),
    "pipelines-open": (block_pipelines_open, pipeline_files),
    "pipelines-headline": (block_pipelines_headline, pipeline_files),
    "pipelines-figures": (block_pipelines_figures, pipeline_files),
    "http": (block_http, ("http_vs_fastapi",)),
    "overhead": (block_overhead, ("overhead",)),
    "fusion": (block_fusion, ("fusion",)),
    "transport": (block_transport, ("transport",)),
    "compete": (block_compete, ("compete",)),
    "batching": (block_batching, ("batching",)),
    "batch-cost": (block_batch_cost, ("batch_cost",)),
    "locality": (block_locality, ("locality", "locality_10gbit")),
    "autoscaling": (block_autoscaling, ("autoscaling",)),
    "request-split-translation": (lambda: block_request_split("request_split_translation"),
                                  ("request_split_translation",)),
    "translation-race": (lambda: block_side_by_side("translation_raced"), ("translation_raced",)),
}


def render(name: str) -> str:
    fn, _ = BLOCKS[name]
    try:
        return fn().rstrip() + "\n"
    except Missing as e:
        return f"Not measured: `{e}` is not in the repository.\n"


# -- checking ------------------------------------------------------------------------------------------------
def uncommitted(names) -> list[str]:
    """Results files that git does not hold as they are on disk (none when git is not there)."""
    bad = []
    for name in names:
        rel = f"benchmarks/results/{name}.json"
        if not (ROOT / rel).exists():
            continue
        try:
            tracked = subprocess.run(["git", "ls-files", "--error-unmatch", rel], cwd=ROOT, capture_output=True).returncode == 0
            clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", rel], cwd=ROOT, capture_output=True).returncode == 0
        except FileNotFoundError:
            return []
        if not (tracked and clean):
            bad.append(rel + (" is not committed" if not tracked else " differs from its commit"))
    return bad


def measured_parts(doc: str, text: str) -> list[tuple[int, str]]:
    """(line number, line) of the parts whose every number must be generated: the whole of
    benchmarks.md; elsewhere from a heading containing "Measured" to the next heading of its level or
    above, and between ``<!-- measured -->`` and ``<!-- /measured -->``. Lines inside report blocks
    and code are excluded."""
    out, inside, level, block, code = [], doc == "benchmarks.md", None, False, False
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip() in ("<!-- measured -->", "<!-- /measured -->"):
            inside, level = line.strip() == "<!-- measured -->", None
            continue
        m = re.match(r"(#+) ", line)
        if m and doc != "benchmarks.md":
            if "Measured" in line:
                inside, level = True, len(m.group(1))
            elif inside and level is not None and len(m.group(1)) <= level:
                inside = False
        if line.startswith("<!-- report:"):
            block = True
        elif line.startswith("<!-- /report:"):
            block = False
            continue
        if line.startswith("```"):
            code = not code
            continue
        if inside and not block and not code and not line.startswith("Goal:"):   # a goal is a target, not a result
            out.append((i, line))
    return out


def process(check: bool) -> list[str]:
    problems, used = [], set()
    for doc in DOC_FILES:
        path = DOCS / doc
        if not path.exists():
            problems.append(f"docs/{doc}: missing")
            continue
        text = path.read_text()

        def fill(m):
            name = m.group("name")
            if name not in BLOCKS:
                problems.append(f"docs/{doc}: unknown report block {name!r}")
                return m.group(0)
            files = BLOCKS[name][1]
            used.update(files() if callable(files) else files)
            new = render(name)
            if check and m.group("body") != new:
                problems.append(f"docs/{doc}: block {name!r} disagrees with the results (run benchmarks/report.py)")
            return f"<!-- report:{name} -->\n{new}<!-- /report:{name} -->"

        new_text = BLOCK.sub(fill, text)
        for i, line in measured_parts(doc, text):
            for hit in MEASUREMENT.findall(line):
                problems.append(f"docs/{doc}:{i}: a measurement outside a report block: {hit!r}")
        if not check and new_text != text:
            path.write_text(new_text)
    if any(name.startswith("pipelines") for name in used):
        for fig in figures_pipelines(write=not check):
            if check and not fig.exists():
                problems.append(f"{fig.relative_to(ROOT)}: figure missing (run benchmarks/report.py)")
    if check:
        problems += uncommitted(sorted(used))
    return problems


def measure_models() -> Path:
    """Counts each pipeline model's FLOPs and parameters (deterministic; seconds) -> results/models.json."""
    import torch

    sys.path.insert(0, str(BENCH))
    from _report import save, table as md_table
    from pipelines import models as M

    src = torch.randint(0, 4096, (1, 12))
    cases = [
        ("MobileNetV2", "cascade", "cascade: MobileNetV2", M.mobilenet_v2(), (torch.zeros(1, 3, 96, 96),), {}, "1×3×96×96"),
        ("ResNet-18", "cascade (when unsure)", "cascade: large CNN", M.large_cnn(), (torch.zeros(1, 3, 96, 96),), {}, "1×3×96×96"),
        ("MobileNetV2", "heavy", "cascade: MobileNetV2", M.mobilenet_v2(), (torch.zeros(1, 3, 224, 224),), {}, "1×3×224×224"),
        ("detector CNN", "video", "video: detector", M.detector(), (torch.zeros(30, 3, 32, 32),), {}, "30 frames × 3×32×32"),
        ("language classifier", "translation", "translation: language classifier", M.language_classifier(),
         (src,), {}, "12 tokens"),
        ("Seq2Seq translator", "translation", "translation: translators", M.translator("fr"), (src,), {"steps": 12},
         "12 tokens in, 12 decoded"),
    ]
    models = []
    for model, pipeline, key, net, args, kw, shape in cases:
        models.append({"model": model, "pipeline": pipeline, "sized_as": M.SIZED_AS[key], "input": shape,
                       "gflops": M.flops(net, *args, **kw) / 1e9,
                       "params_m": sum(p.numel() for p in net.parameters()) / 1e6})
    config = {"counter": "torch.utils.flop_counter.FlopCounterMode (a multiply-add counts 2)"}
    return save("models", {"models": models, "config": config},
                md_table(models, ["model", "pipeline", "sized_as", "input", "gflops", "params_m"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a doc disagrees with the results")
    ap.add_argument("--models", action="store_true", help="count the models' FLOPs into results/models.json first")
    args = ap.parse_args(argv)
    if args.models:
        print("wrote", measure_models())
    problems = process(check=args.check)
    for p in problems:
        print(p, file=sys.stderr)
    if args.check:
        print(f"report --check: {len(problems)} problem(s)" if problems else "report --check: the docs agree with the results")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
