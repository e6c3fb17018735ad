"""Python entry points of the raphael_ext ops (SPEC §3); each module registers its op's autograd and fake kernels."""

from .cross_attention_mask import cross_attention_mask
from .focal_loss import sigmoid_focal_loss

__all__ = ["cross_attention_mask", "sigmoid_focal_loss"]
