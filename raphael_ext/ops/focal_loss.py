"""sigmoid_focal_loss: torchvision's focal loss (formula in docs/kernels.md), computed with its gradient in one pass."""

from typing import Optional

import torch
from torch import Tensor

_OP = "raphael_ext::sigmoid_focal_loss"


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.5,
    gamma: float = 2.0,
    reduction: str = "mean",
    sample_mask: Optional[Tensor] = None,
) -> Tensor:
    """Focal loss of `logits` against (soft) `targets` in [0, 1], the value of `torchvision.ops.sigmoid_focal_loss`.

    Args:
        logits (`torch.Tensor`):
            float32, float16 or bfloat16 (float64 too), any shape; `(B, ...)` when `sample_mask` is given.
        targets (`torch.Tensor`):
            Same shape as logits; cast to logits' dtype if it differs (bool or integer hard labels are fine). No
            gradient.
        alpha (`float`, *optional*, defaults to 0.5):
            Weight of the positive class, in [0, 1]; a negative value means no weighting.
        gamma (`float`, *optional*, defaults to 2.0):
            Focusing exponent >= 0; 0 gives the binary cross-entropy times the alpha weight.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"none"`, `"mean"` or `"sum"`.
        sample_mask (`torch.Tensor` of shape `(B,)`, *optional*):
            bool; samples with False are dropped entirely (their loss and gradient are 0, and `"mean"` divides by the
            elements of the kept samples only). RAPHAEL uses it for the t <= T_c gate of edge supervision.

    Returns:
        `torch.Tensor`: the loss, a scalar for `"mean"` and `"sum"`, logits' shape for `"none"`. A `"mean"` over zero
        counted elements (empty input, or every sample dropped) is 0 with a zero gradient, not NaN, so a batch without
        eligible samples adds nothing to the training loss.

    All math runs in float32 (float64 for float64 inputs) and is finite for logits up to the dtype's range. The
    forward pass writes d(loss)/d(logits), so backward only scales it; double backward raises.
    """
    if isinstance(targets, Tensor) and isinstance(logits, Tensor) and targets.dtype != logits.dtype:
        targets = targets.to(logits.dtype)
    loss, _, _ = torch.ops.raphael_ext.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction, sample_mask)
    return loss


@torch.library.register_fake(_OP)
def _sigmoid_focal_loss_fake(logits, targets, alpha, gamma, reduction, sample_mask):
    torch._check(logits.shape == targets.shape, lambda: "sigmoid_focal_loss: targets must have the shape of logits")
    torch._check(reduction in ("none", "mean", "sum"), lambda: f"sigmoid_focal_loss: bad reduction {reduction!r}")
    loss = (torch.empty_like(logits, memory_format=torch.contiguous_format) if reduction == "none"
            else logits.new_empty(()))
    dloss = torch.empty_like(logits, memory_format=torch.contiguous_format)
    norm = logits.new_empty((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return loss, dloss, norm


def _setup_context(ctx, inputs, output):
    _, dloss, norm = output
    ctx.save_for_backward(dloss, norm)
    # Only the loss is differentiable; without this autograd would fill a zero gradient for dloss
    # (as large as the input) on every backward.
    ctx.mark_non_differentiable(dloss, norm)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_dloss, _grad_norm):
    if grad_loss is None:  # the loss itself took no part in what is differentiated
        return None, None, None, None, None, None
    dloss, norm = ctx.saved_tensors
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # dloss is saved, not recomputed: a second derivative would silently miss d(dloss)/d(logits).
        raise RuntimeError("sigmoid_focal_loss does not support double backward (create_graph=True)")
    # For 'mean'/'sum' grad_loss is a scalar: the scale is formed in float32 before touching the
    # per-element gradient, so a large loss scale (AMP) does not overflow and 1/N does not underflow early.
    grad_logits = dloss * (grad_loss * norm).to(dloss.dtype)
    return grad_logits, None, None, None, None, None


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
