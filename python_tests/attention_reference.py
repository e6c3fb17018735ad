"""Eager softmax cross-attention with the map and mask of docs/kernels.md: the independent reference of the
cross_attention_mask tests (float64) and PyTorch's own same-dtype result for FlashAttention's error rule."""

import math

import torch

# Absolute slack added to FlashAttention's "2x PyTorch's own error" rule, per dtype.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def valid_keys(batch, keys, text_lengths, device):
    lengths = torch.full((batch,), keys, device=device) if text_lengths is None else text_lengths.to(device)
    return torch.arange(keys, device=device)[None, :] < lengths.clamp(0, keys)[:, None]  # [B, N_y]


def eager_attention(q, k, v, text_lengths=None, scale=None):
    """(out, attn_map) computed in q's dtype with materialised probabilities; differentiable."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    valid = valid_keys(q.shape[0], k.shape[2], text_lengths, q.device)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(valid[:, None, None, :], probs, torch.zeros_like(probs))  # no valid key: 0, not NaN
    return probs @ v, probs.mean(dim=1)


def threshold_mask(attn_map, alpha, text_lengths=None):
    """The mask the contract derives from the returned map: compared in float32 (float64 for float64)."""
    acc = attn_map.double() if attn_map.dtype == torch.float64 else attn_map.float()
    column_max = acc.amax(dim=1, keepdim=True) if acc.shape[1] else acc.sum(dim=1, keepdim=True)
    valid = valid_keys(attn_map.shape[0], attn_map.shape[2], text_lengths, attn_map.device)
    return (acc >= alpha * column_max) & valid[:, None, :]


def max_error(actual, expected):
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item() if expected.numel() else 0.0


def assert_within_torch_error(ours, torch_same_dtype, reference, dtype, what):
    """FlashAttention's rule: our error vs the float64 reference is at most twice PyTorch's own error at
    the same dtype, plus a small absolute slack."""
    ours_err = max_error(ours, reference)
    torch_err = max_error(torch_same_dtype, reference)
    assert ours_err <= 2 * torch_err + ATOL[dtype], (
        f"{what}: error {ours_err:.3g} vs the float64 reference exceeds 2 x PyTorch's {torch_err:.3g} + {ATOL[dtype]:g}"
    )
