"""Probes of a cluster's request path: what a request costs outside its operators.

A profile (``profiling.profile``) times each operator on a worker; the planner also needs what
the path around them costs on the cluster that will serve — the client's router, the transport,
the worker's session and executor, and back (``request_path``); the same over HTTP when the
workers serve it themselves (``http_path``: a client's request, the HTTP parse and JSON, the
executor, and back) — and what each stage costs when a plan that batches or races places its
stages one by one (``stage_hops``). Each is measured by deploying a probe flow whose operators
do nothing and timing its requests, paced as requests at a modest rate arrive. Then the flow's
own requests, its sample's rows one at a time (``flow_paths``): what they cost beyond their
operators and the probe's path — their rows' encoding, their stages' bookkeeping — calibrates
the model (``latency_model.calibrated``).
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import socket
import time
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np

from .errors import FlowError
from .flow import Flow

__all__ = ["request_path", "http_path", "flow_paths", "stage_hops", "probed", "PLACED_STAGES"]

logger = logging.getLogger("flowkit.profile")


def request_path(client, runs: int, timeout: float = 120.0, gap_s: float = 0.01, *,
                 placed: bool = False) -> tuple[float, ...]:
    """A request's round trip (ms) outside its operators on this cluster — the client's router,
    the transport, the worker's session and executor, and back: a flow of one operator that does
    nothing, deployed on the cluster and run ``runs`` times (after 20 to warm up), ``gap_s``
    apart: a request that finds the threads on its path asleep, as one at a modest rate does,
    pays their wake-ups (back to back, the path looks faster than paced requests find it). The
    planner draws each request's overhead from these (``Overheads.of``). ``placed``: a flow of
    ``PLACED_STAGES`` such operators, one of them batching, each placed as a stage of its own —
    as the worker runs a plan that batches or races (see ``stage_hops``)."""
    from .runtime.deployment import deploy

    probe = Flow("flowkit-request-path", {"x": int})
    rules: Any = False
    if placed:
        probe.map(_nothing, names=["y"]).map(_nothing_batch, names=["z"], batching=True).map(_nothing_z, names=["w"])
        rules = {"fusion": False, "batching": True, "max_wait_ms": 0.5}
    else:
        probe.map(_nothing, names=["y"])
    with deploy(probe, client, optimize=rules, timeout=timeout) as dep:
        return _paced(lambda: dep.run({"x": [0]}, timeout), runs, gap_s)


def http_path(client, runs: int, timeout: float = 120.0, gap_s: float = 0.01) -> tuple[float, ...]:
    """``request_path`` over HTTP: the one-operator probe served by the workers themselves
    (``dep.serve(where="workers")``), each request a POST from this process on one keep-alive
    connection (``TCP_NODELAY``, as HTTP clients set it), ``gap_s`` apart — what a client waits
    beyond the operators when the workers serve the deployment (the planner's path once
    ``dep.serve()`` serves from the workers: ``Overheads.of(profile, http=True)``)."""
    from .runtime.deployment import deploy
    from .runtime.endpoints import serves_at_workers

    probe = Flow("flowkit-http-path", {"x": int})
    probe.map(_nothing, names=["y"])
    with deploy(probe, client, optimize=False, timeout=timeout) as dep:
        if not serves_at_workers("127.0.0.1", dep.workers):
            raise FlowError("the workers do not run on this machine, so its loopback cannot reach their HTTP "
                            "endpoints")
        with dep.serve(where="workers") as server:
            return _http_round_trips(server.url, f"/v1/flows/{dep.name}/predict", runs, timeout, gap_s)


def flow_paths(client, flow: Flow, table, runs: int, timeout: float = 120.0, gap_s: float = 0.01,
               store: Mapping[Any, Any] | None = None) -> tuple[tuple[float, ...], ...]:
    """The flow's own requests, one row of ``table`` each (in turn), ``runs`` times, paced like
    the probes': ``(client_ms, http_ms, at_worker_ms)`` — their round trips from the Python
    client, over HTTP served by the workers (POSTs from this process; () where the workers are
    not on this machine), and those HTTP requests' time in the worker's endpoint (from the
    headers parsed to the answer's bytes). The flow is deployed fused, unbatched and unraced:
    the plan the model predicts with no stage placed on its own, so what these take beyond the
    model's operators and the probe's path is the flow's own cost per request
    (``latency_model.calibrated``). ``store``: the objects its lookups read (``dep.put``)."""
    from .optimize import optimize
    from .runtime.deployment import deploy
    from .runtime.endpoints import serves_at_workers
    from .runtime.http_codec import encode_rows

    if not len(table):
        raise FlowError("the flow's own requests need a sample with at least one row")
    rows = [table[i:i + 1] for i in range(len(table))]
    turn = itertools.count()
    fused = optimize(flow.original, fusion=True, compete=1, batching=False)
    with deploy(fused, client, optimize=False, timeout=timeout) as dep:
        for key, obj in (store or {}).items():
            dep.put(key, obj)
        own = _paced(lambda: dep.run(rows[next(turn) % len(rows)], timeout), runs, gap_s)
        if not serves_at_workers("127.0.0.1", dep.workers):
            return own, (), ()
        # as many over HTTP as fit in 15 s (the workers keep what they served for 30 s)
        runs = max(10, min(runs, int(15_000 / (float(np.mean(own)) + gap_s * 1000)) - 20))
        bodies = [json.dumps(encode_rows(r)) for r in rows]
        with dep.serve(where="workers") as server:
            http_ms = _http_round_trips(server.url, f"/v1/flows/{dep.name}/predict", runs, timeout, gap_s, bodies)
            deadline = time.monotonic() + 10
            while len(dep._finished.by_workers.finished) < len(http_ms) + 20 and time.monotonic() < deadline:
                dep.recent(0.0)   # (asks the workers what they served: their answers arrive later)
                time.sleep(0.05)
        served = sorted(dep._finished.by_workers.finished)[-len(http_ms):]
        return own, http_ms, tuple(s * 1000 for _, s in served)


def _http_round_trips(url: str, path: str, runs: int, timeout: float, gap_s: float,
                      bodies: Sequence[str] = (json.dumps({"rows": [{"x": 0}]}),)) -> tuple[float, ...]:
    """``_paced`` POSTs of ``bodies`` in turn to ``url`` + ``path`` on one keep-alive connection."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    turn = itertools.count()

    def post() -> None:
        conn.request("POST", path, bodies[next(turn) % len(bodies)], {"Content-Type": "application/json"})
        answer = conn.getresponse()
        answer.read()
        if answer.status != 200:
            raise FlowError(f"the HTTP probe was answered {answer.status} {answer.reason}")

    try:
        return _paced(post, runs, gap_s)
    finally:
        conn.close()


def _paced(call: Callable[[], Any], runs: int, gap_s: float, warmup: int = 20) -> tuple[float, ...]:
    """Milliseconds of each of ``runs`` calls, ``gap_s`` apart, after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(runs):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1000)
    return tuple(out)


def probed(what: str, default: str, notes: list, probe) -> tuple[float, ...]:
    """``probe()``'s round trips, or () with a note when it failed: the operators' figures stand
    without them (the model then assumes ``default``)."""
    try:
        return probe()
    except Exception as e:
        logger.warning("profile: the %s was not measured: %s: %s", what, type(e).__name__, e)
        notes.append(f"{what} not measured ({type(e).__name__}: {e}); the model assumes {default}")
        return ()


PLACED_STAGES = 3   # the operators of ``request_path(placed=True)``'s probe


def stage_hops(path_ms: Sequence[float], placed_ms: Sequence[float], stages: int = PLACED_STAGES) -> tuple[float, ...]:
    """What one stage placed on its own costs (ms) — the hops from the worker's event loop to a
    thread and back, the evaluator's bookkeeping — one sample per placed round trip: its excess
    over the one-operator path's median, shared by its ``stages`` stages (never below zero).

    >>> stage_hops([1.0, 1.2, 1.1], [1.7, 2.6, 1.0])
    (0.2, 0.5, 0.0)
    """
    if not path_ms or not placed_ms:
        return ()
    base = float(np.median(path_ms))
    return tuple(round(max(0.0, (p - base) / stages), 9) for p in placed_ms)


def _nothing(row) -> int:
    return row["x"]


def _nothing_batch(table) -> list:
    return [r["y"] for r in table]


def _nothing_z(row) -> int:
    return row["z"]
