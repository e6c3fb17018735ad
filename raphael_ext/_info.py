"""What raphael_ext was built with and what it runs on (`python -m raphael_ext.info` prints it)."""

import platform

import torch

from . import _C


def build_info() -> dict:
    """Versions the extension was built with (torch, CUDA, CUTLASS), the GPU archs compiled, and the runtime."""
    info = dict(_C.build_info())
    info["runtime"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return info
