"""Runtime part 2: competitive execution, dynamic batching, locality and autoscaling observed
on live deployments (through stats() and results), with the reference executor's results."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import numpy as np
import pytest

import flowkit as fk

from .waiting import wait_until

SCHEMA = {"x": int}


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
        def stopped(how):   # (whole when it appears: the test reads it as soon as it exists)
            with open(MARK + ".tmp", "w") as f:
                f.write(how)
            os.replace(MARK + ".tmp", MARK + ".stopped")
        def translate(row) -> int:
            try:
                os.close(os.open(MARK, os.O_CREAT | os.O_EXCL))
                slow = True                     # the first replica to start is the straggler
            except FileExistsError:
                slow = False
            if slow:                            # works until it is cancelled (for far longer than run's timeout)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 120:
                    if fk.cancelled():
                        stopped("cancelled")
                        return -1
                    time.sleep(0.005)           # (its simulated work)
                stopped("ran to the end")
                return -2
            return row["x"] * 10
    """)
    flow = fk.Flow("race", SCHEMA)
    flow.map(m.translate, names=["y"], high_variance=True)
    with fk.deploy(flow, cluster=client, optimize={"compete": 2}) as dep:
        out = dep.run({"x": [4]}, timeout=30)   # the straggler alone would take 120 s: the other replica won
        assert out.column("y") == [40]
        stopped = tmp_path / "slow.stopped"
        wait_until(stopped.exists, "the losing replica to notice it was cancelled")
        assert stopped.read_text() == "cancelled"
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
        # the loser's stage ends (counted cancelled) once it notices, between two rows: no row after
        wait_until(lambda: sum(_count(r, "cancelled") for _, r in dep.stats().filter(like="step~", axis=0).iterrows()),
                   "the losing replica to stop")
        assert len((tmp_path / "slow.rows").read_text()) < 60


def embed(table) -> list[int]:
    """A batching model whose answer tells the size of the batch it ran in (thousands)."""
    return [r["x"] + len(table) * 1000 for r in table]


def test_dynamic_batching_merges_requests_and_respects_its_bounds(client):
    flow = fk.Flow("batch", SCHEMA)
    flow.map(embed, names=["y"], batching=True, max_batch=4, max_wait_ms=150)
    with fk.deploy(flow, cluster=client, optimize={"eager_batches": False}) as dep:
        t0 = time.monotonic()
        lone = dep.run({"x": [1]}, timeout=30)
        lone_s = time.monotonic() - t0
        assert lone.column("y") == [1001]    # a batch of one, once max_wait_ms passed ...
        assert lone_s >= 0.14, lone_s        # ... not before (a slow machine only makes it later)
        futs = [dep.submit({"x": [i]}) for i in range(40)]
        outs = [f.result(30).column("y")[0] for f in futs]
        assert [o % 1000 for o in outs] == list(range(40))
        sizes = dep.stats().loc["embed", "batch_sizes"]
    assert max(sizes) <= 4 and max(sizes) > 1
    assert sum(n * c for n, c in sizes.items()) == 41


def held_batch(table) -> list[int]:
    """A batching model that runs while the file its rows name exists (the test holds it), then
    answers the size of the batch it ran in."""
    while os.path.exists(table.column("s")[0]):
        time.sleep(0.01)
    return [len(table)] * len(table)


def test_eager_batches_go_at_once_on_an_idle_stage_and_fill_while_it_is_busy(client, tmp_path):
    """With a ten-minute window, an eager batch does not wait to fill: a lone request goes at
    once, and the requests that arrive while the stage's threads are busy go together as soon
    as a thread is free."""
    flow = fk.Flow("eager", {"x": int, "s": str})
    flow.map(held_batch, names=["n"], batching=True, max_batch=64, max_wait_ms=600_000)
    hold = str(tmp_path / "hold")
    with fk.deploy(flow, cluster=client) as dep:
        assert dep.run({"x": [1], "s": [hold]}, timeout=60).column("n") == [1]   # not held: at once
        open(hold, "w").close()
        threads = sum(client.nthreads().values())   # (one per worker: least-loaded routing fills each)
        busy = [dep.submit({"x": [i], "s": [hold]}) for i in range(threads)]
        wait_until(lambda: _batches(client, dep) == (0, threads), "every worker thread to run a held batch")
        queued = [dep.submit({"x": [i], "s": [hold]}) for i in range(10)]
        wait_until(lambda: _batches(client, dep) == (10, threads), "the others to queue behind the busy threads")
        os.unlink(hold)
        assert [f.result(60).column("n") for f in busy] == [[1]] * threads
        sizes = [f.result(60).column("n")[0] for f in queued]
        batches = dep.stats().loc["held_batch", "batch_sizes"]
    assert max(sizes) > 1
    assert sum(n * c for n, c in batches.items()) == 1 + threads + 10   # every row ran once
    assert sum(batches.values()) <= 1 + threads + threads   # the queued ones went together, per worker


@pytest.mark.parametrize("stuck", [False, True], ids=["busy", "stuck"])
def test_eager_rows_wait_for_a_busy_thread_unless_its_work_is_stuck(client, tmp_path, stuck):
    """With a 1 ms window, rows that find every thread running a batch as long as work there
    usually takes wait for a thread, not for the window (a batch sent to a thread of its own
    would share the cores with the one running), and then go together; behind stuck work (work
    there usually takes no time at all) they go on threads of their own after the window."""
    flow = fk.Flow("eager-busy", {"x": int, "s": str})
    flow.map(held_batch, names=["n"], batching=True, max_batch=64, max_wait_ms=1)
    hold = str(tmp_path / "hold")
    with fk.deploy(flow, cluster=client) as dep:
        assert dep.run({"x": [1], "s": [hold]}, timeout=60).column("n") == [1]

        def usually(dask_worker, deployment=dep.id, seconds=0.0 if stuck else 600.0):
            dask_worker._flowkit[deployment].typical = seconds

        client.run(usually)
        open(hold, "w").close()
        threads = sum(client.nthreads().values())
        busy = [dep.submit({"x": [i], "s": [hold]}) for i in range(threads)]
        wait_until(lambda: _batches(client, dep) == (0, threads), "every worker thread to run a held batch")
        queued = [dep.submit({"x": [i], "s": [hold]}) for i in range(10)]
        if stuck:
            wait_until(lambda: _batches(client, dep)[1] > threads, "a batch on a thread of its own")
        else:
            wait_until(lambda: _batches(client, dep) == (10, threads), "the others to wait for the busy threads")
        os.unlink(hold)
        assert [f.result(60).column("n") for f in busy] == [[1]] * threads
        assert all(f.result(60).column("n")[0] >= 1 for f in queued)
        batches = dep.stats().loc["held_batch", "batch_sizes"]
    assert sum(n * c for n, c in batches.items()) == 1 + threads + 10   # every row ran once
    if not stuck:
        assert sum(batches.values()) <= 1 + threads + threads   # the queued ones went together, per worker


def _batches(client, dep) -> tuple[int, int]:
    """(requests waiting in the deployment's batch queues, batches running), on every worker."""
    def counts(dask_worker, deployment=dep.id):
        d = dask_worker._flowkit.get(deployment)
        return (0, 0) if d is None else (sum(len(b.queue) for b in d.batchers.values()),
                                         sum(b.running for b in d.batchers.values()))

    per_worker = client.run(counts).values()
    return sum(q for q, _ in per_worker), sum(r for _, r in per_worker)


def test_a_request_abandoned_while_it_waits_for_its_batch_is_left_out(client):
    flow = fk.Flow("batch-abandon", SCHEMA)
    flow.map(embed, names=["y"], batching=True, max_batch=4, max_wait_ms=300)
    with fk.deploy(flow, cluster=client, optimize={"eager_batches": False}) as dep:
        abandoned = dep.submit({"x": [1]})
        wait_until(lambda: _queued_for_batches(client, dep) == 1, "the request to wait in its batch queue")
        assert abandoned.cancel()
        assert dep.run({"x": [2]}, timeout=30).column("y") == [1002]   # a batch of one
        wait_until(lambda: _queued_for_batches(client, dep) == 0, "every batch queue to be settled")
        sizes = dep.stats().loc["embed", "batch_sizes"]
    assert sum(n * c for n, c in sizes.items()) == 1   # the abandoned row was never computed


def _queued_for_batches(client, dep) -> int:
    """Requests waiting in the deployment's batch queues, on every worker."""
    def queued(dask_worker, deployment=dep.id):
        d = dask_worker._flowkit.get(deployment)
        return 0 if d is None else sum(len(b.queue) for b in d.batchers.values())

    return sum(client.run(queued).values())


def test_batches_never_exceed_max_batch_even_for_large_requests(client):
    def count(table) -> list[int]:
        return [len(table)] * len(table)

    flow = fk.Flow("big", SCHEMA)
    flow.map(count, names=["n"], batching=True, max_batch=8, max_wait_ms=1)
    with fk.deploy(flow, cluster=client) as dep:
        out = dep.run({"x": list(range(20))}, timeout=30)
    assert max(out.column("n")) <= 8 and out.qids == list(range(20))


def batch_size(table) -> list[int]:
    return [len(table)] * len(table)


def test_a_window_shrunk_live_lets_a_larger_queued_request_through_and_bounds_new_batches(client):
    """A request queued before its batch window shrank below its size still runs (as a batch of
    its own: it once spun the worker's event loop for ever); new ones respect the new window."""
    from flowkit.plan import Stage

    flow = fk.Flow("shrink", SCHEMA)
    flow.map(batch_size, names=["n"], batching=True, max_batch=8, max_wait_ms=600_000)
    with fk.deploy(flow, cluster=client, optimize={"eager_batches": False}) as dep:
        (stage,) = [op.name for op in dep.plan.nodes if isinstance(op, Stage) and op.batching]
        queued = dep.submit({"x": list(range(6))})   # 6 < 8 rows: it waits for the window (ten minutes)
        wait_until(lambda: _queued_for_batches(client, dep) == 1, "the request to wait in its batch queue")
        dep.windows.resize({stage: (2, 0.0)})
        assert queued.result(60).column("n") == [6] * 6
        out = dep.run({"x": list(range(5))}, timeout=60)
        assert max(out.column("n")) <= 2 and out.qids == list(range(5))
        assert dep.run({"x": [7]}, timeout=60).column("n") == [1]   # no wait: the new window's is 0 ms


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


def test_many_requests_crossing_between_workers_at_once_all_finish(client):
    """A computed key's request waits in one of its worker's threads while its lookup stage runs
    on the other worker; with requests crossing both ways and far more of them than threads,
    neither worker may end up with every thread waiting for the other."""
    flow = fk.Flow("crossing", {"key": str})
    flow.map(_same_key, names=["key"]).lookup("key", dynamic=True).map(_total, names=["total"])
    with fk.deploy(flow, cluster=client) as dep:
        for i in range(6):
            dep.put(f"k{i}", np.full(1000, float(i)))
        assert len({w for ws in client.who_has().values() for w in ws}) == 2   # objects on both workers
        keys = np.random.default_rng(0).integers(0, 6, 200)   # (not in step with the router's turns)
        futures = [dep.submit({"key": [f"k{k}"]}) for k in keys]
        assert [f.result(timeout=120).column("total") for f in futures] == [[1000.0 * k] for k in keys]
        stats = dep.stats()
        assert _count(stats.loc[stats["stage"].str.startswith("lookup_key")].iloc[0], "sent to another worker") > 0


def _key_and_mark(row) -> tuple[str, str]:
    return row["key"], row["mark"]


def _until_cancelled(row) -> float:
    """Runs until its request is cancelled (with a mark to write), or returns at once (without)."""
    if not row["mark"]:
        return float(row["key_value"].sum())
    with open(row["mark"], "a") as f:
        f.write("x")   # running
    deadline = time.monotonic() + 300   # (a guard: a stage that is never told to stop ends)
    while not fk.cancelled() and time.monotonic() < deadline:
        time.sleep(0.005)
    return float(row["key_value"].sum())


def test_abandoned_requests_stop_their_stages_here_and_on_the_other_worker(client, tmp_path):
    """Requests whose lookup stage runs where they landed and requests whose stage runs on the
    other worker (while their thread waits for it): abandoning them stops every stage."""
    flow = fk.Flow("abandon_crossing", {"key": str, "mark": str})
    flow.map(_key_and_mark, names=["key", "mark"]).lookup("key", dynamic=True).map(_until_cancelled, names=["total"])
    mark = str(tmp_path / "running")
    with fk.deploy(flow, cluster=client) as dep:
        for i in range(2):
            dep.put(f"k{i}", np.full(10, float(i)))
        assert len({w for ws in client.who_has().values() for w in ws}) == 2   # one object on each worker
        futures = [dep.submit({"key": [k], "mark": [mark]}) for k in ("k0", "k0", "k1", "k1")]
        wait_until(lambda: os.path.exists(mark) and len(open(mark).read()) == 4, "all four stages to run")
        assert all(f.cancel() for f in futures)

        def stage_counts():
            stats = dep.stats()
            return stats.loc[stats["stage"].str.startswith("lookup_key")].iloc[0]

        wait_until(lambda: _count(stage_counts(), "cancelled") == 4,
                   lambda: f"every stage to stop (stats: {stage_counts().to_dict()})")
        assert _count(stage_counts(), "sent to another worker") >= 1   # (requests land on both, objects too)

        def working(dask_worker, deployment=dep.id):
            return len(dask_worker._flowkit[deployment].working)

        wait_until(lambda: sum(client.run(working).values()) == 0, "no thread to stay held")
        assert dep.run({"key": ["k1"], "mark": [""]}, timeout=30).column("total") == [10.0]   # serving on


def _copies(client, dep) -> dict:
    """How many objects put with broadcast each worker holds a copy of."""
    def copies(dask_worker, deployment=dep.id):
        return len(dask_worker._flowkit[deployment].store.copies)

    return client.run(copies)


def test_objects_put_with_broadcast_are_read_locally_everywhere(client):
    flow = fk.Flow("broadcast", {"key": str})
    flow.map(_same_key, names=["key"]).lookup("key", dynamic=True).map(_total, names=["total"])
    with fk.deploy(flow, cluster=client) as dep:
        for i in range(6):
            dep.put(f"k{i}", np.full(1000, float(i)), broadcast=True)
        assert _copies(client, dep) == {w: 6 for w in client.scheduler_info()["workers"]}
        for n in range(24):
            assert dep.run({"key": [f"k{n % 6}"]}, timeout=30).column("total") == [1000.0 * (n % 6)]
        dep.put("k0", np.full(1000, 7.0), broadcast=True)   # stored again: every copy replaced
        assert [dep.run({"key": ["k0"]}, timeout=30).column("total") for _ in range(6)] == [[7000.0]] * 6
        stats = dep.stats()
        lookup = stats.loc[stats["stage"].str.startswith("lookup_key")].iloc[0]
        assert _count(lookup, "sent to another worker") == 0
        assert _count(lookup, "local lookups") == 30 and _count(lookup, "remote lookups") == 0
        assert _count(lookup, "holders asked of the scheduler") == 0   # held here: nobody holds more


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
def test_gpu_stages_run_on_workers_with_a_gpu_resource(client, tmp_path, processes):
    worker = processes.start([os.path.join(os.path.dirname(sys.executable), "dask"), "worker",
                              client.scheduler.address, "--nthreads", "1", "--resources", "GPU=1", "--no-dashboard"],
                             cwd=tmp_path)
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
    finally:   # the module's cluster goes back to its two workers, whatever happened
        processes.stop()
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, "the GPU worker to leave")


def _slow_square(row) -> int:
    time.sleep(0.05)
    return row["x"] ** 2


def test_a_late_copy_of_an_earlier_put_never_replaces_a_later_one(client):
    """Copies travel beside other messages (a joining worker's, a re-put's "forget"): each carries
    its put's number, and a worker keeps the latest it heard of."""
    def sequence(dask_worker):
        from flowkit.runtime.store_worker import WorkerStore

        store, seen = WorkerStore("versions", dask_worker), []
        store.keep("k", 2, "two")
        store.keep("k", 1, "one")   # a late copy of put 1
        seen.append(list(store.copies.values()))
        store.forget("k", 3)        # put 3, not broadcast ...
        store.keep("k", 2, "two")   # ... then a late copy of put 2
        seen.append(list(store.copies.values()))
        store.keep("k", 4, "four")  # a joining worker's copy of put 4, before put 4's "forget"
        store.forget("k", 4)
        store.forget("k", 0)        # the dask copy stored again after its worker died: the copy stays
        seen.append(list(store.copies.values()))
        return seen

    for seen in client.run(sequence).values():
        assert seen == [["two"], [], ["four"]]


def test_a_worker_that_joins_gets_its_copies_of_objects_put_with_broadcast(make_cluster):
    cluster = make_cluster(n_workers=1, client=False)
    flow = fk.Flow("broadcast_join", {"key": str})
    flow.map(_same_key, names=["key"]).lookup("key", dynamic=True).map(_total, names=["total"])
    with fk.deploy(flow, cluster=cluster) as dep:
        for i in range(3):
            dep.put(f"k{i}", np.full(10, float(i)), broadcast=True)
        cluster.scale(2)
        dep.client.wait_for_workers(2, timeout=60)
        wait_until(lambda: sorted(_copies(dep.client, dep).values()) == [3, 3], "the new worker to get its copies")
        futures = [dep.submit({"key": [f"k{n % 3}"]}) for n in range(12)]   # at once: on both workers
        assert [f.result(timeout=60).column("total") for f in futures] == [[10.0 * (n % 3)] for n in range(12)]
        stats = dep.stats()
        lookup = stats.loc[stats["stage"].str.startswith("lookup_key")].iloc[0]
        assert len(lookup["workers"].split(", ")) == 2   # both served ...
        assert _count(lookup, "sent to another worker") == 0 and _count(lookup, "remote lookups") == 0   # ... locally


def test_autoscaling_grows_under_load_shrinks_when_idle_and_loses_no_stored_object(make_cluster):
    cluster = make_cluster(n_workers=1, client=False)
    flow = fk.Flow("scale", {"x": int, "k": str})
    flow.lookup("k", dynamic=True).map(lambda r: (r["x"], float(r["k_value"][0])), names=["x", "v"]) \
        .map(_slow_square_pair, names=["y", "v"])
    with fk.deploy(flow, cluster=cluster) as dep:
        dep.adapt(minimum=1, maximum=2, interval=0.2, wait_count=3)
        dep.put("a", np.array([1.0]))
        futs = []

        def load() -> bool:   # eight requests of 50 ms every 0.2 s: more than one worker serves
            futs.extend(dep.submit({"x": [i], "k": ["a"]}) for i in range(8))
            return len(cluster.workers) == 2

        wait_until(load, "the cluster to grow to 2 workers under load", interval=0.2)
        assert all(f.result(60).column("y")[0] >= 0 for f in futs)
        client = dep.client
        client.wait_for_workers(2, timeout=60)
        for i in range(8):   # stored objects on both workers
            dep.put(f"s{i}", np.array([float(i)]))
        trickle = []   # a light load while a worker retires: none of it may be lost

        def trickling() -> bool:   # one request every 0.5 s, ~0.1 in flight: under the 10% that shrinks it
            trickle.append((len(trickle), dep.submit({"x": [len(trickle)], "k": ["a"]})))
            return len(client.scheduler_info()["workers"]) == 1

        wait_until(trickling, "the idle cluster to shrink to 1 worker", interval=0.5)
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


def test_a_race_takes_one_thread_so_another_races_while_one_is_free(make_cluster, tmp_path):
    """One worker of 3 threads: a race runs its 2 replicas there (no other worker), and a second
    race still finds a thread free, so it races too (a race was once counted twice: its first
    replica, and itself)."""
    m = _module(tmp_path, "gate_models", f"""
        import os, time, uuid
        DIR = {str(tmp_path)!r}
        def held(row) -> int:
            open(os.path.join(DIR, "started-" + uuid.uuid4().hex), "w").close()
            t0 = time.monotonic()
            while not os.path.exists(os.path.join(DIR, "go")) and time.monotonic() - t0 < 120:
                time.sleep(0.005)
            return row["x"] + 1
    """)
    started = lambda: len(list(tmp_path.glob("started-*")))
    flow = fk.Flow("one_thread_a_race", SCHEMA)
    flow.map(m.held, names=["y"], high_variance=True)
    client = make_cluster(n_workers=1, threads_per_worker=3)
    with fk.deploy(flow, cluster=client, optimize={"compete": 2}) as dep:
        first = dep.submit({"x": [1]})
        wait_until(lambda: started() == 2, "the first race's two replicas to start")
        second = dep.submit({"x": [2]})
        wait_until(lambda: started() == 4, lambda: f"the second race's replicas to start ({started()} started)")
        (tmp_path / "go").touch()
        assert [first.result(60).column("y"), second.result(60).column("y")] == [[2], [3]]
        race = dep.stats().loc["held"]
    assert not race.get("races skipped (busy)", 0) > 0   # (NaN where never counted)


def _spin(row) -> int:
    end = time.perf_counter() + 0.003
    while time.perf_counter() < end:   # computing, not waiting
        pass
    return row["x"] + 1


def _cpu_share(client, dep, stage: str) -> float:
    """The share of its wall time that ``stage`` computed, as its workers measured it."""
    def measured(dask_worker, deployment=dep.id, stage=stage):
        s = dask_worker._flowkit[deployment].stats[stage]
        with s.lock:
            return sum(c for c, _ in s.cpu), sum(w for _, w in s.cpu)

    parts = list(client.run(measured).values())
    return sum(c for c, _ in parts) / sum(w for _, w in parts)


def _as_if_measured(client, dep, stage: str, share: float) -> None:
    """On every worker, as if ``stage``'s calls had computed ``share`` of their time, by far the
    most of what it measures from now on: on a loaded machine a computing thread waits for a core,
    so what its next calls measure would depend on the machine, not on the stage."""
    def inject(dask_worker, deployment=dep.id, stage=stage, share=share):
        s = dask_worker._flowkit[deployment].stats[stage]
        with s.lock:
            s.cpu.extend([(60.0 * share, 60.0)] * s.cpu.maxlen)

    client.run(inject)


def test_cpu_bound_replicas_are_hedged_and_waiting_ones_race_at_once(client):
    counts, measured = {}, {}
    for fn in (_spin, _sleepy):
        flow = fk.Flow(f"hedge_{fn.__name__}", SCHEMA)
        flow.map(fn, names=["y"], high_variance=True)
        with fk.deploy(flow, cluster=client, optimize={"compete": 2}) as dep:
            for i in range(20):              # raced at once until 20 races are measured
                assert dep.run({"x": [i]}, timeout=30).column("y") == [i + 1]
            measured[fn.__name__] = _cpu_share(client, dep, f"{fn.__name__}~1")
            _as_if_measured(client, dep, f"{fn.__name__}~1", 1.0 if fn is _spin else 0.0)
            for i in range(20, 40):
                assert dep.run({"x": [i]}, timeout=30).column("y") == [i + 1]
            stats = dep.stats()
            race = stats.loc[fn.__name__]
            second = stats.loc[f"{fn.__name__}~2"] if f"{fn.__name__}~2" in stats.index else {}
            started = _count(second, "requests") + _count(second, "cancelled")   # finished or stopped
            counts[fn.__name__] = (_count(race, "hedges not needed"), _count(race, "hedged"), started)
    assert measured["_spin"] > 2 * measured["_sleepy"]           # spinning computes; sleeping waits
    not_needed, hedged, second = counts["_spin"]
    assert not_needed >= 10 and not_needed + hedged == 40 - 20   # hedged once 20 races are measured
    assert second <= 20 + hedged                                 # the second replica ran only when hedged
    # waiting replicas are never hedged: each race starts them at once (the second one, on the
    # other worker, may be skipped when this one's thread is still busy, or stopped before it
    # started: how often depends on the machine's load)
    assert counts["_sleepy"][:2] == (0, 0) and counts["_sleepy"][2] > 0


def test_hedges_that_keep_losing_are_held_back_but_still_probed(client):
    flow = fk.Flow("hedge_losing", SCHEMA)
    flow.map(_spin, names=["y"], high_variance=True)
    with fk.deploy(flow, cluster=client, optimize={"compete": 2}) as dep:
        for i in range(20):                  # the race is measured ...
            dep.run({"x": [i]}, timeout=30)
        _as_if_measured(client, dep, "_spin~1", 1.0)   # ... CPU-bound, so it is hedged from now on

        def lost_ten(dask_worker, deployment=dep.id):   # as if its last 10 hedges all lost
            dask_worker._flowkit[deployment].hedge_wins["_spin"].extend([False] * 10)

        client.run(lost_ten)
        for i in range(40):
            assert dep.run({"x": [i]}, timeout=30).column("y") == [i + 1]
        race = dep.stats().loc["_spin"]
    held = _count(race, "hedges held (they lost)")
    assert 30 <= held <= 40 - 3               # held back, except one race in ten, which still may hedge
    assert _count(race, "hedged") + _count(race, "hedges not needed") <= 40 - held

