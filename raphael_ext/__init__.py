"""raphael_ext: CUDA/C++ kernels and a PyTorch library for RAPHAEL (space-MoE, time-MoE, edge supervision).

Importing the package loads the native extension `raphael_ext._C`, which registers the kernels under
`torch.ops.raphael_ext`, and then the Python side of each op (autograd and fake kernels). The models, the pipeline
and the trainer (diffusers-based) are imported when first used: `raphael_ext.RaphaelUNet`,
`raphael_ext.RaphaelPipeline`, `raphael_ext.RaphaelControlNet`, `raphael_ext.OpenCLIPTextEncoder`, or their
subpackages models/, pipelines/, training/, evaluation/.
"""

import importlib

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

try:
    from . import _C
except ImportError as error:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        f"raphael_ext's native extension failed to load ({error}). It must be built against the torch "
        f"installed here ({torch.__version__}): reinstall with `pip install --no-build-isolation --force-reinstall .`"
    ) from error


def _check_torch_version() -> None:
    built = _C.build_info()["torch"]
    running = torch.__version__.split("+")[0]
    if built != running:
        raise ImportError(
            f"raphael_ext was built against torch {built} but torch {running} is installed: install torch=={built}, "
            "or rebuild raphael_ext against this torch with `pip install --no-build-isolation --force-reinstall .`"
        )


_check_torch_version()

from . import nn, ops  # noqa: E402
from ._info import build_info  # noqa: E402

__version__ = "0.2.0"

# Public names imported on first use (diffusers, open_clip and transformers are only loaded then).
_LAZY = {
    "RaphaelUNet": "raphael_ext.models.unet",
    "RaphaelControlNet": "raphael_ext.models.controlnet",
    "OpenCLIPTextEncoder": "raphael_ext.models.text_encoder",
    "RaphaelPipeline": "raphael_ext.pipelines.pipeline_raphael",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'raphael_ext' has no attribute {name!r}")


__all__ = ["build_info", "nn", "ops", *_LAZY]
