"""Python entry points of the raphael_ext ops (SPEC §3); each module registers its op's autograd and fake kernels."""

from .focal_loss import sigmoid_focal_loss

__all__ = ["sigmoid_focal_loss"]
