"""The RAPHAEL U-Net: ResNet blocks and RAPHAEL transformer blocks (self-attention → masked cross-attention
→ time-MoE → space-MoE), plus the edge head of edge supervision.

A diffusers model: `ModelMixin` (save_pretrained / from_pretrained folders, `torch_dtype`, gradient checkpointing),
`ConfigMixin` (the __init__ arguments are its config.json) and `PeftAdapterMixin` (LoRA through PEFT). Small and
readable on purpose, in the spirit of DiT's models.py; the kernels live in raphael_ext.ops.

    unet = RaphaelUNet.from_preset("tiny")                       # or "small", "paper"; any argument can be overridden
    out = unet(x_t, t, encoder_hidden_states=text_states, text_lengths=text_lengths)
    # out.sample, routes, maps, edge_logits, balance_loss; t may be [B], [1] or a number
    unet.save_pretrained("folder"); RaphaelUNet.from_pretrained("folder", torch_dtype=torch.bfloat16)
"""

import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import apply_lora_scale
from safetensors.torch import load_file
from torch import Tensor, nn

from ..nn import MaskedCrossAttention, SpaceMoE, TimeMoE

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# RaphaelUNet arguments of each preset (the rest keep their defaults, which are the tiny preset's).
PRESETS: Dict[str, dict] = {
    # Trains on 2 CPU cores in minutes: 32x32 pixels, two levels, 4 transformer blocks (16x16 tokens).
    "tiny": {},
    # One GPU: 64x64 latents (512 px), four levels, 16 transformer blocks like the paper's layout.
    "small": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, attention_levels=(True, True, True, False), attention_head_dim=64,
                  cross_attention_dim=512, edge_channels=64, latent=True),
    # The paper's scale (Table 2): 16 transformer blocks, 6 space and 4 time experts, ViT-g/14 text (width 1024,
    # 77 tokens), latent diffusion at 640x640 (80x80 latents). 2.98 B parameters (the paper: "about 3 B"); the
    # deepest level, without attention, is widened to 2048 to get there.
    "paper": dict(sample_size=80, in_channels=4, out_channels=4, block_out_channels=(384, 768, 1536, 2048),
                  layers_per_block=2, attention_levels=(True, True, True, False), attention_head_dim=64,
                  cross_attention_dim=1024, edge_channels=128, latent=True, gradient_checkpointing=True),
}

# The config names of raphael_ext 0.2 and their diffusers names, which replaced them; configs with the old names
# (config.json files, preset overrides, keyword arguments) keep loading.
LEGACY_CONFIG_NAMES = {"channels": "block_out_channels", "layers_per_level": "layers_per_block",
                       "norm_groups": "norm_num_groups", "text_dim": "cross_attention_dim",
                       "head_dim": "attention_head_dim"}


def rename_legacy_config(config: dict) -> dict:
    """config with raphael_ext 0.2's names replaced by diffusers' (a name given both ways is an error)."""
    out = dict(config)
    for old, new in LEGACY_CONFIG_NAMES.items():
        if old in out:
            if new in out:
                raise ValueError(f"config gives both {old!r} and its new name {new!r}")
            out[new] = out.pop(old)
    return out


class LegacyConfigNamesMixin:
    """Accepts raphael_ext 0.2's config names (LEGACY_CONFIG_NAMES) wherever a diffusers config is read: from_config,
    from_pretrained (both go through extract_init_dict) and keyword arguments of __init__ (`_legacy_config`)."""

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        return super().extract_init_dict(rename_legacy_config(config_dict), **rename_legacy_config(kwargs))

    def _legacy_config(self, values: dict, legacy: dict) -> dict:
        """values (this model's diffusers-named arguments) updated by the old-named ones in legacy, which are also
        written to the config under their new names; anything else in legacy is an unknown argument."""
        unknown = sorted(set(legacy) - set(LEGACY_CONFIG_NAMES))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown arguments {unknown}")
        renamed = rename_legacy_config(legacy)
        given = set(values) - set(self.config.get("_use_default_values", []))
        if given & set(renamed):
            raise ValueError(f"{type(self).__name__}: {sorted(given & set(renamed))} given both by the old and the "
                             f"new name")
        if renamed:
            defaults = [k for k in self.config.get("_use_default_values", []) if k not in renamed]
            self.register_to_config(**renamed, _use_default_values=defaults)
        return {**values, **renamed}


def broadcast_timestep(timestep: Union[Tensor, float, int], batch: int, device) -> Tensor:
    """The timestep as a [batch] tensor: a python number, a 0-d tensor or a [1] tensor is repeated for every sample
    (diffusers' U-Nets take all three)."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=device)
    t = t.to(device).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timestep must hold 1 or batch = {batch} values, got shape {tuple(timestep.shape)}")
    return t


def lengths_from_mask(encoder_attention_mask: Tensor) -> Tensor:
    """Text lengths [B] from diffusers' encoder_attention_mask [B, N_y] (1 keeps a token; the kept tokens must be a
    prefix, as a tokenizer's padding makes them)."""
    return encoder_attention_mask.to(torch.long).sum(dim=-1)


# Written by raphael_ext before it became a diffusers model (config.json of RaphaelConfig + model.safetensors).
LEGACY_WEIGHTS = "model.safetensors"


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim] (as in DiT and diffusers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention with diffusers' `Attention` parameter names (to_q, to_k, to_v, to_out.0), so LoRA
    configs written for diffusers U-Nets target it as they are."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])

    def forward(self, h: Tensor) -> Tensor:
        batch, tokens, dim = h.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(heads(self.to_q(h)), heads(self.to_k(h)), heads(self.to_v(h)))
        return self.to_out[0](attn.transpose(1, 2).reshape(batch, tokens, dim))


@dataclass
class BlockAux:
    """What one RAPHAEL transformer block reports besides its output."""

    attn_map: Tensor  # [B, N_x, N_y] head-mean cross-attention probabilities
    space_route: Optional[Tensor]  # [B, N_y] expert per text token (None: space-MoE off)
    time_route: Optional[Tensor]  # [B] expert per sample (None: time-MoE off)
    balance_loss: Optional[Tensor]


class RaphaelBlock(nn.Module):
    """Self-attention → cross-attention (map + mask) → time-MoE → space-MoE, each pre-norm and residual."""

    def __init__(self, dim: int, head_dim: int, text_dim: int, time_dim: int, alpha: float, dropout: float,
                 space_experts: int, time_experts: int, expert_hidden_mult: int, gate_noise: float, balance_loss: bool,
                 space_moe_recompute: bool = False, time_moe_recompute: bool = False):
        super().__init__()
        heads = dim // head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross = MaskedCrossAttention(dim, text_dim, heads, alpha=alpha, dropout=dropout)
        moe = dict(hidden_mult=expert_hidden_mult, gate_noise=gate_noise, balance_loss=balance_loss, pre_norm=True)
        self.time_moe = TimeMoE(dim, time_dim, time_experts, recompute=time_moe_recompute, **moe)
        self.space_moe = SpaceMoE(dim, text_dim, space_experts, recompute=space_moe_recompute, **moe)

    def forward(self, h: Tensor, text: Tensor, text_lengths: Tensor, temb: Tensor) -> Tuple[Tensor, BlockAux]:
        h = h + self.self_attn(self.norm1(h))
        cross, attn_map, mask = self.cross(self.norm2(h), text, text_lengths)
        h = h + cross
        time_out = self.time_moe(h, temb)
        space_out = self.space_moe(time_out.out, text, mask, text_lengths)
        losses = [x for x in (time_out.balance_loss, space_out.balance_loss) if x is not None]
        balance = torch.stack(losses).sum() if losses else None
        return space_out.out, BlockAux(attn_map, space_out.route, time_out.route, balance)


def position_embedding(height: int, width: int, dim: int, device=None) -> Tensor:
    """Fixed 2D sin-cos embedding [height * width, dim] of each token's position as a fraction of the image (half the
    channels encode y, half x, as in DiT but resolution-independent, so every bucket shares it)."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height * 64
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width * 64
    y = ys[:, None, None] * freqs
    x = xs[None, :, None] * freqs
    emb = torch.cat([torch.sin(y).expand(height, width, quarter), torch.cos(y).expand(height, width, quarter),
                     torch.sin(x).expand(height, width, quarter), torch.cos(x).expand(height, width, quarter)], dim=-1)
    return F.pad(emb.reshape(height * width, 4 * quarter), (0, dim - 4 * quarter))


class SpatialTransformer(nn.Module):
    """[B, C, H, W] feature map → tokens → RAPHAEL block → feature map, with a residual around it all. With
    positional=True the tokens get position_embedding() (the U-Net's convolutions alone give its attention little
    sense of where a token is, which spatial relations in a prompt need)."""

    def __init__(self, dim: int, norm_groups: int, block: RaphaelBlock, positional: bool = False):
        super().__init__()
        self.positional = positional
        self.norm = nn.GroupNorm(norm_groups, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.block = block
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)  # starts as the identity, like diffusers' Transformer2DModel
        nn.init.zeros_(self.proj_out.bias)
        self.gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing

    def forward(self, x: Tensor, text: Tensor, text_lengths: Tensor, temb: Tensor) -> Tuple[Tensor, BlockAux]:
        batch, dim, height, width = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        if self.positional:
            h = h + position_embedding(height, width, dim, h.device).to(h.dtype)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            h, aux = self._gradient_checkpointing_func(self.block, h, text, text_lengths, temb)
        else:
            h, aux = self.block(h, text, text_lengths, temb)
        h = self.proj_out(h).transpose(1, 2).reshape(batch, dim, height, width)
        return x + h, aux


class EdgeHead(nn.Module):
    """P_theta (paper §3.2): a stack of `layers` convolutions from the pooled token's attention maps (averaged over
    the transformer blocks) to edge logits [B, 1, H, W]. The maps come at 1/patch_size of the sample's resolution, like
    the U-Net's first level, and the last convolution answers for each p x p patch of pixels (pixel_shuffle), so the
    head costs what one U-Net level does rather than p**2 times that."""

    def __init__(self, channels: int, layers: int, patch_size: int = 1):
        super().__init__()
        convs = [nn.Conv2d(1, channels, 3, padding=1)]
        convs += [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers - 2)]
        convs += [nn.Conv2d(channels, patch_size**2, 3, padding=1)]
        self.convs = nn.ModuleList(convs)
        self.patch_size = patch_size

    def forward(self, maps: Tensor) -> Tensor:
        h = maps
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = F.silu(h)
        return F.pixel_shuffle(h, self.patch_size) if self.patch_size > 1 else h


@dataclass
class _Record:
    """What the transformer blocks report during one forward pass, collected in block order."""

    space_routes: List[Optional[Tensor]] = field(default_factory=list)
    time_routes: List[Optional[Tensor]] = field(default_factory=list)
    attn_maps: List[Tensor] = field(default_factory=list)
    pooled_maps: List[Tensor] = field(default_factory=list)
    balance: List[Tensor] = field(default_factory=list)


class RaphaelEncoderMixin:
    """The U-Net's time embedding, input convolution, down path and middle block, shared by RaphaelUNet and
    RaphaelControlNet (which copies them): _build_encoder() makes them under the same names in both, so a U-Net's
    weights load into a ControlNet as they are."""

    def _build_encoder(self, in_channels: int, channels: Sequence[int], layers_per_level: int,
                       attention_levels: Sequence[bool], norm_groups: int, dropout: float, block_args: dict,
                       pooled_text: bool = False, positional: bool = False, patch_size: int = 1) -> int:
        c0 = channels[0]
        time_dim = block_args["time_dim"]
        self.time_embed = nn.Sequential(nn.Linear(c0, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        # The end-of-text token's state added to the time embedding (SDXL's pooled text embedding; not in the paper).
        self.text_embed = nn.Sequential(nn.Linear(block_args["text_dim"], time_dim), nn.SiLU(),
                                        nn.Linear(time_dim, time_dim)) if pooled_text else None
        # patch_size > 1: x_t enters as p x p patches folded into channels (pixel_unshuffle), so every level runs at
        # 1/p of the sample's height and width (DiT's patches, simple diffusion's first downsampling).
        self.patch_size = patch_size
        self.conv_in = nn.Conv2d(in_channels * patch_size**2, c0, 3, padding=1)
        self.down = nn.ModuleList()
        ch = c0
        for level, (width, attention) in enumerate(zip(channels, attention_levels)):
            for _ in range(layers_per_level):
                self.down.append(self._stage(ch, width, attention, norm_groups, dropout, block_args, positional))
                ch = width
            if level < len(channels) - 1:
                self.down.append(nn.ModuleDict({"downsample": nn.Conv2d(ch, ch, 3, stride=2, padding=1)}))
        self.mid = self._stage(ch, ch, True, norm_groups, dropout, block_args, positional)
        self.mid_res = ResBlock(ch, ch, time_dim, norm_groups, dropout)
        return ch

    @staticmethod
    def _stage(in_ch: int, out_ch: int, attention: bool, norm_groups: int, dropout: float, block_args: dict,
               positional: bool) -> nn.ModuleDict:
        modules = {"res": ResBlock(in_ch, out_ch, block_args["time_dim"], norm_groups, dropout)}
        if attention:
            modules["attn"] = SpatialTransformer(out_ch, norm_groups, RaphaelBlock(out_ch, **block_args), positional)
        return nn.ModuleDict(modules)

    def _time_embedding(self, timestep: Tensor, batch: int, dtype: torch.dtype, text_states: Tensor,
                        text_lengths: Tensor) -> Tensor:
        """The time embedding of timestep [batch] in dtype (the sample's: under layerwise casting the weights are
        stored in another), plus the pooled text embedding when the model has one."""
        emb = self.time_embed(timestep_embedding(timestep, self.conv_in.out_channels).to(dtype))
        if self.text_embed is not None:
            eot = (text_lengths.clamp(min=1) - 1).view(batch, 1, 1).expand(batch, 1, text_states.shape[-1])
            emb = emb + self.text_embed(text_states.gather(1, eot).squeeze(1).to(emb.dtype))
        return emb.to(dtype)

    @staticmethod
    def _run_stage(stage: nn.ModuleDict, h: Tensor, temb: Tensor, text_states: Tensor, text_lengths: Tensor,
                   record: _Record) -> Tensor:
        h = stage["res"](h, temb)
        if "attn" in stage:
            h, aux = stage["attn"](h, text_states, text_lengths, temb)
            batch = h.shape[0]
            record.space_routes.append(aux.space_route)
            record.time_routes.append(aux.time_route)
            record.attn_maps.append(aux.attn_map)
            eot = (text_lengths.clamp(min=1) - 1).view(batch, 1, 1).expand(batch, aux.attn_map.shape[1], 1)
            record.pooled_maps.append(aux.attn_map.gather(2, eot).view(batch, h.shape[2], h.shape[3]))
            if aux.balance_loss is not None:
                record.balance.append(aux.balance_loss)
        return h

    def _encode(self, sample: Tensor, temb: Tensor, text_states: Tensor, text_lengths: Tensor, record: _Record,
                conv_in_residual: Optional[Tensor] = None) -> Tuple[List[Tensor], Tensor]:
        """(the skip connections, the middle block's output); conv_in_residual is added to conv_in's output (a
        ControlNet's conditioning embedding)."""
        h = self.conv_in(F.pixel_unshuffle(sample, self.patch_size) if self.patch_size > 1 else sample)
        if conv_in_residual is not None:
            h = h + conv_in_residual
        skips = [h]
        for stage in self.down:
            h = stage["downsample"](h) if "downsample" in stage else self._run_stage(stage, h, temb, text_states,
                                                                                      text_lengths, record)
            skips.append(h)
        mid = self.mid_res(self._run_stage(self.mid, h, temb, text_states, text_lengths, record), temb)
        return skips, mid


@dataclass
class RaphaelUNetOutput(BaseOutput):
    """forward()'s result: the prediction and everything RAPHAEL's losses and plots need."""

    sample: Tensor  # like x_t: the noise, v or x0 (config.prediction_type)
    space_routes: Optional[List[Optional[Tensor]]] = None  # per block: [B, N_y]
    time_routes: Optional[List[Optional[Tensor]]] = None  # per block: [B]
    attn_maps: Optional[List[Tensor]] = None  # per block: [B, h*w, N_y] head-mean cross-attention map
    pooled_maps: Optional[List[Tensor]] = None  # per block: [B, h, w] map of the end-of-text token
    edge_logits: Optional[Tensor] = None  # [B, 1, H, W] (None when edge supervision is off)
    balance_loss: Optional[Tensor] = None  # sum over blocks (None when disabled)


def down_stage_widths(channels: Sequence[int], layers_per_level: int) -> List[int]:
    """Channels of every skip connection, in order: conv_in's output, then each down stage's (ResNet stage or
    downsampling convolution). The up path consumes them in reverse; a ControlNet adds one residual to each."""
    widths = [channels[0]]
    for level, width in enumerate(channels):
        widths += [width] * layers_per_level
        if level < len(channels) - 1:
            widths.append(width)
    return widths


class RaphaelUNet(LegacyConfigNamesMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, RaphaelEncoderMixin):
    r"""
    The RAPHAEL U-Net: ResNet blocks and RAPHAEL transformer blocks (self-attention, masked cross-attention, time-MoE,
    space-MoE), plus the edge head of edge supervision. Called like diffusers' UNet2DConditionModel:
    `unet(sample, timestep, encoder_hidden_states=text_states).sample`.

    Args:
        sample_size (`int`, defaults to 32): The training height and width of the sample (pixels, or latents with
            `latent=True`); any multiple of `sample_stride` runs.
        in_channels (`int`, defaults to 3): Channels of the input sample.
        out_channels (`int`, defaults to 3): Channels of the prediction.
        block_out_channels (`Tuple[int]`, defaults to `(64, 128)`): The width of each U-Net level (0.2's `channels`).
        layers_per_block (`int`, defaults to 1): Stages per level on the way down (0.2's `layers_per_level`).
        attention_levels (`Tuple[bool]`, defaults to `(False, True)`): Which levels have transformer blocks.
        attention_head_dim (`int`, defaults to 32): Width of an attention head: 32, 64 or 128, the cross-attention
            kernel's (0.2's `head_dim`).
        norm_num_groups (`int`, defaults to 32): Groups of the GroupNorms (0.2's `norm_groups`).
        dropout (`float`, defaults to 0.0): Dropout of the ResNet blocks and cross-attention.
        cross_attention_dim (`int`, defaults to 64): Width of the text states (0.2's `text_dim`).
        text_tokens (`int`, defaults to 77): Text tokens per prompt.
        alpha (`float`, defaults to 0.2): Threshold of the cross-attention mask.
        space_experts (`int`, defaults to 6): Space-MoE experts (0 turns space-MoE off).
        time_experts (`int`, defaults to 4): Time-MoE experts (0 turns time-MoE off).
        expert_hidden_mult (`int`, defaults to 4): Hidden width of an expert FFN over its input width.
        gate_noise (`float`, defaults to 0.1): Standard deviation of the gates' training noise.
        balance_loss (`bool`, defaults to `False`): Whether the MoEs return a load-balancing loss.
        use_space_moe (`bool`, defaults to `True`): Ablation switch of space-MoE.
        use_time_moe (`bool`, defaults to `True`): Ablation switch of time-MoE.
        use_edge (`bool`, defaults to `True`): Whether the model has the edge head P_theta.
        edge_layers (`int`, defaults to 5): Convolutions of the edge head.
        edge_channels (`int`, defaults to 32): Width of the edge head.
        t_cutoff (`int`, defaults to 500): T_c of the edge loss (no edge loss above it).
        pooled_text (`bool`, defaults to `False`): Adds the end-of-text token's state to the time embedding (SDXL's
            pooled text embedding), so every ResNet block sees the prompt.
        positional_embedding (`bool`, defaults to `False`): Adds a fixed 2D sin-cos position to transformer tokens.
        num_train_timesteps (`int`, defaults to 1000): Length of the training noise schedule.
        prediction_type (`str`, defaults to `"epsilon"`): What the model predicts: `"epsilon"`, `"v_prediction"` or
            `"sample"` (diffusers' names).
        gradient_checkpointing (`bool`, defaults to `False`): Enables gradient checkpointing at construction.
        latent (`bool`, defaults to `False`): Whether the model runs on VAE latents.
        patch_size (`int`, defaults to 1): Folds p x p pixels into channels before conv_in (DiT's patches), so every
            level runs at 1/p of the sample's height and width.
        space_moe_recompute (`bool`, defaults to `False`): Every space-MoE recomputes its experts' hidden activations
            in the backward instead of keeping them from the forward (less memory, slower; `nn.SpaceMoE`'s
            `recompute`).
        time_moe_recompute (`bool`, defaults to `False`): The same for every time-MoE (`nn.TimeMoE`'s `recompute`).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SpatialTransformer", "ResBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: Tuple[int, ...] = (64, 128),
        layers_per_block: int = 1,
        attention_levels: Tuple[bool, ...] = (False, True),
        attention_head_dim: int = 32,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        cross_attention_dim: int = 64,
        text_tokens: int = 77,
        alpha: float = 0.2,
        space_experts: int = 6,
        time_experts: int = 4,
        expert_hidden_mult: int = 4,
        gate_noise: float = 0.1,
        balance_loss: bool = False,
        use_space_moe: bool = True,
        use_time_moe: bool = True,
        use_edge: bool = True,
        edge_layers: int = 5,
        edge_channels: int = 32,
        t_cutoff: int = 500,
        pooled_text: bool = False,
        positional_embedding: bool = False,
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        gradient_checkpointing: bool = False,
        latent: bool = False,
        patch_size: int = 1,
        space_moe_recompute: bool = False,
        time_moe_recompute: bool = False,
        **kwargs,
    ):
        super().__init__()
        # diffusers' enable_gradient_checkpointing sets this flag on every module that has one, this one included;
        # an attribute of our own keeps it from reading the config field of the same name.
        self.gradient_checkpointing = False
        names = self._legacy_config(dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                                         attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
                                         cross_attention_dim=cross_attention_dim), kwargs)
        channels, layers_per_level, head_dim, norm_groups, text_dim = (
            names["block_out_channels"], names["layers_per_block"], names["attention_head_dim"],
            names["norm_num_groups"], names["cross_attention_dim"])
        channels, attention_levels = tuple(channels), tuple(bool(a) for a in attention_levels)
        if len(channels) != len(attention_levels):
            raise ValueError("RaphaelUNet: channels and attention_levels need one entry per level")
        if head_dim not in (32, 64, 128):
            raise ValueError(f"RaphaelUNet: head_dim must be 32, 64 or 128, got {head_dim}")
        for c in channels:
            if c % head_dim or c % norm_groups:
                raise ValueError(f"RaphaelUNet: width {c} must be a multiple of head_dim={head_dim} "
                                 f"and norm_groups={norm_groups}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"RaphaelUNet: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if patch_size < 1:
            raise ValueError(f"RaphaelUNet: patch_size must be at least 1, got {patch_size}")
        block_args = raphael_block_args(channels[0], head_dim, text_dim, alpha, dropout,
                                        space_experts if use_space_moe else 0, time_experts if use_time_moe else 0,
                                        expert_hidden_mult, gate_noise, balance_loss, space_moe_recompute,
                                        time_moe_recompute)
        ch = self._build_encoder(in_channels, channels, layers_per_level, attention_levels, norm_groups, dropout,
                                 block_args, pooled_text, positional_embedding, patch_size)
        skips = down_stage_widths(channels, layers_per_level)
        self.up = nn.ModuleList()
        for level in reversed(range(len(channels))):
            width, attention = channels[level], attention_levels[level]
            for _ in range(layers_per_level + 1):
                self.up.append(self._stage(ch + skips.pop(), width, attention, norm_groups, dropout, block_args,
                                           positional_embedding))
                ch = width
            if level > 0:
                self.up.append(nn.ModuleDict({"upsample": nn.Conv2d(ch, ch, 3, padding=1)}))
        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels * patch_size**2, 3, padding=1)
        self.edge_head = EdgeHead(edge_channels, edge_layers, patch_size) if use_edge else None
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RaphaelUNet":
        """A freshly initialised U-Net of preset "tiny", "small" or "paper", with any argument overridden."""
        return cls(**preset_config(name, **overrides))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "RaphaelUNet":
        """diffusers' from_pretrained; a folder written by raphael_ext 0.1 (config.json of RaphaelConfig and
        model.safetensors) loads too, its weights renamed to this layout (see `convert_legacy_state_dict`)."""
        folder = Path(str(pretrained_model_name_or_path))
        if (folder / LEGACY_WEIGHTS).is_file() and not (folder / "diffusion_pytorch_model.safetensors").is_file():
            return cls.from_legacy_folder(folder, torch_dtype=kwargs.get("dtype", kwargs.get("torch_dtype")))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_legacy_folder(cls, folder: Union[str, Path], torch_dtype: Optional[torch.dtype] = None) -> "RaphaelUNet":
        folder = Path(folder)
        logger.info("RaphaelUNet: %s is a raphael_ext 0.1 folder; converting it on load", folder)
        config = json.loads((folder / "config.json").read_text())
        config.pop("text_encoder", None)  # which text tower it was trained with: now the pipeline's text_encoder
        model = cls(**rename_legacy_config(config))
        model.load_state_dict(convert_legacy_state_dict(load_file(str(folder / LEGACY_WEIGHTS))))
        return model.to(torch_dtype) if torch_dtype is not None else model

    # --- introspection --------------------------------------------------------------------------------------
    @property
    def num_transformer_blocks(self) -> int:
        return sum(isinstance(m, SpatialTransformer) for m in self.modules())

    @property
    def skip_widths(self) -> List[int]:
        """Channels of the skip connections (the residuals a ControlNet adds), in the order forward() makes them."""
        return down_stage_widths(self.config.block_out_channels, self.config.layers_per_block)

    @property
    def sample_stride(self) -> int:
        """The height and width of x_t must be multiples of this."""
        return 2 ** (len(self.config.block_out_channels) - 1) * self.patch_size

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        sample: Tensor,
        timestep: Union[Tensor, float, int],
        encoder_hidden_states: Tensor,
        text_lengths: Optional[Tensor] = None,
        down_block_additional_residuals: Optional[Sequence[Tensor]] = None,
        mid_block_additional_residual: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        cross_attention_kwargs: Optional[Dict[str, object]] = None,
        return_dict: bool = True,
    ) -> Union[RaphaelUNetOutput, Tuple[Tensor]]:
        r"""
        The prediction for a noisy sample (diffusers' UNet2DConditionModel.forward).

        Args:
            sample (`torch.Tensor`): The noisy input `[B, C, H, W]`.
            timestep (`torch.Tensor`, `float` or `int`): The timestep: `[B]`, or one value (a number, a 0-d or a
                `[1]` tensor) for the whole batch.
            encoder_hidden_states (`torch.Tensor`): The text states `[B, N_y, cross_attention_dim]`.
            text_lengths (`torch.Tensor`, *optional*): Valid tokens per prompt `[B]`; all tokens when neither it nor
                `encoder_attention_mask` is given.
            down_block_additional_residuals (`List[torch.Tensor]`, *optional*): A ControlNet's residuals, added to
                the skip connections.
            mid_block_additional_residual (`torch.Tensor`, *optional*): A ControlNet's residual, added to the
                middle block's output.
            encoder_attention_mask (`torch.Tensor`, *optional*): `[B, N_y]`, 1 for the prompt's tokens (a prefix);
                taken as `text_lengths`.
            cross_attention_kwargs (`dict`, *optional*): Its `"scale"` scales the LoRA adapters for this call.
            return_dict (`bool`, defaults to `True`): Whether to return a `RaphaelUNetOutput` or a tuple.

        Returns:
            `RaphaelUNetOutput` (the prediction, routes, attention maps, edge logits, balance loss), or `(sample,)`.
        """
        text_states = encoder_hidden_states
        batch, _, height, width = sample.shape
        timestep = broadcast_timestep(timestep, batch, sample.device)
        if text_lengths is None and encoder_attention_mask is not None:
            text_lengths = lengths_from_mask(encoder_attention_mask)
        if text_lengths is None:
            text_lengths = torch.full((batch,), text_states.shape[1], dtype=torch.long, device=sample.device)
        temb = self._time_embedding(timestep, batch, sample.dtype, text_states, text_lengths)
        record = _Record()
        skips, h = self._encode(sample, temb, text_states, text_lengths, record)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"RaphaelUNet: {len(skips)} down-block residuals expected, "
                                 f"got {len(down_block_additional_residuals)}")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for stage in self.up:
            if "upsample" in stage:
                h = stage["upsample"](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            else:
                h = self._run_stage(stage, torch.cat([h, skips.pop()], dim=1), temb, text_states, text_lengths, record)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.patch_size > 1:
            out = F.pixel_shuffle(out, self.patch_size)
        edge_logits = None
        if self.edge_head is not None:
            size = (height // self.patch_size, width // self.patch_size)
            maps = torch.stack([F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)
                                for m in record.pooled_maps]).mean(dim=0)
            edge_logits = self.edge_head(maps.to(sample.dtype))
        if not return_dict:
            return (out,)
        return RaphaelUNetOutput(sample=out, space_routes=record.space_routes, time_routes=record.time_routes,
                                 attn_maps=record.attn_maps, pooled_maps=record.pooled_maps, edge_logits=edge_logits,
                                 balance_loss=torch.stack(record.balance).sum() if record.balance else None)


def raphael_block_args(c0: int, head_dim: int, text_dim: int, alpha: float, dropout: float, space_experts: int,
                       time_experts: int, expert_hidden_mult: int, gate_noise: float, balance_loss: bool,
                       space_moe_recompute: bool = False, time_moe_recompute: bool = False) -> dict:
    """RaphaelBlock's arguments besides its width (the time embedding is 4 x the first level's width)."""
    return dict(head_dim=head_dim, text_dim=text_dim, time_dim=4 * c0, alpha=alpha, dropout=dropout,
                space_experts=space_experts, time_experts=time_experts, expert_hidden_mult=expert_hidden_mult,
                gate_noise=gate_noise, balance_loss=balance_loss, space_moe_recompute=space_moe_recompute,
                time_moe_recompute=time_moe_recompute)


def preset_config(name: str, **overrides) -> dict:
    """RaphaelUNet's arguments for a preset, with overrides."""
    if name not in PRESETS:
        raise ValueError(f"RaphaelUNet: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    overrides = rename_legacy_config(overrides)
    unknown = sorted(set(overrides) - set(inspect.signature(RaphaelUNet.__init__).parameters) - {"self", "kwargs"})
    if unknown:
        raise ValueError(f"RaphaelUNet: unknown arguments {unknown}")
    return {**PRESETS[name], **overrides}


LEGACY_EXPERT_NAMES = {"0": "w1", "1": "b1", "2": "w2", "3": "b2"}


def convert_legacy_state_dict(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """raphael_ext 0.1's weights in this layout: each block's fused self-attention projection `qkv` [3C, C] becomes
    self_attn.to_q / to_k / to_v, `proj` becomes self_attn.to_out.0, and the expert parameter lists experts.0..3
    become experts.w1, b1, w2, b2. Everything else kept its name."""
    out = {}
    for key, value in state.items():
        prefix, _, last = key.rpartition(".")
        if prefix.endswith(".experts") and last in LEGACY_EXPERT_NAMES:
            out[f"{prefix}.{LEGACY_EXPERT_NAMES[last]}"] = value
        elif key.endswith(".block.qkv.weight"):
            prefix = key[: -len("qkv.weight")]
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.weight"] = part.contiguous()
        elif ".block.proj." in key:
            out[key.replace(".block.proj.", ".block.self_attn.to_out.0.")] = value
        else:
            out[key] = value
    return out


__all__ = ["EdgeHead", "LEGACY_CONFIG_NAMES", "PRESETS", "PREDICTION_TYPES", "RaphaelBlock", "RaphaelEncoderMixin",
           "RaphaelUNet", "RaphaelUNetOutput", "ResBlock", "SpatialTransformer", "broadcast_timestep",
           "convert_legacy_state_dict", "down_stage_widths", "preset_config", "raphael_block_args",
           "rename_legacy_config", "timestep_embedding"]
