"""The GPU cost model: its calibration is cited, its Table 1 is a prediction (never checked against
the paper: the error is reported, whatever it is), and a module's cost is that module's."""

from __future__ import annotations

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from flowkit.gpu.costmodel import (TABLE1, Gemm, LayerCosts, gflops, kernel_seconds, policy_seconds,  # noqa: E402
                                   predict_table1, structure_key, table1_error)
from flowkit.gpu.profiles import PROFILES  # noqa: E402

CALIBRATED = ("sms", "fp32_tflops", "bf16_tflops", "mem_gbs", "memory_gib", "launch_us", "connections",
              "max_concurrent", "sgemm_eff", "tile_m", "tile_n", "ctas_per_sm")


def small_stack():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))


def large_stack():
    return nn.Sequential(nn.Conv2d(3, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1))


def modeled_seconds(gemms, profile="v100"):
    return sum(policy_seconds("time", g, 1, PROFILES[profile]) for g in gemms)


def test_two_different_sequentials_are_costed_apart():
    costs, x = LayerCosts(), torch.randn(1, 3, 32, 32)
    small, large = costs(small_stack(), x), costs(large_stack(), x)
    assert len(small) == 2 and len(large) == 3
    assert modeled_seconds(large) > 5 * modeled_seconds(small)


def test_tenants_of_one_architecture_share_a_trace_and_other_settings_do_not():
    torch.manual_seed(0)
    a = small_stack()
    torch.manual_seed(1)
    b = small_stack()
    assert structure_key(a) == structure_key(b)                       # other weights, same cost
    wider = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    assert structure_key(wider) != structure_key(a)                   # same classes, other kernel size
    costs, x = LayerCosts(), torch.randn(2, 3, 16, 16)
    costs(a, x)
    costs(b, x)
    assert len(costs.entries) == 1
    costs(a, torch.randn(4, 3, 16, 16))                               # another batch: its own entry
    assert len(costs.entries) == 2


def test_the_cache_is_bounded():
    costs = LayerCosts(maxsize=3)
    for n in range(1, 6):
        costs(small_stack(), torch.randn(n, 3, 8, 8))
    assert len(costs.entries) == 3


@pytest.mark.parametrize("batch_first", [False, True])
def test_an_lstm_costs_more_for_a_longer_sequence(batch_first):
    lstm, costs = nn.LSTM(32, 64, num_layers=2, batch_first=batch_first), LayerCosts()

    def seq(steps):
        return torch.randn(2, steps, 32) if batch_first else torch.randn(steps, 2, 32)

    short, long = costs(lstm, seq(5)), costs(lstm, seq(50))
    # per layer: one input projection for all steps, then one recurrent GEMM per step
    assert len(short) == 2 * (1 + 5) and len(long) == 2 * (1 + 50)
    assert short[0] == Gemm(5 * 2, 4 * 64, 32) and short[1] == Gemm(2, 4 * 64, 64)
    assert modeled_seconds(long) > 5 * modeled_seconds(short)


def test_a_gru_cell_and_a_bidirectional_gru_are_counted():
    costs = LayerCosts()
    assert costs(nn.GRUCell(16, 32), torch.randn(4, 16)) == [Gemm(4, 96, 16), Gemm(4, 96, 32)]
    gemms = costs(nn.GRU(16, 32, bidirectional=True), torch.randn(7, 3, 16))
    assert len(gemms) == 2 * (1 + 7)


def test_the_simulated_backend_costs_each_module_as_itself():
    from flowkit.gpu import SimBackend

    backend, x = SimBackend("v100"), torch.randn(1, 3, 32, 32)
    small = backend.modeled("time", small_stack(), x)[0]
    large = backend.modeled("time", large_stack(), x)[0]
    assert large > 5 * small
    lstm = nn.LSTM(32, 64)
    assert backend.modeled("time", lstm, torch.randn(50, 1, 32))[0] > 5 * backend.modeled(
        "time", lstm, torch.randn(5, 1, 32))[0]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_constant_of_a_profile_names_its_source(name):
    p = PROFILES[name]
    assert set(p.sources) == set(CALIBRATED)
    assert all(p.sources[f] for f in CALIBRATED)
    assert set(CALIBRATED) | {"name", "sources"} == {f.name for f in dataclasses.fields(p)}


def test_table1_is_predicted_and_its_error_reported_not_asserted():
    rows = table1_error(PROFILES["v100"])
    assert len(rows) == sum(len([k for k in paper if k.startswith(("R=", "geomean"))]) for paper in TABLE1.values())
    for row in rows:
        assert math.isfinite(row["predicted"]) and row["predicted"] > 0
        assert row["error"] == pytest.approx(row["predicted"] / row["paper"] - 1, abs=0.01)
    pred = predict_table1(PROFILES["h200"])
    assert set(pred) == set(TABLE1)


def test_the_model_has_the_mechanisms_it_claims():
    """Properties of the model itself (launch cost, waves, queues), not of the paper's numbers."""
    v100, conv = PROFILES["v100"], Gemm(256, 128, 1152)
    assert kernel_seconds(conv, 21, v100) == pytest.approx(2 * kernel_seconds(conv, 20, v100))   # a second wave
    assert gflops("spacetime", conv, 21, v100) < gflops("spacetime", conv, 20, v100)            # the sawtooth
    for r in (2, 10, 40, 120):
        assert gflops("spacetime", conv, r, v100) >= gflops("space", conv, r, v100) >= gflops("time", conv, r, v100)
    tiny = Gemm(8, 8, 8)   # shorter than a launch: one stream is launch-bound
    assert policy_seconds("time", tiny, 100, v100) == pytest.approx(100 * v100.launch_us * 1e-6, rel=0.01)
    one_queue = dataclasses.replace(v100, connections=1)   # every stream on one hardware queue: no overlap
    assert policy_seconds("space", conv, 10, one_queue) == pytest.approx(policy_seconds("time", conv, 10, v100))
