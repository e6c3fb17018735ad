"""Builds raphael_ext._C: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA build of torch are present.

    pip install .                          # isolated build against the torch pinned in pyproject.toml
    pip install --no-build-isolation .     # build against the torch already installed (a nightly, another CUDA)

Either way the package requires exactly the torch it was compiled against (torch==<version> is added to its
dependencies here), so pip never pairs the module with another torch. Build switches, printed at build time
(also without pip's -v, on the terminal):
    RAPHAEL_EXT_CUDA      auto (default: CUDA kernels when possible) | 0 (CPU only) |
                          1 (CUDA kernels and CUTLASS required: a build without them is an error)
    TORCH_CUDA_ARCH_LIST  GPU archs; default: the visible GPUs (a Hopper GPU as 9.0a, which its wgmma
                          kernels need), or "8.0;9.0a" (Ampere + Hopper) when none is visible
    MAX_JOBS              parallel compile jobs (ninja)
    CUDA_HOME             CUDA toolkit; default: found from nvcc on PATH
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS_WITHOUT_GPU = "8.0;9.0a"
# Besides torch (pinned to the build's version in build_extension); the training and evaluation extras are in
# pyproject.toml. Lower bounds: diffusers' enable_layerwise_casting and LoRA loaders, PEFT's target_parameters (the
# experts' LoRA). Pinned versions for CI: requirements-dev.txt.
RUNTIME_REQUIREMENTS = ["numpy", "safetensors", "tqdm", "pillow", "open_clip_torch", "diffusers>=0.32",
                        "transformers", "peft>=0.17", "accelerate"]


def _terminal():
    """pip shows a build's output only with -v; where a terminal is attached, the build's summary goes there too."""
    if sys.stderr.isatty() or os.environ.get("RAPHAEL_EXT_BUILD_QUIET"):
        return None
    try:
        return open("/dev/tty", "w")
    except OSError:
        return None


TERMINAL = _terminal()


def log(message: str) -> None:
    line = f"[raphael_ext build] {message}"
    print(line, file=sys.stderr, flush=True)
    if TERMINAL is not None:
        print(line, file=TERMINAL, flush=True)


def import_torch():
    try:
        import torch
    except ImportError:
        raise RuntimeError(
            "\n\nraphael_ext compiles its C++/CUDA kernels against torch, but this build cannot import it. "
            "`pip install .` brings the torch of pyproject.toml into its isolated build; a build without isolation "
            "(--no-build-isolation, setup.py directly) needs torch installed first.\n"
        ) from None
    return torch


def find_cuda_home() -> str | None:
    """The toolkit folder: CUDA_HOME/CUDA_PATH, else the folder of nvcc (following wrapper scripts' usual layout)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda"]
    for folder in filter(None, candidates):
        if (Path(folder) / "bin" / "nvcc").exists() and (Path(folder) / "include" / "cuda_runtime.h").exists():
            return folder
    return None


def find_cutlass_include() -> list[str]:
    """CUTLASS headers from the nvidia-cutlass wheel (cutlass_library/source/include)."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return []
    source = Path(list(spec.submodule_search_locations)[0]) / "source"
    folders = [source / "include", source / "tools" / "util" / "include"]
    return [str(f) for f in folders if f.is_dir()]


def visible_gpu_archs(torch) -> str:
    """TORCH_CUDA_ARCH_LIST for the visible GPUs. Hopper (9.0) becomes 9.0a: torch's own default would build
    plain sm_90, which lacks the wgmma/TMA instructions of the CUTLASS 3.x kernels, so they would silently not run."""
    archs = set()
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        archs.add((major, minor))
    return ";".join(f"{major}.{minor}{'a' if (major, minor) == (9, 0) else ''}" for major, minor in sorted(archs))


def builds_sm90a(arch_list: str) -> bool:
    """Whether TORCH_CUDA_ARCH_LIST asks for sm_90a code (e.g. "8.0;9.0a", "9.0a+PTX")."""
    return any(arch.split("+")[0] == "9.0a" for arch in arch_list.replace(" ", ";").split(";"))


def extra_cuda_headers(cuda_home: str) -> list[str]:
    """cuBLAS/cuSPARSE headers (pulled in by ATen's CUDA headers) from torch's nvidia pip packages when the
    toolkit lacks them; searched after the toolkit's own include folder."""
    if (Path(cuda_home) / "include" / "cublas_v2.h").exists():
        return []
    flags = []
    for path in sys.path:
        for folder in (Path(path) / "nvidia" / "cu13" / "include", Path(path) / "nvidia" / "cublas" / "include"):
            if (folder / "cublas_v2.h").exists():
                flags += ["-isystem", str(folder)]
    return flags[:2]


def build_extension():
    cuda_home = find_cuda_home()
    if cuda_home and "CUDA_HOME" not in os.environ:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    torch = import_torch()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    mode = os.environ.get("RAPHAEL_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"RAPHAEL_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    cuda_possible = torch.version.cuda is not None and cuda_home is not None
    why_not = "torch is a CPU build" if torch.version.cuda is None else "nvcc / CUDA toolkit not found"
    if mode == "1" and not cuda_possible:
        raise RuntimeError(f"RAPHAEL_EXT_CUDA=1 but CUDA kernels cannot be built: {why_not}")
    with_cuda = cuda_possible and mode != "0"

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    # at::parallel_for is inline OpenMP: without -fopenmp the CPU kernels would run on one thread. The
    # libgomp it links is the one torch already loaded (same soname), so there is one OpenMP runtime.
    cxx_flags = ["-O3", "-fopenmp"]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--expt-extended-lambda"]
    include_dirs = [str(ROOT / "csrc")]
    cutlass = find_cutlass_include()

    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    log(f"RAPHAEL_EXT_CUDA={mode}: CUDA kernels {'ON' if with_cuda else 'OFF'}"
        + ("" if with_cuda else f" ({'disabled' if mode == '0' else why_not})"))
    if with_cuda:
        if mode == "1" and not cutlass:
            raise RuntimeError("RAPHAEL_EXT_CUDA=1 but the CUTLASS headers were not found (pip install nvidia-cutlass): "
                               "without them the expert GEMMs would silently run as an at::mm loop")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = visible_gpu_archs(torch)
                log(f"TORCH_CUDA_ARCH_LIST unset: building for the visible GPUs ({os.environ['TORCH_CUDA_ARCH_LIST']})")
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS_WITHOUT_GPU
                log(f"TORCH_CUDA_ARCH_LIST unset and no GPU visible: using {DEFAULT_ARCHS_WITHOUT_GPU}")
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        log(f"TORCH_CUDA_ARCH_LIST={arch_list}, CUDA_HOME={cuda_home}")
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
        headers = extra_cuda_headers(cuda_home)
        defines = ["-DRAPHAEL_EXT_WITH_CUDA"]
        if cutlass:
            defines.append("-DRAPHAEL_EXT_WITH_CUTLASS")
            include_dirs += cutlass
        if builds_sm90a(arch_list):
            defines.append("-DRAPHAEL_EXT_SM90A")  # build_info() reports the sm_90a kernels (csrc/cuda/build_info.cu)
        else:
            log("no 9.0a in TORCH_CUDA_ARCH_LIST: Hopper GPUs will run the Sm80 CUTLASS kernels, not the wgmma ones")
        cxx_flags += defines + headers
        nvcc_flags += defines + headers
    log(f"CUTLASS headers: {cutlass[0] if cutlass else 'not found (pip install nvidia-cutlass)'}"
        + ("" if with_cuda else " (unused without CUDA)"))
    log(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}")
    if with_cuda:
        log("expect minutes: CUDA + CUTLASS for 8.0;9.0a took 7 min with 2 cores (MAX_JOBS=2), about 2 with 16; "
            "the Hopper grouped GEMM files are the long ones")
    else:
        log("expect about 2 minutes with 2 cores (C++ only)")

    extension_type = CUDAExtension if with_cuda else CppExtension
    extension = extension_type(
        name="raphael_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    torch_requirement = f"torch=={torch.__version__.split('+')[0]}"
    log(f"the package will require {torch_requirement} (the torch it is compiled against)")
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}, torch_requirement


if __name__ == "__main__":  # pip's build backend runs this file as __main__; the tests import its helpers
    ext_modules, cmdclass, torch_requirement = build_extension()
    setup(
        packages=find_packages(include=["raphael_ext", "raphael_ext.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        install_requires=[torch_requirement, *RUNTIME_REQUIREMENTS],
    )
