"""sigmoid_focal_loss (SPEC §3.3): torchvision's focal loss, computed with its gradient in one pass."""

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
        logits: float32/float16/bfloat16 (float64 too) tensor of any shape; [B, ...] when `sample_mask` is given.
        targets: same shape; cast to `logits`' dtype if it differs (bool/int hard labels are fine). No gradient.
        alpha: weight of the positive class, in [0, 1]; negative means no weighting.
        gamma: focusing exponent >= 0 (0 gives the plain binary cross-entropy times the alpha weight).
        reduction: 'none' | 'mean' | 'sum'.
        sample_mask: optional bool [B]: samples with False are dropped entirely (their loss and gradient are 0,
            and 'mean' divides by the elements of the kept samples only). RAPHAEL uses it for the t <= T_c gate.

    Decision: a 'mean' over zero counted elements (empty input, or every sample dropped) is 0 with a zero
    gradient, not NaN, so a batch without eligible samples adds nothing to the training loss.

    The kernel computes all math in float32 (float64 for float64 inputs), is finite for logits up to the
    dtype's range, and writes d(loss)/d(logits) during the forward pass; backward only scales it.
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
