"""torch.nn modules built on raphael_ext.ops."""

from typing import Optional, Tuple

from torch import Tensor, nn

from .ops import cross_attention_mask, sigmoid_focal_loss


class MaskedCrossAttention(nn.Module):
    """Cross-attention from image tokens to text tokens that also returns RAPHAEL's attention map and
    space-MoE mask (SPEC §2.2), through the fused `cross_attention_mask` op.

    Parameter names follow diffusers' `Attention` used as cross-attention (`to_q`, `to_k`, `to_v` without
    bias, `to_out.0` with bias, `to_out.1` dropout), so a diffusers cross-attention state dict loads as is.

    forward(hidden_states [B, N_x, dim], encoder_hidden_states [B, N_y, text_dim], text_lengths [B] or None)
        -> (out [B, N_x, dim], attn_map [B, N_x, N_y], mask bool [B, N_x, N_y])
    """

    def __init__(self, dim: int, text_dim: int, heads: int, alpha: float = 0.2, dropout: float = 0.0):
        super().__init__()
        if heads <= 0 or dim % heads or dim // heads not in (32, 64, 128):
            raise ValueError(
                f"MaskedCrossAttention: dim / heads must be a head size of 32, 64 or 128, got dim={dim}, heads={heads}"
            )
        self.heads = heads
        self.head_dim = dim // heads
        self.alpha = alpha
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(text_dim, dim, bias=False)
        self.to_v = nn.Linear(text_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])

    def forward(
        self, hidden_states: Tensor, encoder_hidden_states: Tensor, text_lengths: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        batch, queries, _ = hidden_states.shape
        keys = encoder_hidden_states.shape[1]
        # [B, N, H * D] -> [B, H, N, D] views: the op reads any strides with a contiguous last dimension.
        q = self.to_q(hidden_states).view(batch, queries, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(encoder_hidden_states).view(batch, keys, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(encoder_hidden_states).view(batch, keys, self.heads, self.head_dim).transpose(1, 2)
        out, attn_map, mask = cross_attention_mask(q, k, v, self.alpha, text_lengths)
        out = out.transpose(1, 2).reshape(batch, queries, self.heads * self.head_dim)  # a view: out is [B, N_x, H, D]
        return self.to_out[1](self.to_out[0](out)), attn_map, mask

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, alpha={self.alpha}"


class EdgeFocalLoss(nn.Module):
    """Edge-supervision loss of RAPHAEL (SPEC §2.5): focal loss between predicted edge logits and target edge
    maps, applied only to samples whose diffusion timestep is <= t_cutoff (T_c = 500 in the paper); the mean
    runs over the elements of those samples, and a batch with none of them gives 0."""

    def __init__(self, t_cutoff: int = 500, alpha: float = 0.5, gamma: float = 2.0):
        super().__init__()
        self.t_cutoff = t_cutoff
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, edge_logits: Tensor, edge_targets: Tensor, timesteps: Tensor) -> Tensor:
        if timesteps.dim() != 1 or timesteps.shape[0] != edge_logits.shape[0]:
            raise ValueError(
                f"EdgeFocalLoss: timesteps must have shape [B] with B = edge_logits.shape[0] = "
                f"{edge_logits.shape[0]}, got {tuple(timesteps.shape)}"
            )
        sample_mask = timesteps.to(edge_logits.device) <= self.t_cutoff
        return sigmoid_focal_loss(edge_logits, edge_targets, self.alpha, self.gamma, "mean", sample_mask)

    def extra_repr(self) -> str:
        return f"t_cutoff={self.t_cutoff}, alpha={self.alpha}, gamma={self.gamma}"


__all__ = ["EdgeFocalLoss", "MaskedCrossAttention"]
