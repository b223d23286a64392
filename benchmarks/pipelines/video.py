"""Video streams: a 30-frame clip -> a per-frame detector-style CNN -> two filtered branches
("person" and "car" frames), each into its own classifier -> outer join. Served fused whole."""

from __future__ import annotations

import numpy as np

from . import once

FRAMES, SIZE = 30, 32
PERSON, CAR = 0, 1
TARGET_MS = 250.0
RULES = {"whole": True}


def decode(row) -> np.ndarray:
    return np.frombuffer(row["clip"], dtype=np.uint8).reshape(FRAMES, 3, SIZE, SIZE).astype(np.float32) / 255


class Detector:
    def __init__(self):
        from .models import detector
        self.model = detector()

    def __call__(self, row) -> tuple[int, int, np.ndarray]:
        import torch

        with torch.inference_mode():
            z = self.model(torch.from_numpy(row["frames"]))[:, :3]
            z = (z - z.mean(0)) / (z.std(0) + 1e-6)        # scores relative to the clip
            classes = (z + torch.tensor([0.0, 0.0, 0.8])).argmax(1).numpy()   # 0 person, 1 car, 2 neither
        return int((classes == PERSON).sum()), int((classes == CAR).sum()), classes


def has_person(row) -> bool:
    return row["persons"] > 0


def has_car(row) -> bool:
    return row["cars"] > 0


class _Classifier:
    kind = ""
    wanted = 0

    def __init__(self):
        from .models import clip_classifier
        self.model = clip_classifier(self.kind)

    def __call__(self, row) -> int:
        import torch

        frames = row["frames"][row["classes"] == self.wanted]
        with torch.inference_mode():
            return int(self.model(torch.from_numpy(np.ascontiguousarray(frames))).mean(0).argmax())


class PersonClassifier(_Classifier):
    kind, wanted = "person", PERSON


class CarClassifier(_Classifier):
    kind, wanted = "car", CAR


def flow():
    import flowkit as fk

    f = fk.Flow("video", {"clip": bytes})
    frames = f.map(decode, names=["frames"])
    d = frames.join(frames.map(Detector, names=["persons", "cars", "classes"]))
    people = d.filter(has_person).map(PersonClassifier, names=["person_label"])
    cars = d.filter(has_car).map(CarClassifier, names=["car_label"])
    found = people.join(cars, how="outer")
    d.join(found, how="left").map(labels, names=["person_label", "car_label"])   # clips with neither keep a row
    return f


def labels(row) -> tuple[int, int]:
    return row["person_label"], row["car_label"]


def requests(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"clip": rng.integers(0, 256, FRAMES * 3 * SIZE * SIZE, dtype=np.uint8).tobytes()} for _ in range(n)]


def store() -> dict:
    return {}


_models: dict = {}   # this process's instances (see pipelines.once)
MODELS = (Detector, PersonClassifier, CarClassifier)


def floor(row: dict, store: dict) -> dict:
    frames = decode(row)
    persons, cars, classes = once(_models, Detector)({"frames": frames})
    r = {"frames": frames, "classes": classes}
    out = {"person_label": None, "car_label": None}
    if persons:
        out["person_label"] = once(_models, PersonClassifier)(r)
    if cars:
        out["car_label"] = once(_models, CarClassifier)(r)
    return out


def d_decode(row):
    return decode(row)


def d_detect(frames):
    from flowkit.runtime.semantics import callable_for
    return callable_for(Detector)({"frames": frames})


def d_classify(kind, frames, det):
    from flowkit.runtime.semantics import callable_for
    cls = PersonClassifier if kind == "person" else CarClassifier
    count = det[0] if kind == "person" else det[1]
    return callable_for(cls)({"frames": frames, "classes": det[2]}) if count else None


def d_join(person, car):
    return {"person_label": person, "car_label": car}


def dask_pipeline(client, row, stored):
    frames = client.submit(d_decode, row, pure=False)
    det = client.submit(d_detect, frames, pure=False)
    p = client.submit(d_classify, "person", frames, det, pure=False)
    c = client.submit(d_classify, "car", frames, det, pure=False)
    return client.submit(d_join, p, c, pure=False)
