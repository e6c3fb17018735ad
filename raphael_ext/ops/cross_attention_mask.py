"""cross_attention_mask: cross-attention that also returns the head-mean attention map and its thresholded mask (the
space-MoE mask rule of docs/kernels.md), without materialising the per-head probabilities."""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

_OP = "raphael_ext::cross_attention_mask"
_BACKWARD_OP = "raphael_ext::cross_attention_mask_backward"


def cross_attention_mask(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float = 0.2,
    text_lengths: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Softmax attention of image queries over text keys, plus RAPHAEL's space-MoE mask.

    Args:
        q (`torch.Tensor` of shape `(B, H, N_x, D)`):
            Image queries, in SDPA's layout (any strides). D is 32, 64 or 128; float32, float16 or bfloat16 (float64 on
            CPU only, for gradcheck).
        k (`torch.Tensor` of shape `(B, H, N_y, D)`):
            Text keys, 1 <= N_y <= 128, in q's dtype and on q's device.
        v (`torch.Tensor` of shape `(B, H, N_y, D)`):
            Text values, like k.
        alpha (`float`, *optional*, defaults to 0.2):
            Mask threshold relative to each text token's largest map value over the image tokens (the paper's 0.2).
        text_lengths (`torch.Tensor` of shape `(B,)`, *optional*):
            Valid text tokens per sample (integer); keys at positions >= text_lengths[b] are padding and take no part.
            Values must lie in [0, N_y]: the CPU raises otherwise, CUDA clamps (checking would need a host sync).
            Defaults to all N_y keys valid.
        scale (`float`, *optional*):
            Multiplies q·k before the softmax. Defaults to 1/sqrt(D).

    Returns:
        `Tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: `(out, attn_map, mask)`:
            - out `(B, H, N_x, D)`: softmax(q kᵀ·scale) v over the valid keys, stored as (B, N_x, H, D) so that
              ``out.transpose(1, 2).reshape(B, N_x, H * D)`` is a free view.
            - attn_map `(B, N_x, N_y)`: the probabilities averaged over heads; 0 at padding keys.
            - mask `(B, N_x, N_y)`, bool: attn_map >= alpha * attn_map.amax(dim=1) (the max over image tokens),
              compared in float32 (float64 for float64) on the returned, rounded map; False at padding keys. No
              gradient.

    Gradients flow from out and attn_map to q, k and v; double backward raises. A sample with text_lengths = 0 has
    no key to attend to: its out and attn_map are 0, its mask is all False and no gradient reaches it (rather than
    the NaN of an empty softmax).
    """
    out, attn_map, mask, _ = torch.ops.raphael_ext.cross_attention_mask(
        q, k, v, alpha, text_lengths, _resolve_scale(scale, q)
    )
    return out, attn_map, mask


def _resolve_scale(scale: Optional[float], q: Tensor) -> float:
    # The same double as the C++ default 1.0 / std::sqrt(D).
    return float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _check_fake_args(q, k, v, text_lengths):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "cross_attention_mask: q and k must be 4-d")
    torch._check(k.shape == v.shape, lambda: "cross_attention_mask: v must have the shape of k")
    torch._check(q.dtype == k.dtype == v.dtype, lambda: "cross_attention_mask: q, k, v must share a dtype")
    if text_lengths is not None:
        torch._check(text_lengths.shape == (q.shape[0],), lambda: "cross_attention_mask: text_lengths must be [B]")
        torch._check(
            text_lengths.device == q.device, lambda: "cross_attention_mask: text_lengths must be on the device of q"
        )


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(_OP)
def _cross_attention_mask_fake(q, k, v, alpha, text_lengths, scale):
    _check_fake_args(q, k, v, text_lengths)
    batch, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    out = q.new_empty((batch, queries, heads, head_dim)).transpose(1, 2)
    attn_map = q.new_empty((batch, queries, keys))
    mask = q.new_empty((batch, queries, keys), dtype=torch.bool)
    lse = q.new_empty((batch, heads, queries), dtype=_lse_dtype(q.dtype))
    return out, attn_map, mask, lse


@torch.library.register_fake(_BACKWARD_OP)
def _cross_attention_mask_backward_fake(grad_out, grad_attn_map, q, k, v, lse, text_lengths, scale):
    _check_fake_args(q, k, v, text_lengths)
    batch, heads, queries, head_dim = q.shape
    dq = q.new_empty((batch, queries, heads, head_dim)).transpose(1, 2)
    return dq, k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _alpha, text_lengths, scale = inputs
    _, _, mask, lse = output
    ctx.save_for_backward(q, k, v, lse, text_lengths)
    ctx.scale = _resolve_scale(scale, q)
    ctx.mark_non_differentiable(mask, lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_attn_map, _grad_mask, _grad_lse):
    if grad_out is None and grad_attn_map is None:
        return None, None, None, None, None, None
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # The backward kernel has no derivative of its own; a silent wrong second derivative is worse.
        raise RuntimeError("cross_attention_mask does not support double backward (create_graph=True)")
    q, k, v, lse, text_lengths = ctx.saved_tensors
    dq, dk, dv = torch.ops.raphael_ext.cross_attention_mask_backward(
        grad_out, grad_attn_map, q, k, v, lse, text_lengths, ctx.scale
    )
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None)


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
