"""time_moe (SPEC §2.3): each sample through the one expert FFN its timestep gate chose."""

import torch
from torch import Tensor


def time_moe(x: Tensor, route: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """y[b] = GELU(x[b] w1[r] + b1[r]) w2[r] + b2[r] with r = route[b], for x [B, N, C] and route int [B].

    A composite op (csrc/composite/time_moe.cpp): samples are stably sorted by expert and run through two
    grouped GEMMs, so autograd, fake tensors and torch.compile come from grouped_gemm. An out-of-range route
    raises on the CPU and trips a device-side assert on the GPU (checking it on the host would synchronise).
    """
    return torch.ops.raphael_ext.time_moe(x, route, w1, b1, w2, b2)
