"""The load of benchmarks/slo.py: open-loop Poisson arrivals, sent with ``dep.submit`` from the
client's process (``drive``) or over HTTP to the deployment's workers by load generators in
processes of their own (``drive_http``), and the figures taken from them.

Every latency counts from the request's *scheduled* send time (a backlog in the sender or the
deployment is not hidden). A request refused (``fk.Overloaded``), failed, or unanswered by the
end is a miss: it stays in the denominator, with latency ``nan`` (``inf`` for percentiles).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import flowkit as fk


@dataclass
class Run:
    """One drive: per request its scheduled time (s from the start) and latency (ms; nan: a
    miss), the workers seen (t, count) every half second, and the wall-clock start."""

    sched: np.ndarray
    lat_ms: np.ndarray
    refused: int
    failed: int
    workers: list = field(default_factory=list)
    wall_start: float = 0.0
    lead_s: float = 0.0   # of the drive's time, seconds before the load began (load generators starting)
    server_ms: np.ndarray = field(default_factory=lambda: np.array([]))   # the workers' own times (drive_http)
    late_ms: np.ndarray = field(default_factory=lambda: np.array([]))   # how late each was sent (drive_http)

    def summary(self, slo_ms: float | None = None, lo: float = 0.0, hi: float = math.inf) -> dict:
        keep = (self.sched >= lo) & (self.sched < hi)
        return summarize(self.lat_ms[keep], slo_ms)

    def server_summary(self) -> dict:
        """The same requests as the workers' HTTP endpoints timed them (arrival to answer; the
        load generator, the kernel and uvicorn's header parsing left out): how many, p50, p99;
        and the p99 of how late the load generator sent them (its sender thread waking from its
        sleep until the scheduled time, or every sender busy: in every latency, which counts from
        the schedule)."""
        p50, p99 = _p50_p99(self.server_ms)
        late = self.late_ms[~np.isnan(self.late_ms)]
        return {"server_requests": int(len(self.server_ms)), "server_p50_ms": p50, "server_p99_ms": p99,
                "sender_late_p99_ms": _p50_p99(late)[1]}

    def workers_used(self) -> dict:
        counts = [n for _, n in self.workers] or [0]
        return {"workers_mean": float(np.mean(counts)), "workers_max": int(max(counts))}


def p99_all(lat_ms: np.ndarray) -> float:
    """The p99 over every request, a miss counting as infinitely late (nearest rank)."""
    if len(lat_ms) == 0:
        return math.nan
    v = np.sort(np.where(np.isnan(lat_ms), np.inf, lat_ms))
    return float(v[min(len(v) - 1, math.ceil(0.99 * len(v)) - 1)])


def _p50_p99(ms: np.ndarray) -> tuple[float | None, float | None]:
    return (float(np.percentile(ms, 50)), float(np.percentile(ms, 99))) if len(ms) else (None, None)


def summarize(lat_ms: np.ndarray, slo_ms: float | None) -> dict:
    done = lat_ms[~np.isnan(lat_ms)]
    p50, p99 = _p50_p99(done)
    out = {"requests": int(len(lat_ms)), "misses": int(np.isnan(lat_ms).sum()),
           "p50_ms": p50, "p99_ms": p99,         # of the answered requests
           "p99_all_ms": p99_all(lat_ms)}        # misses as infinitely late
    if slo_ms is not None:
        out["within_slo"] = float((done <= slo_ms).sum() / len(lat_ms)) if len(lat_ms) else 0.0
    return out


def schedule(phases: list[tuple[float, float]], seed: int) -> np.ndarray:
    """Poisson arrival times for consecutive ``(seconds, rate)`` phases."""
    rng = random.Random(seed)
    times, start = [], 0.0
    for seconds, rate in phases:
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            times.append(t)
        start += seconds
    return np.array(times)


def _watch_workers(dep, start: float, stop: threading.Event, into: list, served: set | None = None) -> threading.Thread:
    """A thread noting ``(seconds since start, workers)`` every half second until ``stop``, and
    into ``served`` (when given) the requests finished since ``start`` (``dep.recent``: ``(finish
    time, seconds)``; those sent from this process finished before, in the warm-up)."""
    def watch():
        while not stop.is_set():
            try:
                into.append((time.perf_counter() - start, len(dep.workers)))
                if served is not None:
                    _add_served(dep, served, start)
            except Exception:
                pass
            stop.wait(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def drive(dep, request, phases: list[tuple[float, float]], seed: int = 0, drain_s: float = 20.0) -> Run:
    """Send ``request(i)`` at Poisson times over ``phases`` (``[(seconds, rate), ...]``) from this
    process; wait up to ``drain_s`` after the last for the answers."""
    sched = schedule(phases, seed)
    lat = np.full(len(sched), np.nan)
    refused, failed = [0], [0]
    lock = threading.Lock()
    pending = [0]
    cond = threading.Condition(lock)
    workers: list = []
    stop = threading.Event()
    start = time.perf_counter() + 0.05
    wall_start = time.time() + 0.05
    watcher = _watch_workers(dep, start, stop, workers)
    futures = []
    for i, at in enumerate(sched):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

        def finished(fut, i=i, at=start + at):
            with lock:
                if not fut.cancelled() and fut.exception() is None:
                    lat[i] = (time.perf_counter() - at) * 1000
                else:
                    failed[0] += 1
                pending[0] -= 1
                cond.notify_all()

        try:
            with lock:
                pending[0] += 1
            fut = dep.submit(request(i))
        except fk.Overloaded:
            with lock:
                pending[0] -= 1
                refused[0] += 1
            continue
        except Exception:
            with lock:
                pending[0] -= 1
                failed[0] += 1
            continue
        futures.append(fut)
        fut.add_done_callback(finished)
    with cond:   # answers still due: wait for them, up to drain_s
        cond.wait_for(lambda: pending[0] == 0, drain_s)
    for f in futures:   # unanswered by now: a miss (nan), and abandoned
        f.cancel()
    stop.set()
    watcher.join(2)
    with lock:
        return Run(sched, lat.copy(), refused[0], failed[0], workers, wall_start)


LOADGEN = Path(__file__).resolve().parent / "peers" / "cycling_loadgen.py"
BODIES = 200   # distinct requests the HTTP load cycles over (request(0..BODIES-1))
LEAD_S = 2.0   # seconds the load generator processes get to start before their schedule does
SERVED_KEEP_S = 25.0   # how far back each look at the workers' served requests reaches (they keep 30 s)


def write_bodies(path: Path, request, n: int = BODIES) -> Path:
    """``request(0..n-1)`` as the JSON bodies of one-row HTTP requests (``{"rows": [row]}``), in
    the list file cycling_loadgen.py sends in turn."""
    rows = [{k: v[0] for k, v in request(i).items()} for i in range(n)]
    path.write_text(json.dumps([json.dumps({"rows": [r]}) for r in rows]))
    return path


def http_load(url: str, bodies: Path, phases: list[tuple[float, float]], seed: int, wall_start: float,
              timeout: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Send ``phases`` (``[(seconds, rate), ...]``) of open-loop Poisson requests to ``url``, one
    load generator process per phase, each starting its schedule at ``wall_start``
    (``time.time()``) plus the phases before it; returns (scheduled times from the first phase's
    start, latencies in ms, nan: a miss; how late each was sent, in ms, nan: unsent). The processes
    are killed and waited for however it ends."""
    procs, offset = [], 0.0
    try:
        for k, (seconds, rate) in enumerate(phases):
            procs.append(subprocess.Popen(
                [sys.executable, str(LOADGEN), "--url", url, "--bodies", str(bodies), "--rate", str(rate),
                 "--seconds", str(seconds), "--connections", "64", "--timeout", str(timeout),
                 "--seed", str(seed + k), "--start-at", str(wall_start + offset)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            offset += seconds
        sched, lat, late, offset = [], [], [], 0.0
        for (seconds, _), proc in zip(phases, procs):
            out, err = proc.communicate(timeout=wall_start + offset + seconds + timeout + 120 - time.time())
            if proc.returncode or not out.strip():
                raise RuntimeError(f"the load generator failed ({proc.returncode}): {err.strip()[-300:]}")
            got = json.loads(out)
            sched += [offset + t for t in got["schedule_s"]]
            lat += [math.nan if x is None else x for x in got["latencies_ms"]]
            late += [math.nan if x is None else x for x in got["late_ms"]]
            offset += seconds
        return np.array(sched), np.array(lat), np.array(late)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def drive_http(dep, request, phases: list[tuple[float, float]], seed: int = 0, drain_s: float = 20.0) -> Run:
    """The load of ``drive`` sent over HTTP instead: the deployment served by its workers
    (``dep.serve(where="workers")``), each phase sent by benchmarks/peers/cycling_loadgen.py in a
    process of its own (``request(0..BODIES-1)`` in turn, 64 keep-alive connections; ``http_load``)
    so the phases follow each other without a gap. A request refused (503), failed, or
    unanswered ``drain_s`` after the end is a miss (counted as ``failed``). ``Run.lead_s``: the
    seconds given the load generators to start before the schedule's start (not the system's)."""
    tmp = Path(tempfile.mkdtemp(prefix="slo_http_"))
    workers: list = []
    served: set = set()
    stop = threading.Event()
    try:
        with dep.serve(where="workers") as server:
            wall_start, start = time.time() + LEAD_S, time.perf_counter() + LEAD_S
            watcher = _watch_workers(dep, start, stop, workers, served)
            try:
                sched, lat, late = http_load(server.url + f"/v1/flows/{dep.name}/predict",
                                       write_bodies(tmp / "bodies.json", request), phases, seed, wall_start, drain_s)
            finally:
                stop.set()
                watcher.join(2)
            _last_served(dep, served, start, int((~np.isnan(lat)).sum()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Run(sched, lat, 0, int(np.isnan(lat).sum()), workers, wall_start, LEAD_S,
               np.array(sorted(s for _, s in served)) * 1000, late)


def _add_served(dep, served: set, start: float) -> None:
    """Add to ``served`` the requests the deployment reports finished since ``start``."""
    served.update(r for r in dep.recent(SERVED_KEEP_S) if r[0] >= start)


def _last_served(dep, served: set, start: float, answered: int, wait_s: float = 30.0) -> None:
    """``_add_served`` until ``served`` holds ``answered`` requests (the workers' last reports
    arrive an asking interval late; later on a loaded machine), for at most ``wait_s``."""
    end = time.perf_counter() + wait_s
    _add_served(dep, served, start)
    while len(served) < answered and time.perf_counter() < end:
        time.sleep(0.1)
        _add_served(dep, served, start)


def windows(run: Run, slo_ms: float, width: float = 1.0) -> list[dict]:
    """Per ``width``-second window of scheduled time: requests, p99 (misses as infinitely late),
    the share within the objective, and the workers seen."""
    out = []
    end = float(run.sched[-1]) if len(run.sched) else 0.0
    t = 0.0
    while t <= end:
        s = run.summary(slo_ms, t, t + width)
        ws = [n for at, n in run.workers if t <= at < t + width]
        out.append({"t": t, "requests": s["requests"], "p99_ms": s["p99_all_ms"], "within_slo": s["within_slo"],
                    "workers": max(ws) if ws else None})
        t += width
    return out


def recovery_s(wins: list[dict], step_at: float, slo_ms: float) -> float | None:
    """Seconds from ``step_at`` to the start of the first 1-s window after which every window's
    p99 is within ``slo_ms`` to the end (0: it never left); None: never within the run."""
    after = [w for w in wins if w["t"] >= step_at - 1e-9 and w["requests"]]
    for k, w in enumerate(after):
        if all(x["p99_ms"] <= slo_ms for x in after[k:]):
            return w["t"] - step_at
    return None
