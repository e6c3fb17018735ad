"""space_moe (docs/kernels.md): every text token's expert applied to its masked image region, averaged over the text."""

from typing import Optional, Tuple

import torch
from torch import Tensor

_OP = "raphael_ext::space_moe"
_BACKWARD_OP = "raphael_ext::space_moe_backward"
_PLAN_OP = "raphael_ext::space_moe_plan"


def space_moe(
    x: Tensor,
    mask: Tensor,
    route: Tensor,
    gate: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    text_lengths: Optional[Tensor] = None,
    recompute: bool = False,
) -> Tensor:
    """y_j = (1/n_y) sum_{i < n_y} gate_i * e_{route_i}(x_j * mask_ji), e_k(h) = GELU(h w1[k] + b1[k]) w2[k] + b2[k].

    Args:
        x: image features [B, N_x, C] (float32/float16/bfloat16, float64 too).
        mask: bool [B, N_x, N_y], the thresholded cross-attention map M̂.
        route: int32/int64 [B, N_y], each text token's expert in [0, E) (padding tokens are not read).
        gate: [B, N_y] gate weights (RAPHAEL passes the straight-through p / p.detach(), value 1).
        w1 [E, C, F], b1 [E, F], w2 [E, F, C], b2 [E, C]: the expert FFNs.
        text_lengths: optional int [B], valid text tokens n_y per sample (default N_y); the rest is padding.
        recompute: what the backward does for the first GEMM's activations (T x F, T the routed rows): False
            (default, faster) keeps them from the forward; True recomputes them in the backward, one GEMM more
            for T x F less memory between the passes, like activation checkpointing. Same results either way.

    Computed exactly as y_j = sum_k w_jk e_k(x_j) + sum_k z_jk e_k(0) (docs/kernels.md), so expert k runs only on
    the image tokens some token routed to k covers: at most min(E, n_y) experts per image token. A sample
    with n_y = 0 gives 0. Gradients flow to x, gate, w1, b1, w2, b2.
    """
    save_hidden = not recompute and torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gate, w1, b1, w2, b2)
    )
    return torch.ops.raphael_ext.space_moe(x, mask, route, gate, w1, b1, w2, b2, text_lengths, save_hidden)[0]


def space_moe_plan(
    mask: Tensor, route: Tensor, gate: Tensor, num_experts: int, text_lengths: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """space_moe's routing plan alone, for inspection: (offsets, pair_index, weight, z).

    offsets int32 [E]: cumulative pair counts per expert (the grouped GEMMs' row ends); pair_index int32
    [B*N_x, E]: the grouped row of pair (image token j, expert k), -1 where no valid text token routed to k
    covers j; weight and z [B*N_x, E] (float32, float64 for float64 gates): w_jk and z_jk of docs/kernels.md.
    """
    return torch.ops.raphael_ext.space_moe_plan(mask, route, gate, text_lengths, num_experts)


def empty_cpu_cache() -> None:
    """Frees the idle buffers the CPU kernels keep for their next call (like ``torch.cuda.empty_cache``).

    space_moe's CPU kernels recycle their large buffers (saved activations, gathered rows) between calls,
    keeping up to ``RAPHAEL_EXT_CPU_CACHE_MIB`` MiB idle (default 1024, 0 turns the cache off), because glibc
    maps and faults in every allocation over 32 MiB afresh. Buffers still held by tensors are not touched.
    """
    from .. import _C

    _C.empty_cpu_cache()


@torch.library.register_fake(_PLAN_OP)
def _space_moe_plan_fake(mask, route, gate, text_lengths, num_experts):
    pairs = (mask.shape[0] * mask.shape[1], num_experts)
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (
        mask.new_empty((num_experts,), dtype=torch.int32),
        mask.new_empty(pairs, dtype=torch.int32),
        mask.new_empty(pairs, dtype=acc),
        mask.new_empty(pairs, dtype=acc),
    )


@torch.library.register_fake(_OP)
def _space_moe_fake(x, mask, route, gate, w1, b1, w2, b2, text_lengths=None, save_hidden=False):
    torch._check(x.dim() == 3 and mask.dim() == 3 and w1.dim() == 3, lambda: "space_moe: x, mask and w1 must be 3-D")
    batch, tokens, channels = x.shape
    experts = w1.shape[0]
    torch._check(experts >= 1, lambda: "space_moe: w1 must hold at least one expert")
    capacity = batch * tokens * torch.sym_min(experts, mask.shape[2])
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pairs = (batch * tokens, experts)
    return (
        x.new_empty(x.shape),
        x.new_empty((capacity, channels)),
        x.new_empty((experts,), dtype=torch.int32),
        x.new_empty(pairs, dtype=torch.int32),
        x.new_empty(pairs, dtype=acc),
        x.new_empty(pairs, dtype=acc),
        x.new_empty((capacity if save_hidden else 0, w1.shape[2])),
    )


@torch.library.register_fake(_BACKWARD_OP)
def _space_moe_backward_fake(grad_y, x, mask, route, gate, w1, b1, w2, b2, *_):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, gate, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    *tensors, save_hidden = inputs
    _, expert_out, offsets, pair_index, weight, z, hidden = output
    ctx.save_hidden = save_hidden
    ctx.save_for_backward(*tensors, expert_out, offsets, pair_index, weight, z, hidden)
    ctx.mark_non_differentiable(expert_out, offsets, pair_index, weight, z, hidden)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, *_):
    if grad_y is None:
        return (None,) * 10
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("space_moe does not support double backward (create_graph=True)")
    x, mask, route, gate, w1, b1, w2, b2, text_lengths, *saved, hidden = ctx.saved_tensors
    dx, dgate, dw1, db1, dw2, db2 = torch.ops.raphael_ext.space_moe_backward(
        grad_y, x, mask, route, gate, w1, b1, w2, b2, text_lengths, *saved, hidden if ctx.save_hidden else None
    )
    return dx, None, None, dgate, dw1, db1, dw2, db2, None, None


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
