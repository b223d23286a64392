"""Ray Serve with its autoscaling, serving one synthetic pipeline of benchmarks/slo.py (run in
.venv-peers; benchmarks/slo.py starts and stops it).

One deployment runs every stage of the pipeline (``slo_pipelines.floor``), its batching stage
through ``@serve.batch`` (max 8 rows, 2 ms wait), scaled by Ray Serve's autoscaler between 1 and
``--max-replicas`` replicas (one reserved CPU each) on ``target_ongoing_requests`` 2 — Ray's
documented default for latency-sensitive serving, with a 1-s upscale delay — behind the HAProxy
ingress with the throughput-optimized request path (``servers.ray_env``, as
benchmarks/pipelines_vs_peers.py runs Ray Serve). It takes
``{"rows": [{...}]}`` (one row, as flowkit's endpoint takes it) at ``POST /<pipeline>`` and
answers ``{"rows": [out]}``. Every second the
running replicas are written to ``--replicas-file`` as JSON ``[[t, n], ...]``.

    .venv-peers/bin/python benchmarks/slo_ray.py --port 8000 --pipeline cascade --max-replicas 2
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--max-replicas", type=int, default=2)
    ap.add_argument("--replicas-file", required=True)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE / "peers"))
    from servers import die_with_parent, ray_env

    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    env = ray_env(a.port)   # HAProxy ingress and the throughput-optimized path, as the peers' benchmark
    os.environ.update(env)
    import ray
    from ray import serve
    from ray.serve.schema import LoggingConfig
    from starlette.requests import Request

    ray.init(num_cpus=a.max_replicas + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE), **env}})
    quiet = LoggingConfig(enable_access_log=False, log_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": a.port}, logging_config=quiet)
    name = a.pipeline

    @serve.deployment(name=f"{name}-slo", max_ongoing_requests=16, ray_actor_options={"num_cpus": 1},
                      logging_config=quiet,
                      autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": a.max_replicas,
                                          "target_ongoing_requests": 2, "upscale_delay_s": 1.0,
                                          "downscale_delay_s": 30.0, "metrics_interval_s": 0.5,
                                          "look_back_period_s": 2.0})
    class Pipeline:
        def __init__(self):
            import slo_pipelines

            self.P = slo_pipelines
            self.store = slo_pipelines.PIPELINES[name]["store"]()

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
        async def batch(self, rows: list) -> list:
            return await asyncio.to_thread(self.P.floor_batch, name, rows, self.store)

        async def __call__(self, request: Request):
            row = (await request.json())["rows"][0]
            return {"rows": [await self.batch(row)]}

    serve.run(Pipeline.bind(), name=name, route_prefix=f"/{name}")
    print("ray ready", flush=True)
    seen, t0 = [], time.time()
    try:
        while True:
            try:
                app = serve.status().applications[name]
                dep = app.deployments[f"{name}-slo"]
                n = dep.replica_states.get("RUNNING", 0)
            except Exception:
                n = None
            seen.append([round(time.time() - t0, 1), n])
            Path(a.replicas_file).write_text(json.dumps(seen))
            time.sleep(1)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
