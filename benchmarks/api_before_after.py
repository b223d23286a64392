"""The Python API's closed-loop latency (``dep.run`` on the embedded cluster, the 3-stage image
pipeline) of two versions of flowkit, measured alternately in one run: did a change regress it?

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/api_before_after.py /tmp/before . [--rounds 2]

Each round runs each tree's measurement in a fresh process (``PYTHONPATH=<tree>``): 200 warm-up
requests, then 1,500 timed. Writes ``results/api_before_after.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import save, table  # noqa: E402

MEASURE = """
import json, time
import flowkit as fk
from flowkit.demo import image_flow, sample_images
from flowkit.runtime.stats import percentile
if __name__ == "__main__":
    img = sample_images(1)
    with fk.deploy(image_flow()) as dep:
        for _ in range(200):
            dep.run(img)
        lat = []
        for _ in range(1500):
            t0 = time.perf_counter(); dep.run(img); lat.append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)}))
"""


def commit(tree: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    trees = {"before": os.path.abspath(a.before), "after": os.path.abspath(a.after)}
    runs = {k: [] for k in trees}
    for _ in range(a.rounds):
        for name, tree in trees.items():
            out = subprocess.run([sys.executable, "-c", MEASURE], cwd="/tmp", capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=tree), check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    rows = [{"version": name, "commit": commit(trees[name]), "runs": len(r),
             "p50_ms": statistics.median(x["p50_ms"] for x in r), "p99_ms": statistics.median(x["p99_ms"] for x in r),
             "p50 each": ", ".join(f"{x['p50_ms']:.3f}" for x in r)} for name, r in runs.items()]
    md = table(rows, ["version", "commit", "runs", "p50_ms", "p99_ms", "p50 each"])
    print(md)
    save("api_before_after", {"rows": rows, "runs": runs}, md)


if __name__ == "__main__":
    main()
