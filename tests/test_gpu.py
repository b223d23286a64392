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
from flowkit.gpu.scheduler import Request, Tenant, find_stragglers

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
    some = backend.forward_stacked(stacked, xs[:3], slots=(4, 0, 4))   # a subset: their weights gathered
    with torch.inference_mode():
        for i, m in enumerate(models):
            assert torch.allclose(out[i], m(xs[i]), atol=1e-5)
        for row, slot in enumerate((4, 0, 4)):
            assert torch.allclose(some[row], models[slot](xs[row]), atol=1e-5)


class BucketingCPU(CPUBackend):
    """The CPU backend padding stacked launches as the CUDA backend does (for its graphs)."""

    bucket = staticmethod(power_of_two)

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward_stacked(self, stacked, xs, slots=None):
        self.shapes.append((tuple(xs.shape[:2]), slots))
        return super().forward_stacked(stacked, xs, slots)


def test_one_super_kernel_per_group_serves_any_subset_of_its_tenants_in_few_shapes():
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
        assert stats["stacked"] == len(waves) and stats["cache misses"] == 1   # one program for every subset
        assert all(w in (1, 2, 4, 5) and r in (1, 2, 4) for (w, r), _ in backend.shapes)
        assert (backend.shapes[2][1] is None) and all(s is not None for i, (_, s) in enumerate(backend.shapes) if i != 2)
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
        assert sched.tenants["b0"].arch != sched.tenants["b1"].arch      # never grouped again
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


def test_the_simulated_v100_reproduces_the_papers_ordering_and_ratios():
    v100, rs = PROFILES["v100"], [1, 2, 5, 10, 20, 32, 40, 64, 80, 120]
    conv = Gemm(256, 128, 1152)
    per = {p: [gflops(p, conv, r, v100) for r in rs] for p in ("time", "space", "spacetime")}
    assert all(st >= s >= t * 0.99 for st, s, t in zip(per["spacetime"][2:], per["space"][2:], per["time"][2:]))
    assert _geomean_ratio(per["spacetime"], per["space"]) == pytest.approx(3.23, rel=0.25)
    assert _geomean_ratio(per["spacetime"], per["time"]) == pytest.approx(7.73, rel=0.25)
    square = Gemm(256, 256, 256)
    assert _geomean_ratio([gflops("spacetime", square, r, v100) for r in rs],
                          [gflops("space", square, r, v100) for r in rs]) == pytest.approx(4.93, rel=0.25)
    rnn = Gemm(512, 1, 512)                                   # memory-bound: time-only is the next best
    per = {p: [gflops(p, rnn, r, v100) for r in rs] for p in ("time", "space", "spacetime")}
    assert _geomean_ratio(per["time"], per["space"]) > 1
    assert _geomean_ratio(per["spacetime"], per["time"]) == pytest.approx(2.48, rel=0.25)
    # the sawtooth: one more problem than a full wave costs throughput
    assert gflops("spacetime", conv, 21, v100) < gflops("spacetime", conv, 20, v100)


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
        xs = torch.randn(5, 2, 8, 6, 6, device=backend.device)
        out = backend.forward_stacked(stacked, xs)
        slots = ((4, 1), (0, 2), (3, 3))[step % 3]
        some = backend.forward_stacked(stacked, xs[:2], slots)   # a subset: gathered inside the graph
        with torch.inference_mode():
            for i, m in enumerate(models):
                assert torch.allclose(out[i], m(xs[i]), rtol=1e-4, atol=1e-4), (step, i)
            for row, slot in enumerate(slots):
                assert torch.allclose(some[row], models[slot](xs[row]), rtol=1e-4, atol=1e-4), (step, slots)
    assert backend.graph_failures == 0
    assert len(stacked.graphs) == 2 and all(stacked.graphs.values())   # two shapes, each captured once
