"""Fusion: chains of 1-10 maps passing 10 KB / 500 KB / 10 MB payloads, fused vs unfused,
median end-to-end latency on the embedded cluster; beside them, the same chain as hand-written
chained dask futures (what an unfused hop costs when every hop goes through the scheduler).

Goal: fused latency flat in chain length (10 maps <= 1.2x one map); unfused cost per hop reported.
Run: .venv/bin/python benchmarks/fusion.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import RESULTS, plot, save, table, time_calls  # noqa: E402

import flowkit as fk  # noqa: E402


def touch(b: bytes) -> bytes:
    """A map that reads its payload (so the bytes are really there) and passes it on."""
    return b if b[:1] is not None else b""


def chain(length: int) -> fk.Flow:
    flow = fk.Flow(f"chain{length}", {"payload": bytes})
    node = flow
    for _ in range(length):
        node = node.map(touch, col="payload")
    return flow


def main(quick: bool = False) -> dict:

    sizes = {"10 KB": 10_000, "500 KB": 500_000, "10 MB": 10_000_000}
    lengths = [1, 2, 5, 10] if not quick else [1, 10]
    rows = []
    with fk.deploy(chain(1)) as probe:
        client = probe.client
        for label, size in sizes.items():
            data = {"payload": [os.urandom(size)]}
            n = (8 if quick else 30) if size >= 10_000_000 else (20 if quick else 100)
            for length in lengths:
                flow = chain(length)
                with fk.deploy(flow, cluster=client, optimize=True) as fused, \
                        fk.deploy(flow, cluster=client, optimize=False) as unfused:
                    assert fused.run(data) == unfused.run(data) == flow.run(data)

                    def dask_chain():
                        f = src = client.scatter(data["payload"][0], hash=False)
                        for _ in range(length):
                            f = client.submit(touch, f, pure=False)
                        out = f.result()
                        del src
                        return out

                    meds = {}
                    for name, call in (("fused", lambda: fused.run(data)), ("unfused", lambda: unfused.run(data)),
                                       ("dask chained futures", dask_chain)):
                        meds[name] = statistics.median(time_calls(call, n, warmup=3)) * 1000
                rows.append({"payload": label, "maps": length, **{f"{k} ms": v for k, v in meds.items()}})
                print(rows[-1], flush=True)
    for r in rows:
        one = next(x for x in rows if x["payload"] == r["payload"] and x["maps"] == 1)
        r["fused vs 1 map"] = r["fused ms"] / one["fused ms"]
    per_hop = {}
    for label in sizes:
        pts = [r for r in rows if r["payload"] == label]
        lo, hi = pts[0], pts[-1]
        span = hi["maps"] - lo["maps"]
        per_hop[label] = {k: (hi[f"{k} ms"] - lo[f"{k} ms"]) / span for k in ("fused", "unfused", "dask chained futures")}
    md = table(rows, ["payload", "maps", "fused ms", "unfused ms", "dask chained futures ms", "fused vs 1 map"])
    md += "\n\ncost per extra map (ms/hop): " + "; ".join(
        f"{k}: fused {v['fused']:.3f}, unfused {v['unfused']:.3f}, dask chain {v['dask chained futures']:.3f}"
        for k, v in per_hop.items())
    worst = max(r["fused vs 1 map"] for r in rows if r["maps"] == max(lengths))
    md += f"\n\nfused, {max(lengths)} maps vs 1 map: worst {worst:.2f}x (goal <= 1.2x)"
    print(md)
    save("fusion", {"rows": rows, "per_hop_ms": per_hop, "quick": quick}, md)
    plot(RESULTS / "fusion.png",
         {f"{kind} {label}": ([r["maps"] for r in rows if r["payload"] == label],
                              [r[f"{kind} ms"] for r in rows if r["payload"] == label])
          for label in sizes for kind in ("fused", "unfused", "dask chained futures")},
         "maps in the chain", "median latency (ms)", "fusion: latency vs chain length", logy=True)
    return {"rows": rows, "per_hop": per_hop}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
