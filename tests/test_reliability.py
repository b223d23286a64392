"""The edges a user hits in a first week: shared clients, abandoned and interrupted requests,
slow neighbours, batched qids, hostile operators, failed and closed deployments, typed errors."""

from __future__ import annotations

import _thread
import concurrent.futures
import http.client
import json
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

import flowkit as fk

from .waiting import wait_until

SCHEMA = {"x": int, "s": str}


def _cluster(n: int) -> LocalCluster:
    return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")


@pytest.fixture(scope="module")
def client():
    with _cluster(2) as cluster, Client(cluster) as c:
        yield c


def gated(row) -> int:
    """For ``x < 0``: says it started (its pid, in file ``s + '.started'``), then holds its thread
    until the file ``s`` exists, without ever asking whether it was cancelled. Else ``x`` at once."""
    if row["x"] >= 0:
        return row["x"]
    Path(row["s"] + ".started").write_text(str(os.getpid()))
    while not os.path.exists(row["s"]):
        threading.Event().wait(0.01)
    return row["x"]


def attentive(row) -> int:
    """Says it started, then runs until it is cancelled (writing ``s + '.cancelled'``) or the file
    ``s`` exists."""
    Path(row["s"] + ".started").write_text(str(os.getpid()))
    while not os.path.exists(row["s"]):
        if fk.cancelled():
            Path(row["s"] + ".cancelled").write_text("yes")
            return -1
        threading.Event().wait(0.01)
    return row["x"]


def started(gate: Path) -> int:
    """Wait until the gated operator behind ``gate`` runs; its worker's pid."""
    marker = Path(str(gate) + ".started")
    wait_until(marker.exists, f"{marker.name} to be written")
    return int(marker.read_text())


def one(x: int, s: str = "") -> dict:
    return {"x": [x], "s": [s]}


def _flow(name: str, fn=gated) -> fk.Flow:
    flow = fk.Flow(name, SCHEMA)
    flow.map(fn, names=["y"])
    return flow


# -- item 1: several deployments on one client ------------------------------------------------
def test_deployments_sharing_a_client_each_follow_their_workers_through_scaling_restart_and_close():
    with _cluster(1) as cluster, Client(cluster) as c:
        deps = [fk.deploy(_flow(f"shared{i}"), cluster=c) for i in range(3)]
        try:
            def all_follow(what: str) -> None:
                c.wait_for_workers(len(cluster.workers), timeout=120)
                for i, dep in enumerate(deps):
                    if dep._closed:
                        continue
                    workers = lambda: set(c.scheduler_info()["workers"])
                    wait_until(lambda: set(dep.workers) == workers(), f"deployment {i} to follow the workers {what}")
                    assert dep.run(one(i), timeout=60).column("y") == [i]

            cluster.scale(2)
            all_follow("after scaling up")
            c.restart()
            all_follow("after a restart")
            deps[0].close()   # closing one leaves the others listening
            cluster.scale(3)
            all_follow("after closing one and scaling up")
            c.restart()
            all_follow("after closing one and a restart")
        finally:
            for dep in deps:
                dep.close()


# -- item 2: an abandoned request's worker is busy until its thread is free --------------------
def test_an_abandoned_request_keeps_its_worker_busy_until_its_thread_is_free(client, tmp_path):
    """The abandoned request's function never looks at cancellation, so it holds its worker's
    one thread: new requests go to the other worker, not behind it."""
    gate = tmp_path / "gate"
    with fk.deploy(_flow("abandon"), cluster=client) as dep:
        wait_until(lambda: len(dep.workers) == 2, "both workers to connect")
        fut = dep.submit(one(-1, str(gate)))
        started(gate)
        assert fut.cancel()
        for i in range(6):
            assert dep.run(one(i), timeout=60).column("y") == [i]
        assert dep._router.inflight() == 1   # the abandoned one, still holding its thread
        gate.write_text("open")
        wait_until(lambda: dep._router.inflight() == 0, "the worker to say the abandoned request's thread is free")


def test_a_burst_of_requests_is_spread_over_the_workers(client, tmp_path):
    """Requests routed in one pass of the router's loop each see the ones routed before them:
    four sent at once onto two single-threaded workers start on both."""
    with fk.deploy(_flow("burst"), cluster=client) as dep:
        wait_until(lambda: len(dep.workers) == 2, "both workers to connect")
        gates = [tmp_path / f"gate{i}" for i in range(4)]
        futures = [dep.submit(one(-1, str(g))) for g in gates]
        try:
            pids = lambda: {Path(str(g) + ".started").read_text() for g in gates if Path(str(g) + ".started").exists()}
            wait_until(lambda: len(pids()) == 2, "requests to run on both workers")
        finally:
            for g in gates:
                g.write_text("open")
        assert [f.result(60).column("y") for f in futures] == [[-1]] * 4


def _post(conn, body: dict) -> tuple[int, dict]:
    conn.request("POST", "/v1/flows/http-abandon/predict", json.dumps(body).encode(), {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_a_busy_worker_is_stuck_only_when_its_oldest_work_overstays():
    """A worker serving HTTP sends a request on only while stuck: every thread busy and the
    oldest work there well past how long work there usually takes a row (a hop costs more than
    a short wait for a thread, or a place in the next batch); a batch may take as long per row."""
    from flowkit.runtime.executor import STUCK, STUCK_FLOOR_S, stuck

    now, typical = 100.0, 0.010
    assert not stuck((), 1, typical, now)                                             # idle
    assert not stuck(((now - 1.0, 1),), 2, typical, now)                             # a thread free
    assert not stuck(((now - 0.5 * STUCK * typical, 1),) * 3, 1, typical, now)        # busy, queued: not stuck
    assert stuck(((now - 0.001, 1), (now - 2 * STUCK * typical, 1)), 1, typical, now)  # the oldest overstays
    assert stuck(((now - 1.0, 1), (now - 1.0, 1)), 2, typical, now)
    assert not stuck(((now - 2 * STUCK * typical, 4),), 1, typical, now)              # a batch of 4 rows: not yet
    assert stuck(((now - 5 * STUCK * typical, 4),), 1, typical, now)
    # before any work has finished (typical 0), the floor decides
    assert not stuck(((now - STUCK_FLOOR_S / 2, 1),), 1, 0.0, now)
    assert stuck(((now - 2 * STUCK_FLOOR_S, 1),), 1, 0.0, now)


def test_one_abandoned_request_does_not_make_its_worker_slow_to_call_itself_stuck():
    """How long work usually takes moves with each finished piece, but one that overstayed (an
    abandoned request finishing after minutes) counts only as the limit it passed."""
    from flowkit.runtime.executor import STUCK, usual_time

    typical = 0.010
    for _ in range(100):
        typical = usual_time(typical, 0.010)
    after = usual_time(typical, 300.0)
    assert typical < after <= typical + 0.05 * STUCK * typical
    slower = typical
    for _ in range(200):   # work that really takes ten times as long: the average follows
        slower = usual_time(slower, 0.100)
    assert 0.09 < slower <= 0.100


@pytest.mark.parametrize("where", ["workers", "client"])
def test_requests_after_one_that_timed_out_over_http_are_answered(client, tmp_path, where):
    """A 504 abandons its request, whose function keeps its worker's one thread: the requests
    after it on the same connection are still answered (by the other worker) — served by the
    workers, the one holding the connection sends them on while its thread is stuck."""
    gate = tmp_path / "gate"
    with fk.deploy(_flow("http-abandon"), cluster=client) as dep, dep.serve(where=where, timeout=3) as server:
        wait_until(lambda: len(dep.workers) == 2, "both workers to connect")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            assert _post(conn, {"rows": [{"x": -1, "s": str(gate)}]})[0] == 504
            for i in range(4):
                status, body = _post(conn, {"rows": [{"x": i, "s": ""}]})
                assert (status, body["rows"][0]["y"]) == (200, i)
        finally:
            gate.write_text("open")
            conn.close()


def test_interrupting_dep_run_abandons_its_request(client, tmp_path):
    """Ctrl-C during ``dep.run`` cancels the request, as a timeout does."""
    gate = tmp_path / "gate"
    with fk.deploy(_flow("interrupt", attentive), cluster=client) as dep:
        threading.Thread(target=lambda: (started(gate), _thread.interrupt_main()), daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            dep.run(one(1, str(gate)), timeout=120)
        wait_until(Path(str(gate) + ".cancelled").exists, "the interrupted request to be cancelled on its worker")
        (tmp_path / "open").write_text("")
        assert dep.run(one(2, str(tmp_path / "open")), timeout=60).column("y") == [2]


# -- item 3: no user code on the worker's event loop ------------------------------------------
def test_a_slow_request_of_one_flow_never_holds_up_another_flow_on_its_worker(tmp_path):
    """Flow A is fast for a long time (a plan that once ran on the worker's event loop when it
    was reliably fast), then one of its requests blocks: flow B, on the same single worker, is
    still answered."""
    gate = tmp_path / "gate"
    with _cluster(1) as cluster, Client(cluster) as c, \
            fk.deploy(_flow("fast-then-slow"), cluster=c) as a, fk.deploy(_flow("neighbour"), cluster=c) as b:
        for i in range(200):
            a.run(one(i), timeout=60)
        blocked = a.submit(one(-1, str(gate)))
        started(gate)
        assert b.run(one(7), timeout=60).column("y") == [7]
        assert not blocked.done()
        gate.write_text("open")
        assert blocked.result(60).column("y") == [-1]


# -- item 4: qids are ints in batched stages too ----------------------------------------------
def _qids_seen(table) -> list:
    return [(r.qid, type(r.qid).__name__) for r in table]


def _fails_on_seven(table) -> list:
    for r in table:
        if r["x"] == 7:
            raise ValueError("seven")
    return [r["x"] for r in table]


def test_a_batched_stage_sees_each_rows_own_int_qid(client):
    flow = fk.Flow("batched-qids", SCHEMA)
    flow.map(_qids_seen, names=["seen"], batching=True, max_batch=64, max_wait_ms=50)
    rows = {"x": [10, 11, 12], "s": ["a", "b", "c"]}
    with fk.deploy(flow, cluster=client) as dep:
        futures = [dep.submit(rows) for _ in range(8)]
        for f in futures:
            out = f.result(60)
            assert out.qids == [0, 1, 2]
            assert out.column("seen") == [(0, "int"), (1, "int"), (2, "int")]
        assert flow.run(rows).column("seen") == out.column("seen")
        assert sum(dep.stats().loc["_qids_seen", "batch_sizes"].values()) >= 1

    failing = fk.Flow("batched-error", SCHEMA)
    failing.map(_fails_on_seven, names=["y"], batching=True)
    with fk.deploy(failing, cluster=client) as dep:
        with pytest.raises(fk.OperatorError) as e:
            dep.run({"x": [5, 7], "s": ["a", "b"]}, timeout=60)
        assert e.value.qid == 0 and type(e.value.qid) is int and e.value.operator == "_fails_on_seven"


def _keep_positive(row) -> bool:
    return row["x"] > 0


def _double_all(table) -> list:
    return [2 * x for x in table.column("x")]


def test_a_fused_batching_stage_keeps_each_requests_rows_apart(client):
    """Row-wise members of a batching stage run per request: a filter drops one request's rows
    only, and every request gets back exactly its own rows and qids."""
    flow = fk.Flow("batched-fused", SCHEMA)
    flow.filter(_keep_positive).map(_double_all, names=["y"], batching=True, max_wait_ms=50)
    inputs = [{"x": [i, -i, i + 1], "s": ["a", "b", "c"]} for i in range(1, 7)]
    with fk.deploy(flow, cluster=client) as dep:
        futures = [dep.submit(x) for x in inputs]
        for x, f in zip(inputs, futures):
            assert f.result(60) == flow.run(x)


# -- items 5 and 9: every failure of user code is the operator's --------------------------------
def _exits(row) -> int:
    raise SystemExit(3)


def _interrupts(row) -> int:
    raise KeyboardInterrupt


def _array_predicate(row):
    return np.array([row["x"], 1])


@pytest.mark.parametrize("build, operator, cause", [
    (lambda f: f.map(_exits, names=["y"]), "_exits", SystemExit),
    (lambda f: f.map(_interrupts, names=["y"]), "_interrupts", KeyboardInterrupt),
    (lambda f: f.filter(_array_predicate), "_array_predicate", ValueError),
])
def test_any_failure_of_user_code_is_an_operator_error_naming_it(client, build, operator, cause):
    flow = fk.Flow(f"hostile-{operator.strip('_')}", SCHEMA)
    build(flow)
    with pytest.raises(fk.OperatorError) as local:
        flow.run(one(4))
    assert (local.value.operator, local.value.qid, type(local.value.original)) == (operator, 0, cause)
    with fk.deploy(flow, cluster=client) as dep:
        for _ in range(2):   # and the deployment keeps serving
            with pytest.raises(fk.OperatorError) as deployed:
                dep.run(one(4), timeout=60)
            assert (deployed.value.operator, deployed.value.qid, type(deployed.value.original)) == (operator, 0, cause)


# -- item 7: a failed deploy cleans up ----------------------------------------------------------
def test_a_plan_the_workers_cannot_load_fails_naming_operator_and_module_and_leaves_nothing(client, tmp_path):
    (tmp_path / "only_here.py").write_text("def triple(x):\n    return 3 * x\n")
    sys.path.insert(0, str(tmp_path))   # importable here, not on the (already started) workers
    try:
        import only_here

        def needs_module(row) -> int:
            return only_here.triple(row["x"])

        flow = fk.Flow("unloadable", SCHEMA)
        flow.map(needs_module, names=["y"])
        with pytest.raises(fk.FlowError) as e:
            fk.deploy(flow, cluster=client, timeout=30)
        assert "'needs_module'" in str(e.value) and "'only_here'" in str(e.value)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("only_here", None)
    plugins = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
    assert not [p for p in plugins if str(p).startswith("flowkit-")]
    with fk.deploy(_flow("after-failure"), cluster=client) as dep:   # the cluster is fine
        assert dep.run(one(5), timeout=60).column("y") == [5]


# -- item 8: a closed deployment says so at once ------------------------------------------------
def test_every_use_of_a_closed_deployment_fails_at_once_saying_it_is_closed(client):
    dep = fk.deploy(_flow("closing"), cluster=client)
    dep.close()
    assert repr(dep) == "<Deployment 'closing' (closed)>"
    for call in (dep.stats, dep.dashboard, dep.serve, lambda: dep.submit(one(1)), lambda: dep.run(one(1)),
                 lambda: dep.map([one(1)]), lambda: dep.put("k", 1), dep.adapt):
        with pytest.raises(fk.DeploymentClosed):
            call()
    dep.close()   # closing again is harmless


# -- typed errors -------------------------------------------------------------------------------
def test_a_request_in_flight_when_its_deployment_closes_fails_with_deployment_closed(client, tmp_path):
    gate = tmp_path / "gate"
    dep = fk.deploy(_flow("closed-under"), cluster=client)
    try:
        fut = dep.submit(one(-1, str(gate)))
        started(gate)
    finally:
        dep.close()
        gate.write_text("open")
    with pytest.raises(fk.DeploymentClosed):
        fut.result(60)


def test_a_request_whose_worker_dies_more_often_than_retries_fails_with_worker_lost(tmp_path):
    gate = tmp_path / "gate"
    with _cluster(1) as cluster, Client(cluster) as c, fk.deploy(_flow("lost"), cluster=c, retries=0) as dep:
        fut = dep.submit(one(-1, str(gate)))
        os.kill(started(gate), signal.SIGKILL)
        with pytest.raises(fk.WorkerLost):
            fut.result(60)


def test_a_request_no_worker_takes_fails_with_no_workers():
    with _cluster(1) as cluster, Client(cluster) as c, fk.deploy(_flow("none"), cluster=c, timeout=1) as dep:
        cluster.scale(0)
        wait_until(lambda: not dep.workers, "the worker to leave")
        with pytest.raises(fk.NoWorkers):
            dep.run(one(1), timeout=60)


# -- item 14: deploy returns with the workers it was asked for -----------------------------------
def test_the_embedded_cluster_returns_with_every_worker_asked_for():
    with fk.deploy(_flow("two"), n_workers=2) as dep:
        assert len(dep.workers) == 2


# -- a cancel racing with its answer ------------------------------------------------------------
class _CancelledAsChecked(concurrent.futures.Future):
    """A request's future that its caller cancels just after the router looked at it."""

    def done(self):
        return False


def test_an_answer_arriving_as_its_request_is_cancelled_is_dropped_quietly():
    """The caller's thread may cancel a request between the router's check and its setting of
    the answer: the answer is dropped (the cancellation accounts for the request), and the
    session reading it lives on (an exception there dropped a healthy worker's session)."""
    from flowkit.runtime import protocol
    from flowkit.runtime.router import Request, Router
    from flowkit.runtime.wire import dumps

    done = []
    router = Router("test", on_done=lambda req, ok: done.append(ok))
    try:
        for answer in (protocol.Answer(1, True, payload=dumps(7)), protocol.Answer(1, False, error=dumps(ValueError()))):
            fut = _CancelledAsChecked()
            fut.cancel()
            router._resolve(Request("run", None, fut, id=1), answer)   # raises nothing
        assert done == []
    finally:
        router.close()
