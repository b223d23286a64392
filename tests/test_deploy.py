"""The dask runtime: the conformance suite on a deployment, clusters, faults, limits, errors."""

from __future__ import annotations

import concurrent.futures
import gc
import os
import signal
import sys
import textwrap
import time

import pytest
from distributed import Client

import flowkit as fk

from .conformance import CASES, SCHEMA, XS, rows
from .operators import ended, has_started, held, open_gate, patient, started
from .waiting import wait_until


@pytest.mark.parametrize("case", sorted(CASES))
def test_conformance_on_a_deployment(client, case):
    flow, data, store, expected = CASES[case]()
    with fk.deploy(flow, cluster=client, optimize=False) as dep:
        for key, obj in (store or {}).items():
            dep.put(key, obj)
        assert rows(dep.run(data, timeout=30)) == expected
        assert rows(dep.submit(data).result(30)) == expected


@pytest.mark.parametrize("rules", [True, {"whole": True}, {"fusion": False, "compete": 2}])
def test_optimized_deployments_match_the_reference(client, rules):
    flow, data, store, expected = CASES["pipeline"]()
    with fk.deploy(flow, cluster=client, optimize=rules) as dep:
        assert rows(dep.run(data, timeout=30)) == expected


def test_the_embedded_default_cluster_is_adaptive_and_closed_with_the_deployment():
    flow, data, _, expected = CASES["row_map"]()
    dep = fk.deploy(flow)
    try:
        assert "dashboard: http://" in repr(dep)
        assert rows(dep.run(data)) == expected
        cluster = dep.cluster
        assert cluster is not None and cluster._adaptive is dep.adaptive is not None
        assert dep.adaptive.minimum == 1 and dep.adaptive.maximum == (os.cpu_count() or 1)
        # flowkit owns these workers: tuned for serving, their heap frozen (see plugin.freeze_heap)
        assert all(n > 0 for n in dep.client.run(gc.get_freeze_count).values())
        # ... and on uvloop's event loop, as uvicorn serves where uvloop is installed
        assert set(dep.client.run(_event_loop_module).values()) == {"uvloop"}
        # ... without dask's statistical profiler sampling stacks on that loop every 10 ms (serving_settings)
        assert set(dep.client.run(_profiling).values()) == {False}
        # ... and with dask's housekeeping on that loop less often (serving_settings)
        for intervals in dep.client.run(_housekeeping_ms).values():
            assert intervals["tick"] == 1000 and intervals["monitor"] == 10000
            assert intervals.get("memory_monitor", 1000) == 1000
        # ... and with heartbeats to the scheduler every 5 s (plugin.HEARTBEAT_S) rather than 0.5 s
        assert set(dep.client.run(_heartbeat_ms).values()) == {5000}
    finally:
        dep.close()
    assert dep.client.status == "closed" and cluster.status.name == "closed"


def _profiling(dask_worker) -> bool:
    """Whether dask's statistical profiler runs on this worker (its periodic sampling)."""
    import dask

    return bool(dask.config.get("distributed.worker.profile.enabled")) or "profile" in dask_worker.periodic_callbacks


def _housekeeping_ms(dask_worker) -> dict:
    """The intervals (ms) of dask's periodic housekeeping on this worker's loop."""
    return {name: pc.callback_time for name, pc in dask_worker.periodic_callbacks.items()
            if name in ("tick", "monitor", "memory_monitor")}


def _heartbeat_ms(dask_worker) -> float | None:
    from flowkit.runtime import compat

    return compat.heartbeat_ms(dask_worker)


def _event_loop_module() -> str:
    """The top-level module of the running event loop's class (``client.run`` calls it on a
    worker's loop)."""
    import asyncio

    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_workers_of_a_cluster_flowkit_did_not_start_are_tuned_only_when_asked(make_cluster):
    flow, data, _, expected = CASES["row_map"]()
    client = make_cluster(n_workers=1)
    with fk.deploy(flow, cluster=client) as dep:
        assert rows(dep.run(data)) == expected
        assert list(client.run(gc.get_freeze_count).values()) == [0]
        assert all(ms < 5000 for ms in client.run(_heartbeat_ms).values())
    with fk.deploy(flow, cluster=client, tune_workers=True) as dep:
        assert rows(dep.run(data)) == expected
        assert all(n > 0 for n in client.run(gc.get_freeze_count).values())
        assert list(client.run(_heartbeat_ms).values()) == [5000]
        with fk.deploy(flow, cluster=client, tune_workers=True) as second:
            assert rows(second.run(data)) == expected
        # a tuned deployment that leaves thaws the heap (its objects can be collected), and the
        # worker freezes again for the one still there
        assert all(n > 0 for n in client.run(gc.get_freeze_count).values())
    wait_until(lambda: list(client.run(gc.get_freeze_count).values()) == [0], "the worker's heap thawed")
    # ... and heartbeats as the scheduler asks again (from its answer to the next one)
    wait_until(lambda: all(ms < 5000 for ms in client.run(_heartbeat_ms).values()),
               "the worker's heartbeat to be the scheduler's again")


def test_close_releases_only_what_the_deployment_started(client):
    flow, data, _, expected = CASES["row_map"]()
    with fk.deploy(flow, cluster=client) as dep:
        dep.put("k", 1)
        with pytest.raises(fk.FlowError, match="a key must be hashable .*not list"):
            dep.put(["k"], 1)
        assert any("flowkit-" in name for name in client.run_on_scheduler(
            lambda dask_scheduler: list(dask_scheduler.worker_plugins)))
    with pytest.raises(fk.FlowError, match="is closed"):
        dep.put("k", 2)
    assert client.status == "running"
    plugins = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
    assert not any(name.startswith("flowkit-" + dep.id) for name in plugins)
    assert rows(fk.deploy(flow, cluster=client).run(data)) == expected


def test_stats_report_every_stage_with_latency_and_worker(client):
    flow = fk.Flow("stats", SCHEMA)
    flow.map(lambda r: r["x"], names=["y"]).filter(lambda r: r["y"] > 1)
    with fk.deploy(flow, cluster=client, optimize=False) as dep:
        for _ in range(5):
            dep.run(XS)
        df = dep.stats()
    assert list(df["stage"]) == ["(end to end)", "lambda#1", "lambda#2"]
    assert {"requests", "errors", "p50_ms", "p99_ms", "workers"} <= set(df.columns)
    assert (df["requests"] == 5).all() and (df["errors"] == 0).all()
    assert (df["p50_ms"] > 0).all() and (df["p99_ms"] >= df["p50_ms"]).all()
    assert df.loc["lambda#1", "workers"].startswith("tcp://")


def test_a_users_anyof_counts_its_requests_and_which_branch_won(client):
    flow, x, _, expected = CASES["anyof"]()
    with fk.deploy(flow, cluster=client, optimize=False) as dep:
        for _ in range(3):
            assert [(r.qid, r.as_dict()) for r in dep.run(x, timeout=30)] == expected
        df = dep.stats()
    assert df.loc["anyof", "requests"] == 3 and df.loc["anyof", "errors"] == 0
    assert df.loc["anyof", "wins fast_label"] == 3


def test_serving_leaves_no_garbage_cycles_behind(client):
    """Each request used to leave a reference cycle (its future held it in a callback): 16,789
    objects for 600 requests, freed only by the garbage collector, whose pauses stalled serving
    (p99 60-90 ms instead of 5-10 at 200 req/s)."""
    import gc
    import http.client
    import json

    flow, _, _, _ = CASES["row_map"]()
    with fk.deploy(flow, cluster=client) as dep, dep.serve() as server:
        for i in range(20):
            dep.run({"x": [i], "s": ["a"]})
        gc.collect()
        gc.disable()
        try:
            for i in range(200):
                dep.run({"x": [i], "s": ["a"]})
                dep.submit({"x": [i], "s": ["a"]}).result(30)
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            for i in range(200):
                conn.request("POST", f"/v1/flows/{flow.name}/predict", json.dumps({"x": i, "s": "a"}))
                assert conn.getresponse().read()
            conn.close()
            garbage = gc.collect()
        finally:
            gc.enable()
    assert garbage < 100, garbage


def test_a_user_exception_fails_only_its_request(client):
    def explode(row) -> int:
        if row["x"] == 3:
            raise ValueError("bad row")
        return row["x"]

    flow = fk.Flow("errors", SCHEMA)
    flow.map(explode, names=["y"])
    with fk.deploy(flow, cluster=client) as dep:
        with pytest.raises(fk.OperatorError, match="'explode' raised ValueError: bad row on row qid=2") as e:
            dep.run(XS, timeout=30)
        assert e.value.operator == "explode" and e.value.qid == 2 and isinstance(e.value.original, ValueError)
        assert dep.run({"x": [1], "s": ["a"]}).column("y") == [1]
        assert dep.stats().loc["explode", "errors"] == 1


def test_schema_errors_are_raised_at_submit_before_any_work(client):
    flow, _, _, _ = CASES["row_map"]()
    with fk.deploy(flow, cluster=client) as dep:
        with pytest.raises(fk.SchemaError, match="column 'x' expects int, found str"):
            dep.submit({"x": ["1"], "s": ["a"]})
        with pytest.raises(fk.SchemaError, match="unexpected column 'z'"):
            dep.submit([{"z": 1}])
        assert dep.stats()["requests"].sum() == 0


def test_result_times_out_cleanly_and_the_request_still_completes(client, tmp_path):
    gate = str(tmp_path / "gate")   # the request cannot finish before it opens
    flow = fk.Flow("slow", SCHEMA)
    flow.map(held, names=["y"])
    with fk.deploy(flow, cluster=client) as dep:
        fut = dep.submit({"x": [1], "s": [gate]})
        try:
            with pytest.raises(concurrent.futures.TimeoutError):
                fut.result(timeout=0.01)
            assert not fut.done()
        finally:
            open_gate(gate)
        assert fut.result(timeout=30).column("y") == [2]


def test_the_load_is_sampled_while_requests_run_and_an_idle_router_waits_for_the_next(client, tmp_path):
    """The autoscaler's measure (``Router.mean_inflight``) samples the requests in flight every
    20 ms; after a whole window with none, the sampler waits for a request instead of waking."""
    gate = str(tmp_path / "gate")
    flow = fk.Flow("sampled", SCHEMA)
    flow.map(held, names=["y"])
    with fk.deploy(flow, cluster=client) as dep:
        router = dep._router
        wait_until(lambda: not router.load.sampling, "the sampler to wait, nothing having been in flight")
        assert router.mean_inflight() == 0 and not router.load._work.is_set()
        futs = [dep.submit({"x": [i], "s": [gate]}) for i in range(2)]
        try:
            wait_until(lambda: router.load.sampling and router.mean_inflight() > 1, "2 requests in flight to be sampled")
        finally:
            open_gate(gate)
        assert [f.result(timeout=30).column("y") for f in futs] == [[0], [2]]
        wait_until(lambda: not router.load.sampling, "the sampler to wait again, a window after the last request")
        assert set(n for _, n in router.load.samples) == {0} and router.mean_inflight() == 0


@pytest.mark.parametrize("raced", [False, True])
def test_cancelling_a_request_stops_its_work_on_the_worker(client, tmp_path, raced):
    """``future.cancel()`` and ``dep.run``'s timeout abandon a request: its worker stops it (also
    every racing replica) and it stops counting against ``max_inflight``."""
    flow = fk.Flow("cancel", SCHEMA)
    flow.map(patient, names=["y"], high_variance=raced)
    with fk.deploy(flow, cluster=client, max_inflight=1, optimize={"compete": 2 if raced else 1}) as dep:
        first = tmp_path / "first"
        fut = dep.submit({"x": [1], "s": [str(first)]})
        started(first)   # running on its worker
        assert fut.cancel() and fut.cancelled()
        assert ended(first) == "cancelled"
        second = tmp_path / "second"
        with pytest.raises(TimeoutError):   # admitted: the cancelled one is no longer in flight
            dep.run({"x": [2], "s": [str(second)]}, timeout=0.3)
        assert ended(second) == "cancelled"
        stats = dep.stats()
    assert stats.loc["(end to end)", "cancelled"] == 2
    assert stats.filter(like="patient", axis=0)["cancelled"].sum() >= 2


def test_a_map_that_fails_abandons_the_inputs_still_in_flight(client, tmp_path):
    flow = fk.Flow("map-abandon", SCHEMA)
    flow.map(patient, names=["y"])
    paths = [tmp_path / f"input{i}" for i in range(3)]
    with fk.deploy(flow, cluster=client) as dep:
        with pytest.raises(TimeoutError):
            dep.map([{"x": [i], "s": [str(p)]} for i, p in enumerate(paths)], timeout=0.3, progress=False)
        wait_until(lambda: dep.stats().loc["(end to end)", "cancelled"] == 3, "the 3 inputs to count as cancelled",
                   interval=0.05)
        wait_until(lambda: dep._router.inflight() == 0, "the workers' threads to be free (what ran has stopped)")
    # those that had started stopped; one still queued behind them never started
    ran = [ended(p) for p in paths if has_started(p)]
    assert ran and set(ran) == {"cancelled"}


def test_admission_control_sheds_load_beyond_max_inflight(client, tmp_path):
    gate = str(tmp_path / "gate")   # the 3 requests stay in flight until it opens
    flow = fk.Flow("overload", SCHEMA)
    flow.map(held, names=["y"])
    with fk.deploy(flow, cluster=client, max_inflight=3) as dep:
        try:
            futs = [dep.submit({"x": [i], "s": [gate]}) for i in range(3)]
            with pytest.raises(fk.Overloaded, match="max_inflight=3"):
                dep.submit({"x": [9], "s": [gate]})
        finally:
            open_gate(gate)
        assert [f.result(30).column("y") for f in futs] == [[0], [2], [4]]
        assert dep.run({"x": [5], "s": [gate]}, timeout=30).column("y") == [10]


def test_map_scores_many_inputs_in_order(client, capsys):
    flow, _, _, _ = CASES["row_map"]()
    with fk.deploy(flow, cluster=client, max_inflight=8) as dep:
        out = dep.map([{"x": [i], "s": ["a"]} for i in range(40)])
    assert [t.column("y") for t in out] == [[2 * i] for i in range(40)]
    assert "40/40" in capsys.readouterr().err


def fails_on_three(row) -> int:
    if row["x"] == 3:
        raise ValueError("three is not allowed")
    return row["x"]


def test_map_says_which_input_failed_or_returns_the_errors_in_place(client, capsys):
    flow = fk.Flow("map-errors", SCHEMA)
    flow.map(fails_on_three, names=["y"])
    inputs = [{"x": [i], "s": ["a"]} for i in range(6)] + [{"x": ["seven"], "s": ["a"]}]
    with fk.deploy(flow, cluster=client, max_inflight=4) as dep:
        with pytest.raises(fk.OperatorError, match="three is not allowed") as info:
            dep.map(inputs)
        assert "dep.map: input 3 of 7 failed" in info.value.__notes__
        assert "3/7" in capsys.readouterr().err   # the bar stops where it failed, not at 7/7
        out = dep.map(inputs, return_exceptions=True, progress=False)
    assert [t.column("y") for t in out[:3]] + [t.column("y") for t in out[4:6]] == [[0], [1], [2], [4], [5]]
    assert isinstance(out[3], fk.OperatorError) and isinstance(out[6], fk.SchemaError)
    assert "'x'" in str(out[6])   # refused before it ran, naming the column


@pytest.mark.parametrize("options, words", [
    ({"max_inflight": 0}, "max_inflight must be a whole number >= 1"),
    ({"retries": -1}, "retries must be a whole number >= 0"),
    ({"timeout": 0}, "timeout must be a number of seconds > 0"),
    ({"cluster": "not-an-address"}, "'not-an-address' is not a scheduler address"),
    ({"cluster": "tcp://127.0.0.1:9", "timeout": 1}, "no dask scheduler answered at 'tcp://127.0.0.1:9' within 1 s"),
])
def test_bad_deployment_settings_fail_at_once_saying_what_is_wrong(options, words, monkeypatch):
    import distributed

    flow, _, _, _ = CASES["row_map"]()
    clusters = []

    def no_cluster(*args, **kwargs):
        clusters.append(kwargs)
        raise RuntimeError("fk.deploy started an embedded cluster")

    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    with pytest.raises(fk.FlowError, match=words):   # (an unanswered address: its own timeout, not 30 s)
        fk.deploy(flow, **options)
    assert clusters == []   # refused before any embedded cluster was started


def test_what_cannot_travel_between_processes_is_named(client):
    import threading

    lock = threading.Lock()
    closure = fk.Flow("closure", SCHEMA)
    closure.map(lambda r: (lock, r["x"])[1], names=["y"])
    with pytest.raises(fk.FlowError, match="operator 'lambda#1' cannot be sent to the workers: TypeError: cannot "
                                           "pickle '_thread.lock'.*inside it, or in a class operator's __init__"):
        fk.deploy(closure, cluster=client)
    result = fk.Flow("result", SCHEMA)
    result.map(lambda r: threading.Lock() if r["x"] == 2 else None, names=["y"])
    with fk.deploy(result, cluster=client) as dep:
        with pytest.raises(fk.FlowError, match="column 'y' of the result holds a lock, which cannot be sent back"):
            dep.run(XS, timeout=30)
        assert dep.run({"x": [1], "s": ["a"]}, timeout=30).column("y") == [None]   # serving on


def test_class_operators_are_instantiated_once_per_worker_before_any_request(client, tmp_path):
    log = tmp_path / "inits.log"
    module = tmp_path / "flowkit_test_models.py"
    module.write_text(textwrap.dedent(f"""
        import os
        class Model:
            def __init__(self):
                with open({str(log)!r}, "a") as f:
                    f.write(str(os.getpid()) + "\\n")
            def __call__(self, row) -> int:
                return row["x"] + 1
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import flowkit_test_models
    finally:
        sys.path.remove(str(tmp_path))
    flow = fk.Flow("models", SCHEMA)
    flow.map(flowkit_test_models.Model, names=["y"])
    with fk.deploy(flow, cluster=client) as dep:
        loaded = log.read_text().split()    # deploy() returned: every worker's model is loaded
        assert sorted(loaded) == sorted(str(p) for p in client.run(os.getpid).values())
        futs = [dep.submit({"x": [i], "s": ["a"]}) for i in range(40)]
        assert [f.result(30).column("y") for f in futs] == [[i + 1] for i in range(40)]
    pids = log.read_text().split()
    assert pids == loaded                   # and never again
    del sys.modules["flowkit_test_models"]


def test_a_worker_killed_under_load_loses_no_request(client):
    def work(row) -> int:
        time.sleep(0.01)
        return row["x"] * 2

    flow = fk.Flow("faults", SCHEMA)
    flow.map(work, names=["y"])
    client.wait_for_workers(2, timeout=60)
    with fk.deploy(flow, cluster=client) as dep:
        _connected_to_both_workers(dep)
        pids = client.run(os.getpid)
        futs = [dep.submit({"x": [i], "s": ["a"]}) for i in range(150)]
        wait_until(lambda: sum(f.done() for f in futs) >= 20, "the load to be under way (20 answers)")
        victim = _worker_with_requests(dep, finished=lambda: all(f.done() for f in futs))
        os.kill(pids[victim or next(iter(pids))], signal.SIGKILL)
        futs += [dep.submit({"x": [i], "s": ["a"]}) for i in range(150, 200)]
        results = []
        for f in futs:
            try:
                results.append(f.result(timeout=120).column("y")[0])
            except fk.FlowError as e:  # a clear error is allowed; a hang is not
                results.append(e)
        assert sum(isinstance(r, int) for r in results) >= 195
        assert [r for r in results if isinstance(r, int)] == [2 * i for i, r in enumerate(results) if isinstance(r, int)]
    client.wait_for_workers(2, timeout=60)


def napping(row) -> int:
    end = time.perf_counter() + (row["x"] % 10) / 1000
    while time.perf_counter() < end and not fk.cancelled():
        time.sleep(0.001)
    return row["x"] * 2


@pytest.mark.parametrize("compete", [1, 2])
def test_cancellations_from_many_threads_and_a_killed_worker_lose_and_leak_nothing(client, compete):
    """Six threads submit, a third of the requests are cancelled at random moments, and a worker
    is killed meanwhile: every request not cancelled gets its own answer, and nothing stays
    counted in flight."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    flow = fk.Flow("churn", SCHEMA)
    flow.map(napping, names=["y"], high_variance=True)
    client.wait_for_workers(2, timeout=60)
    with fk.deploy(flow, cluster=client, optimize={"compete": compete}) as dep:
        _connected_to_both_workers(dep)
        pids = client.run(os.getpid)
        answered = []   # one entry per answer (list.append is atomic)

        def churn(seed):
            rng, answers, cancelled = random.Random(seed), [], 0
            for _ in range(100):
                x = rng.randrange(1000)
                fut = dep.submit({"x": [x], "s": ["a"]})
                if rng.random() < 0.35:
                    time.sleep(rng.random() * 0.004)
                    if fut.cancel():
                        cancelled += 1
                        continue
                try:
                    answers.append((x, fut.result(60).column("y")[0]))
                except fk.FlowError as e:   # lost with the killed worker after retries: said, not hung
                    answers.append((x, e))
                answered.append(x)
            return answers, cancelled

        with ThreadPoolExecutor(6) as pool:
            runs = [pool.submit(churn, seed) for seed in range(6)]
            wait_until(lambda: len(answered) >= 40 or all(r.done() for r in runs), "the churn to be under way")
            victim = _worker_with_requests(dep, finished=lambda: all(r.done() for r in runs))
            os.kill(pids[victim or next(iter(pids))], signal.SIGKILL)
            runs = [r.result() for r in runs]
        answers = [a for run, _ in runs for a in run]
        assert sum(isinstance(y, int) for _, y in answers) >= len(answers) - 6
        assert all(y == 2 * x for x, y in answers if isinstance(y, int))
        wait_until(lambda: not dep._inflight and not dep._router.inflight(),
                   lambda: "every request to leave the in-flight count (an abandoned one once its thread is free): "
                           + _inflight_state(dep))
        assert dep._inflight == 0 and dep._router.inflight() == 0
        assert dep.stats().loc["(end to end)", "cancelled"] == sum(c for _, c in runs) > 0
    client.wait_for_workers(2, timeout=60)


def _inflight_state(dep) -> str:
    """What a deployment still counts in flight, and where (for a failing test's message)."""
    r = dep._router
    sessions = {a: (sorted(s.inflight), sorted(s.abandoned)) for a, s in list(r.sessions.items())}
    draining = [(s.address, sorted(s.inflight), sorted(s.abandoned)) for s in list(r.draining)]
    return f"client count {dep._inflight}; sessions {sessions}; draining {draining}; waiting {len(r.waiting)}"


def _stored_total(row) -> float:
    return float(row["key_value"].sum())


def test_an_object_lost_with_its_worker_is_stored_again(client, caplog):
    """dask cannot recompute scattered data: when the worker holding a stored object dies, the
    deployment stores the object again (it keeps a reference, unless put with restore=False)."""
    import numpy as np

    client.wait_for_workers(2, timeout=60)
    flow = fk.Flow("restore", {"key": str})
    flow.lookup("key", dynamic=True).map(_stored_total, names=["total"])
    with fk.deploy(flow, cluster=client) as dep:
        _connected_to_both_workers(dep)
        for i in range(4):
            dep.put(f"k{i}", np.full(100, float(i)), restore=i != 3)
        holders = {k: ws[0] for k, ws in client.who_has().items() if "flowkit-store" in str(k)}
        victim = holders[next(k for k in holders if "'k3'" in str(k))]
        lost = sorted(k for k, w in holders.items() if w == victim)
        assert len(lost) >= 2   # k3 and at least one kept object
        os.kill(client.run(os.getpid)[victim], signal.SIGKILL)
        restored = set()

        def all_restored() -> bool:
            for i in range(3):   # k0..k2 are kept; whichever of them were lost come back
                try:
                    assert dep.run({"key": [f"k{i}"]}, timeout=30).column("total") == [100.0 * i]
                    restored.update(k for k in lost if f"'k{i}'" in str(k))
                except fk.OperatorError as e:
                    assert "lost with the worker that held it" in str(e)
            return len(restored) == len(lost) - 1

        wait_until(all_restored, "every kept object lost with the worker to be stored again", interval=0.05)
        assert len(restored) == len(lost) - 1   # all lost ones but k3
        with pytest.raises(fk.OperatorError, match="no stored object under key 'k3'"):
            dep.run({"key": ["k3"]}, timeout=30)   # put with restore=False: gone until put again
        dep.put("k3", np.full(100, 3.0))
        assert dep.run({"key": ["k3"]}, timeout=30).column("total") == [300.0]
    client.wait_for_workers(2, timeout=60)


def _connected_to_both_workers(dep) -> None:
    """Wait until the deployment's client has a session to each of the 2 workers."""
    wait_until(lambda: len(dep.workers) == 2, "a session to each of the 2 workers")


def _worker_with_requests(dep, finished, at_least: int = 1, running=lambda address: True) -> str | None:
    """Wait until a worker has ``at_least`` requests of ``dep`` in flight (and ``running(address)``
    holds) and return its address; None if ``finished()`` holds first. (Which worker a burst of
    requests goes to is the router's business: the test picks the worker that has them.)"""
    def busy():
        for address, session in list(dep._router.sessions.items()):
            if len(session.inflight) >= at_least and running(address):
                return (address,)
        return (None,) if finished() else None

    return wait_until(busy, f"a worker with {at_least} request(s) in flight")[0]


def test_the_framed_transport_carries_messages_and_payloads_and_reports_a_closed_peer():
    import asyncio

    from flowkit.runtime import framed

    async def main():
        async def echo(comm):
            while True:
                msg = await comm.read()
                if msg.get("kind") == "close":
                    return
                await comm.write({**msg, "echo": True})

        server, port = await framed.serve("127.0.0.1", echo)
        comm = await framed.connect("127.0.0.1", port)
        big = os.urandom(3 * 2 ** 20)
        sent = [{"id": 1}, {"id": 2, "payload": b"small"}, {"id": 3, "payload": big}, {"id": 4, "payload": b""}]
        got = []
        for msg in sent:
            await comm.write(msg)
            got.append(await comm.read())
        assert got == [{**m, "echo": True} for m in sent]
        assert sent[2]["payload"] is big and "payload" in sent[2]   # the caller's message is left as it was
        await comm.write({"kind": "close"})                         # the server ends the connection
        with pytest.raises(ConnectionError):
            await comm.read()
        assert comm.closed()
        with pytest.raises(ConnectionError):
            await comm.write({"id": 5})
        server.close()

    asyncio.run(main())


@pytest.mark.parametrize("framed", [True, False])
def test_sessions_use_the_framed_transport_on_plain_tcp_and_dask_comm_when_told_not_to(client, monkeypatch, framed):
    monkeypatch.setenv("FLOWKIT_FRAMED", "1" if framed else "0")
    flow, data, _, expected = CASES["row_map"]()
    with fk.deploy(flow, cluster=client) as dep:
        _connected_to_both_workers(dep)
        kinds = {type(s.comm).__name__ for s in dep._router.sessions.values()}
        assert kinds == ({"FramedComm"} if framed else {"TCP"})
        futs = [dep.submit(data) for _ in range(20)]
        assert all(rows(f.result(30)) == expected for f in futs)


def _leave(client, dep, address: str) -> None:
    """Make ``address`` leave the deployment, as the plugin's teardown does on retirement."""
    def leave(dask_worker, deployment=dep.id):
        dask_worker._flowkit[deployment].close()

    client.run(leave, workers=[address])


def test_a_request_routed_to_a_connection_as_it_breaks_is_sent_elsewhere(client):
    """The race behind a lost request: the router picks a worker's session, the connection
    breaks, then the send runs. The request must go to the other worker, not vanish nor be
    sent twice."""
    import asyncio

    from flowkit.runtime.router import Request
    from flowkit.runtime.wire import dumps
    from flowkit.table import as_table

    flow, data, _, expected = CASES["row_map"]()
    with fk.deploy(flow, cluster=client) as dep:
        router = dep._router
        _connected_to_both_workers(dep)

        async def break_then_send():
            session = next(iter(router.sessions.values()))
            fut = concurrent.futures.Future()
            fut.set_running_or_notify_cancel()
            req = Request("run", dumps(as_table(data, flow.plan.source.schema)), fut, id=next(router.ids))
            session.assign(req)              # routed to it (counted there, its send under way) ...
            await router._lost(session)      # ... as the connection breaks
            await router._lost(session)      # and the broken session is reported twice
            return fut, session.address

        fut, broken = asyncio.run_coroutine_threadsafe(break_then_send(), router.loop).result(10)
        assert rows(fut.result(30)) == expected
        assert broken not in router.sessions


def test_requests_reaching_a_worker_that_is_leaving_run_elsewhere(client):
    """A worker leaving the deployment (retired, scaled down, shutting down) answers that it is
    leaving; the router stops routing to it and sends those requests to the other worker."""
    flow, data, _, expected = CASES["row_map"]()
    with fk.deploy(flow, cluster=client) as dep:
        _connected_to_both_workers(dep)
        leaving = dep.workers[0]
        _leave(client, dep, leaving)
        futs = [dep.submit(data) for _ in range(40)]
        assert all(rows(f.result(30)) == expected for f in futs)
        assert leaving not in dep.workers
        assert dep.stats().iloc[1]["workers"] != leaving


def test_requests_queued_on_a_worker_when_it_leaves_run_elsewhere(client, tmp_path):
    gate = str(tmp_path / "gate")   # every request runs (or queues) until it opens
    flow = fk.Flow("leave_queued", SCHEMA)
    flow.map(held, names=["y"])
    with fk.deploy(flow, cluster=client) as dep:
        _connected_to_both_workers(dep)
        pids = client.run(os.getpid)
        try:
            futs = [dep.submit({"x": [i], "s": [gate]}) for i in range(10)]
            # the worker to leave: one running a request, with others queued behind it
            leaving = _worker_with_requests(dep, finished=lambda: False, at_least=2,
                                            running=lambda address: os.path.exists(f"{gate}.{pids[address]}"))
            _leave(client, dep, leaving)
            wait_until(lambda: leaving not in dep._router.sessions,   # its queued requests were turned away ...
                       "the router to stop routing to the leaving worker")
            assert any(s.address == leaving for s in dep._router.draining)
            gc.collect()   # ... and the session's reader still waits for the running request's answer
        finally:
            open_gate(gate)
        assert [f.result(30).column("y")[0] for f in futs] == [2 * i for i in range(10)]
        wait_until(lambda: not dep._router.draining,   # its connection closed once the last answer came
                   "the leaving worker's connection to close once its last answer came")


def _batch_double(table) -> list[int]:
    return [r["x"] * 2 for r in table]


def _batched(client, dep) -> dict:
    """The workers with requests of ``dep`` waiting in their batch queues: {address: how many}."""
    def queued(dask_worker, deployment=dep.id):
        return sum(len(b.queue) for b in dask_worker._flowkit[deployment].batchers.values())

    return {address: n for address, n in client.run(queued).items() if n}


def test_requests_waiting_in_a_batch_queue_when_the_worker_leaves_run_elsewhere(client):
    flow = fk.Flow("leave_batched", SCHEMA)
    flow.map(_batch_double, names=["y"], batching=True, max_batch=64, max_wait_ms=2000)
    with fk.deploy(flow, cluster=client, optimize={"eager_batches": False}) as dep:
        _connected_to_both_workers(dep)
        futs = [dep.submit({"x": [i], "s": ["a"]}) for i in range(10)]   # waiting for their batches
        # the worker to leave: one with requests in its batch queue (unless every batch already ran)
        queued = wait_until(lambda: _batched(client, dep) or any(f.done() for f in futs),
                            "requests to wait in a worker's batch queue", interval=0.05)
        _leave(client, dep, max(queued, key=queued.get) if isinstance(queued, dict) else dep.workers[0])
        assert [f.result(30).column("y")[0] for f in futs] == [2 * i for i in range(10)]


@pytest.mark.slow
def test_a_cluster_started_with_the_dask_command_line_by_address(tmp_path, processes):
    import json

    bin_dir = os.path.dirname(sys.executable)
    sched_file = tmp_path / "scheduler.json"
    env = dict(os.environ, PYTHONPATH="")
    sched = processes.start([os.path.join(bin_dir, "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                             "--dashboard-address", ":0", "--scheduler-file", str(sched_file)], env=env, cwd=tmp_path)

    def written_address():
        try:
            return json.loads(sched_file.read_text()).get("address")
        except (OSError, ValueError):   # not there yet, or half written
            return None

    address = wait_until(written_address, "the dask scheduler to write its address to its file")
    processes.start([os.path.join(bin_dir, "dask"), "worker", "--scheduler-file", str(sched_file),
                     "--nthreads", "1", "--nworkers", "2", "--no-dashboard"], env=env, cwd=tmp_path)
    with Client(address) as c:
        c.wait_for_workers(2, timeout=60)
    for case in ("pipeline", "class_operator", "dynamic_lookup", "anyof"):
        flow, data, store, expected = CASES[case]()
        with fk.deploy(flow, cluster=address) as dep:
            for key, obj in (store or {}).items():
                dep.put(key, obj)
            assert rows(dep.run(data, timeout=60)) == expected

    # Without its scheduler a dask cluster's workers shut down: requests then fail with a
    # clear error once no worker came back within the deployment's timeout; none hangs (a
    # request that hung would raise TimeoutError, which is no FlowError, and fail the test).
    flow, data, _, expected = CASES["row_map"]()
    with fk.deploy(flow, cluster=address, timeout=5) as dep:
        assert rows(dep.run(data, timeout=30)) == expected
        sched.kill()
        sched.wait(30)

        def refused() -> bool:
            try:
                dep.run(data, timeout=30)
            except fk.FlowError:
                return True
            return False

        wait_until(refused, "a request to fail with a FlowError once the workers are gone", interval=0.05)


def test_a_script_without_a_main_guard_is_told_why_its_cluster_did_not_start(tmp_path):
    """The embedded cluster's worker processes import the script again (spawn): without
    ``if __name__ == "__main__":`` they fail to start, and the error says what to change."""
    import subprocess

    script = tmp_path / "serve_it.py"
    script.write_text(textwrap.dedent("""
        import flowkit as fk
        f = fk.Flow("unguarded", {"x": int})
        f.map(lambda r: r["x"], names=["y"])
        fk.deploy(f)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert 'a script must call fk.deploy under `if __name__ == "__main__":`' in done.stderr
