"""Per-request cost of the reference executor: a one-row request through a 5-operator flow,
against calling the same 5 functions directly in a loop. Goal: < 20 µs overhead per operator.

Run: .venv/bin/python benchmarks/local_overhead.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flowkit as fk  # noqa: E402
from _report import save, table, time_calls  # noqa: E402


def parse(row) -> float:
    return float(row["x"])


def scale(row) -> float:
    return row["v"] * 1.5


def shift(row) -> float:
    return row["v"] + 2.0


def clip(row) -> float:
    return min(row["v"], 100.0)


def label(row) -> str:
    return "high" if row["v"] > 10 else "low"


def build() -> fk.Flow:
    flow = fk.Flow("overhead", {"x": int})
    flow.map(parse, names=["v"]).map(scale, names=["v"]).map(shift, names=["v"]).map(clip, names=["v"]) \
        .map(label, names=["label"])
    return flow


def direct(record: dict) -> str:
    # The same five functions, called on plain dicts: the floor.
    v = parse(record)
    v = scale({"v": v})
    v = shift({"v": v})
    v = clip({"v": v})
    return label({"v": v})


def main(n: int = 20000) -> dict:
    flow = build()
    plan = flow.plan
    from flowkit.runtime.reference import run_plan

    request = {"x": 7}
    assert flow.run(request).records() == [{"label": "high" if direct(request) == "high" else "low"}]
    rounds = []
    for _ in range(5):  # interleave the two sides so noise hits both alike
        d = time_calls(lambda: direct(request), n // 5)
        f = time_calls(lambda: run_plan(plan, request), n // 5)
        rounds.append((statistics.median(d), statistics.median(f)))
    direct_us = statistics.median(r[0] for r in rounds) * 1e6
    flow_us = statistics.median(r[1] for r in rounds) * 1e6
    per_op = (flow_us - direct_us) / 5
    rows = [{"path": "5 functions called directly", "median_us": direct_us},
            {"path": "flow.run, 5 maps, one row", "median_us": flow_us},
            {"path": "flowkit overhead per operator", "median_us": per_op}]
    md = table(rows, ["path", "median_us"]) + f"\n\nratio flow/direct: {flow_us / direct_us:.1f}x; goal: overhead < 20 µs per operator"
    print(md)
    save("local_overhead", {"rows": rows, "ratio": flow_us / direct_us, "goal_us_per_op": 20}, md)
    return {"direct_us": direct_us, "flow_us": flow_us, "per_op_us": per_op}


if __name__ == "__main__":
    main()
