# Shared by scripts/device_prebuild.sh (this machine) and scripts/gpu_check.sh (the GPU machine): what the GPU
# machine's image lacks, and the stamp that says whether a prebuilt _C matches the tree and the Python/torch at hand.
# Sourced, not run.

# Wheels the device image lacks (its package list: the device tool's KINDS.md), pinned as in requirements-dev.txt.
# All are pure Python or abi3; installed there with --no-deps, so each one's own missing requirements are listed too:
# ftfy <- open_clip_torch, wcwidth <- ftfy, importlib_metadata <- diffusers, lazy-importer <- importlib_metadata,
# braceexpand <- webdataset. nvidia-cutlass only provides the CUTLASS headers. (peft, transformers and accelerate
# are in the image.)
DEVICE_WHEELS=(
  nvidia-cutlass==4.2.0.0
  open_clip_torch==3.3.0
  diffusers==0.42.1
  ftfy==6.3.1
  wcwidth==0.9.4
  importlib_metadata==10.2.0
  lazy-importer==0.1.0
  webdataset==1.0.2
  braceexpand==0.1.7
)
# The GPU machine's Python packages that the tests and benchmarks use, at the versions its image holds.
DEVICE_IMAGE_PACKAGES=(
  torch==2.11.0 triton==3.6.0 torchvision==0.26.0 numpy==2.5.2 huggingface_hub==1.33.0 safetensors==0.8.0
  pillow tqdm regex timm matplotlib filelock requests pybind11 ninja setuptools wheel pyyaml
  transformers==5.17.0 peft accelerate
  scipy scikit-learn torchmetrics  # the analyses' (evaluation/analysis.py, quality.py); the image's versions unread
  pytest pytest-benchmark pytest-timeout hypothesis
)
DEVICE_ARCH=9.0a

# source_stamp PYTHON: one line naming the Python (major.minor), the torch and a hash of everything _C is built
# from; gpu_check.sh notes a prebuilt _C whose saved line differs (built from other sources) and device_prebuild.sh
# rebuilds it.
source_stamp() {
  local python=$1
  local runtime
  runtime=$("$python" -c 'import sys, torch; print(f"python{sys.version_info[0]}.{sys.version_info[1]} torch{torch.__version__}")')
  local sources
  sources=$(find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
  echo "$runtime arch$DEVICE_ARCH sources-$sources"
}
