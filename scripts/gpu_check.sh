#!/usr/bin/env bash
# The project's one device check, for a machine with an NVIDIA Hopper GPU (H100/H200) and no internet. On
# the workplace's GPU machine, from the repository root (about 6 minutes; every stage has its own limit):
#
#     scripts/gpu_check.sh          with the device tool: carry [".whl", ".device"], timeout_s 480
#
# Prepare both folders on a machine with internet first: scripts/device_prebuild.sh downloads into .whl/ the
# wheels the GPU image lacks (scripts/device_env.sh), prebuilds raphael_ext._C for sm_90a against the image's
# torch into .device/, and rehearses this script on the CPU (--rehearse). Without a current .device/ the check
# builds _C here first (a few minutes with all cores).
#
# Stages, each under `timeout`, each teeing its output live into $OUT/gpu_check.log, so a run cut off at its
# limit still returns every line printed so far (the per-stage logs are bundled into $OUT/logs.tar.gz after each
# stage; the device tool returns at most 8 files):
#   setup       wheels (--no-deps --target, as the image needs), _C (prebuilt or built), build_info checks
#               (CUTLASS present, sm_90a kernels on a Hopper GPU), no test module skipped for a missing module
#   tests       every CUDA test (no -x: --maxfail and a per-test timeout), junit XML
#   benchmarks  every CUDA benchmark against its peers (incl. Fig. 6c at paper widths), JSON; fails if the
#               runtime-vs-experts study did not run
#   summary     markdown table and plots
#   sanitizer   compute-sanitizer memcheck on a small case of every kernel, racecheck on attention (its
#               shared-memory tiles); last, so that the results above come back first
# A stage that reaches its limit is interrupted with SIGINT, so pytest still writes its summary (-rfE names every
# failure), its junit XML and its benchmark JSON.
# Files in $OUT: gpu_check.log, logs.tar.gz, TAG-cuda-tests.xml, TAG-bench.json, TAG-bench.png,
# TAG-bench-runtime_vs_experts.png, TAG-summary.md (TAG = date and GPU name). Commit them under
# benchmarks/results/. Exit status: 0 when every stage passed.
#
# --rehearse (scripts/device_prebuild.sh): the same setup on a machine without a GPU, the CPU tests instead of
# the CUDA ones, no sanitizer, the benchmarks once without timing.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
REHEARSE=0
[[ ${1:-} == --rehearse ]] && REHEARSE=1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-build/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/raphael_gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$WORK"
mkdir -p "$WORK/logs"
LOG=$OUT/gpu_check.log
: > "$LOG"
SECONDS=0
FAILED=()

stamp() { echo "[gpu_check ${SECONDS}s] $*" | tee -a "$LOG"; }
bundle_logs() { tar czf "$OUT/logs.tar.gz" -C "$WORK/logs" . 2>/dev/null; }

# stage NAME LIMIT_S COMMAND...: the command under `timeout`, its output teed into the check's log and
# $WORK/logs/NAME.log as it runs; a failure or a timeout is recorded and the next stage still runs.
stage() {
  local name=$1 limit=$2
  shift 2
  stamp "stage $name (limit ${limit}s)"
  # SIGINT, not SIGTERM: pytest then still writes its failure summary, junit XML and benchmark JSON.
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/logs/$name.log"
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

finish() {
  bundle_logs
  if (( ${#FAILED[@]} )); then
    stamp "FAILED: ${FAILED[*]}"
    exit 1
  fi
  stamp "all stages passed"
  exit 0
}

# --- setup --------------------------------------------------------------------------------------------------
export PYTHONUNBUFFERED=1
SITE=$WORK/site PKG=$WORK/pkg
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    2>&1 | tee -a "$LOG" || { FAILED+=("wheels"); finish; }
fi
export PYTHONPATH=$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}

if (( REHEARSE )); then
  TAG="$(date +%Y-%m-%d)-cpu-rehearsal"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr ' ' '-')
  TAG="$(date +%Y-%m-%d)-${GPU:-unknown-gpu}"
fi

# The package: this tree's Python sources plus a _C for this Python and torch (prebuilt when its stamp matches).
mkdir -p "$PKG"
cp -r raphael_ext "$PKG/"
rm -f "$PKG"/raphael_ext/_C*.so
STAMP=$(source_stamp "$PYTHON")
if [[ -f .device/stamp ]] && [[ "$(cat .device/stamp)" == "$STAMP" ]] && compgen -G ".device/_C*.so" >/dev/null; then
  stamp "prebuilt _C from .device ($STAMP)"
  cp .device/_C*.so "$PKG/raphael_ext/"
else
  stamp "no current prebuilt _C (.device/stamp: $(cat .device/stamp 2>/dev/null || echo none); here: $STAMP): building"
  stage build 420 env TORCH_CUDA_ARCH_LIST="$DEVICE_ARCH" RAPHAEL_EXT_CUDA=1 MAX_JOBS="$(nproc)" \
    "$PYTHON" setup.py -q build_ext --build-temp "$WORK/build-temp" --build-lib "$WORK/build-lib" || finish
  cp "$WORK"/build-lib/raphael_ext/_C*.so "$PKG/raphael_ext/"
fi
"$PYTHON" -P -m raphael_ext.info 2>&1 | tee -a "$LOG"

stage checks 90 "$PYTHON" -P -c '
import sys, torch, raphael_ext
info = raphael_ext.build_info()
problems = []
if info["cuda"] is None:
    problems.append("_C was built without CUDA kernels")
if info["cutlass"] is None:
    problems.append("_C was built without CUTLASS: the expert GEMMs would run (and be timed) as an at::mm loop")
if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and not info["sm90a_kernels"]:
    problems.append("a Hopper GPU but no sm_90a kernels: the CUTLASS 3.x grouped GEMM would not run")
if not torch.cuda.is_available() and "--rehearse" not in sys.argv:
    problems.append("no CUDA GPU visible")
print("\n".join(problems) or "build_info: CUDA, CUTLASS and (on Hopper) the sm_90a kernels are present")
sys.exit(1 if problems else 0)
' $([[ $REHEARSE == 1 ]] && echo --rehearse) || finish

# Collect everything: a module skipped at import for a missing package means the image lacks a wheel.
collect_and_check() {  # one pytest per folder: both hold a test_focal_loss.py (no __init__.py, so no packages)
  local status=0
  : > "$WORK/collect.txt"
  for folder in python_tests benchmarks; do
    "$PYTHON" -P -m pytest --collect-only -q -rs -p no:cacheprovider "$folder" >> "$WORK/collect.txt" 2>&1 || status=$?
    tail -n 1 "$WORK/collect.txt"
  done
  if grep -E "could not import|No module named" "$WORK/collect.txt"; then
    echo "modules skipped for a missing package: add its wheel to scripts/device_env.sh"
    return 1
  fi
  return "$status"
}
export -f collect_and_check
export PYTHON WORK
stage collect 90 bash -c collect_and_check || finish

# --- tests ----------------------------------------------------------------------------------------------------
if (( REHEARSE )); then
  stage tests 1800 "$PYTHON" -P -m pytest python_tests -q -rfE --continue-on-collection-errors -p no:cacheprovider \
    -m "not cuda" --timeout 600 --junitxml="$OUT/$TAG-cpu-tests.xml"
else
  stage tests 150 "$PYTHON" -P -m pytest python_tests -q -rfE --continue-on-collection-errors -p no:cacheprovider \
    -m cuda --timeout 90 --maxfail 30 --durations 10 --junitxml="$OUT/$TAG-cuda-tests.xml"
fi

# --- benchmarks -----------------------------------------------------------------------------------------------
if (( REHEARSE )); then
  stage benchmarks 900 "$PYTHON" -P -m pytest benchmarks -q -rfE --continue-on-collection-errors -p no:cacheprovider \
    --benchmark-disable
else
  BENCH=$OUT/$TAG-bench.json
  stage benchmarks 150 "$PYTHON" -P -m pytest benchmarks -q -rfE --continue-on-collection-errors -p no:cacheprovider \
    -k cuda --benchmark-json="$BENCH"
  stage study-ran 30 "$PYTHON" -c '
import json, sys
rows = [b for b in json.load(open(sys.argv[1]))["benchmarks"]
        if b.get("extra_info", {}).get("study") == "runtime_vs_experts" and b["extra_info"].get("device") == "cuda"]
print(f"runtime_vs_experts on CUDA: {len(rows)} benchmarks")
sys.exit(0 if rows else 1)' "$BENCH"

  # --- summary --------------------------------------------------------------------------------------------------
  stage summary 60 bash -c "'$PYTHON' benchmarks/report.py '$BENCH' > '$OUT/$TAG-summary.md' && \
    '$PYTHON' benchmarks/plot_runtime_vs_experts.py '$BENCH' >> '$OUT/$TAG-summary.md'; status=\$?; \
    cat '$OUT/$TAG-summary.md'; exit \$status"
fi

# --- sanitizer (last: the results above come back even when it runs out of time) ---------------------------------
if (( REHEARSE )); then
  stamp "stage sanitizer: skipped in a rehearsal (no GPU); the case script itself runs on the CPU"
  stage sanitizer-cases 120 "$PYTHON" -P scripts/sanitize_kernels.py --device cpu
else
  # One cudaMalloc per tensor, so an access past a tensor's end is outside every allocation.
  stage sanitizer-memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 1 --print-limit 20 "$PYTHON" -P scripts/sanitize_kernels.py
  stage sanitizer-racecheck 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck \
    --error-exitcode 1 --print-limit 20 "$PYTHON" -P scripts/sanitize_kernels.py attention
fi

finish
