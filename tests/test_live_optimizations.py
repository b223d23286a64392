"""Runtime part 2: competitive execution, dynamic batching, locality and autoscaling observed
on live deployments (through stats() and results), with the reference executor's results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

import flowkit as fk

SCHEMA = {"x": int}


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


def _module(tmp_path, name, source):
    """A user module the workers cannot import (so its functions travel by value)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    sys.path.insert(0, str(tmp_path))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_competitive_replicas_race_on_distinct_workers_and_losers_stop(client, tmp_path):
    m = _module(tmp_path, "race_models", f"""
        import os, time
        import flowkit as fk
        MARK = {str(tmp_path / "slow")!r}
        def translate(row) -> int:
            try:
                os.close(os.open(MARK, os.O_CREAT | os.O_EXCL))
                slow = True                     # the first replica to start is the straggler
            except FileExistsError:
                slow = False
            if slow:
                t0 = time.time()
                while time.time() - t0 < 10:
                    if fk.cancelled():
                        with open(MARK + ".stopped", "w") as f:
                            f.write(str(time.time()))
                        return -1
                    time.sleep(0.005)
            return row["x"] * 10
    """)
    flow = fk.Flow("race", SCHEMA)
    flow.map(m.translate, names=["y"], high_variance=True)
    with fk.deploy(flow, cluster=client, optimize={"compete": 2}) as dep:
        t0 = time.time()
        out = dep.run({"x": [4]}, timeout=30)
        elapsed = time.time() - t0
        assert out.column("y") == [40] and elapsed < 2
        stopped = tmp_path / "slow.stopped"
        deadline = time.time() + 5
        while not stopped.exists() and time.time() < deadline:
            time.sleep(0.01)
        assert stopped.exists(), "the losing replica never noticed it was cancelled"
        assert float(stopped.read_text()) - t0 < 2
        stats = dep.stats()
    race = stats.loc["translate"]
    assert race["cancelled losers"] == 1
    assert sum(race[c] for c in stats.columns if str(c).startswith("wins ") and race[c] == race[c]) == 1
    workers = {stats.loc[f"translate~{i}", "workers"] for i in (1, 2)}
    assert len(workers) == 2 and all(w.startswith("tcp://") for w in workers)


def test_a_loser_stops_between_rows_without_asking(client, tmp_path):
    m = _module(tmp_path, "row_models", f"""
        import os, time
        MARK = {str(tmp_path / "slow")!r}
        def step(row) -> int:
            try:
                os.close(os.open(MARK + str(row.qid), os.O_CREAT | os.O_EXCL))
                slow = row.qid == 0
            except FileExistsError:
                slow = False
            if os.path.exists(MARK + ".who") and open(MARK + ".who").read() == str(os.getpid()):
                time.sleep(0.05)
                with open(MARK + ".rows", "a") as f:
                    f.write("x")
            elif slow:
                with open(MARK + ".who", "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(0.05)
                with open(MARK + ".rows", "a") as f:
                    f.write("x")
            return row["x"]
    """)
    flow = fk.Flow("rows", SCHEMA)
    flow.map(m.step, names=["y"], high_variance=True)
    with fk.deploy(flow, cluster=client, optimize={"compete": 2}) as dep:
        out = dep.run({"x": list(range(60))}, timeout=30)
        assert out.column("y") == list(range(60))
        time.sleep(0.5)
        done = len((tmp_path / "slow.rows").read_text())
        time.sleep(0.5)
        assert len((tmp_path / "slow.rows").read_text()) == done < 60


def embed(table) -> list[int]:
    """A batching model whose answer tells the size of the batch it ran in (thousands)."""
    return [r["x"] + len(table) * 1000 for r in table]


def test_dynamic_batching_merges_requests_and_respects_its_bounds(client):
    flow = fk.Flow("batch", SCHEMA)
    flow.map(embed, names=["y"], batching=True, max_batch=4, max_wait_ms=150)
    with fk.deploy(flow, cluster=client) as dep:
        t0 = time.perf_counter()
        lone = dep.run({"x": [1]}, timeout=30)
        lone_s = time.perf_counter() - t0
        assert lone.column("y") == [1001]
        assert 0.14 <= lone_s < 0.6, lone_s  # waited for the batch to fill, then no longer than max_wait_ms
        futs = [dep.submit({"x": [i]}) for i in range(40)]
        outs = [f.result(30).column("y")[0] for f in futs]
        assert [o % 1000 for o in outs] == list(range(40))
        sizes = dep.stats().loc["embed", "batch_sizes"]
    assert max(sizes) <= 4 and max(sizes) > 1
    assert sum(n * c for n, c in sizes.items()) == 41


def test_a_request_abandoned_while_it_waits_for_its_batch_is_left_out(client):
    flow = fk.Flow("batch-abandon", SCHEMA)
    flow.map(embed, names=["y"], batching=True, max_batch=4, max_wait_ms=300)
    with fk.deploy(flow, cluster=client) as dep:
        abandoned = dep.submit({"x": [1]})
        time.sleep(0.05)
        assert abandoned.cancel()
        assert dep.run({"x": [2]}, timeout=30).column("y") == [1002]   # a batch of one
        time.sleep(0.4)
        sizes = dep.stats().loc["embed", "batch_sizes"]
    assert sum(n * c for n, c in sizes.items()) == 1   # the abandoned row was never computed


def test_batches_never_exceed_max_batch_even_for_large_requests(client):
    def count(table) -> list[int]:
        return [len(table)] * len(table)

    flow = fk.Flow("big", SCHEMA)
    flow.map(count, names=["n"], batching=True, max_batch=8, max_wait_ms=1)
    with fk.deploy(flow, cluster=client) as dep:
        out = dep.run({"x": list(range(20))}, timeout=30)
    assert max(out.column("n")) <= 8 and out.qids == list(range(20))


def test_batching_stage_gives_the_reference_results_with_fused_row_members(client):
    def pre(row) -> int:
        return row["x"] * 2

    def model(table) -> list[int]:
        return [r["p"] + 1 for r in table]

    flow = fk.Flow("fused_batch", SCHEMA)
    flow.map(pre, names=["p"]).filter(lambda r: r["p"] % 3 != 0).map(model, names=["y"], batching=True, max_wait_ms=20)
    data = {"x": list(range(10))}
    with fk.deploy(flow, cluster=client) as dep:
        futs = [dep.submit(data) for _ in range(6)]
        results = [f.result(30) for f in futs]
    assert all(r == flow.run(data) for r in results)


def _total(row) -> float:
    return float(row["key_value"].sum())


def test_locality_runs_lookups_where_the_object_lives(client):
    flow = fk.Flow("recommend", {"key": str})
    flow.lookup("key", dynamic=True).map(_total, names=["total"])
    store = {f"k{i}": np.full(1000, float(i)) for i in range(6)}
    data = {"key": [f"k{i % 6}" for i in range(12)]}
    expected = flow.run({"key": ["k3"]}, store=store)
    results = {}
    for locality in (True, False):
        with fk.deploy(flow, cluster=client, optimize={"locality": locality}) as dep:
            for k, v in store.items():
                dep.put(k, v)
            holders = client.who_has()
            assert len({w for ws in holders.values() for w in ws}) == 2   # objects spread over both workers
            for key in data["key"]:
                assert dep.run({"key": [key]}, timeout=30).column("total") == [1000.0 * int(key[1:])]
            assert dep.run({"key": ["k3"]}) == expected
            results[locality] = dep.stats().iloc[1]
    assert _count(results[True], "local lookups") == 13 and _count(results[True], "remote lookups") == 0
    assert _count(results[False], "remote lookups") > 0
    assert _count(results[False], "local lookups") + _count(results[False], "remote lookups") == 13


def _same_key(row) -> str:
    return row["key"]


def test_a_request_keyed_by_an_input_column_starts_where_its_object_lives(client):
    """The client sends it to the key's worker, so its lookup stage runs there: one hop. A key
    computed by an operator is only known on a worker, which then sends the stage on: two."""
    store = {f"k{i}": np.full(1000, float(i)) for i in range(6)}
    keys = [f"k{i % 6}" for i in range(24)]
    in_request = fk.Flow("keyed", {"key": str})
    in_request.lookup("key", dynamic=True).map(_total, names=["total"])
    computed = fk.Flow("computed", {"key": str})
    computed.map(_same_key, names=["key"]).lookup("key", dynamic=True).map(_total, names=["total"])
    sent = {}
    for flow in (in_request, computed):
        with fk.deploy(flow, cluster=client) as dep:
            for k, v in store.items():
                dep.put(k, v)
            assert len({w for ws in client.who_has().values() for w in ws}) == 2   # objects on both workers
            for key in keys:
                assert dep.run({"key": [key]}, timeout=30).column("total") == [1000.0 * int(key[1:])]
            stats = dep.stats()
            sent[flow.name] = _count(stats.loc[stats["stage"].str.startswith("lookup_key")].iloc[0],
                                     "sent to another worker")
            assert _count(stats.iloc[-1], "local lookups") == len(keys)
    assert sent == {"keyed": 0, "computed": sent["computed"]} and sent["computed"] > 0


def test_fast_remote_lookups_never_block_the_worker(client):
    """Many fast requests without locality: the worker would start running the plan on its own
    event loop, where a remote lookup (which waits on that loop) would hang it for good."""
    flow = fk.Flow("fast_lookups", {"key": str})
    flow.lookup("key", dynamic=True).map(_total, names=["total"])
    with fk.deploy(flow, cluster=client, optimize={"locality": False}) as dep:
        for i in range(4):
            dep.put(f"k{i}", np.full(10, float(i)))
        for n in range(300):
            assert dep.run({"key": [f"k{n % 4}"]}, timeout=10).column("total") == [10.0 * (n % 4)]
        assert _count(dep.stats().iloc[1], "remote lookups") > 0


def test_an_object_stored_again_is_read_anew_everywhere(client):
    """Workers remember where stored objects live; ``dep.put`` of the same key makes them forget."""
    flow = fk.Flow("restore", {"key": str})
    flow.lookup("key", dynamic=True).map(_total, names=["total"])
    for locality in (True, False):
        with fk.deploy(flow, cluster=client, optimize={"locality": locality}) as dep:
            for version in (1.0, 2.0, 3.0):
                for i in range(4):
                    dep.put(f"k{i}", np.full(10, version * (i + 1)))
                for n in range(24):
                    assert dep.run({"key": [f"k{n % 4}"]}, timeout=30).column("total") == [10.0 * version * (n % 4 + 1)]


def _count(row, name) -> int:
    v = row.get(name, 0)
    return 0 if v is None or v != v else int(v)


@pytest.mark.slow
def test_gpu_stages_run_on_workers_with_a_gpu_resource(client, tmp_path):
    worker = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "dask"), "worker",
                               client.scheduler.address, "--nthreads", "1", "--resources", "GPU=1", "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        client.wait_for_workers(3, timeout=60)
        gpu_worker = next(a for a, w in client.scheduler_info()["workers"].items() if w["resources"].get("GPU"))

        def pre(row) -> int:
            return row["x"] + 1

        def model(row) -> int:
            return row["x"] * 2

        flow = fk.Flow("gpu", SCHEMA)
        flow.map(pre, names=["x"]).map(model, names=["y"], gpu=True)
        with fk.deploy(flow, cluster=client) as dep:
            for i in range(6):
                assert dep.run({"x": [i]}, timeout=30).column("y") == [2 * (i + 1)]
            stats = dep.stats()
        assert stats.loc["model", "workers"] == gpu_worker
    finally:
        worker.terminate()
        worker.wait(30)
        client.wait_for_workers(2, timeout=30)


def _slow_square(row) -> int:
    time.sleep(0.05)
    return row["x"] ** 2


def test_autoscaling_grows_under_load_shrinks_when_idle_and_loses_no_stored_object():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        flow = fk.Flow("scale", {"x": int, "k": str})
        flow.lookup("k", dynamic=True).map(lambda r: (r["x"], float(r["k_value"][0])), names=["x", "v"]) \
            .map(_slow_square_pair, names=["y", "v"])
        with fk.deploy(flow, cluster=cluster) as dep:
            dep.adapt(minimum=1, maximum=2, interval="200ms", wait_count=3)
            dep.put("a", np.array([1.0]))
            futs, sizes = [], []
            deadline = time.time() + 30
            while time.time() < deadline and len(cluster.workers) < 2:
                futs += [dep.submit({"x": [i], "k": ["a"]}) for i in range(8)]
                time.sleep(0.2)
                sizes.append(len(cluster.workers))
            assert max(sizes) == 2, sizes
            assert all(f.result(60).column("y")[0] >= 0 for f in futs)
            client = dep.client
            client.wait_for_workers(2, timeout=30)
            for i in range(8):   # stored objects on both workers
                dep.put(f"s{i}", np.array([float(i)]))
            deadline = time.time() + 30
            trickle = []   # a light load while a worker retires: none of it may be lost
            while time.time() < deadline and len(client.scheduler_info()["workers"]) > 1:
                trickle.append((len(trickle), dep.submit({"x": [len(trickle)], "k": ["a"]})))
                time.sleep(0.5)   # ~0.1 requests in flight: under the 10% that shrinks the cluster
            assert len(client.scheduler_info()["workers"]) == 1
            assert [f.result(30).column("y")[0] for _, f in trickle] == [i * i for i, _ in trickle]
            for i in range(8):
                out = dep.run({"x": [1], "k": [f"s{i}"]}, timeout=30)
                assert out.column("v") == [float(i)]


def _slow_square_pair(row) -> tuple[int, float]:
    return _slow_square(row), row["v"]


def _sleepy(row) -> int:
    time.sleep(0.05)
    return row["x"] + 1


def test_races_only_use_idle_capacity(client):
    flow = fk.Flow("busy_race", SCHEMA)
    flow.map(_sleepy, names=["y"], high_variance=True)
    with fk.deploy(flow, cluster=client, optimize={"compete": 2}) as dep:
        assert dep.run({"x": [1]}).column("y") == [2]          # idle: the replicas race
        futs = [dep.submit({"x": [i]}) for i in range(30)]     # busy: extra replicas are skipped
        assert [f.result(60).column("y")[0] for f in futs] == [i + 1 for i in range(30)]
        race = dep.stats().loc["_sleepy"]
    assert race["cancelled losers"] >= 1
    assert race["races skipped (busy)"] >= 1


def _spin(row) -> int:
    end = time.perf_counter() + 0.003
    while time.perf_counter() < end:   # computing, not waiting
        pass
    return row["x"] + 1


def test_cpu_bound_replicas_are_hedged_and_waiting_ones_race_at_once(client):
    counts = {}
    for fn in (_spin, _sleepy):
        flow = fk.Flow(f"hedge_{fn.__name__}", SCHEMA)
        flow.map(fn, names=["y"], high_variance=True)
        with fk.deploy(flow, cluster=client, optimize={"compete": 2}) as dep:
            for i in range(40):
                assert dep.run({"x": [i]}, timeout=30).column("y") == [i + 1]
            stats = dep.stats()
            race = stats.loc[fn.__name__]
            second = stats.loc[f"{fn.__name__}~2"] if f"{fn.__name__}~2" in stats.index else {}
            started = _count(second, "requests") + _count(second, "cancelled")   # finished or stopped
            counts[fn.__name__] = (_count(race, "hedges not needed"), _count(race, "hedged"), started)
    not_needed, hedged, second = counts["_spin"]
    assert not_needed >= 10 and not_needed + hedged == 40 - 20   # hedged once 20 races are measured
    assert second <= 20 + hedged                                 # the second replica ran only when hedged
    assert counts["_sleepy"] == (0, 0, 40)                       # waiting replicas race every time


def test_hedges_that_keep_losing_are_held_back_but_still_probed(client):
    flow = fk.Flow("hedge_losing", SCHEMA)
    flow.map(_spin, names=["y"], high_variance=True)
    with fk.deploy(flow, cluster=client, optimize={"compete": 2}) as dep:
        for i in range(20):                  # the race is measured: CPU-bound, so it is hedged from now on
            dep.run({"x": [i]}, timeout=30)

        def lost_ten(dask_worker, deployment=dep.id):   # as if its last 10 hedges all lost
            dask_worker._flowkit[deployment].hedge_wins["_spin"].extend([False] * 10)

        client.run(lost_ten)
        for i in range(40):
            assert dep.run({"x": [i]}, timeout=30).column("y") == [i + 1]
        race = dep.stats().loc["_spin"]
    held = _count(race, "hedges held (they lost)")
    assert 30 <= held <= 40 - 3               # held back, except one race in ten, which still may hedge
    assert _count(race, "hedged") + _count(race, "hedges not needed") <= 40 - held

