"""The peers, serving the four pipelines over HTTP (run in .venv-peers, see setup.sh).

    python servers.py fastapi  --port P      # all stages fused in one process, FastAPI + uvicorn (the HTTP floor)
    python servers.py litserve --port P --pipeline NAME   # one fused LitServe server per pipeline
    python servers.py ray      --port P      # Ray Serve: per pipeline one fused deployment
                                             # (/<name>/fused) and a graph of one deployment per
                                             # stage composed through DeploymentHandles (/<name>/graph)

Every server takes {"rows": [row]} (bytes as base64) at POST /<pipeline>[/variant] and answers
{"rows": [outputs]}, like flowkit's front door. The stages are the pipelines' own functions:
the fused servers call each pipeline's in-process ``floor``; Ray's graph runs the same per-stage
functions as the hand-written dask pipeline (``dask_pipeline``), one deployment per function.
"""

import argparse
import base64
import importlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import PIPELINES  # noqa: E402

BYTES = {"img", "clip"}


def decode(row: dict) -> dict:
    return {k: base64.b64decode(v) if k in BYTES else v for k, v in row.items()}


def encode(out: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}


def modules() -> dict:
    return {name: importlib.import_module(f"pipelines.{name}") for name in PIPELINES}


def fastapi_app():
    from fastapi import FastAPI, Request

    app, mods = FastAPI(), modules()
    stores = {n: m.store() for n, m in mods.items()}

    @app.post("/{pipeline}")
    async def predict(pipeline: str, request: Request):
        body = await request.json()
        mod = mods[pipeline]
        return {"rows": [encode(mod.floor(decode(r), stores[pipeline])) for r in body["rows"]]}

    @app.get("/healthz")
    async def health():
        return {"ok": True}

    return app


def serve_fastapi(port: int) -> None:
    import socket

    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    uvicorn.Server(uvicorn.Config(fastapi_app(), log_level="warning", access_log=False)).run(sockets=[sock])


try:  # LitServe pickles its API into a worker process: the class must live at module level
    import litserve as _ls
except ImportError:  # not in the peers' environment
    _ls = None

if _ls is not None:
    class PipelineAPI(_ls.LitAPI):
        """All of one pipeline's stages, fused, in a LitServe worker."""

        def __init__(self, pipeline: str):
            super().__init__(api_path=f"/{pipeline}")
            self.pipeline = pipeline

        def setup(self, device):
            self.mod = importlib.import_module(f"pipelines.{self.pipeline}")
            self.store = self.mod.store()

        def decode_request(self, request):
            return [decode(r) for r in request["rows"]]

        def predict(self, rows):
            return [self.mod.floor(r, self.store) for r in rows]

        def encode_response(self, outs):
            return {"rows": [encode(o) for o in outs]}


def serve_litserve(port: int, pipeline: str) -> None:
    import litserve as ls

    ls.LitServer(PipelineAPI(pipeline), accelerator="cpu", workers_per_device=1, healthcheck_path="/healthz").run(port=port, host="127.0.0.1", generate_client_file=False,
                                                  log_level="warning")


class _RayCalls:
    """Stands in for a dask client inside Ray: ``submit(fn, *args)`` calls that stage's deployment."""

    def __init__(self, handles: dict):
        self.handles = handles

    def submit(self, fn, *args, pure=False):
        return self.handles[fn.__name__].remote(*args)


def serve_ray(port: int) -> None:
    import ray
    from ray import serve
    from starlette.requests import Request

    # Stopped (SIGTERM), the server shuts Ray down, so the processes ray.init started (its GCS,
    # raylet and workers) end with it instead of outliving the benchmark.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    here = str(Path(__file__).resolve().parents[1])   # benchmarks/, where the pipelines live
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": here, "OMP_NUM_THREADS": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(ray_actor_options={"num_cpus": 0.01})
    class Stage:
        def __init__(self, pipeline: str, fn: str):
            self.fn = getattr(importlib.import_module(f"pipelines.{pipeline}"), fn)

        def __call__(self, *args):
            return self.fn(*args)

    @serve.deployment(ray_actor_options={"num_cpus": 0.01})
    class Graph:
        def __init__(self, pipeline: str, **handles):
            self.mod = importlib.import_module(f"pipelines.{pipeline}")
            self.calls = _RayCalls(handles)
            self.stored = {k: ray.put(v) for k, v in self.mod.store().items()}

        async def __call__(self, request: Request):
            body = await request.json()
            outs = [await self.mod.dask_pipeline(self.calls, decode(r), self.stored) for r in body["rows"]]
            return {"rows": [encode(o) for o in outs]}

    @serve.deployment(ray_actor_options={"num_cpus": 0.01})
    class Fused:
        def __init__(self, pipeline: str):
            self.mod = importlib.import_module(f"pipelines.{pipeline}")
            self.store = self.mod.store()

        async def __call__(self, request: Request):
            body = await request.json()
            return {"rows": [encode(self.mod.floor(decode(r), self.store)) for r in body["rows"]]}

    # 12 stage deployments, 4 graphs and 4 fused deployments share 2 CPUs: each asks for a sliver,
    # so Ray places them all (the default of 1 CPU each would leave most of them pending).
    for name, mod in modules().items():
        fns = sorted({f for f in dir(mod) if f.startswith("d_")})
        handles = {f: Stage.options(name=f"{name}-{f}").bind(name, f) for f in fns}
        serve.run(Graph.options(name=f"{name}-graph").bind(name, **handles), name=f"{name}-graph",
                  route_prefix=f"/{name}/graph")
        serve.run(Fused.options(name=f"{name}-fused").bind(name), name=f"{name}-fused", route_prefix=f"/{name}/fused")
    print("ray ready", flush=True)
    import time

    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


def die_with_parent() -> None:
    """End this server (SIGTERM) when the process that started it ends, on Linux: a benchmark or
    test that dies without stopping its peers must not leave them serving (one FastAPI server
    outlived a failed test run for over an hour). The signal comes when the starting *thread*
    ends: peers are started from the benchmark's main thread."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:   # the parent was already gone before we asked
        sys.exit(0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["fastapi", "litserve", "ray"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pipeline", default="cascade")
    args = ap.parse_args()
    die_with_parent()
    {"fastapi": lambda: serve_fastapi(args.port), "litserve": lambda: serve_litserve(args.port, args.pipeline),
     "ray": lambda: serve_ray(args.port)}[args.system]()
