"""Cloudflow's four pipelines (image cascade, video streams, translation, recommender) and a heavy
variant, on real models where real weights ship offline (see ``models.SIZED_AS``).

Each module defines the stages as plain functions (``stages``), a flowkit flow built from them
(``flow()``), the optimizer rules the pipeline is served with (``RULES``), sample requests
(``requests(n)``), objects to store (``store()``), and a latency target for the open-loop runs.
"""

PIPELINES = ("cascade", "video", "translation", "recommender")
EXTRA = ("heavy",)   # MobileNetV2 at 224x224 with batching: where compute dominates


def once(instances: dict, make):
    """``make()``'s instance in ``instances``, made on first use: a floor builds each model once per
    process, as flowkit does (``dict.setdefault`` would build one per call to throw away)."""
    found = instances.get(make)
    if found is None:
        found = instances[make] = make()
    return found


def load(mod) -> None:
    """Build every model pipeline ``mod``'s floor uses (``mod.MODELS``) now: each peer server loads
    its models at start-up, as its own docs say (LitServe's ``setup``, a Ray deployment's
    ``__init__``, FastAPI's app start-up), and as flowkit's workers do before they take requests."""
    for make in getattr(mod, "MODELS", ()):
        once(mod._models, make)
