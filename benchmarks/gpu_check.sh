#!/usr/bin/env bash
# The GPU checks as one prepared command for a lent device machine (about 8 minutes at most):
#
#   1. device.txt      the device, driver, torch and CUDA — and a stop here unless torch sees CUDA
#   2. tests.txt       tests/test_gpu.py's CUDA tests (per-test timeout kept), the plugin on CUDA
#                      among them where `distributed` imports (skipped, saying so, where it does not)
#   3. checks.txt      eager vs CUDA-graph replay of a stacked program at R = 8 and 32 (CUDA events)
#   4. gpu_spacetime_cuda.txt / .json / .md   the paper's Table 1 measured on the device
#   5. verdict.txt     pass/fail of the conv workload against the paper's 3.23x and 7.73x
#   6. extras.tar.gz   everything else (plots), so the folder holds at most 8 files
#
# Each part writes its file as it finishes (a run stopped at its limit still returns what it
# wrote). Output goes to $OUT/gpu_<date>_<device>/ when $OUT is set, else to benchmarks/results/.
#
# Python: the first of python3 and .venv/bin/python whose torch sees CUDA (a carried .venv may hold
# a CPU build of torch). If that interpreter lacks `distributed` and a carried .venv of the same
# Python version has it, the .venv's packages are added *after* the interpreter's own, so the
# machine's CUDA torch still wins.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

PY=""
for cand in python3 .venv/bin/python; do
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
    if "$cand" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        PY="$cand"
        break
    fi
done

stamp="$(date +%Y-%m-%d)"
if [ -z "$PY" ]; then
    dir="${OUT:-benchmarks/results}/gpu_${stamp}_no-cuda"
    mkdir -p "$dir"
    { echo "FAIL: no python here has a torch that sees CUDA (tried python3, .venv/bin/python)"; nvidia-smi 2>&1;
      for cand in python3 .venv/bin/python; do
          "$cand" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1 | sed "s|^|$cand: |"
      done; } > "$dir/device.txt" 2>&1
    cat "$dir/device.txt"
    exit 2
fi

shim=""
if ! "$PY" -c 'import distributed' >/dev/null 2>&1 && [ -x .venv/bin/python ]; then
    venv_site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)"
    same="$("$PY" -c 'import sys; print(sys.version_info[:2])')" && [ "$same" = "$(.venv/bin/python -c 'import sys; print(sys.version_info[:2])')" ] \
        && [ -d "$venv_site" ] && {
        shim="$(mktemp -d)"
        printf 'import site\nsite.addsitedir(%s)\n' "'$venv_site'" > "$shim/sitecustomize.py"   # appended: after the machine's packages
    }
fi
export PYTHONPATH="$PWD${shim:+:$shim}${PYTHONPATH:+:$PYTHONPATH}"

dev="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "_"))')"
dir="${OUT:-benchmarks/results}/gpu_${stamp}_${dev}"
mkdir -p "$dir"
extras="$(mktemp -d)"

# -- 1. the device --------------------------------------------------------------------------------------
{ nvidia-smi; "$PY" -c 'import sys, torch; print(sys.executable, sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0)); assert torch.cuda.is_available()'
  "$PY" -c 'import distributed; print("distributed", distributed.__version__, "from", distributed.__file__)' 2>&1 || true
} > "$dir/device.txt" 2>&1

# -- 2. the CUDA tests ------------------------------------------------------------------------------------
# addopts is cleared (it names doctest and notebook options this run does not want), so the
# per-test timeout is given again here; without pytest-timeout the outer `timeout` still bounds it.
: > "$dir/tests.txt"
pytest_args=(-q -p no:cacheprovider -o addopts="" -rs -s)
if "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
    pytest_args+=(-p pytest_timeout --timeout=120)
else
    echo "pytest-timeout is not installed: no per-test timeout, only the 240 s bound on the run" >> "$dir/tests.txt"
fi
select="cuda"
if ! "$PY" -c 'import distributed' >/dev/null 2>&1; then
    select="cuda and not plugin"
    echo "distributed does not import: the plugin tests are skipped" >> "$dir/tests.txt"
fi
timeout -k 10 240 "$PY" -m pytest "${pytest_args[@]}" -k "$select" tests/test_gpu.py 2>&1 | tee -a "$dir/tests.txt"
echo "exit status ${PIPESTATUS[0]}" >> "$dir/tests.txt"

# -- 3. eager vs graph replay of a stacked program ----------------------------------------------------------
timeout -k 10 90 "$PY" - > "$dir/checks.txt" 2>&1 <<'PYCHECK'
import json, statistics, sys, torch
sys.path.insert(0, ".")
from flowkit.gpu import CUDABackend
from flowkit.gpu.backends import Backend
from tests.test_gpu import tenant_model

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
backend = CUDABackend()
for R in (8, 32):
    models = [backend.place(tenant_model(i)) for i in range(R)]
    stacked = backend.stack(tuple(range(R)), models)
    xs = torch.randn(R, 1, 8, 28, 28, device=backend.device)
    result = {"R": R}
    for mode, run in (("eager", lambda: Backend.forward_stacked(backend, stacked, xs)),
                      ("graph replay", lambda: backend.forward_stacked(stacked, xs))):
        for _ in range(5):
            run()
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        result[f"{mode} median ms"] = statistics.median(times)
        result[f"{mode} p90 ms"] = sorted(times)[int(0.9 * len(times))]
    result["speedup"] = result["eager median ms"] / result["graph replay median ms"]
    result["graph failures"] = backend.graph_failures
    print(json.dumps(result), flush=True)
PYCHECK
echo "exit status $?" >> "$dir/checks.txt"

# -- 4. Table 1 on the device ----------------------------------------------------------------------------
timeout -k 10 180 "$PY" benchmarks/gpu_spacetime.py --device cuda 2>&1 | tee "$dir/gpu_spacetime_cuda.txt"
echo "exit status ${PIPESTATUS[0]}" >> "$dir/gpu_spacetime_cuda.txt"
cp benchmarks/results/gpu_spacetime_cuda.json benchmarks/results/gpu_spacetime_cuda.md "$dir/" 2>/dev/null || true
cp benchmarks/results/gpu_spacetime_cuda*.png "$extras/" 2>/dev/null || true

# -- 5. the verdict against the paper --------------------------------------------------------------------
"$PY" - "$dir/gpu_spacetime_cuda.json" > "$dir/verdict.txt" 2>&1 <<'PYVERDICT'
import json, sys
try:
    summary = json.load(open(sys.argv[1]))["summary"]
except Exception as e:
    sys.exit(f"FAIL: no results from gpu_spacetime.py ({e!r})")
goals = {"spacetime/space": 3.23, "spacetime/time": 7.73}
ok = True
for row in summary:
    if row["dtype"] == "fp32" and row["workload"].startswith("conv2_2"):
        for ratio, goal in goals.items():
            passed = row[ratio] >= goal
            ok &= passed
            print(f"{'PASS' if passed else 'FAIL'} {row['workload']} fp32 {ratio} = {row[ratio]:.2f}x (paper {goal}x)")
    else:
        print(f"info {row['workload']} {row['dtype']}: " + ", ".join(f"{k} {row[k]:.2f}x" for k in goals))
print("verdict:", "PASS" if ok else "FAIL")
PYVERDICT

# -- 6. at most 8 files: the rest in one archive -----------------------------------------------------------
for f in "$dir"/*; do
    case "$(basename "$f")" in
        device.txt|tests.txt|checks.txt|gpu_spacetime_cuda.txt|gpu_spacetime_cuda.json|gpu_spacetime_cuda.md|verdict.txt|extras.tar.gz) ;;
        *) mv "$f" "$extras/" ;;
    esac
done
if [ -n "$(ls -A "$extras")" ]; then
    tar -czf "$dir/extras.tar.gz" -C "$extras" .
fi
rm -rf "$extras" ${shim:+"$shim"}
ls -l "$dir"
