#!/usr/bin/env bash
# The GPU checks as one prepared command for a lent device machine (a few minutes): the GPU tests
# on CUDA, then the paper's Table 1 on the device. Uses .venv when there is one, else the
# machine's python3 (the device image has torch, numpy, pytest, nvidia-ml-py; dask and ipywidgets
# are not needed: those tests skip). Output goes straight to $OUT/gpu_<date>_<device>/ when $OUT
# is set (so a run stopped at its limit still returns what it wrote), else to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
stamp="$(date +%Y-%m-%d)"
dev="$($PY -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "no-cuda")')"
dir="${OUT:-benchmarks/results}/gpu_${stamp}_${dev}"
mkdir -p "$dir"
{ nvidia-smi; $PY -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda)'; } \
    > "$dir/device.txt" 2>&1
timeout 180 $PY -m pytest -q -p no:cacheprovider -o addopts="" -rs -s tests/test_gpu.py 2>&1 | tee "$dir/tests.txt"
timeout 300 $PY benchmarks/gpu_spacetime.py --device cuda 2>&1 | tee "$dir/gpu_spacetime_cuda.txt"
cp benchmarks/results/gpu_spacetime_cuda* "$dir/" 2>/dev/null || true
