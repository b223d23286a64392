"""The GPU scheduler on CPU: super-kernel correctness, policies, EDF, stragglers, SLOs, the
simulated device against the paper, and the dask plugin serving gpu=True maps."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

import flowkit as fk
from flowkit.gpu import (CPUBackend, Gemm, SimBackend, SpaceTimeScheduler, TorchModel, gflops, make_backend,
                         plan_launch)
from flowkit.gpu.backends import power_of_two
from flowkit.gpu.profiles import PROFILES
from flowkit.gpu.policy import Request, Tenant, find_stragglers

from .waiting import wait_until


class Block(nn.Module):
    """A ResNet-18-style basic block with a small head (BatchNorm buffers included)."""

    def __init__(self, c=8):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(x + self.b2(self.c2(y)))
        return self.head(y.mean((2, 3)))


def tenant_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = Block().eval()
    for bn in (m.b1, m.b2):  # non-trivial running statistics, so buffers matter
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m


def other_model(seed: int) -> nn.Module:
    """A tenant of another architecture (it cannot stack with the blocks)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


@pytest.mark.parametrize("policy", ["time", "batch", "space", "spacetime"])
def test_every_policy_gives_each_tenant_its_solo_result(policy):
    sched = SpaceTimeScheduler(CPUBackend(), policy, max_wait_ms=5)
    try:
        models = {f"t{i}": tenant_model(i) for i in range(5)}
        models["t5"] = other_model(5)   # another architecture
        for name, m in models.items():
            sched.add_tenant(name, m)
        xs = [torch.randn(1 + i % 3, 8, 6, 6) for i in range(30)]
        futs = [(f"t{i % 6}", x, sched.submit(f"t{i % 6}", x)) for i, x in enumerate(xs)]
        for name, x, f in futs:
            with torch.inference_mode():
                assert torch.allclose(f.result(30), models[name](x), atol=1e-5)
        stats = sched.stats()
        assert sum(t["requests"] for t in stats["tenants"].values()) == 30
        if policy == "spacetime":
            assert stats["stacked"] >= 1 and stats["cache hits"] + stats["cache misses"] == stats["stacked"]
    finally:
        sched.close()


def test_a_stacked_super_kernel_equals_each_tenants_solo_forward():
    backend = CPUBackend()
    models = [tenant_model(i) for i in range(7)]
    stacked = backend.stack(tuple(range(7)), models)
    xs = torch.randn(7, 4, 8, 6, 6)
    out = backend.forward_stacked(stacked, xs)
    with torch.inference_mode():
        for i, m in enumerate(models):
            assert torch.allclose(out[i], m(xs[i]), atol=1e-5)


class BucketingCPU(CPUBackend):
    """The CPU backend padding stacked launches as the CUDA backend does (for its graphs)."""

    bucket = staticmethod(power_of_two)

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward_stacked(self, stacked, xs, *gather):
        self.shapes.append(tuple(xs.shape[:2]))
        return super().forward_stacked(stacked, xs, *gather)


def test_a_groups_programs_serve_subsets_of_its_tenants_in_few_shapes():
    backend = BucketingCPU()
    sched = SpaceTimeScheduler(backend, "spacetime", max_wait_ms=1)
    try:
        for i in range(5):
            sched.add_tenant(f"t{i}", tenant_model(i))
        waves = [(0, 1), (1, 2, 3), (0, 1, 2, 3, 4), (4, 2), (3, 0, 1)]
        for wave, members in enumerate(waves):
            with sched.cond:   # hold the dispatcher while the wave queues, so it is one launch
                futs = [(i, x, sched.submit(f"t{i}", x)) for i in members
                        for x in [torch.randn(1 + (i + wave) % 3, 8, 6, 6)]]
            for i, x, f in futs:
                with torch.inference_mode():
                    assert torch.allclose(f.result(30), tenant_model(i)(x), atol=1e-5), (wave, i)
        stats = sched.stats()
        # (0, 1) builds a program of two; (1, 2, 3) one of four, widened with t0 (it covers the
        # first: evicted); all five one of five (covers the four: evicted); (4, 2) is under half
        # of five: a program of its own; (3, 0, 1) runs on the five (idle slots get zero rows)
        assert [w for w, _ in backend.shapes] == [2, 4, 5, 2, 5]
        assert all(r in (1, 2, 4) for _, r in backend.shapes)
        assert (stats["stacked"], stats["cache misses"], stats["cache hits"], stats["evicted programs"]) == (5, 4, 1, 2)
        assert sorted(p.tenants for p in sched.cache.values()) == [("t0", "t1", "t2", "t3", "t4"), ("t2", "t4")]
    finally:
        sched.close()


def _tenants(**slo_ms):
    return {n: Tenant(n, None, ("arch",), s / 1000) for n, s in slo_ms.items()}


def _queue(t: Tenant, rows: int, deadline: float):
    t.queue.append(Request(t.name, None, rows, 0.0, deadline))


def test_plan_launch_is_earliest_deadline_first():
    ts = _tenants(a=100, b=10, c=50)
    _queue(ts["a"], 1, 3.0)
    _queue(ts["b"], 1, 1.0)
    _queue(ts["c"], 1, 2.0)
    assert plan_launch("time", ts, 32).separate[0][0] == "b"
    assert plan_launch("batch", ts, 32).separate[0][0] == "b"
    assert [n for n, _ in plan_launch("space", ts, 32).separate] == ["b", "c", "a"]
    st = plan_launch("spacetime", ts, 32)
    assert st.kind == "stacked" and [n for n, _ in st.stacked] == ["b", "c", "a"]


def test_spacetime_groups_by_architecture_and_evicts_stragglers():
    ts = _tenants(a=100, b=100, c=100, d=100, e=100, f=100)
    ts["d"].arch = ("alone",)
    ts["e"].arch = ts["f"].arch = ("pair",)
    for n, rows in (("a", 1), ("b", 2), ("c", 40), ("d", 1), ("e", 1), ("f", 1)):
        _queue(ts[n], rows, {"a": 1.0, "b": 1.5, "c": 2.0, "d": 5.0, "e": 1.2, "f": 6.0}[n])
    launch = plan_launch("spacetime", ts, 64)
    assert [n for n, _ in launch.stacked] == ["a", "b"]          # same architecture, earliest deadlines
    assert launch.stragglers == ("c",)                            # its backlog would stall a, b
    assert [n for n, _ in launch.separate] == ["c", "d"]          # beside the stack: the straggler, the peerless
    assert "e" not in launch.tenants and "f" not in launch.tenants   # a group of two waits for its own stack
    assert find_stragglers({"a": 1, "b": 2, "c": 40}) == {"c"}
    del ts["a"].queue[0], ts["b"].queue[0], ts["c"].queue[0]
    assert [n for n, _ in plan_launch("spacetime", ts, 64).stacked] == ["e", "f"]   # then theirs
    del ts["e"].queue[0], ts["f"].queue[0]
    assert plan_launch("spacetime", ts, 64).kind == "batch"      # one tenant left: batched alone


def test_a_tenant_whose_rows_would_make_its_peers_miss_their_deadlines_is_evicted_by_measured_latency():
    measured = {1: 0.001, 2: 0.002, 8: 0.008}                   # seconds of a stacked launch, by rows per tenant

    def plan(c_deadline, cost=lambda arch, rows: measured.get(rows)):
        ts = _tenants(a=5, b=5, c=100)
        for n, rows, deadline in (("a", 1, 0.005), ("b", 2, 0.005), ("c", 8, c_deadline)):
            _queue(ts[n], rows, deadline)
        return plan_launch("spacetime", ts, 32, now=0.0, cost=cost)

    assert find_stragglers({"a": 1, "b": 2, "c": 8}) == set()    # not a backlog outlier ...
    launch = plan(0.1)
    assert [n for n, _ in launch.stacked] == ["a", "b"] and launch.stragglers == ("c",)   # ... but 8 ms > a's 5 ms
    assert [n for n, _ in launch.separate] == ["c"]
    assert plan(0.004).stragglers == ()                           # c is the most urgent itself: it stays
    assert plan(0.1, cost=lambda arch, rows: None).stragglers == ()   # nothing measured yet: nothing judged
    measured[8] = 0.004
    assert plan(0.1).stragglers == ()                             # fast enough for everyone: stacked together


def test_the_dispatcher_measures_stacked_launches_and_evicts_by_them():
    sched = SpaceTimeScheduler(CPUBackend(), "spacetime", max_wait_ms=1)
    try:
        for name, slo in (("a", 40), ("b", 40), ("c", 10_000)):
            sched.add_tenant(name, tenant_model(len(name) + ord(name)), slo_ms=slo)
        arch = sched.tenants["a"].arch
        small, big = torch.randn(1, 8, 6, 6), torch.randn(4, 8, 6, 6)     # 4 rows: no backlog outlier
        with sched.cond:
            futs = [sched.submit(n, x) for n, x in (("a", small), ("b", small), ("c", big))]
        [f.result(30) for f in futs]
        assert sched.stats()["stacked"] == 1 and (arch, 4) in sched.latency   # measured, not yet judged
        assert sched.stats()["stacked launch ms"]
        assert sched.stats()["straggler evictions"] == 0
        sched.latency[(arch, 4)] = 10.0                               # as if 4 rows per tenant took 10 s
        sched.latency[(arch, 1)] = 0.0001
        with sched.cond:
            futs = [(n, x, sched.submit(n, x)) for n, x in (("a", small), ("b", small), ("c", big))]
        for n, x, f in futs:
            with torch.inference_mode():
                assert torch.allclose(f.result(30), tenant_model(len(n) + ord(n))(x), atol=1e-5)
        assert sched.stats()["straggler evictions"] == 1 and sched.stats()["stacked"] == 2
    finally:
        sched.close()


class Pooled(nn.Module):
    """Takes images of any size (adaptive pooling); its data-dependent branch defeats ``vmap``
    when ``branchy``."""

    def __init__(self, seed: int, branchy: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.head, self.branchy = nn.Conv2d(8, 4, 3, padding=1), nn.Linear(4, 3), branchy

    def forward(self, x):
        y = self.conv(x)
        if self.branchy and bool(y.mean() > 0):   # Python control flow on a tensor's value
            y = -y
        return self.head(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def _solo(model, x):
    with torch.inference_mode():
        return model(x)


def test_a_bad_request_fails_alone_and_its_error_names_the_tenant():
    sched = SpaceTimeScheduler(CPUBackend(), "spacetime", max_wait_ms=1)
    try:
        models = {f"t{i}": tenant_model(i) for i in range(3)}
        for name, m in models.items():
            sched.add_tenant(name, m)
        good = torch.randn(2, 8, 6, 6)
        with sched.cond:   # one launch: good rows of every tenant and a request with 5 channels, not 8
            futs = [(n, sched.submit(n, good)) for n in models] + [("t1", sched.submit("t1", torch.randn(1, 5, 6, 6)))]
            futs += [("t2", sched.submit("t2", good))]
        *fine, (_, bad), (_, after) = futs
        for name, f in fine + [("t2", after)]:
            assert torch.allclose(f.result(30), _solo(models[name], good), atol=1e-5)
        with pytest.raises(RuntimeError) as info:
            bad.result(30)
        assert "tenant 't1', a request of 1 row(s) of shape (5, 6, 6)" in "\n".join(info.value.__notes__)
        assert sched.stats()["failed requests"] == 1 and sched.stats()["unstackable groups"] == 0
    finally:
        sched.close()


def test_requests_of_other_shapes_batch_apart_and_models_vmap_cannot_stack_run_unstacked():
    sched = SpaceTimeScheduler(CPUBackend(), "spacetime", max_wait_ms=1)
    try:
        models = {"p0": Pooled(0), "p1": Pooled(1), "b0": Pooled(2, branchy=True), "b1": Pooled(3, branchy=True)}
        for name, m in models.items():
            sched.add_tenant(name, m)
        assert sched.tenants["p0"].arch == sched.tenants["p1"].arch   # same structure and settings: one group
        assert sched.tenants["p0"].arch != sched.tenants["b0"].arch   # a setting differs: never one program
        xs = [torch.randn(1 + i % 2, 8, 5 + i % 3, 5 + i % 3) for i in range(12)]   # three image sizes
        for round_ in range(2):
            with sched.cond:
                futs = [(n, x, sched.submit(n, x)) for x in xs for n in models]
            for name, x, f in futs:
                assert torch.allclose(f.result(30), _solo(models[name], x), atol=1e-5), (round_, name, x.shape)
        stats = sched.stats()
        assert stats["failed requests"] == 0 and stats["unstackable groups"] == 1
        assert sched.unstackable[sched.tenants["b0"].arch] == math.inf   # never stacked again
        assert sched.tenants["p0"].arch not in sched.unstackable
    finally:
        sched.close()


def test_bad_submissions_are_refused_and_closing_fails_what_is_queued():
    sched = SpaceTimeScheduler(CPUBackend(), "spacetime", max_wait_ms=1)
    sched.add_tenant("t", tenant_model(0))
    with pytest.raises(ValueError, match="tenant 't': a request is a tensor of rows"):
        sched.submit("t", [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one row"):
        sched.submit("t", torch.randn(0, 8, 6, 6))
    with sched.cond:                     # queued, and the dispatcher has not taken it yet
        queued = sched.submit("t", torch.randn(1, 8, 6, 6))
        sched.closed = True
        sched.cond.notify_all()
    sched.close()
    with pytest.raises(fk.FlowError, match="closed before this request ran"):
        queued.result(5)
    with pytest.raises(fk.FlowError, match="the GPU scheduler is closed"):
        sched.submit("t", torch.randn(1, 8, 6, 6))


def test_a_cancelled_request_is_withdrawn_and_the_dispatcher_serves_on():
    """Cancelling a queued request's future used to kill the dispatcher thread (it set the
    result of a cancelled future), and every later request hung."""
    sched = SpaceTimeScheduler(CPUBackend(), "spacetime", max_wait_ms=1)
    try:
        sched.add_tenant("t", tenant_model(0))
        x = torch.randn(1, 8, 4, 4)
        with sched.cond:                 # queued, not yet taken
            withdrawn, kept = sched.submit("t", x), sched.submit("t", x)
            assert withdrawn.cancel()
        assert kept.result(30).shape[0] == 1 and withdrawn.cancelled()
        assert sched.submit("t", x).result(30).shape[0] == 1 and sched.thread.is_alive()
        assert sched.stats()["cancelled requests"] == 1 and sched.stats()["tenants"]["t"]["requests"] == 2
    finally:
        sched.close()


class Held(nn.Module):
    """Holds the device until the test lets it go."""

    def __init__(self):
        super().__init__()
        self.running, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        self.running.set()
        assert self.release.wait(60), "the test never let the device go"
        return x


class Waiting(TorchModel):
    def build(self):
        return tenant_model(1)

    def inputs(self, table):
        return torch.randn(len(table), 8, 4, 4)


def test_a_torch_model_whose_work_is_cancelled_withdraws_its_queued_request():
    from concurrent.futures import ThreadPoolExecutor

    from flowkit.gpu.scheduler import install
    from flowkit.runtime.cancel import Token, running_under

    sched = SpaceTimeScheduler(CPUBackend(), "time")
    install(sched)
    try:
        held = Held()
        sched.add_tenant("held", held)
        busy = sched.submit("held", torch.randn(1, 2))      # holds the device until released
        wait_until(held.running.is_set, "the first request to hold the device")
        token = Token()

        def call():
            with running_under(token):
                return Waiting()(fk.Table({"x": int}, [(1,)]))

        try:
            with ThreadPoolExecutor(1) as pool:
                fut = pool.submit(call)
                wait_until(lambda: sched.stats()["tenants"].get(Waiting().tenant, {}).get("queued"),
                           "the model's request to queue behind the held device")
                token.cancel("the request was abandoned")
                with pytest.raises(fk.Cancelled, match="queued for the GPU"):
                    fut.result(30)
        finally:
            held.release.set()
        busy.result(30)
        wait_until(lambda: sched.stats()["cancelled requests"], "the dispatcher to drop the withdrawn request")
        assert sched.stats()["cancelled requests"] == 1
        assert sched.stats()["tenants"][Waiting().tenant]["requests"] == 0
    finally:
        install(None)
        sched.close()


def test_the_dispatcher_serves_queued_requests_in_deadline_order():
    sched = SpaceTimeScheduler(CPUBackend(), "time")
    try:
        for name, slo in (("slow", 1000), ("mid", 300), ("fast", 20)):
            sched.add_tenant(name, tenant_model(len(name)), slo_ms=slo)
        x = torch.randn(1, 8, 4, 4)
        with sched.cond:       # hold the dispatcher while the queue fills
            futs = [sched.submit(n, x) for n in ("slow", "mid", "fast", "slow", "fast", "mid")]
        for f in futs:
            f.result(30)
        deadlines = [d for _, d in list(sched.order)[-6:]]
        assert deadlines == sorted(deadlines)
        assert [n for n, _ in list(sched.order)[-6:]][:2] == ["fast", "fast"]
    finally:
        sched.close()


def test_slo_attainment_is_measured_per_tenant():
    sched = SpaceTimeScheduler(CPUBackend(), "spacetime", max_wait_ms=1)
    try:
        sched.add_tenant("lax", tenant_model(1), slo_ms=10_000)
        sched.add_tenant("impossible", tenant_model(2), slo_ms=0.001)
        x = torch.randn(1, 8, 4, 4)
        for f in [sched.submit(n, x) for n in ("lax", "impossible") * 5]:
            f.result(30)
        tenants = sched.stats()["tenants"]
        assert tenants["lax"]["attainment"] == 1.0 and tenants["impossible"]["attainment"] == 0.0
        assert tenants["lax"]["p99_ms"] >= tenants["lax"]["p50_ms"] > 0
    finally:
        sched.close()


def _geomean_ratio(a, b):
    return math.exp(sum(math.log(x / y) for x, y in zip(a, b)) / len(a))


def test_the_simulated_v100_orders_the_policies_as_the_paper():
    v100, rs = PROFILES["v100"], [1, 2, 5, 10, 20, 32, 40, 64, 80, 120]
    conv = Gemm(256, 128, 1152)
    per = {p: [gflops(p, conv, r, v100) for r in rs] for p in ("time", "space", "spacetime")}
    assert all(st >= s >= t * 0.99 for st, s, t in zip(per["spacetime"][2:], per["space"][2:], per["time"][2:]))
    # The paper's ratios are predicted by the calibrated model and its error reported, not
    # asserted here (tests/test_gpu_model.py): asserting them made the model fit the check.
    assert _geomean_ratio(per["spacetime"], per["space"]) > 1 and _geomean_ratio(per["spacetime"], per["time"]) > 1


def _sm_share(policy: str) -> tuple[float, dict]:
    """SM-seconds per busy second on the simulated V100 for one workload under ``policy``."""
    sched = SpaceTimeScheduler(SimBackend("v100"), policy, max_wait_ms=5)
    try:
        for i in range(8):
            sched.add_tenant(f"t{i}", tenant_model(i))
        sched.sample()
        with sched.cond:
            futs = [sched.submit(f"t{i}", torch.randn(1, 8, 6, 6)) for i in range(8)]
        for f in futs:
            f.result(30)
        return sched.backend.sm_busy_seconds / sched.backend.busy_seconds, sched.sample()
    finally:
        sched.close()


def test_the_simulated_gpu_shows_stacking_keeps_more_sms_busy():
    time_share, time_sample = _sm_share("time")
    stacked_share, stacked_sample = _sm_share("spacetime")
    assert stacked_share > 3 * time_share          # one small model at a time leaves most SMs idle
    for sample in (time_sample, stacked_sample):
        assert 0 < sample["sm_utilization"] <= sample["utilization"] <= 100


class FakeGpm:
    """NVML's GPM calls as a Hopper GPU answers them: counters that grow between samples."""

    def __init__(self, supported=True):
        import pynvml

        self.real, self.supported, self.clock = pynvml, supported, 0

    def __getattr__(self, name):          # constants (metric ids, NVML_SUCCESS) are NVML's own
        return getattr(self.real, name)

    def nvmlGpmQueryDeviceSupport(self, device):
        return type("Support", (), {"isSupportedDevice": int(self.supported)})()

    def nvmlGpmSampleAlloc(self):
        return {"at": None}

    def nvmlGpmSampleGet(self, device, sample):
        self.clock += 10
        sample["at"] = self.clock
        return sample

    def c_nvmlGpmMetricsGet_t(self):
        metric = type("Metric", (), {"metricId": 0, "value": 0.0, "nvmlReturn": 0})
        return type("Query", (), {"metrics": [metric() for _ in range(4)]})()

    def nvmlGpmMetricsGet(self, query):
        assert query.version == self.real.NVML_GPM_METRICS_GET_VERSION and query.numMetrics == 2
        span = query.sample2["at"] - query.sample1["at"]
        for m in query.metrics[:query.numMetrics]:
            m.value = {self.real.NVML_GPM_METRIC_SM_UTIL: 5.0 * span,
                       self.real.NVML_GPM_METRIC_SM_OCCUPANCY: 2.0 * span}[m.metricId]
        return query


def test_gpm_metrics_are_read_between_consecutive_samples():
    pytest.importorskip("pynvml")
    from flowkit.gpu.monitor import GpmSampler

    gpm = GpmSampler(FakeGpm(), device="gpu0")
    assert gpm.read() == {"sm_utilization": 50.0, "sm_occupancy": 20.0}   # the samples 10 ticks apart
    assert gpm.read() == {"sm_utilization": 50.0, "sm_occupancy": 20.0}   # then the next pair, not the first again
    assert gpm.previous["at"] == 30 and gpm.spare["at"] == 20
    with pytest.raises(RuntimeError, match="no GPM"):
        GpmSampler(FakeGpm(supported=False), device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_means_the_simulated_backend_not_a_crash():
    backend = make_backend("auto")
    assert isinstance(backend, SimBackend) and backend.name == "sim:h200"
    assert make_backend("cpu").name == "cpu" and make_backend("sim:v100").profile.name == "V100"
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("tpu")
    with pytest.raises(RuntimeError, match="needs a CUDA device.*'sim:h200'"):
        make_backend("cuda")


class Classifier(TorchModel):
    slo_ms = 500

    def build(self):
        return tenant_model(3)

    def inputs(self, table):
        return torch.stack([torch.from_numpy(x) for x in table.column("x")])

    def outputs(self, y, table):
        return [int(i) for i in y.argmax(1)]


def test_torch_model_runs_locally_without_the_plugin():
    flow = fk.Flow("local", {"x": np.ndarray})
    flow.map(Classifier, names=["label"], gpu=True, batching=True)
    xs = [np.random.default_rng(i).standard_normal((8, 4, 4)).astype(np.float32) for i in range(4)]
    out = flow.run({"x": xs})
    with torch.inference_mode():
        expected = tenant_model(3)(torch.stack([torch.from_numpy(x) for x in xs])).argmax(1).tolist()
    assert out.column("label") == expected


def test_the_plugin_serves_gpu_maps_in_a_deployed_flow_and_publishes_samples(make_cluster):
    pytest.importorskip("distributed")
    from flowkit.gpu import GPUPlugin

    flow = fk.Flow("gpu", {"x": np.ndarray})
    flow.map(Classifier, names=["label"], gpu=True, batching=True, max_wait_ms=2)
    xs = [np.random.default_rng(i).standard_normal((8, 4, 4)).astype(np.float32) for i in range(6)]
    expected = flow.run({"x": xs})
    client = make_cluster(n_workers=1)   # its own: the plugin stays registered on it
    client.register_plugin(GPUPlugin(policy="spacetime", backend="sim:h200", sample_hz=10))
    with fk.deploy(flow, cluster=client) as dep:
        futs = [dep.submit({"x": [x]}) for x in xs]
        assert [f.result(30).column("label")[0] for f in futs] == expected.column("label")
        stats = client.run(lambda dask_worker: dask_worker._flowkit_gpu.stats())
        (worker_stats,) = stats.values()
        assert worker_stats["backend"] == "sim:h200" and worker_stats["policy"] == "spacetime"
        assert sum(t["requests"] for t in worker_stats["tenants"].values()) >= 1
        events = wait_until(lambda: client.get_events("flowkit-gpu"), "the plugin's first published sample")
        # registering again replaces each worker's scheduler (another policy, a fixed typo)
        client.register_plugin(GPUPlugin(policy="time", backend="sim:v100"))
        assert [f.result(30).column("label")[0] for f in [dep.submit({"x": [x]}) for x in xs]] == \
            expected.column("label")
        (worker_stats,) = client.run(lambda dask_worker: dask_worker._flowkit_gpu.stats()).values()
        assert (worker_stats["policy"], worker_stats["backend"]) == ("time", "sim:v100")
        assert sum(t["rows"] for t in worker_stats["tenants"].values()) == len(xs)   # the new one served them all
    assert events and {"utilization", "queue", "throughput", "memory_used"} <= set(events[-1][1])


@pytest.mark.parametrize("options, words", [({"policy": "fastest"}, "unknown policy 'fastest'"),
                                            ({"backend": "tpu"}, "unknown backend 'tpu'"),
                                            ({"backend": "sim:a100"}, "unknown backend 'sim:a100'"),
                                            ({"max_batch": 0}, "max_batch >= 1")])
def test_the_plugin_refuses_bad_settings_where_they_are_written(options, words):
    """In the notebook, at once, not later in each worker's log."""
    pytest.importorskip("distributed")
    from flowkit.gpu import GPUPlugin

    with pytest.raises(ValueError, match=words):
        GPUPlugin(**options)


def test_gpu_chart_draws_samples_from_the_simulated_backend():
    pytest.importorskip("ipywidgets")
    from flowkit_widgets.gpu import GPUChart

    sched = SpaceTimeScheduler(SimBackend("h200"), "spacetime", max_wait_ms=1)
    chart = GPUChart()
    try:
        for i in range(4):
            sched.add_tenant(f"m{i}", tenant_model(i))
        x = torch.randn(2, 8, 4, 4)
        for _ in range(3):
            for f in [sched.submit(f"m{i}", x) for i in range(4)]:
                f.result(30)
            chart.add(sched.sample())
        assert "sim:h200" in chart.title.value and "spacetime" in chart.title.value
        assert chart.util.value.count("<polyline") == 3 and "SMs busy" in chart.util.value
        assert "m3" in chart.tenants.value
        assert "queued requests" in chart.queue.value
        # another run (a new scheduler, another policy) starts the chart afresh, not drawn over the last
        chart.add({**sched.sample(), "time": 0.0, "policy": "time"})
        assert "policy time" in chart.title.value and "1 samples" in chart.title.value
    finally:
        sched.close()


class HostClock:
    """The host's clock, injected into a simulated device: it moves only when the test says."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def test_a_simulated_gpu_is_measured_on_its_own_clock():
    """Its monitor counts each launch's modeled device time, not the CPU time its numbers took,
    and idle time only while it has nothing to do: flooded, the modeled GPU is busy all along,
    however long the CPU emulating it takes (the host's clock is injected, so a loaded machine
    changes nothing here)."""
    host = HostClock()
    backend = SimBackend("h200", wall=host)
    sched = SpaceTimeScheduler(backend, "time", max_wait_ms=0)
    try:
        for i in range(4):
            sched.add_tenant(f"m{i}", tenant_model(i))
        x = torch.randn(32, 8, 32, 32)   # the CPU takes far longer over these than the modeled H200
        wait_until(lambda: backend.clock.idle, "the dispatcher to wait for work")
        host.advance(2.0)                # two seconds with nothing to do
        first = sched.sample()
        assert first["time"] == pytest.approx(2.0) and first["utilization"] == 0
        busy0 = backend.busy_seconds
        with sched.cond:   # all queued before the first launch: the device never waits for work
            futures = [sched.submit(f"m{i % 4}", x) for i in range(100)]
            host.advance(5.0)            # the host is slow to hand the work over: not the device's time
        for f in futures:
            f.result(30)
        flooded = sched.sample()
        busy = backend.busy_seconds - busy0
        one = backend.modeled("time", sched.tenants["m0"].module, x)[0]
        assert busy == pytest.approx(100 * one) and 0 < busy < 1   # what the modeled H200 takes for the work
        assert flooded["time"] - first["time"] == pytest.approx(busy)   # its clock ran for that, no more
        assert flooded["utilization"] == pytest.approx(100)
        assert sum(flooded["throughput"].values()) == pytest.approx(100 * 32 / busy)   # rows per device second
        assert flooded["queue"] == 0
        wait_until(lambda: backend.clock.idle, "the dispatcher to wait for work again")
        host.advance(3 * busy)           # then idle three times as long: a quarter of the time busy
        later = sched.sample()
        assert later["time"] - flooded["time"] == pytest.approx(3 * busy)
        assert later["utilization"] == 0 and sum(later["throughput"].values()) == 0
        span = later["time"] - first["time"]
        assert 100 * busy / span == pytest.approx(25)
    finally:
        sched.close()


def test_a_simulated_gpu_idles_on_the_hosts_clock_while_it_waits_for_a_batch():
    """Under a batching policy a queued request waits for company: that wait is the device's idle
    time (under ``time``, above, the device has work from the moment a request is queued)."""
    host = HostClock()
    backend = SimBackend("v100", wall=host)
    sched = SpaceTimeScheduler(backend, "batch", max_wait_ms=20)
    try:
        sched.add_tenant("m", tenant_model(0), slo_ms=1e9)
        first = sched.sample()
        with sched.cond:
            fut = sched.submit("m", torch.randn(2, 8, 6, 6))
            host.advance(4.0)            # queued, not yet launched: the device waits
        fut.result(30)
        sample = sched.sample()
        busy = backend.busy_seconds
        assert 0 < busy < 1
        assert sample["time"] - first["time"] == pytest.approx(4.0 + busy)
        assert sample["utilization"] == pytest.approx(100 * busy / (4.0 + busy))
    finally:
        sched.close()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run benchmarks/gpu_check.sh on one)")


@pytest.fixture
def fp32():
    """FP32 that is FP32 on CUDA (TF32 off), so outputs compare with the CPU's."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@cuda
@pytest.mark.parametrize("policy", ["time", "batch", "space", "spacetime"])
def test_on_cuda_every_policy_gives_each_tenant_its_solo_result(policy, fp32):
    from flowkit.gpu import CUDABackend

    sched = SpaceTimeScheduler(CUDABackend(), policy, max_wait_ms=2)
    try:
        make = {f"t{i}": (tenant_model, i) for i in range(40)}   # more tenants than torch's 32 pool streams
        make["t40"] = (other_model, 40)      # and one of another architecture, beside the stacks
        for name, (model, seed) in make.items():
            sched.add_tenant(name, model(seed))   # (moves the module to the device)
        reference = {name: model(seed) for name, (model, seed) in make.items()}   # the same weights, on the CPU
        xs = [torch.randn(1 + i % 3, 8, 6, 6) for i in range(123)]
        for _ in range(3):                   # again, so settled super-kernels replay from CUDA graphs
            futs = [(f"t{i % 41}", x, sched.submit(f"t{i % 41}", x)) for i, x in enumerate(xs)]
            for name, x, f in futs:
                with torch.inference_mode():
                    assert torch.allclose(f.result(60).cpu(), reference[name](x), rtol=1e-4, atol=1e-4)
        if policy == "spacetime":
            assert sched.backend.graph_failures == 0 and sched.stats()["stacked"] > 0
    finally:
        sched.close()


@cuda
def test_on_cuda_the_gemm_benchmark_orders_the_policies(fp32):
    from flowkit.gpu import CUDABackend

    backend = CUDABackend()
    g = Gemm(256, 128, 1152)
    t, s, st = (backend.gemm_seconds(p, g, 40, iters=10) for p in ("time", "space", "spacetime"))
    assert st < s and st < t


@cuda
def test_on_cuda_the_monitor_samples_the_device():
    from flowkit.gpu import CUDABackend
    from flowkit.gpu.monitor import device_sample, nvml_available

    pytest.importorskip("pynvml")
    backend = CUDABackend()
    assert nvml_available()
    x = torch.randn(4096, 4096, device=backend.device)
    first = device_sample(backend)
    for _ in range(20):
        x = x @ x / 64
    backend.synchronize()
    sample = device_sample(backend)
    assert first is not None and 0 < sample["memory_used"] <= sample["memory_total"]
    print("device sample:", sample)   # GPM's sm_utilization / sm_occupancy appear where the GPU offers them
    if "sm_utilization" in sample:
        assert 0 <= sample["sm_utilization"] <= 100 and 0 <= sample.get("sm_occupancy", 0) <= 100


@cuda
def test_on_cuda_settled_super_kernels_replay_from_cuda_graphs(fp32):
    from flowkit.gpu import CUDABackend

    backend = CUDABackend()
    models = [backend.place(tenant_model(i)) for i in range(5)]
    stacked = backend.stack(tuple(range(5)), models)
    for step in range(4):
        rows = (2, 4)[step % 2]
        xs = torch.randn(5, rows, 8, 6, 6, device=backend.device)
        out = backend.forward_stacked(stacked, xs)
        with torch.inference_mode():
            for i, m in enumerate(models):
                assert torch.allclose(out[i], m(xs[i]), rtol=1e-4, atol=1e-4), (step, i)
    assert backend.graph_failures == 0
    assert len(stacked.graphs) == 2 and all(stacked.graphs.values())   # two shapes, each captured once


# -- defects of issue 16, each with the test that failed before its fix -------------------------------
def test_a_bad_request_on_the_simulated_gpu_fails_alone_and_the_dispatcher_serves_on():
    """The cost model traced the bad input outside the launch's error handling: the dispatcher
    thread died and every later request hung."""
    for policy in ("time", "spacetime"):
        sched = SpaceTimeScheduler(SimBackend("h200"), policy, max_wait_ms=1)
        try:
            models = {f"t{i}": tenant_model(i) for i in range(2)}
            for name, m in models.items():
                sched.add_tenant(name, m)
            good = torch.randn(2, 8, 6, 6)
            with sched.cond:
                bad = sched.submit("t0", torch.randn(1, 5, 6, 6))     # 5 channels, not 8
                fine = sched.submit("t1", good)
            with pytest.raises(RuntimeError):
                bad.result(30)
            assert torch.allclose(fine.result(30), _solo(models["t1"], good), atol=1e-5)
            later = [(n, sched.submit(n, good)) for n in models]
            for name, f in later:
                assert torch.allclose(f.result(30), _solo(models[name], good), atol=1e-5), policy
            assert sched.thread.is_alive() and sched.stats()["failed requests"] == 1
        finally:
            sched.close()


class TwoHeads(nn.Module):
    """A model with a tuple output (as recurrent and attention modules have)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, (y.sum(1), {"max": y.amax(1)})


@pytest.mark.parametrize("policy", ["batch", "space", "spacetime"])
def test_tuple_outputs_are_sliced_per_request(policy):
    """Under ``batch`` one request got both output tensors' rows and the other ``y.sum(1)``."""
    sched = SpaceTimeScheduler(CPUBackend(), policy, max_wait_ms=5)
    try:
        models = {f"h{i}": TwoHeads(i) for i in range(3)}
        for name, m in models.items():
            sched.add_tenant(name, m)
        with sched.cond:   # one launch: requests of 1, 2 and 3 rows of each tenant
            futs = [(n, x, sched.submit(n, x)) for n in models for x in (torch.randn(k, 6) for k in (1, 2, 3))]
        for name, x, f in futs:
            y, (total, extra) = f.result(30)
            ref_y, (ref_total, ref_extra) = _solo(models[name], x)
            assert y.shape == ref_y.shape and total.shape == ref_total.shape, (name, x.shape)
            assert torch.allclose(y, ref_y, atol=1e-5) and torch.allclose(total, ref_total, atol=1e-5)
            assert torch.allclose(extra["max"], ref_extra["max"], atol=1e-5)
    finally:
        sched.close()


class Hiccup(nn.Module):
    """Fails its next ``fail[0]`` forward calls with an error that is not vmap's (a device
    hiccup); the counter is the class's, so the program's copy of the model shares it."""

    fail = [0]

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        if type(self).fail[0] > 0:
            type(self).fail[0] -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered (transient)")
        return self.lin(x)


def test_a_stack_that_fails_for_another_reason_than_vmap_is_stacked_again_later():
    """Any failed stack whose requests ran alone used to mark the group unstackable forever."""
    sched = SpaceTimeScheduler(CPUBackend(), "spacetime", max_wait_ms=1, restack_after_s=0.0)
    try:
        models = {f"h{i}": Hiccup(i) for i in range(3)}
        for name, m in models.items():
            sched.add_tenant(name, m)
        x = torch.randn(2, 6)

        def wave():
            with sched.cond:
                futs = [(n, sched.submit(n, x)) for n in models]
            for name, f in futs:
                assert torch.allclose(f.result(30), _solo(models[name], x), atol=1e-5)

        Hiccup.fail[0] = 1            # the stacked launch's one call fails; each request alone succeeds
        wave()
        stats = sched.stats()
        assert (stats["stacked"], stats["stacking paused"], stats["unstackable groups"]) == (1, 1, 0)
        wave()                         # stacked again: the pause (0 s here) is over
        assert sched.stats()["stacked"] == 2 and sched.stats()["failed requests"] == 0
    finally:
        Hiccup.fail[0] = 0
        sched.close()


def test_adding_tenants_one_by_one_keeps_one_program_not_a_copy_of_the_weights_per_size():
    """Adding 20 tenants one by one left 16 cached programs holding 200 weight copies."""
    sched = SpaceTimeScheduler(CPUBackend(), "spacetime", max_wait_ms=1)
    try:
        x = torch.randn(1, 6)
        for i in range(20):
            sched.add_tenant(f"h{i}", Hiccup(i))
            with sched.cond:
                futs = [sched.submit(f"h{j}", x) for j in range(i + 1)]
            [f.result(30) for f in futs]
            copies = sum(p.width for p in sched.cache.values())
            assert copies <= 2 * (i + 1), (i, [p.tenants for p in sched.cache.values()])
        assert [p.width for p in sched.cache.values()] == [20]
        assert sched.stats()["stacked"] == 19
    finally:
        sched.close()


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops run inside it (torch's own op-level hook, not a mock)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class LoggingCPU(CPUBackend):
    def __init__(self):
        super().__init__()
        self.ops, self.weights = [], []

    def forward_stacked(self, stacked, xs, *gather):
        self.weights.append({k: v.data_ptr() for k, v in stacked.params.items()})
        with OpLog() as log:
            out = super().forward_stacked(stacked, xs, *gather)
        self.ops += log.ops
        return out


def test_stacked_weights_are_built_once_per_program_not_gathered_per_launch():
    backend = LoggingCPU()
    sched = SpaceTimeScheduler(backend, "spacetime", max_wait_ms=1)
    try:
        for i in range(4):
            sched.add_tenant(f"t{i}", tenant_model(i))
        x = torch.randn(1, 8, 6, 6)
        for members in ((0, 1, 2, 3), (0, 2, 3), (1, 3, 0), (0, 1, 2, 3)):   # subsets of the group
            with sched.cond:
                futs = [(i, sched.submit(f"t{i}", x)) for i in members]
            for i, f in futs:
                assert torch.allclose(f.result(30), _solo(tenant_model(i), x), atol=1e-5)
        assert "aten.index_select" not in backend.ops and "aten.gather" not in backend.ops
        assert sched.stats()["cache misses"] == 1 and all(w == backend.weights[0] for w in backend.weights)
    finally:
        sched.close()


# -- recurrent and attention models as super-kernels ------------------------------------------------------
class Tagger(nn.Module):
    """A sequence model around an LSTM (vmap alone cannot batch ``aten::lstm``)."""

    def __init__(self, seed: int, cell=nn.LSTM):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = cell(6, 10, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


class Stepper(nn.Module):
    """A hand-unrolled GRU cell."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.cell, self.head = nn.GRUCell(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = None
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


class Attender(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)

    def forward(self, x):
        y, w = self.att(x, x, x)
        return self.enc(y), w


def _seeded(make, seed):
    torch.manual_seed(seed)
    return make().eval()


RECURRENT = {
    "lstm": (lambda: nn.LSTM(6, 10, batch_first=True), (4, 7, 6)),
    "lstm 2 layers, bidirectional, time first": (lambda: nn.LSTM(6, 10, num_layers=2, bidirectional=True), (7, 4, 6)),
    "lstm with projections": (lambda: nn.LSTM(6, 10, proj_size=4, batch_first=True), (4, 7, 6)),
    "gru": (lambda: nn.GRU(6, 10, num_layers=2, batch_first=True), (4, 7, 6)),
    "rnn relu": (lambda: nn.RNN(6, 10, nonlinearity="relu", batch_first=True), (4, 7, 6)),
    "lstm cell": (lambda: nn.LSTMCell(6, 10), (4, 6)),
    "gru cell": (lambda: nn.GRUCell(6, 10), (4, 6)),
    "rnn cell": (lambda: nn.RNNCell(6, 10), (4, 6)),
    "model around a bidirectional lstm": (lambda: Tagger(0), (4, 7, 6)),
    "model around a bidirectional gru": (lambda: Tagger(0, nn.GRU), (4, 7, 6)),
    "unrolled gru cell": (lambda: Stepper(0), (4, 7, 6)),
    "attention and a transformer layer": (lambda: Attender(0), (4, 7, 8)),
}


def _close(a, b):
    if isinstance(b, tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return torch.allclose(a, b, atol=1e-5)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.filterwarnings("error:There is a performance drop")   # vmap's per-tenant fallback loop
@pytest.mark.parametrize("kind", RECURRENT)
def test_recurrent_and_attention_models_stack_into_batched_gemms_equal_to_each_tenant_alone(kind):
    make, shape = RECURRENT[kind]
    backend, R = CPUBackend(), 5
    models = [backend.place(_seeded(make, seed)) for seed in range(R)]
    stacked = backend.stack(tuple(range(R)), models)
    xs = torch.randn(R, *shape)
    with OpLog() as log:
        out = backend.forward_stacked(stacked, xs)
    for i, m in enumerate(models):
        solo = _solo(m, xs[i])
        assert _close(tuple_at(out, i), solo), (kind, i)
    assert {"aten.bmm", "aten.baddbmm"} & set(log.ops) or "aten.matmul" in log.ops or "aten.mm" in log.ops
    assert not {"aten.lstm", "aten.gru", "aten.rnn_tanh", "aten.rnn_relu", "aten._native_multi_head_attention",
                "aten._transformer_encoder_layer_fwd"} & set(log.ops)


def tuple_at(out, i):
    from flowkit.gpu.backends import tensors_map

    return tensors_map(lambda t: t[i], out)


def test_an_lstm_super_kernel_is_one_batched_gemm_per_timestep_over_the_tenants():
    backend, R, T = CPUBackend(), 6, 9
    models = [_seeded(lambda: nn.LSTM(6, 10, batch_first=True), s) for s in range(R)]
    stacked = backend.stack(tuple(range(R)), models)
    with OpLog() as log:
        backend.forward_stacked(stacked, torch.randn(R, 3, T, 6))
    gemms = [op for op in log.ops if op in ("aten.bmm", "aten.baddbmm", "aten.mm", "aten.addmm")]
    assert len(gemms) == 1 + T and set(gemms) == {"aten.baddbmm"}   # the input projection, then one per step


def test_lstm_tenants_are_served_stacked_by_the_scheduler():
    sched = SpaceTimeScheduler(CPUBackend(), "spacetime", max_wait_ms=1)
    try:
        models = {f"tag{i}": Tagger(i).eval() for i in range(4)}
        for name, m in models.items():
            sched.add_tenant(name, m)
        for _ in range(2):
            with sched.cond:
                futs = [(n, x, sched.submit(n, x)) for n in models for x in [torch.randn(1 + len(n) % 3, 5, 6)]]
            for name, x, f in futs:
                assert torch.allclose(f.result(30), _solo(models[name], x), atol=1e-5)
        stats = sched.stats()
        assert stats["stacked"] == 2 and stats["unstackable groups"] == 0 and stats["failed requests"] == 0
    finally:
        sched.close()


# -- the local scheduler, the monitor's device, the plugin's resource ---------------------------------------
def test_a_torch_model_without_the_plugin_uses_the_gpu_where_torch_sees_one(monkeypatch):
    from flowkit.gpu.model import local_choice

    assert local_choice() == (("cuda", "spacetime") if torch.cuda.is_available() else ("cpu", "batch"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # as on a GPU machine
    assert local_choice() == ("cuda", "spacetime")


class FakeNVML:
    """NVML's device lookups and readings as a machine with two GPUs answers them."""

    def __init__(self):
        self.asked = []

    def nvmlDeviceGetHandleByIndex(self, i):
        self.asked.append(("index", i))
        return f"gpu{i}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.asked.append(("uuid", uuid))
        return uuid

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("U", (), {"gpu": {"gpu0": 0.0, "gpu1": 77.0}[h]})()

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"used": 1.0, "total": 2.0})()

    def nvmlGpmQueryDeviceSupport(self, h):
        return type("S", (), {"isSupportedDevice": 0})()


def test_the_monitor_reads_the_schedulers_device_not_device_0(monkeypatch):
    from flowkit.gpu import CUDABackend, monitor

    nvml = FakeNVML()
    monkeypatch.setattr(monitor, "_nvml", nvml)
    monkeypatch.setattr(monitor, "_handles", {})
    monkeypatch.setattr(monitor, "_gpm", {})
    backend = object.__new__(CUDABackend)   # the backend of cuda:1, without a GPU to start it on
    backend.torch, backend.index, backend.device = torch, 1, "cuda:1"
    sample = monitor.device_sample(backend)
    assert sample["nvml_utilization"] == 77.0 and nvml.asked == [("index", 1)]


def _plugin_on_one_of_two(make_cluster):
    """A cluster of two workers, the plugin registered and then removed from the second."""
    from flowkit.gpu import GPUPlugin
    from flowkit.runtime.compat import worker_resources

    def resources_of(dask_worker):
        return worker_resources(dask_worker)

    client = make_cluster(n_workers=2)
    client.register_plugin(GPUPlugin(policy="spacetime", backend="sim:h200"))
    resources = client.run(resources_of)
    assert all(r.get("GPU") == 1 for r in resources.values()), resources
    gpu, plain = sorted(resources)

    async def remove(dask_worker):
        await dask_worker.plugin_remove("flowkit-gpu")

    client.run(remove, workers=[plain])
    assert client.run(resources_of, workers=[plain])[plain].get("GPU") == 0
    wait_until(lambda: client.scheduler_info()["workers"][plain]["resources"].get("GPU") == 0,
               "the scheduler to see the worker without its GPU")
    return client, gpu, plain


def test_the_plugin_declares_the_workers_gpu_resource(make_cluster):
    """The runtime sends gpu=True maps to workers with a GPU resource, which the plugin never declared."""
    pytest.importorskip("distributed")
    client, gpu, plain = _plugin_on_one_of_two(make_cluster)
    assert client.scheduler_info()["workers"][gpu]["resources"].get("GPU") == 1


@pytest.mark.parametrize("batching", [False, True])
def test_gpu_maps_go_to_the_plugins_worker(make_cluster, batching):
    pytest.importorskip("distributed")
    flow = fk.Flow("gpu-routing", {"x": np.ndarray})
    flow.map(Classifier, names=["label"], gpu=True, batching=batching)
    xs = [np.random.default_rng(i).standard_normal((8, 4, 4)).astype(np.float32) for i in range(8)]
    expected = flow.run({"x": xs}).column("label")
    client, gpu, plain = _plugin_on_one_of_two(make_cluster)
    with fk.deploy(flow, cluster=client) as dep:
        futs = [dep.submit({"x": [x]}) for x in xs]
        assert [f.result(30).column("label")[0] for f in futs] == expected
    (served,) = client.run(lambda dask_worker: dask_worker._flowkit_gpu.stats(), workers=[gpu]).values()
    assert sum(t["rows"] for t in served["tenants"].values()) == len(xs)   # every gpu=True row ran on it


# -- on a GPU (benchmarks/gpu_check.sh runs these on a lent device) ---------------------------------------
@cuda
def test_on_cuda_bf16_stacked_outputs_equal_solo_ones():
    from flowkit.gpu import CUDABackend

    backend = CUDABackend()
    for make, shape in ((tenant_model, (2, 8, 6, 6)), (lambda s: Tagger(s).eval(), (2, 5, 6))):
        models = [backend.place(make(s)).to(torch.bfloat16) for s in range(6)]
        stacked = backend.stack(tuple(range(6)), models)
        xs = torch.randn(6, *shape, device=backend.device, dtype=torch.bfloat16)
        for _ in range(3):   # eager, then captured, then replayed
            out = backend.forward_stacked(stacked, xs)
            for i, m in enumerate(models):
                assert torch.allclose(out[i].float(), _solo(m, xs[i]).float(), rtol=3e-2, atol=3e-2), (make, i)


@cuda
def test_on_cuda_a_tuple_output_tenant_runs_beside_a_stack(fp32):
    """``record_stream`` on a tuple output failed the launch, and the stack beside it was marked
    unstackable."""
    from flowkit.gpu import CUDABackend

    sched = SpaceTimeScheduler(CUDABackend(), "spacetime", max_wait_ms=2)
    try:
        models = {f"t{i}": tenant_model(i) for i in range(3)}
        reference = {n: tenant_model(i) for i, n in enumerate(models)}
        for name, m in models.items():
            sched.add_tenant(name, m)
        sched.add_tenant("heads", TwoHeads(7))
        heads = TwoHeads(7)
        for _ in range(3):
            with sched.cond:
                futs = [(n, x, sched.submit(n, x)) for n in models for x in [torch.randn(2, 8, 6, 6)]]
                h = torch.randn(3, 6)
                tup = sched.submit("heads", h)
            for name, x, f in futs:
                assert torch.allclose(f.result(60).cpu(), _solo(reference[name], x), rtol=1e-4, atol=1e-4)
            y, (total, extra) = tup.result(60)
            ref_y, (ref_total, _) = _solo(heads, h)
            assert torch.allclose(y.cpu(), ref_y, atol=1e-4) and torch.allclose(total.cpu(), ref_total, atol=1e-4)
        stats = sched.stats()
        assert stats["stacked"] == 3 and stats["stacking paused"] == 0 and stats["unstackable groups"] == 0
    finally:
        sched.close()


@cuda
def test_on_cuda_memory_stays_bounded_over_ten_input_shapes():
    from flowkit.gpu import CUDABackend

    backend = CUDABackend()
    sched = SpaceTimeScheduler(backend, "spacetime", max_wait_ms=2)
    try:
        for i in range(8):
            sched.add_tenant(f"t{i}", tenant_model(i))
        reserved = []
        for size in range(4, 14):                       # ten image sizes: ten captured graphs per program
            for _ in range(3):
                with sched.cond:
                    futs = [sched.submit(f"t{i}", torch.randn(2, 8, size, size)) for i in range(8)]
                [f.result(60) for f in futs]
            torch.cuda.synchronize()
            reserved.append(torch.cuda.memory_reserved(backend.device))
        growth = [(b - a) / 2 ** 20 for a, b in zip(reserved, reserved[1:])]
        print("memory reserved per shape (MiB):", [round(r / 2 ** 20, 1) for r in reserved], "growth:", growth)
        assert backend.graph_failures == 0
        assert reserved[-1] - reserved[0] < 512 * 2 ** 20   # one shared graph pool: no private pool per capture
    finally:
        sched.close()


@cuda
def test_on_cuda_an_lstm_super_kernel_equals_each_tenant_alone(fp32):
    from flowkit.gpu import CUDABackend

    backend = CUDABackend()
    models = [backend.place(_seeded(lambda: nn.LSTM(16, 32, num_layers=2, batch_first=True), s)) for s in range(8)]
    stacked = backend.stack(tuple(range(8)), models)
    xs = torch.randn(8, 4, 12, 16, device=backend.device)
    for _ in range(3):
        out = backend.forward_stacked(stacked, xs)
        for i, m in enumerate(models):
            assert _close(tuple_at(out, i), _solo(m, xs[i])), i
    assert backend.graph_failures == 0


@cuda
def test_on_cuda_the_plugin_serves_gpu_maps(make_cluster):
    pytest.importorskip("distributed")
    from flowkit.gpu import GPUPlugin

    flow = fk.Flow("gpu-cuda", {"x": np.ndarray})
    flow.map(Classifier, names=["label"], gpu=True, batching=True, max_wait_ms=2)
    xs = [np.random.default_rng(i).standard_normal((8, 4, 4)).astype(np.float32) for i in range(6)]
    expected = flow.run({"x": xs}).column("label")
    client = make_cluster(n_workers=1)
    client.register_plugin(GPUPlugin(policy="spacetime", backend="cuda"))
    with fk.deploy(flow, cluster=client) as dep:
        assert [dep.submit({"x": [x]}).result(60).column("label")[0] for x in xs] == expected
    (stats,) = client.run(lambda dask_worker: dask_worker._flowkit_gpu.stats()).values()
    assert stats["backend"] == "cuda" and sum(t["rows"] for t in stats["tenants"].values()) == len(xs)
