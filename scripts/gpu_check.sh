#!/usr/bin/env bash
# The project's one device check, for a machine with an NVIDIA Hopper GPU (H100/H200) and no internet. On the
# workplace's GPU machine, from the repository root, as one device call:
#
#     run  command "scripts/gpu_check.sh"  carry [".whl", ".device"]  timeout_s 480
#
# The whole check ends within GPU_CHECK_DEADLINE seconds (default 450, which fits that call with room for the
# files to come back); every stage's limit is capped at the time left, and a stage with no time left is recorded
# as skipped. Prepare both carried folders on a machine with internet first: scripts/device_prebuild.sh downloads
# into .whl/ the wheels the GPU image lacks (scripts/device_env.sh), prebuilds raphael_ext._C for sm_90a against
# the image's torch into .device/, and rehearses this script on the CPU (--rehearse).
#
# Stages, in the order that brings results back first; each runs under `timeout` and tees its output live into
# $OUT/gpu_check.log (the per-stage logs are bundled into $OUT/logs.tar.gz after each stage):
#   setup        wheels (--no-deps --target, as the image needs); _C: the prebuilt one if it imports, else built
#                here; build_info checks (CUTLASS present, sm_90a kernels on a Hopper GPU)
#   tests        every CUDA test, junit XML
#   benchmarks   every CUDA benchmark against its peers, JSON
#   fig6c        the runtime-vs-experts study at paper widths (paper Fig. 6c), its own JSON
#   summary      markdown table and plots
#   memcheck     compute-sanitizer memcheck on a small case of every kernel
#   racecheck    compute-sanitizer racecheck on attention (the kernel with shared-memory tiles)
# A stage that reaches its limit is interrupted with SIGINT, so pytest still writes its summary (-rfEs names every
# failure and skip), its junit XML and its benchmark JSON. A failed stage is recorded and the next one runs; the
# check stops early only when there is no GPU or no _C imports. A test module skipped for a missing package is
# recorded as a failure of its stage (the image lacks a wheel: add it to scripts/device_env.sh).
# Files in $OUT: gpu_check.log, logs.tar.gz, TAG-cuda-tests.xml, TAG-bench.json, TAG-bench.png, TAG-fig6c.json,
# TAG-fig6c-runtime_vs_experts.png, TAG-summary.md (TAG = date and GPU name; older files of the same TAG are removed). Commit them under benchmarks/results/.
# Exit status: 0 when every stage passed.
#
# --rehearse: the same stages on a machine without a GPU, with the CPU tests and benchmarks instead of the CUDA
# ones, and the sanitizer's cases run without a sanitizer.
# Environment: PYTHON, OUT (default build/gpu_check), GPU_CHECK_DEADLINE (seconds; 3600 in a rehearsal),
# GPU_CHECK_LIMIT_<stage> (a stage's own limit, e.g. GPU_CHECK_LIMIT_tests=30), GPU_CHECK_TESTS and
# GPU_CHECK_BENCHMARKS (the files or folders of those stages, default python_tests and benchmarks), GPU_CHECK_PREBUILT (the folder of the prebuilt _C, default .device),
# GPU_CHECK_WORK (scratch, default /tmp/raphael_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
REHEARSE=0
[[ ${1:-} == --rehearse ]] && REHEARSE=1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-build/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/raphael_gpu_check}
PREBUILT=${GPU_CHECK_PREBUILT:-.device}
read -r -a TESTS <<< "${GPU_CHECK_TESTS:-python_tests}"
read -r -a BENCHMARKS <<< "${GPU_CHECK_BENCHMARKS:-benchmarks}"
DEADLINE=${GPU_CHECK_DEADLINE:-$(( REHEARSE ? 3600 : 450 ))}
KILL_AFTER=10  # seconds between a stage's SIGINT and its SIGKILL
RESERVE=5      # seconds kept after the last stage for bundling the logs
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$WORK"
mkdir -p "$WORK/logs"
LOG=$OUT/gpu_check.log
: > "$LOG"
SECONDS=0
FAILED=()
NOTES=()

stamp() { echo "[gpu_check ${SECONDS}s] $*" | tee -a "$LOG"; }
bundle_logs() { tar czf "$OUT/logs.tar.gz" -C "$WORK/logs" . 2>/dev/null; }

# stage NAME LIMIT COMMAND...: the command under `timeout`, its output teed into the check's log and
# $WORK/logs/NAME.log as it runs. The limit is GPU_CHECK_LIMIT_NAME if set, and never runs past the deadline.
# A failure, a timeout or a skip is recorded in FAILED; the caller goes on to the next stage.
stage() {
  local name=$1 limit=$2
  shift 2
  local override="GPU_CHECK_LIMIT_${name//-/_}"
  limit=${!override:-$limit}
  local left=$(( DEADLINE - SECONDS - KILL_AFTER - RESERVE ))
  if (( left < 5 )); then
    stamp "stage $name skipped: the ${DEADLINE}s deadline is reached"
    FAILED+=("$name (skipped at the deadline)")
    return 124
  fi
  (( limit > left )) && limit=$left
  stamp "stage $name (limit ${limit}s)"
  # SIGINT, not SIGTERM: pytest then still writes its failure summary, junit XML and benchmark JSON.
  timeout --signal=INT --kill-after=$KILL_AFTER "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/logs/$name.log"
  local status=${PIPESTATUS[0]}
  if (( status == 124 || status == 137 )); then
    FAILED+=("$name (timed out after ${limit}s)")
  elif (( status != 0 )); then
    FAILED+=("$name (exit $status)")
  fi
  stamp "stage $name done (exit $status)"
  bundle_logs
  return "$status"
}

# pytest_stage NAME LIMIT PYTEST-ARGS...: a pytest stage that also fails when a module was skipped for a
# missing package (collection errors do not stop the others: --continue-on-collection-errors).
pytest_stage() {
  local name=$1 limit=$2
  shift 2
  stage "$name" "$limit" "$PYTHON" -P -m pytest -q -rfEs --continue-on-collection-errors -p no:cacheprovider "$@"
  local status=$?
  if grep -E "^(SKIPPED|ERROR)" "$WORK/logs/$name.log" 2>/dev/null | grep -qE "could not import|No module named"; then
    stamp "$name: a module was skipped for a missing package (add its wheel to scripts/device_env.sh)"
    FAILED+=("$name (missing package)")
  fi
  return "$status"
}

finish() {
  for note in "${NOTES[@]}"; do stamp "note: $note"; done
  bundle_logs
  if (( ${#FAILED[@]} )); then
    stamp "FAILED: ${FAILED[*]}"
    exit 1
  fi
  stamp "all stages passed"
  exit 0
}

# imports: whether the package in $PKG (this tree's sources and a _C) imports with this Python and torch.
imports() { "$PYTHON" -P -c 'import raphael_ext' >> "$WORK/logs/setup.log" 2>&1; }

# --- setup --------------------------------------------------------------------------------------------------
stamp "deadline ${DEADLINE}s"
export PYTHONUNBUFFERED=1
SITE=$WORK/site PKG=$WORK/pkg
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    2>&1 | tee -a "$LOG" || FAILED+=("wheels")
fi
export PYTHONPATH=$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}

if (( REHEARSE )); then
  TAG="$(date +%Y-%m-%d)-cpu-rehearsal"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' ' '-')
  TAG="$(date +%Y-%m-%d)-${GPU:-unknown-gpu}"
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>&1 | tee -a "$LOG"; then
    FAILED+=("no CUDA GPU visible to torch")
    finish
  fi
fi

rm -f "$OUT/$TAG"-*  # an earlier run's results of the same day would pass for this run's
# The package: this tree's Python sources plus a _C for this Python and torch. The prebuilt one is used when it
# imports (its stamp differing from the sources' is noted: the kernels tested are then the prebuilt ones); it is
# built here only when it does not.
mkdir -p "$PKG"
cp -r raphael_ext "$PKG/"
rm -f "$PKG"/raphael_ext/_C*.so
STAMP=$(source_stamp "$PYTHON")
# Only a _C that fails to load (or was built against another torch) is rebuilt: a build cannot fix anything else.
native_failure() { grep -qE "native extension failed to load|was built against torch" "$WORK/logs/setup.log"; }
if compgen -G "$PREBUILT/_C*.so" >/dev/null && cp "$PREBUILT"/_C*.so "$PKG/raphael_ext/" && imports; then
  if [[ "$(cat "$PREBUILT/stamp" 2>/dev/null)" == "$STAMP" ]]; then
    stamp "prebuilt _C from $PREBUILT imports and matches the sources ($STAMP)"
  else
    NOTES+=("the prebuilt _C ($(cat "$PREBUILT/stamp" 2>/dev/null || echo "no stamp")) was built from other sources than these ($STAMP); rerun scripts/device_prebuild.sh")
    stamp "prebuilt _C from $PREBUILT imports; ${NOTES[-1]}"
  fi
elif compgen -G "$PREBUILT/_C*.so" >/dev/null && ! native_failure; then
  tail -n 20 "$WORK/logs/setup.log" | tee -a "$LOG"
  FAILED+=("raphael_ext does not import (not its _C: see above)")
  finish
else
  stamp "no prebuilt _C in $PREBUILT imports (log: setup.log): building"
  rm -f "$PKG"/raphael_ext/_C*.so
  stage build 420 env TORCH_CUDA_ARCH_LIST="$DEVICE_ARCH" RAPHAEL_EXT_CUDA=1 MAX_JOBS="$(nproc)" \
    "$PYTHON" setup.py -q build_ext --build-temp "$WORK/build-temp" --build-lib "$WORK/build-lib" \
    && cp "$WORK"/build-lib/raphael_ext/_C*.so "$PKG/raphael_ext/"
  if ! imports; then
    tail -n 20 "$WORK/logs/setup.log" | tee -a "$LOG"
    FAILED+=("no _C imports")
    finish
  fi
fi
"$PYTHON" -P -m raphael_ext.info 2>&1 | tee -a "$LOG"

stage checks 30 "$PYTHON" -P -c '
import sys, torch, raphael_ext
info = raphael_ext.build_info()
problems = []
if info["cuda"] is None:
    problems.append("_C was built without CUDA kernels")
if info["cutlass"] is None:
    problems.append("_C was built without CUTLASS: the expert GEMMs would run (and be timed) as an at::mm loop")
if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and not info["sm90a_kernels"]:
    problems.append("a Hopper GPU but no sm_90a kernels: the CUTLASS 3.x grouped GEMM would not run")
print("\n".join(problems) or "build_info: CUDA, CUTLASS and (on Hopper) the sm_90a kernels are present")
sys.exit(1 if problems else 0)
'

# --- tests and benchmarks -------------------------------------------------------------------------------------
# A per-test limit where pytest-timeout is installed (a hung kernel then fails one test, not the stage).
PER_TEST=()
"$PYTHON" -c 'import pytest_timeout' 2>/dev/null && PER_TEST=(--timeout 90)
BENCH=$OUT/$TAG-bench.json
FIG6C=$OUT/$TAG-fig6c.json
SUMMARY=$OUT/$TAG-summary.md
export PYTHON SUMMARY
if (( REHEARSE )); then
  # test_gpu_check.py rehearses this script itself under a deadline longer than a test's limit: not from in here.
  pytest_stage tests 1800 "${TESTS[@]}" -m "not cuda" "${PER_TEST[@]}" --junitxml="$OUT/$TAG-cpu-tests.xml" \
    --ignore=python_tests/test_gpu_check.py
  pytest_stage benchmarks 900 "${BENCHMARKS[@]}" --ignore=benchmarks/test_runtime_vs_experts.py --benchmark-json="$BENCH"
  pytest_stage fig6c 300 benchmarks/test_runtime_vs_experts.py --benchmark-json="$FIG6C"
else
  pytest_stage tests 110 "${TESTS[@]}" -m cuda "${PER_TEST[@]}" --maxfail 30 --durations 10 \
    --junitxml="$OUT/$TAG-cuda-tests.xml"
  pytest_stage benchmarks 75 "${BENCHMARKS[@]}" --ignore=benchmarks/test_runtime_vs_experts.py -k cuda \
    --benchmark-json="$BENCH"
  pytest_stage fig6c 55 benchmarks/test_runtime_vs_experts.py -k cuda --benchmark-json="$FIG6C"
fi

# --- summary --------------------------------------------------------------------------------------------------
stage summary 20 bash -c '
  status=0
  for json in "$@"; do [[ -s $json ]] || { echo "missing: $json"; status=1; }; done
  [[ -s $1 ]] && { "$PYTHON" benchmarks/report.py "$1" > "$SUMMARY" || status=1; }
  [[ -s $2 ]] && { "$PYTHON" benchmarks/plot_runtime_vs_experts.py "$2" >> "$SUMMARY" || status=1; }
  cat "$SUMMARY" 2>/dev/null
  exit $status' summary "$BENCH" "$FIG6C"

# --- sanitizers (last: the results above come back even when they run out of time) ------------------------------
if (( REHEARSE )); then
  stage sanitizer-cases 120 "$PYTHON" -P scripts/sanitize_kernels.py --device cpu
else
  # One cudaMalloc per tensor, so an access past a tensor's end is outside every allocation.
  stage memcheck 70 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 1 --print-limit 20 "$PYTHON" -P scripts/sanitize_kernels.py
  stage racecheck 35 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck \
    --error-exitcode 1 --print-limit 20 "$PYTHON" -P scripts/sanitize_kernels.py attention
fi

finish
