"""Translation: a language classifier -> per-language sequence-to-sequence transformers (random
weights), marked high_variance -> outer join. Not raced (`compete=1`, the optimizer's default): the
translator's time follows its input's length, which every replica shares, so a race finds no
faster replica and its loser takes the other core (docs/benchmarks.md); the latency-objective
planner declines to race such a stage too."""

from __future__ import annotations

import zlib

import numpy as np

from . import once

try:   # flowkit's cooperative cancellation (peers' environments run these stages without flowkit)
    from flowkit import cancelled as _cancelled
except ImportError:
    _cancelled = None

TARGET_MS = 300.0
RULES: dict = {}   # the optimizer's defaults (fusion, locality, batching; no race)
WORDS = ("le la les un une est et de du des der die das ein eine ist und zu mit von maison haus chat katze "
         "chien hund voiture auto bleu blau rouge rot grand gross petit klein").split()


def tokens(text: str) -> list[int]:
    return [zlib.crc32(w.encode()) % 4096 for w in text.split()]


class LanguageClassifier:
    def __init__(self):
        from .models import language_classifier
        self.model = language_classifier()

    def __call__(self, row) -> tuple[str, list]:
        import torch

        ids = tokens(row["text"])
        with torch.inference_mode():
            score = self.model(torch.tensor([ids]))[0]
        return ("fr" if float(score[0]) >= float(score[1]) else "de"), ids


def is_fr(row) -> bool:
    return row["lang"] == "fr"


def is_de(row) -> bool:
    return row["lang"] == "de"


class _Translator:
    lang = ""

    def __init__(self):
        from .models import translator
        self.model = translator(self.lang)

    def __call__(self, row) -> str:
        import torch

        ids = row["ids"]
        with torch.inference_mode():   # output as long as the input; a replica that lost its race stops
            out = self.model(torch.tensor([ids]), steps=len(ids), stop=_cancelled)
        return " ".join(map(str, out[0].tolist()))


class TranslateFr(_Translator):
    lang = "fr"


class TranslateDe(_Translator):
    lang = "de"


def flow():
    import flowkit as fk

    f = fk.Flow("translation", {"text": str})
    lang = f.map(LanguageClassifier, names=["lang", "ids"])
    fr = lang.filter(is_fr).map(TranslateFr, names=["fr"], high_variance=True)
    de = lang.filter(is_de).map(TranslateDe, names=["de"], high_variance=True)
    fr.join(de, how="outer")
    return f


def requests(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS, size=int(rng.integers(4, 20))))} for _ in range(n)]


def store() -> dict:
    return {}


_models: dict = {}   # this process's instances (see pipelines.once)
MODELS = (LanguageClassifier, TranslateFr, TranslateDe)


def floor(row: dict, store: dict) -> dict:
    lang, ids = once(_models, LanguageClassifier)(row)
    out = {"fr": None, "de": None}
    model = once(_models, TranslateFr if lang == "fr" else TranslateDe)
    out[lang] = model({"ids": ids})
    return out


def d_lang(row):
    from flowkit.runtime.semantics import callable_for
    return callable_for(LanguageClassifier)(row)


def d_translate(lang, li):
    from flowkit.runtime.semantics import callable_for
    if li[0] != lang:
        return None
    return callable_for(TranslateFr if lang == "fr" else TranslateDe)({"ids": li[1]})


def d_join(fr, de):
    return {"fr": fr, "de": de}


def dask_pipeline(client, row, stored):
    li = client.submit(d_lang, row, pure=False)
    fr = client.submit(d_translate, "fr", li, pure=False)
    de = client.submit(d_translate, "de", li, pure=False)
    return client.submit(d_join, fr, de, pure=False)
