"""Forward of cross_attention_mask (docs/kernels.md) in Triton: one program per (tile of BLOCK_M queries, sample)
loops over the heads, with all keys of a head in one BLOCK_N tile, so each softmax is final after one pass;
the head mean stays in registers and the column max is one float atomic max per column and tile (the
probabilities are >= 0). The mask is a second, elementwise pass."""

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Map, ColumnMax, Lengths,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    heads, n_queries, n_keys, scale,
    HAS_LENGTHS: tl.constexpr, FP32_DOT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    n_valid = n_keys
    if HAS_LENGTHS:
        n_valid = tl.minimum(tl.maximum(tl.load(Lengths + b).to(tl.int32), 0), n_keys)
    row_ok = rows < n_queries
    key_ok = cols < n_valid
    map_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(heads):
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + dims[None, :],
                    mask=key_ok[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + dims[None, :],
                    mask=key_ok[:, None], other=0.0)
        if FP32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(key_ok[None, :], s * scale, float("-inf"))
        row_max = tl.max(s, 1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # no valid key: p = 0 below
        p = tl.exp(s - row_max[:, None])
        row_sum = tl.sum(p, 1)
        p = p / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        if FP32_DOT:
            o = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            o = tl.dot(p.to(v.dtype), v)
        tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :],
                 o.to(Out.dtype.element_ty), mask=row_ok[:, None])
        map_acc += p
    rounded = (map_acc / heads).to(Map.dtype.element_ty)
    col_ok = cols < n_keys
    tl.store(Map + (b * n_queries + rows[:, None]) * n_keys + cols[None, :], rounded,
             mask=row_ok[:, None] & col_ok[None, :])
    tile_max = tl.max(tl.where(row_ok[:, None], rounded.to(tl.float32), 0.0), 0)
    tl.atomic_max(ColumnMax + b * n_keys + cols, tile_max, mask=col_ok)


def _fp32_dot(dtype: torch.dtype) -> bool:
    """float32 inputs keep IEEE float32 products (no TF32), like PyTorch's default. Triton 3.8's interpreter
    computes bfloat16 tl.dot wrongly (a 16x16 product off by 1e10), so there bfloat16 operands are widened to
    float32 as well; the tiling, masking and reductions under test are the same."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)


def cross_attention_mask_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float = 0.2,
    text_lengths: Optional[Tensor] = None,
    scale: Optional[float] = None,
    block_m: int = 64,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, attn_map, mask) of `raphael_ext.ops.cross_attention_mask`, forward only, float32/float16/bfloat16."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"cross_attention_mask_forward: expected q [B, H, N_x, D], k = v [B, H, N_y, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"cross_attention_mask_forward: q, k, v must share a dtype among float32/float16/bfloat16, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    if head_dim not in (32, 64, 128) or not 1 <= keys <= 128:
        raise ValueError(f"cross_attention_mask_forward: needs D in (32, 64, 128) and 1 <= N_y <= 128, got D = "
                         f"{head_dim}, N_y = {keys}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    out = q.new_empty((batch, queries, heads, head_dim)).transpose(1, 2)
    attn_map = q.new_empty((batch, queries, keys))
    column_max = torch.zeros((batch, keys), dtype=torch.float32, device=q.device)
    if batch * queries > 0:
        lengths = text_lengths if text_lengths is not None else column_max  # unread when HAS_LENGTHS is False
        grid = (triton.cdiv(queries, block_m), batch)
        _forward_kernel[grid](
            q, k, v, out, attn_map, column_max, lengths,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            heads, queries, keys, scale,
            HAS_LENGTHS=text_lengths is not None, FP32_DOT=_fp32_dot(q.dtype),
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=max(16, triton.next_power_of_2(keys)),
        )
    valid = torch.arange(keys, device=q.device)[None, :] < (
        text_lengths.clamp(0, keys)[:, None] if text_lengths is not None else keys
    )
    mask = (attn_map.float() >= float(alpha) * column_max[:, None, :]) & valid[:, None, :]
    return out, attn_map, mask
