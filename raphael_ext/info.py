"""What raphael_ext was built with and what it runs on: `python -m raphael_ext.info`."""

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


def main() -> None:
    info = build_info()
    runtime = info.pop("runtime")
    print("raphael_ext build")
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        print(f"  {key:<11} {value if value is not None else 'not built'}")
    print("runtime")
    for key, value in runtime.items():
        print(f"  {key:<15} {', '.join(value) if isinstance(value, list) else value}")


if __name__ == "__main__":
    main()
