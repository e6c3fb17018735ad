#!/usr/bin/env bash
# Prepares, on this machine (no GPU needed), everything scripts/gpu_check.sh needs on the GPU machine, and
# rehearses it here, so the GPU's minutes are spent on the GPU:
#   1. build/device-venv: a venv that mirrors the GPU image (Python 3.12, torch 2.11.0+cu130, triton 3.6.0 and
#      that image's versions of the rest; scripts/device_env.sh lists them);
#   2. .whl/: the wheels the image lacks, installed in the rehearsal exactly as there (--no-deps --target);
#   3. .device/: raphael_ext._C built for sm_90a against that torch (debug info stripped) and its stamp;
#   4. the rehearsal: scripts/gpu_check.sh --rehearse in that venv (collection with no module skipped for a
#      missing module, the CPU tests, the benchmarks timed), and the size of what must travel (< 60 MiB).
# Then, with the workplace's device tool:  run  command "scripts/gpu_check.sh"  carry [".whl", ".device"]  timeout_s 480.
#
# Usage: scripts/device_prebuild.sh [--no-rehearse]     (PY312=/path/to/python3.12 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
SECONDS=0
say() { echo "[device_prebuild ${SECONDS}s] $*"; }

if [[ -z ${PY312:-} ]]; then  # the first Python 3.12 that runs (a pyenv shim may exist without one behind it)
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 "$(command -v python3.12)"; do
    if [[ -x $candidate ]] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$candidate
      break
    fi
  done
fi
[[ -n ${PY312:-} ]] || { echo "device_prebuild: no Python 3.12 found (set PY312)"; exit 1; }
VENV=build/device-venv
VPY=$VENV/bin/python
SITE=build/device-site

if [[ ! -f $VENV/.ready ]] || [[ "$(cat $VENV/.ready)" != "${DEVICE_IMAGE_PACKAGES[*]}" ]]; then
  say "venv $VENV from $PY312 with the image's packages"
  if [[ ! -x $VPY ]]; then
    "$PY312" -m venv "$VENV"
    "$VPY" -m pip install -q --upgrade pip
  fi
  "$VPY" -m pip install -q "${DEVICE_IMAGE_PACKAGES[@]}"
  echo "${DEVICE_IMAGE_PACKAGES[*]}" > $VENV/.ready
fi

mkdir -p .whl
wanted=()
for spec in "${DEVICE_WHEELS[@]}"; do
  prefix="$(echo "${spec%%==*}" | tr '-' '_')-${spec##*==}-"
  wanted+=("$prefix")
  if ! compgen -G ".whl/$prefix*.whl" >/dev/null; then
    say "download $spec"
    "$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
  fi
done
for wheel in .whl/*.whl; do  # a second version of a package would stop the install there
  keep=0
  for prefix in "${wanted[@]}"; do [[ $(basename "$wheel") == "$prefix"* ]] && keep=1; done
  (( keep )) || { say "remove $wheel (not in scripts/device_env.sh)"; rm -f "$wheel"; }
done
rm -rf "$SITE"
"$VPY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl

STAMP=$(source_stamp "$VPY")
if [[ -f .device/stamp ]] && [[ "$(cat .device/stamp)" == "$STAMP" ]] && compgen -G ".device/_C*.so" >/dev/null; then
  say "prebuilt _C is current ($STAMP)"
else
  say "build _C for sm_$DEVICE_ARCH against $("$VPY" -c 'import torch; print(torch.__version__)') (minutes on 2 cores)"
  rm -rf .device
  mkdir -p .device
  PYTHONPATH=$SITE TORCH_CUDA_ARCH_LIST=$DEVICE_ARCH RAPHAEL_EXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$VPY" setup.py -q build_ext --build-temp build/device-temp --build-lib build/device-lib > build/device-build.log 2>&1 \
    || { tail -n 40 build/device-build.log; echo "device_prebuild: build failed (build/device-build.log)"; exit 1; }
  grep "\[raphael_ext build\]" build/device-build.log | awk '!seen[$0]++'
  so=$(ls build/device-lib/raphael_ext/_C*.so)
  strip --strip-debug -o ".device/$(basename "$so")" "$so"
  echo "$STAMP" > .device/stamp
fi
say ".device: $(du -sh .device | cut -f1), .whl: $(du -sh .whl | cut -f1)"
travel=$(( $(du -sb .device | cut -f1) + $(du -sb .whl | cut -f1) + $(git ls-files -z | du -cb --files0-from=- | tail -n1 | cut -f1) ))
(( travel < 60 * 1024 * 1024 )) || { echo "device_prebuild: $travel bytes would travel, over 60 MiB"; exit 1; }

if [[ ${1:-} != --no-rehearse ]]; then
  say "rehearsal: scripts/gpu_check.sh --rehearse in $VENV"
  PYTHON=$VPY OUT=build/device-rehearsal scripts/gpu_check.sh --rehearse
fi
say "ready: $(( travel / 1024 / 1024 )) MiB travel; on the GPU machine run scripts/gpu_check.sh with carry [\".whl\", \".device\"], timeout_s 480"
