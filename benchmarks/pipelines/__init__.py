"""Cloudflow's four pipelines (image cascade, video streams, translation, recommender) and a heavy
variant, on real models where real weights ship offline (see ``models.SIZED_AS``).

Each module defines the stages as plain functions (``stages``), a flowkit flow built from them
(``flow()``), the optimizer rules the pipeline is served with (``RULES``), sample requests
(``requests(n)``), objects to store (``store()``), and a latency target for the open-loop runs.
"""

PIPELINES = ("cascade", "video", "translation", "recommender")
EXTRA = ("heavy",)   # MobileNetV2 at 224x224 with batching: where compute dominates
