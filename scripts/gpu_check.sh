#!/usr/bin/env bash
# The project's one device check, for a machine with an NVIDIA Hopper GPU (H100/H200) and no internet:
# builds raphael_ext for sm_90a only with all cores, runs the CUDA tests, then the benchmarks against
# their peers with JSON output, and prints a short table last. Results go to $OUT (default
# benchmarks/results/); commit them there with the card's name and the date. Budget: under 8 minutes.
#
# Wheels brought along in .whl/ (git-ignored), for what the device image lacks. Download them on a
# machine with internet, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl nvidia-cutlass==4.2.0.0
# (nvidia-cutlass provides the CUTLASS headers; torch, triton, pytest-benchmark, hypothesis and
# torchvision are already on the device). With the workplace's device tool: carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
SECONDS=0
stamp() { echo "[gpu_check ${SECONDS}s] $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr ' ' '-')
TAG="$(date +%Y-%m-%d)-${GPU}"

stamp "build (sm_90a, $(nproc) jobs)"
export TORCH_CUDA_ARCH_LIST=9.0a RAPHAEL_EXT_CUDA=1 MAX_JOBS=$(nproc)
python3 -m pip install -v --no-build-isolation --no-deps --no-cache-dir . > "$OUT/build.log" 2>&1 \
  || { tail -n 80 "$OUT/build.log"; exit 1; }
grep "\[raphael_ext build\]" "$OUT/build.log" | awk '!seen[$0]++'
python3 -P -m raphael_ext.info | tee "$OUT/build_info.txt"

stamp "CUDA tests"
python3 -P -m pytest python_tests -q -m cuda -x --junitxml="$OUT/$TAG-cuda-tests.xml" 2>&1 | tail -n 25 || status=$?

stamp "benchmarks"
python3 -P -m pytest benchmarks -q -k cuda --benchmark-json="$OUT/$TAG-bench.json" > "$OUT/$TAG-bench.log" 2>&1 \
  || { tail -n 60 "$OUT/$TAG-bench.log"; status=1; }
python3 benchmarks/report.py "$OUT/$TAG-bench.json" | tee "$OUT/$TAG-summary.md"
python3 benchmarks/plot_runtime_vs_experts.py "$OUT/$TAG-bench.json" | tee -a "$OUT/$TAG-summary.md" || true
stamp "done"
exit "${status:-0}"
