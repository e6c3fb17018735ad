"""Python entry points of the raphael_ext ops (math: docs/kernels.md); each registers its autograd and fake kernels."""

from .cross_attention_mask import cross_attention_mask
from .focal_loss import sigmoid_focal_loss
from .grouped_gemm import grouped_gemm
from .space_moe import empty_cpu_cache, space_moe, space_moe_plan
from .time_moe import time_moe

__all__ = [
    "cross_attention_mask",
    "empty_cpu_cache",
    "grouped_gemm",
    "sigmoid_focal_loss",
    "space_moe",
    "space_moe_plan",
    "time_moe",
]
