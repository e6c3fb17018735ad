"""torch.nn modules built on raphael_ext.ops."""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import cross_attention_mask, sigmoid_focal_loss, space_moe, time_moe


class MaskedCrossAttention(nn.Module):
    """Cross-attention from image tokens to text tokens that also returns RAPHAEL's attention map and
    space-MoE mask (docs/kernels.md), through the fused `cross_attention_mask` op.

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
    """Edge-supervision loss of RAPHAEL (docs/kernels.md): focal loss between predicted edge logits and target edge
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


class MoEOutput(NamedTuple):
    """What SpaceMoE and TimeMoE return."""

    out: Tensor  # x + the expert mixture (x itself when the layer is off)
    route: Optional[Tensor]  # chosen expert per text token [B, N_y] / per sample [B]; None when off
    balance_loss: Optional[Tensor]  # Switch-style load-balancing loss (0-dim) if enabled, else None


AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


class ExpertFFNs(nn.Module):
    """E expert FFNs e_k(h) = GELU(h w1[k] + b1[k]) w2[k] + b2[k], stacked: w1 [E, dim, hidden], b1 [E, hidden],
    w2 [E, hidden, dim], b2 [E, dim], initialised like nn.Linear.

    forward(h, op, before, after) returns op(h, *before, w1, b1, w2, b2, *after), the expert op run with this module's
    weights. The weights are read inside forward (not by the layer holding them) so that PEFT can adapt them: a
    LoraConfig with target_parameters=["experts.w1", "experts.w2"] gives each expert its own rank-r update, applied
    while this module runs (peft's ParamWrapper). Under autocast the weights are cast to the autocast dtype, as
    nn.Linear's would be (the ops have no autocast rule and take one dtype).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        bound1, bound2 = dim**-0.5, hidden**-0.5
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim).uniform_(-bound2, bound2))

    def weights(self, dtype: torch.dtype) -> List[Tensor]:
        return [w.to(dtype) for w in (self.w1, self.b1, self.w2, self.b2)]

    def forward(self, h: Tensor, op, before: Sequence = (), after: Sequence = ()) -> Tensor:
        return op(h, *before, *self.weights(h.dtype), *after)


def _gate_ffn(in_dim: int, hidden: int, num_experts: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_experts))


def _route(logits: Tensor, noise: float, training: bool):
    """route = argmax(softmax(logits) + eps) (eps ~ N(0, noise^2) in training only, paper §3.1); returns the route,
    the probabilities and the straight-through gate g = p / p.detach() of the chosen expert (value exactly 1, the
    gradient of p)."""
    probs = torch.softmax(logits.float(), dim=-1)
    scores = probs + noise * torch.randn_like(probs) if training and noise > 0 else probs
    route = scores.argmax(dim=-1)
    p = probs.gather(-1, route.unsqueeze(-1)).squeeze(-1)
    return route, probs, p / p.detach()


def _balance_loss(probs: Tensor, route: Tensor, valid: Tensor) -> Tensor:
    """Switch Transformer's E * sum_k f_k P_k over the valid tokens: f_k the fraction routed to k, P_k the mean
    probability of k. 1 when balanced; it pushes the gate towards using every expert."""
    num_experts = probs.shape[-1]
    weights = valid.to(probs.dtype)
    count = weights.sum().clamp_min(1)
    routed = F.one_hot(route, num_experts).to(probs.dtype) * weights.unsqueeze(-1)
    fraction = routed.sum(tuple(range(route.dim()))) / count
    mean_prob = (probs * weights.unsqueeze(-1)).sum(tuple(range(route.dim()))) / count
    return num_experts * (fraction * mean_prob).sum()


class _ExpertLayer(nn.Module):
    """What SpaceMoE and TimeMoE share: a gate FFN on the conditioning (text or time), E expert FFNs and the
    optional pre-norm; num_experts = 0 creates no parameters (the layer is the identity)."""

    def __init__(self, dim: int, cond_dim: int, num_experts: int, hidden_mult: int, gate_noise: float,
                 gate_hidden: Optional[int], balance_loss: bool, pre_norm: bool):
        super().__init__()
        self.num_experts = num_experts
        self.gate_noise = gate_noise
        self.balance_loss = balance_loss
        if num_experts > 0:
            self.norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
            self.gate = _gate_ffn(cond_dim, gate_hidden or cond_dim, num_experts)
            self.experts = ExpertFFNs(num_experts, dim, hidden_mult * dim)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, gate_noise={self.gate_noise}, balance_loss={self.balance_loss}"

    def _expert_input(self, x: Tensor) -> Tensor:
        """The expert ops' input, the pre-norm of x: under autocast in the autocast dtype, as nn.Linear would run
        (the ops have no autocast rule, and would otherwise see LayerNorm's float32 output and run in float32)."""
        h = self.norm(x)
        device = x.device.type
        # Only devices with autocast are asked ("meta", a model built without memory, has none); a fixed list rather
        # than torch.amp.is_autocast_available, which torch.compile cannot trace before torch 2.12.
        if device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
            return h.to(torch.get_autocast_dtype(device))
        return h


class SpaceMoE(_ExpertLayer):
    """RAPHAEL's space-MoE layer (docs/kernels.md): each valid text token picks an expert with the text gate FFN, and
    that expert runs on the image region its mask selects; out = x + mean over text tokens.

    Args:
        dim: image feature width C. text_dim: text state width d_y. num_experts: E; 0 turns the layer off
            (out = x), as in the paper's runtime-vs-experts study.
        hidden_mult: expert hidden width F = hidden_mult * dim. gate_hidden: width of the gate FFN (default text_dim).
        gate_noise: std of the noise eps added to the gate's softmax before the argmax, training only.
        balance_loss: also return the Switch-style load-balancing loss over the valid text tokens.
        pre_norm: the experts see LayerNorm(x) (a transformer block's pre-norm FFN); out = x + mixture.
        recompute: the backward recomputes the experts' hidden activations instead of keeping them from the
            forward (space_moe's recompute): less memory between the passes, one more GEMM; off by default (faster).

    The residual x + ... is ours (the paper gives the mixture only); it makes num_experts = 0 an identity.
    """

    def __init__(self, dim: int, text_dim: int, num_experts: int, hidden_mult: int = 4, gate_noise: float = 0.1,
                 gate_hidden: Optional[int] = None, balance_loss: bool = False, pre_norm: bool = False,
                 recompute: bool = False):
        super().__init__(dim, text_dim, num_experts, hidden_mult, gate_noise, gate_hidden, balance_loss, pre_norm)
        self.recompute = recompute

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recompute={self.recompute}"

    def forward(self, x: Tensor, text: Tensor, mask: Tensor, text_lengths: Optional[Tensor] = None) -> MoEOutput:
        """x [B, N_x, C], text [B, N_y, d_y], mask bool [B, N_x, N_y] (M̂), text_lengths int [B] or None."""
        if self.num_experts == 0:
            return MoEOutput(x, None, None)
        route, probs, gate = _route(self.gate(text), self.gate_noise, self.training)
        h = self._expert_input(x)
        out = x + self.experts(h, space_moe, before=(mask, route, gate.to(h.dtype)),
                               after=(text_lengths, self.recompute))
        balance = None
        if self.balance_loss:
            positions = torch.arange(route.shape[1], device=route.device)
            valid = (positions < text_lengths.unsqueeze(1) if text_lengths is not None
                     else torch.ones_like(route, dtype=torch.bool))
            balance = _balance_loss(probs, route, valid)
        return MoEOutput(out, route, balance)


class TimeMoE(_ExpertLayer):
    """RAPHAEL's time-MoE layer (docs/kernels.md): the time gate FFN picks one expert per sample from the timestep
    embedding; out = x + g * expert(x), with g = p / p.detach() (value 1) so the gate learns through p.
    num_experts = 0 turns the layer off (out = x). Arguments as SpaceMoE, with time_dim the embedding width
    (recompute: time_moe's)."""

    def __init__(self, dim: int, time_dim: int, num_experts: int, hidden_mult: int = 4, gate_noise: float = 0.1,
                 gate_hidden: Optional[int] = None, balance_loss: bool = False, pre_norm: bool = False,
                 recompute: bool = False):
        super().__init__(dim, time_dim, num_experts, hidden_mult, gate_noise, gate_hidden, balance_loss, pre_norm)
        self.recompute = recompute

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recompute={self.recompute}"

    def forward(self, x: Tensor, time_embedding: Tensor) -> MoEOutput:
        """x [B, N, C], time_embedding [B, time_dim]."""
        if self.num_experts == 0:
            return MoEOutput(x, None, None)
        route, probs, gate = _route(self.gate(time_embedding), self.gate_noise, self.training)
        h = self._expert_input(x)
        mixture = self.experts(h, time_moe, before=(route,), after=(self.recompute,))
        out = x + gate.to(h.dtype).view(-1, 1, 1) * mixture
        balance = _balance_loss(probs, route, torch.ones_like(route, dtype=torch.bool)) if self.balance_loss else None
        return MoEOutput(out, route, balance)


__all__ = ["EdgeFocalLoss", "ExpertFFNs", "MaskedCrossAttention", "MoEOutput", "SpaceMoE", "TimeMoE"]
