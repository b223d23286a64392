"""Cloudflow's four real pipelines: image cascade, video streams, translation, recommender.

Each module defines the stages as plain functions (``stages``), a flowkit flow built from them
(``flow()``), the optimizer rules the pipeline is served with (``RULES``), sample requests
(``requests(n)``), objects to store (``store()``), and a latency target for the open-loop runs.
"""

PIPELINES = ("cascade", "video", "translation", "recommender")
