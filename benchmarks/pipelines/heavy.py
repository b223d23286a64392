"""Heavy variant: the real MobileNetV2 at 224x224 on the real photographs -- pre-processing ->
MobileNetV2 (batching) -> the top ImageNet label. Compute dominates (about 0.6 GFLOPs a request,
against 0.11 in the cascade's 96x96 MobileNetV2), so a server's own overhead should vanish next
to the model. Batching saves little per image on a CPU with one torch thread: a batch of 4 rows,
``MAX_BATCH``, costs the least per image, one of 8 more than one row (``benchmarks/batch_cost.py``).

Not in ``PIPELINES`` (the four Cloudflow pipelines); ``EXTRA`` in ``__init__`` lists it."""

from __future__ import annotations

import numpy as np

from . import once

from flowkit.imagenet import CATEGORIES, MEAN, STD

SIZE = 224
TARGET_MS = 500.0
RULES = {"batching": True}
MAX_BATCH = 4   # the cheapest batch per image measured here (benchmarks/results/batch_cost.md)


def preprocess(row) -> np.ndarray:
    img = np.frombuffer(row["img"], dtype=np.uint8).reshape(3, SIZE, SIZE).astype(np.float32) / 255
    return (img - MEAN) / STD


def _top1(logits) -> tuple[str, float]:
    import torch

    p = torch.softmax(logits, -1)
    return CATEGORIES[int(p.argmax())], float(p.max())


class MobileNet224:
    """A batching class operator: one forward pass over a table's rows."""

    def __init__(self):
        from .models import mobilenet_v2
        self.model = mobilenet_v2()

    def __call__(self, table) -> list[tuple[str, float]]:
        import torch

        x = torch.from_numpy(np.stack([np.ascontiguousarray(r["x"]) for r in table]))
        with torch.inference_mode():
            z = self.model(x)
        return [_top1(row) for row in z]


def flow():
    import flowkit as fk

    f = fk.Flow("heavy", {"img": bytes})
    f.map(preprocess, names=["x"]).map(MobileNet224, names=["label", "conf"], batching=True, max_batch=MAX_BATCH)
    return f


def requests(n: int, seed: int = 0) -> list[dict]:
    """``n`` requests cycling over crops of the real photographs, 224x224 RGB bytes."""
    from . import photos

    return photos.requests(SIZE, n, seed)


def store() -> dict:
    return {}


_models: dict = {}   # this process's instances (see pipelines.once)
MODELS = (MobileNet224,)


def floor(row: dict, store: dict) -> dict:
    """All stages called in one process (the floor), one request at a time."""
    label, conf = once(_models, MobileNet224)([{"x": preprocess(row)}])[0]
    return {"label": label, "conf": conf}


def floor_batch(rows: list[dict], store: dict) -> list[dict]:
    """The floor for peers that batch (LitServe, Ray's ``@serve.batch``, Triton): one forward pass."""
    out = once(_models, MobileNet224)([{"x": preprocess(r)} for r in rows])
    return [{"label": label, "conf": conf} for label, conf in out]


# -- the hand-written dask pipeline: one future per stage --------------------------------------------
def d_pre(row):
    return preprocess(row)


def d_model(x):
    from flowkit.runtime.semantics import callable_for
    label, conf = callable_for(MobileNet224)([{"x": x}])[0]
    return {"label": label, "conf": conf}


def dask_pipeline(client, row, stored):
    return client.submit(d_model, client.submit(d_pre, row, pure=False), pure=False)
