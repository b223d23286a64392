"""What one forward pass costs per image at each batch size: the heavy variant's pretrained
MobileNetV2 at 224 px, with 1 torch thread (as every serving process in the benchmarks has), on
the real photographs. Whether batching can raise the heavy variant's throughput on this machine
depends on it: a server that batches saves only what a larger batch saves per image.

The batch sizes take turns, round after round (``ROUNDS``), so that the machine's slower and
faster moments fall on all of them alike; each call is timed whole (pre-processing included, as
the heavy variant's fused stage runs it) and divided by its batch size.

Run: .venv/bin/python benchmarks/batch_cost.py        # ~40 s -> results/batch_cost.json/.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import save, table  # noqa: E402

BATCHES = (1, 2, 4, 8)
ROUNDS, WARMUP = 100, 3


def measure(rounds: int) -> list[dict]:
    import torch

    from pipelines import heavy

    torch.set_num_threads(1)
    model = heavy.MobileNet224()
    reqs = heavy.requests(max(BATCHES), seed=1)

    def call(b: int) -> float:
        t0 = time.perf_counter()
        model([{"x": heavy.preprocess(r)} for r in reqs[:b]])
        return time.perf_counter() - t0

    for b in BATCHES:
        for _ in range(WARMUP):
            call(b)
    per_image: dict[int, list[float]] = {b: [] for b in BATCHES}
    for _ in range(rounds):
        for b in BATCHES:
            per_image[b].append(call(b) / b * 1000)
    base = statistics.median(per_image[1])
    rows = []
    for b in BATCHES:
        xs = sorted(per_image[b])
        med = statistics.median(xs)
        rows.append({"batch": b, "calls": len(xs), "ms_per_image": med, "p10_ms": xs[len(xs) // 10],
                     "p90_ms": xs[(9 * len(xs)) // 10], "vs_batch_1": med / base,
                     "images_per_s_one_core": 1000 / med})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args(argv)
    rows = measure(args.rounds)
    md = table(rows, ["batch", "calls", "ms_per_image", "p10_ms", "p90_ms", "vs_batch_1", "images_per_s_one_core"])
    print(md)
    config = {"model": "MobileNetV2 (torchvision IMAGENET1K_V1) at 1x3x224x224", "torch_threads": 1,
              "rounds": args.rounds, "warmup_calls": WARMUP, "timed": "pre-processing + one forward pass + top-1"}
    print(save("batch_cost", {"batches": rows, "config": config}, md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
