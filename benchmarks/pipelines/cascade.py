"""Image cascade: pre-processing -> pretrained MobileNetV2 -> (only when it is unsure) a larger
CNN -> left join -> keep the more confident label. Served fused whole, as Cloudflow served it."""

from __future__ import annotations

import numpy as np

SIZE = 96
THRESHOLD = 0.2           # MobileNetV2's confidence below which the large CNN is asked too
TARGET_MS = 250.0
RULES = {"whole": True}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def preprocess(row) -> np.ndarray:
    img = np.frombuffer(row["img"], dtype=np.uint8).reshape(3, SIZE, SIZE).astype(np.float32) / 255
    return (img - MEAN) / STD


def _classify(model, x) -> tuple[int, float]:
    import torch

    with torch.inference_mode():
        p = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(x))[None]), 1)[0]
    return int(p.argmax()), float(p.max())


class MobileNet:
    def __init__(self):
        from .models import mobilenet_v2
        self.model = mobilenet_v2()

    def __call__(self, row) -> tuple[int, float]:
        return _classify(self.model, row["x"])


class LargeCNN:
    def __init__(self):
        from .models import large_cnn
        self.model = large_cnn()

    def __call__(self, row) -> tuple[int, float]:
        return _classify(self.model, row["x"])


def unsure(row) -> bool:
    return row["conf"] < THRESHOLD


def pick(row) -> tuple[int, float]:
    if row["label2"] is not None and row["conf2"] > row["conf"]:
        return row["label2"], row["conf2"]
    return row["label"], row["conf"]


def flow():
    import flowkit as fk

    f = fk.Flow("cascade", {"img": bytes})
    pre = f.map(preprocess, names=["x"])
    small = pre.join(pre.map(MobileNet, names=["label", "conf"]))
    large = small.filter(unsure).map(LargeCNN, names=["label2", "conf2"])
    small.join(large, how="left").map(pick, names=["label", "conf"])
    return f


def requests(n: int, seed: int = 0) -> list[dict]:
    """Smooth synthetic images (blobs of colour), so the classifier's confidence varies."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(n):
        img = np.zeros((3, SIZE, SIZE))
        for _ in range(4):
            cy, cx, r = rng.random(3)
            img += rng.random((3, 1, 1)) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.1 * r))
        img = (255 * img / img.max()).astype(np.uint8)
        out.append({"img": img.tobytes()})
    return out


def store() -> dict:
    return {}


_models: dict = {}


def floor(row: dict, store: dict) -> dict:
    """All stages called in one process (the floor)."""
    small = _models.setdefault("small", MobileNet())
    x = preprocess(row)
    label, conf = small({"x": x})
    r = {"label": label, "conf": conf, "label2": None, "conf2": None}
    if conf < THRESHOLD:
        r["label2"], r["conf2"] = _models.setdefault("large", LargeCNN())({"x": x})
    label, conf = pick(r)
    return {"label": label, "conf": conf}


# -- the hand-written dask pipeline: one future per stage --------------------------------------------
def d_pre(row):
    return preprocess(row)


def d_small(x):
    from flowkit.runtime.semantics import callable_for
    return callable_for(MobileNet)({"x": x})


def d_large(x, small):
    from flowkit.runtime.semantics import callable_for
    return callable_for(LargeCNN)({"x": x}) if small[1] < THRESHOLD else (None, None)


def d_pick(small, large):
    label, conf = pick({"label": small[0], "conf": small[1], "label2": large[0], "conf2": large[1]})
    return {"label": label, "conf": conf}


def dask_pipeline(client, row, stored):
    x = client.submit(d_pre, row, pure=False)
    s = client.submit(d_small, x, pure=False)
    big = client.submit(d_large, x, s, pure=False)
    return client.submit(d_pick, s, big, pure=False)
