"""Image cascade: pre-processing -> the pretrained MobileNetV2 -> (only when it is unsure) a larger
CNN (ResNet-18's shapes, random weights) -> left join -> keep the more confident label. Served
fused whole, as Cloudflow served it.

Requests are real photographs (``photos.views``: crops of the photos that ship in scikit-image and
scikit-learn), decoded and resized by the client to 96x96 RGB bytes; labels are ImageNet's names."""

from __future__ import annotations

import numpy as np

from . import once

from flowkit.imagenet import CATEGORIES, MEAN, STD

SIZE = 96
THRESHOLD = 0.6           # MobileNetV2's confidence below which the large CNN is asked too (~1 request in 4)
TARGET_MS = 250.0
RULES = {"whole": True}


def preprocess(row) -> np.ndarray:
    img = np.frombuffer(row["img"], dtype=np.uint8).reshape(3, SIZE, SIZE).astype(np.float32) / 255
    return (img - MEAN) / STD


def _classify(model, x) -> tuple[str, float]:
    import torch

    with torch.inference_mode():
        p = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(x))[None]), 1)[0]
    return CATEGORIES[int(p.argmax())], float(p.max())


class MobileNet:
    def __init__(self):
        from .models import mobilenet_v2
        self.model = mobilenet_v2()

    def __call__(self, row) -> tuple[str, float]:
        return _classify(self.model, row["x"])


class LargeCNN:
    def __init__(self):
        from .models import large_cnn
        self.model = large_cnn()

    def __call__(self, row) -> tuple[str, float]:
        return _classify(self.model, row["x"])


def unsure(row) -> bool:
    return row["conf"] < THRESHOLD


def pick(row) -> tuple[str, float]:
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
    """``n`` requests cycling over crops of the real photographs (see ``photos.views``)."""
    from . import photos

    return photos.requests(SIZE, n, seed)


def store() -> dict:
    return {}


_models: dict = {}   # this process's instances (see pipelines.once)
MODELS = (MobileNet, LargeCNN)


def floor(row: dict, store: dict) -> dict:
    """All stages called in one process (the floor)."""
    small = once(_models, MobileNet)
    x = preprocess(row)
    label, conf = small({"x": x})
    r = {"label": label, "conf": conf, "label2": None, "conf2": None}
    if conf < THRESHOLD:
        r["label2"], r["conf2"] = once(_models, LargeCNN)({"x": x})
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
