"""ControlNet for RAPHAEL (paper §7.8, after Zhang et al. 2023 and diffusers' ControlNetModel): a trainable copy of the
U-Net's encoder half (time embedding, input convolution, down path and middle block) that also sees a control image
(an edge map: Canny by default), and returns one residual per skip connection plus one for the middle block. The
residuals leave through zero-initialised 1x1 convolutions, so a fresh ControlNet adds exactly zero and the U-Net's
images are unchanged until it is trained.

    controlnet = RaphaelControlNet.from_unet(unet)               # copies the encoder weights
    down, mid = controlnet(x_t, t, encoder_hidden_states=text_states, text_lengths=text_lengths,
                           controlnet_cond=edges, conditioning_scale=1.0)
    unet(x_t, t, encoder_hidden_states=text_states, text_lengths=text_lengths,
         down_block_additional_residuals=down, mid_block_additional_residual=mid)
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .unet import (LegacyConfigNamesMixin, RaphaelEncoderMixin, RaphaelUNet, _Record, broadcast_timestep,
                   down_stage_widths, lengths_from_mask, raphael_block_args)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ConditioningEmbedding(nn.Module):
    """The control image [B, cond_channels, H*downscale, W*downscale] -> [B, out_channels, H, W] (diffusers'
    ControlNetConditioningEmbedding): a few SiLU convolutions, one stride-2 step per factor 2 of `downscale` (the
    VAE's stride for latent models, 1 in pixel space), and a zero-initialised output convolution."""

    def __init__(self, cond_channels: int, out_channels: int, hidden: Sequence[int], downscale: int):
        super().__init__()
        steps = int(math.log2(downscale))
        if 2**steps != downscale:
            raise ValueError(f"ConditioningEmbedding: downscale must be a power of 2, got {downscale}")
        layers: List[nn.Module] = [nn.Conv2d(cond_channels, hidden[0], 3, padding=1)]
        width = hidden[0]
        for i in range(max(steps, len(hidden) - 1)):
            nxt = hidden[min(i + 1, len(hidden) - 1)]
            layers += [nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(width, nxt, 3, padding=1, stride=2 if i < steps else 1)]
            width = nxt
        layers += [nn.SiLU(), zero_module(nn.Conv2d(width, out_channels, 3, padding=1))]
        self.layers = nn.Sequential(*layers)

    def forward(self, cond: Tensor) -> Tensor:
        return self.layers(cond)


class RaphaelControlNet(LegacyConfigNamesMixin, ModelMixin, ConfigMixin, RaphaelEncoderMixin):
    """forward(x_t, t, text_states, text_lengths, controlnet_cond, conditioning_scale=1.0) ->
    (down_block_residuals, mid_block_residual) for RaphaelUNet.forward.

    The config repeats the U-Net's encoder arguments (RaphaelUNet's names), plus conditioning_channels (1 for an edge
    map), conditioning_downscale (control image pixels per sample pixel: the VAE stride, or 1) and
    conditioning_embedding_channels (widths of the conditioning encoder). With the U-Net's patch_size p the control
    image is embedded down to 1/p of the sample, where conv_in's output lives."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        block_out_channels: Tuple[int, ...] = (64, 128),
        layers_per_block: int = 1,
        attention_levels: Tuple[bool, ...] = (False, True),
        attention_head_dim: int = 32,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        cross_attention_dim: int = 64,
        alpha: float = 0.2,
        space_experts: int = 6,
        time_experts: int = 4,
        expert_hidden_mult: int = 4,
        gate_noise: float = 0.1,
        pooled_text: bool = False,
        positional_embedding: bool = False,
        conditioning_channels: int = 1,
        conditioning_downscale: int = 1,
        conditioning_embedding_channels: Tuple[int, ...] = (16, 32),
        patch_size: int = 1,
        **kwargs,
    ):
        super().__init__()
        self.gradient_checkpointing = False  # see RaphaelUNet.__init__
        names = self._legacy_config(dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                                         attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
                                         cross_attention_dim=cross_attention_dim), kwargs)
        channels, layers_per_level, head_dim, norm_groups, text_dim = (
            tuple(names["block_out_channels"]), names["layers_per_block"], names["attention_head_dim"],
            names["norm_num_groups"], names["cross_attention_dim"])
        block_args = raphael_block_args(channels[0], head_dim, text_dim, alpha, dropout, space_experts, time_experts,
                                        expert_hidden_mult, gate_noise, balance_loss=False)
        mid_width = self._build_encoder(in_channels, channels, layers_per_level, attention_levels, norm_groups,
                                        dropout, block_args, pooled_text, positional_embedding, patch_size)
        self.cond_embedding = ConditioningEmbedding(conditioning_channels, channels[0],
                                                    tuple(conditioning_embedding_channels),
                                                    conditioning_downscale * patch_size)
        self.controlnet_down_blocks = nn.ModuleList(
            zero_module(nn.Conv2d(width, width, 1)) for width in down_stage_widths(channels, layers_per_level))
        self.controlnet_mid_block = zero_module(nn.Conv2d(mid_width, mid_width, 1))

    @classmethod
    def from_unet(cls, unet: RaphaelUNet, conditioning_channels: int = 1, conditioning_downscale: int = 1,
                  conditioning_embedding_channels: Tuple[int, ...] = (16, 32),
                  load_weights_from_unet: bool = True) -> "RaphaelControlNet":
        """A ControlNet whose encoder copies `unet`'s (architecture and, by default, weights)."""
        c = unet.config
        controlnet = cls(
            in_channels=c.in_channels, block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block, attention_levels=tuple(c.attention_levels),
            attention_head_dim=c.attention_head_dim, norm_num_groups=c.norm_num_groups, dropout=c.dropout,
            cross_attention_dim=c.cross_attention_dim, alpha=c.alpha,
            space_experts=c.space_experts if c.use_space_moe else 0,
            time_experts=c.time_experts if c.use_time_moe else 0, expert_hidden_mult=c.expert_hidden_mult,
            gate_noise=c.gate_noise, pooled_text=c.get("pooled_text", False),
            positional_embedding=c.get("positional_embedding", False), conditioning_channels=conditioning_channels,
            conditioning_downscale=conditioning_downscale,
            conditioning_embedding_channels=tuple(conditioning_embedding_channels),
            patch_size=c.get("patch_size", 1))
        if load_weights_from_unet:
            encoder = ("time_embed.", "text_embed.", "conv_in.", "down.", "mid.", "mid_res.")
            state = {k: v for k, v in unet.state_dict().items() if k.startswith(encoder)}
            missing, unexpected = controlnet.load_state_dict(state, strict=False)
            assert not unexpected and all(k.startswith(("cond_embedding.", "controlnet_")) for k in missing), missing
        controlnet.to(unet.device)
        return controlnet if unet.dtype == controlnet.dtype else controlnet.to(unet.dtype)

    def forward(
        self,
        sample: Tensor,
        timestep: Union[Tensor, float, int],
        encoder_hidden_states: Tensor,
        text_lengths: Optional[Tensor] = None,
        controlnet_cond: Optional[Tensor] = None,
        conditioning_scale: float = 1.0,
        encoder_attention_mask: Optional[Tensor] = None,
    ) -> Tuple[List[Tensor], Tensor]:
        """The arguments are RaphaelUNet.forward's (diffusers' names), plus the control image controlnet_cond and
        conditioning_scale, which multiplies the residuals."""
        if controlnet_cond is None:
            raise ValueError("RaphaelControlNet: controlnet_cond (the control image) is required")
        text_states = encoder_hidden_states
        batch = sample.shape[0]
        timestep = broadcast_timestep(timestep, batch, sample.device)
        if text_lengths is None and encoder_attention_mask is not None:
            text_lengths = lengths_from_mask(encoder_attention_mask)
        if text_lengths is None:
            text_lengths = torch.full((batch,), text_states.shape[1], dtype=torch.long, device=sample.device)
        expected = (sample.shape[-2] * self.config.conditioning_downscale,
                    sample.shape[-1] * self.config.conditioning_downscale)
        if tuple(controlnet_cond.shape[-2:]) != expected:
            controlnet_cond = F.interpolate(controlnet_cond.float(), size=expected, mode="bilinear",
                                            align_corners=False)
        temb = self._time_embedding(timestep, batch, sample.dtype, text_states, text_lengths)
        cond = self.cond_embedding(controlnet_cond.to(sample.dtype))
        skips, mid = self._encode(sample, temb, text_states, text_lengths, _Record(), conv_in_residual=cond)
        down = [conv(s) * conditioning_scale for conv, s in zip(self.controlnet_down_blocks, skips)]
        return down, self.controlnet_mid_block(mid) * conditioning_scale


__all__ = ["ConditioningEmbedding", "RaphaelControlNet", "zero_module"]
