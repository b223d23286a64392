"""HTTP serving of the 3-stage pipeline: flowkit's front door beside a plain FastAPI server that
runs the same functions in one process (the floor), measured in one run.

Closed loop (one keep-alive client, one request at a time): p50/p99. Open loop: Poisson arrivals
at rising rates from a thread pool of keep-alive clients, latency from the scheduled send time;
the highest rate at which 99% of requests finish within 50 ms.
Goal: flowkit p50 within 1.5x of the FastAPI floor (and ahead of LitServe and Ray Serve when those
are installed; they are not dependencies of flowkit and are not installed by default).

Run: .venv/bin/python benchmarks/http_serving.py [--quick]
(Named http_serving.py, not http.py: a benchmarks/http.py would shadow the standard library's
http package for every script here that puts benchmarks/ on sys.path.)
"""


import argparse
import base64
import http.client
import os
import sys
import json
import socket
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _report import RESULTS, open_loop, plot, save, summarize, table  # noqa: E402
from peers.runner import HTTPSystem  # noqa: E402

import flowkit as fk  # noqa: E402
from flowkit.demo import TinyResNet, image_flow, postprocess, preprocess, sample_images  # noqa: E402
from flowkit.runtime.semantics import callable_for  # noqa: E402


def fastapi_floor():
    """A plain FastAPI app running the three stages in its own process's thread (the floor)."""
    import uvicorn
    from fastapi import FastAPI, Request

    app = FastAPI()
    model = callable_for(TinyResNet)

    @app.post("/predict")
    async def predict(request: Request):
        body = await request.json()
        out = []
        for i, row in enumerate(body["rows"]):
            x = preprocess({"img": base64.b64decode(row["img"])})
            label, prob = postprocess({"logits": model({"x": x})})
            out.append({"qid": i, "label": label, "prob": prob})
        return {"rows": out}

    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    import asyncio

    threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, sock.getsockname()[1]


def main(quick: bool = False) -> dict:
    img = sample_images(1)[0]["img"]
    body = json.dumps({"rows": [{"img": base64.b64encode(img).decode()}]}).encode()
    n = 200 if quick else 1000
    with fk.deploy(image_flow()) as dep, dep.serve() as server:
        floor, floor_port = fastapi_floor()
        systems = {"FastAPI, same functions in one process (floor)": (floor_port, "/predict"),
                   "flowkit dep.serve() (fused, embedded cluster)": (server.port, "/v1/flows/classify/predict")}
        answers = {}
        for name, (port, path) in systems.items():
            c = http.client.HTTPConnection("127.0.0.1", port)
            c.request("POST", path, body, {"Content-Type": "application/json"})
            answers[name] = json.loads(c.getresponse().read())["rows"][0]
        assert len({(a["label"], round(a["prob"], 6)) for a in answers.values()}) == 1, answers
        samples = {k: [] for k in systems}
        for _ in range(4 if not quick else 1):     # interleaved rounds
            for name, (port, path) in systems.items():
                conn = http.client.HTTPConnection("127.0.0.1", port)
                for i in range(n // 4 + 20):
                    t0 = time.perf_counter()
                    conn.request("POST", path, body, {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    r.read()
                    if i >= 20:
                        samples[name].append(time.perf_counter() - t0)
                conn.close()
        closed = [{"system": k, **summarize(v)} for k, v in samples.items()]
        floor_p50 = closed[0]["p50_ms"]
        for r in closed:
            r["p50 vs floor"] = r["p50_ms"] / floor_p50
        md = table(closed, ["system", "n", "p50_ms", "p99_ms", "p50 vs floor"])
        md += f"\n\nflowkit p50 = {closed[1]['p50 vs floor']:.2f}x the FastAPI floor (goal <= 1.5x)"
        print(md, flush=True)
        rates = [100, 200, 400] if quick else [100, 200, 400, 600, 800, 1000]
        open_rows = []
        clients = {name: HTTPSystem(port, path) for name, (port, path) in systems.items()}
        request = {"img": img}
        for rate in rates:
            for name, c in clients.items():
                r = open_loop(lambda done, c=c: c.send(request, done), rate, 1.5 if quick else 4.0, seed=rate, timeout=30)
                open_rows.append({"system": name, **r})
                print(open_rows[-1], flush=True)
        best = {name: max([r["rate"] for r in open_rows if r["system"] == name and r["within_50ms"] >= 0.99] or [0])
                for name in systems}
        md2 = table(open_rows, ["system", "rate", "completed", "p50_ms", "p99_ms", "within_50ms"])
        md2 += "\n\nhighest rate with 99% within 50 ms: " + "; ".join(f"{k}: {v} req/s" for k, v in best.items())
        md2 += "\n\nLitServe and Ray Serve: not installed in this environment, so not measured in this run."
        print(md2)
        floor.should_exit = True
    save("http", {"closed_loop": closed, "open_loop": open_rows, "best": best, "quick": quick},
         "## closed loop\n\n" + md + "\n\n## open loop\n\n" + md2)
    plot(RESULTS / "http.png", {name: ([r["rate"] for r in open_rows if r["system"] == name],
                                       [min(r["p99_ms"], 10_000) for r in open_rows if r["system"] == name])
                                for name in systems}, "offered load (req/s)", "p99 (ms)", "HTTP, 3-stage pipeline",
         logy=True)
    return {"closed": closed, "best": best}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
