"""benchmarks/loadgen.py with a set of request bodies sent in turn instead of one body: a pipeline's
requests differ (the cascade's photos decide whether its second model runs), so every system gets
the same mix in the same order. Same options and output as loadgen.py, except ``--bodies``: a JSON
file holding a list of request bodies (strings); its ``answers`` are keyed by a body's place in
that list. It runs in its own process.

    python benchmarks/peers/cycling_loadgen.py --url URL --bodies bodies.json --closed 2000
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loadgen  # noqa: E402


class CyclingEndpoint(loadgen.Endpoint):
    def __init__(self, url: str, bodies: list[bytes], timeout: float):
        super().__init__(url, bodies[0], timeout)
        self._next, self._lock = itertools.cycle(enumerate(bodies)), threading.Lock()

    def next_body(self) -> tuple[int, bytes]:
        with self._lock:
            return next(self._next)


def cycling(url: str, bodies_file: str, timeout: float) -> CyclingEndpoint:
    return CyclingEndpoint(url, [b.encode() for b in json.loads(Path(bodies_file).read_text())], timeout)


if __name__ == "__main__":
    loadgen.main("--bodies", cycling, timeout=10)
