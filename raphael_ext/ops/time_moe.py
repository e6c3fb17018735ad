"""time_moe: each sample through the one expert FFN its timestep gate chose (time-MoE in docs/kernels.md)."""

import torch
from torch import Tensor


def time_moe(x: Tensor, route: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
             recompute: bool = False) -> Tensor:
    """y[b] = GELU(x[b] w1[r] + b1[r]) w2[r] + b2[r] with r = route[b]: every token of a sample through its expert.

    Args:
        x (`torch.Tensor` of shape `(B, N, C)`):
            Image tokens; float32, float16 or bfloat16 (float64 too).
        route (`torch.Tensor` of shape `(B,)`):
            Integer expert index per sample, in [0, E).
        w1 (`torch.Tensor` of shape `(E, C, F)`):
            First layer of each expert FFN, in x's dtype.
        b1 (`torch.Tensor` of shape `(E, F)`):
            Its bias.
        w2 (`torch.Tensor` of shape `(E, F, C)`):
            Second layer of each expert FFN.
        b2 (`torch.Tensor` of shape `(E, C)`):
            Its bias.
        recompute (`bool`, defaults to `False`):
            What the backward does for the first GEMM's output (B x N x F): False (default, faster) keeps it from the
            forward; True recomputes it with one GEMM more, so that no such buffer lives between the passes on the
            CPU (on the GPU one, the GELU output the second GEMM's weight gradient needs, instead of two).

    Returns:
        `torch.Tensor` of shape `(B, N, C)`.

    A composite op (csrc/composite/time_moe.cpp), so autograd, fake tensors and torch.compile come from the ops it
    calls. On the CPU it is space_moe with one text token per sample (the sample's expert, gate 1, covering every
    image token), whose fused expert FFN is faster than grouped GEMMs here; on the GPU samples are stably sorted by
    expert and run through two grouped GEMMs (GELU as its own op when saving). An out-of-range route raises on the
    CPU and trips a device-side assert on the GPU (checking it on the host would synchronise).
    """
    return torch.ops.raphael_ext.time_moe(x, route, w1, b1, w2, b2, recompute)
