"""grouped_gemm: one GEMM per expert over its contiguous rows of `a`, bias and GELU in the epilogue."""

from typing import Optional

import torch
from torch import Tensor

_OP = "raphael_ext::grouped_gemm"
_WEIGHT_GRAD_OP = "raphael_ext::grouped_gemm_weight_grad"


def grouped_gemm(
    a: Tensor, b: Tensor, offsets: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tensor:
    """c[rows of g] = act(a[rows of g] @ b[g] + bias[g]) for every group (expert) g.

    Args:
        a (`torch.Tensor` of shape `(T, K)`):
            Rows sorted by group; float32, float16 or bfloat16 (float64 too).
        b (`torch.Tensor` of shape `(E, K, N)`):
            One weight per group, in a's dtype.
        offsets (`torch.Tensor` of shape `(E,)`):
            int32 cumulative row ends: group g owns rows offsets[g-1] to offsets[g], as in
            `torch.nn.functional.grouped_mm`. Empty groups are legal.
        bias (`torch.Tensor` of shape `(E, N)`, *optional*):
            One bias per group, added before the activation.
        activation (`str`, *optional*):
            None or `"gelu"` (the exact erf GELU, F.gelu's default).

    Returns:
        `torch.Tensor` of shape `(T, N)`: rows from offsets[E-1] on are zero (and pass no gradient).

    The GPU computes in float32 with one rounding to the output dtype. float32 inputs use TF32 tensor cores only where
    PyTorch's float32 matmuls may (`torch.backends.cuda.matmul.allow_tf32`, or
    `torch.set_float32_matmul_precision("high")`); by default they run in full float32 precision. With
    activation="gelu" the backward recomputes the pre-activation with one more grouped GEMM instead of keeping a
    (T, N) buffer alive between the passes.
    """
    return torch.ops.raphael_ext.grouped_gemm(a, b, offsets, bias, activation)


@torch.library.register_fake(_OP)
def _grouped_gemm_fake(a, b, offsets, bias=None, activation=None):
    torch._check(a.dim() == 2 and b.dim() == 3, lambda: "grouped_gemm: a must be [T, K] and b [E, K, N]")
    torch._check(a.shape[1] == b.shape[1], lambda: "grouped_gemm: b must have shape [E, K, N] with K = a.size(1)")
    torch._check(offsets.shape == (b.shape[0],), lambda: "grouped_gemm: offsets must have shape [E]")
    torch._check(activation in (None, "gelu"),
                 lambda: f"grouped_gemm: activation must be None or 'gelu', got {activation!r}")
    return a.new_empty((a.shape[0], b.shape[2]))


@torch.library.register_fake(_WEIGHT_GRAD_OP)
def _weight_grad_fake(a, grad, offsets):
    torch._check(a.shape[0] == grad.shape[0], lambda: "grouped_gemm_weight_grad: grad must have as many rows as a")
    groups = offsets.shape[0]
    return a.new_empty((groups, a.shape[1], grad.shape[1])), a.new_empty((groups, grad.shape[1]))


def _setup_context(ctx, inputs, output):
    a, b, offsets, bias, activation = inputs
    ctx.save_for_backward(a, b, offsets, bias)
    ctx.activation = activation
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    a, b, offsets, bias = ctx.saved_tensors
    if ctx.activation == "gelu":
        pre = torch.ops.raphael_ext.grouped_gemm(a, b, offsets, bias, None)
        grad = torch.ops.aten.gelu_backward(grad, pre)
    grad_a = grad_b = grad_bias = None
    if ctx.needs_input_grad[0]:
        # dA = dC B^T through the same grouped GEMM (rows past offsets[E-1] come out zero).
        grad_a = torch.ops.raphael_ext.grouped_gemm(grad, b.transpose(1, 2), offsets, None, None)
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[3]):
        grad_b, grad_bias = torch.ops.raphael_ext.grouped_gemm_weight_grad(a, grad, offsets)
    return grad_a, grad_b, None, grad_bias if ctx.has_bias else None, None


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
