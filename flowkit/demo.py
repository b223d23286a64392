"""The demo pipeline: classify 32x32 images with a small random-weight ResNet-style CNN.

Three stages, as in the serving benchmarks: numpy pre-processing of raw bytes, the torch model
(a class operator, so it loads once per process), and softmax post-processing.
``python -m flowkit demo`` builds it, runs it, optimizes it and serves it from a deployment.
"""

from __future__ import annotations

import time

import numpy as np

import flowkit as fk

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def preprocess(row) -> np.ndarray:
    """3072 raw bytes -> a normalized (3, 32, 32) float32 array."""
    img = np.frombuffer(row["img"], dtype=np.uint8).reshape(3, 32, 32).astype(np.float32) / 255.0
    return (img - MEAN) / STD


class TinyResNet:
    """A random-weight ResNet-ish CNN (stem conv, 2 residual blocks, pool, 10 classes); ~0.45 ms per image."""

    def __init__(self):
        import torch
        from torch import nn

        torch.manual_seed(0)

        class Block(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
                self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

            def forward(self, x):
                y = torch.relu(self.b1(self.c1(x)))
                return torch.relu(x + self.b2(self.c2(y)))

        self.torch = torch
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                 Block(16), Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.net(self.torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    def __call__(self, row) -> np.ndarray:
        return self.logits(row["x"][None])[0]


def postprocess(row) -> tuple[int, float]:
    z = row["logits"] - row["logits"].max()
    p = np.exp(z) / np.exp(z).sum()
    return int(p.argmax()), float(p.max())


def image_flow() -> fk.Flow:
    flow = fk.Flow("classify", {"img": bytes})
    flow.map(preprocess, names=["x"]).map(TinyResNet, names=["logits"]).map(postprocess, names=["label", "prob"])
    return flow


def sample_images(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"img": rng.integers(0, 256, 3072, dtype=np.uint8).tobytes()} for _ in range(n)]


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000


def main(requests: int = 200) -> None:
    flow = image_flow()
    images = sample_images(8)
    print(f"flow: {flow}")
    for line in [f"  {op.name} ({op.kind}) -> [{op.schema.describe()}]" for op in flow.plan.stages()]:
        print(line)
    local = flow.run(images)
    print("\nreference run on 8 images:")
    print(local.to_pandas().to_string())
    one = images[:1]
    flow.run(one)
    print(f"\nin-process, one image: median {_median_ms(lambda: flow.run(one), requests):.3f} ms")
    opt = fk.optimize(flow)
    print("\noptimizer rewrites:")
    for line in opt.explain():
        print("  -", line)
    try:
        deploy = fk.deploy
    except AttributeError:
        return
    print("\ndeploying on the embedded dask cluster ...", flush=True)
    t0 = time.perf_counter()
    with deploy(flow) as dep:
        print(f"{dep!r}  (ready in {time.perf_counter() - t0:.1f} s)")
        remote = dep.run(images)
        assert remote == local, "the deployment must return what the reference executor returns"
        dep.run(one)
        print(f"deployed, one image end to end: median {_median_ms(lambda: dep.run(one), requests):.3f} ms")
        results = dep.map([images[i % 8:i % 8 + 1] for i in range(64)], progress=False)
        print(f"scored {len(results)} requests with dep.map")
        print("\nper-stage statistics:")
        print(dep.stats().to_string(index=False))
