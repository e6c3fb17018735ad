"""The thin RAPHAEL model (SPEC §2): a U-Net of ResNet blocks and RAPHAEL transformer blocks
(self-attention → masked cross-attention → time-MoE → space-MoE), plus the edge head of edge supervision.

Small and readable on purpose (in the spirit of DiT's models.py); the kernels live in raphael_ext.ops.
`RaphaelConfig` holds every knob of SPEC §1 and saves as JSON; `RaphaelUNet.save_pretrained(dir)` writes
`config.json` + `model.safetensors` (atomically) and `from_pretrained(dir)` reads them back.
"""

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .nn import MaskedCrossAttention, SpaceMoE, TimeMoE

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class RaphaelConfig:
    """Every knob of the model. Presets: RaphaelConfig.preset("tiny" | "small" | "paper")."""

    sample_size: int = 32  # training resolution of x_t (pixels, or latents in latent mode); any multiple of 2**(levels-1)
    in_channels: int = 3
    out_channels: int = 3
    channels: Tuple[int, ...] = (64, 128)  # width of each U-Net level
    layers_per_level: int = 1  # ResNet blocks per level on the way down (one more on the way up)
    attention_levels: Tuple[bool, ...] = (False, True)  # levels whose ResNet blocks are followed by transformer blocks
    head_dim: int = 32  # 32, 64 or 128 (the cross-attention kernel's head sizes)
    norm_groups: int = 32
    dropout: float = 0.0
    # text conditioning
    text_encoder: str = "tiny"  # raphael_ext.text.OpenCLIPTextEncoder name ("ViT-g-14" in the paper)
    text_dim: int = 64
    text_tokens: int = 77
    # RAPHAEL
    alpha: float = 0.2  # mask threshold of the cross-attention map
    space_experts: int = 6  # 0 turns space-MoE off
    time_experts: int = 4  # 0 turns time-MoE off
    expert_hidden_mult: int = 4
    gate_noise: float = 0.1  # std of the noise added to the gates' softmax before the argmax (training only)
    balance_loss: bool = False  # Switch-style load-balancing loss of the gates (ours; off in the paper)
    use_space_moe: bool = True  # ablation switches
    use_time_moe: bool = True
    use_edge: bool = True
    edge_layers: int = 5  # convolutions of the edge predictor P_theta
    edge_channels: int = 32
    t_cutoff: int = 500  # edge loss only for t <= T_c
    num_train_timesteps: int = 1000
    # What the U-Net predicts (diffusers' names): "epsilon" (the paper, SD), "v_prediction" or "sample" (x0).
    # Trainer and RaphaelPipeline both read it.
    prediction_type: str = "epsilon"
    gradient_checkpointing: bool = False
    latent: bool = False  # True: x_t lives in a VAE's latent space (see RaphaelPipeline)

    def __post_init__(self):
        self.channels = tuple(self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("RaphaelConfig: channels and attention_levels need one entry per level")
        for c in self.channels:
            if c % self.head_dim or c % self.norm_groups:
                raise ValueError(f"RaphaelConfig: width {c} must be a multiple of head_dim={self.head_dim} "
                                 f"and norm_groups={self.norm_groups}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"RaphaelConfig: prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        if self.head_dim not in (32, 64, 128):
            raise ValueError(f"RaphaelConfig: head_dim must be 32, 64 or 128, got {self.head_dim}")

    @property
    def active_space_experts(self) -> int:
        return self.space_experts if self.use_space_moe else 0

    @property
    def active_time_experts(self) -> int:
        return self.time_experts if self.use_time_moe else 0

    @classmethod
    def preset(cls, name: str, **overrides) -> "RaphaelConfig":
        presets = {
            # Trains on 2 CPU cores in minutes: 32x32 pixels, two levels, 4 transformer blocks (16x16 tokens).
            "tiny": dict(),
            # One GPU: 64x64 latents (512 px), four levels, 16 transformer blocks like the paper's layout.
            "small": dict(sample_size=64, in_channels=4, out_channels=4, channels=(128, 256, 512, 512),
                          layers_per_level=2, attention_levels=(True, True, True, False), head_dim=64,
                          text_encoder="small", text_dim=512, edge_channels=64, latent=True),
            # The paper's scale (Table 2): 16 transformer blocks, 6 space and 4 time experts, ViT-g/14 text
            # (width 1024, 77 tokens), latent diffusion at 640x640 (80x80 latents). 2.98 B parameters (the
            # paper: "about 3 B"); the deepest level, without attention, is widened to 2048 to get there.
            "paper": dict(sample_size=80, in_channels=4, out_channels=4, channels=(384, 768, 1536, 2048),
                          layers_per_level=2, attention_levels=(True, True, True, False), head_dim=64,
                          text_encoder="ViT-g-14", text_dim=1024, edge_channels=128, latent=True,
                          gradient_checkpointing=True),
        }
        if name not in presets:
            raise ValueError(f"RaphaelConfig.preset: unknown preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RaphaelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RaphaelConfig: unknown fields {unknown}")
        return cls(**data)

    def save(self, path: Union[str, Path]) -> None:
        atomic_write_bytes(Path(path), json.dumps(self.to_dict(), indent=2).encode())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "RaphaelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary file in the same folder, which is then renamed over `path`: a crash never
    leaves a half-written file behind, and a failed write leaves the old one untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _replace_atomically(path, write)


def atomic_save_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _replace_atomically(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


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


@dataclass
class BlockAux:
    """What one RAPHAEL transformer block reports besides its output."""

    attn_map: Tensor  # [B, N_x, N_y] head-mean cross-attention probabilities
    space_route: Optional[Tensor]  # [B, N_y] expert per text token (None: space-MoE off)
    time_route: Optional[Tensor]  # [B] expert per sample (None: time-MoE off)
    balance_loss: Optional[Tensor]


class RaphaelBlock(nn.Module):
    """SPEC §2: self-attention → cross-attention (map + mask) → time-MoE → space-MoE, each pre-norm and residual."""

    def __init__(self, dim: int, config: RaphaelConfig, time_dim: int):
        super().__init__()
        heads = dim // config.head_dim
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross = MaskedCrossAttention(dim, config.text_dim, heads, alpha=config.alpha, dropout=config.dropout)
        moe = dict(hidden_mult=config.expert_hidden_mult, gate_noise=config.gate_noise,
                   balance_loss=config.balance_loss, pre_norm=True)
        self.time_moe = TimeMoE(dim, time_dim, config.active_time_experts, **moe)
        self.space_moe = SpaceMoE(dim, config.text_dim, config.active_space_experts, **moe)

    def forward(self, h: Tensor, text: Tensor, text_lengths: Tensor, temb: Tensor) -> Tuple[Tensor, BlockAux]:
        batch, tokens, dim = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        h = h + self.proj(attn)
        cross, attn_map, mask = self.cross(self.norm2(h), text, text_lengths)
        h = h + cross
        time_out = self.time_moe(h, temb)
        space_out = self.space_moe(time_out.out, text, mask, text_lengths)
        losses = [x for x in (time_out.balance_loss, space_out.balance_loss) if x is not None]
        balance = torch.stack(losses).sum() if losses else None
        return space_out.out, BlockAux(attn_map, space_out.route, time_out.route, balance)


class SpatialTransformer(nn.Module):
    """[B, C, H, W] feature map → tokens → RAPHAEL blocks → feature map, with a residual around it all."""

    def __init__(self, dim: int, config: RaphaelConfig, time_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_groups, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.block = RaphaelBlock(dim, config, time_dim)
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)  # starts as the identity, like diffusers' Transformer2DModel
        nn.init.zeros_(self.proj_out.bias)
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x: Tensor, text: Tensor, text_lengths: Tensor, temb: Tensor) -> Tuple[Tensor, BlockAux]:
        batch, dim, height, width = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            h, aux = checkpoint(self.block, h, text, text_lengths, temb, use_reentrant=False)
        else:
            h, aux = self.block(h, text, text_lengths, temb)
        h = self.proj_out(h).transpose(1, 2).reshape(batch, dim, height, width)
        return x + h, aux


class EdgeHead(nn.Module):
    """P_theta (paper §3.2): a stack of `layers` convolutions from the pooled token's attention maps (averaged over
    the transformer blocks, at the sample resolution) to edge logits [B, 1, H, W]."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        convs = [nn.Conv2d(1, channels, 3, padding=1)]
        convs += [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers - 2)]
        convs += [nn.Conv2d(channels, 1, 3, padding=1)]
        self.convs = nn.ModuleList(convs)

    def forward(self, maps: Tensor) -> Tensor:
        h = maps
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = F.silu(h)
        return h


@dataclass
class RaphaelOutput:
    """forward()'s result: the prediction and everything RAPHAEL's losses and plots need."""

    sample: Tensor  # like x_t: the noise, v or x0 (config.prediction_type)
    space_routes: List[Optional[Tensor]] = field(default_factory=list)  # per block: [B, N_y]
    time_routes: List[Optional[Tensor]] = field(default_factory=list)  # per block: [B]
    attn_maps: List[Tensor] = field(default_factory=list)  # per block: [B, h*w, N_y] head-mean cross-attention map
    pooled_maps: List[Tensor] = field(default_factory=list)  # per block: [B, h, w] map of the end-of-text token
    edge_logits: Optional[Tensor] = None  # [B, 1, H, W] (None when edge supervision is off)
    balance_loss: Optional[Tensor] = None  # sum over blocks (None when disabled)


class RaphaelUNet(nn.Module):
    """forward(x_t [B, C, H, W], t [B], text_states [B, N_y, d_y], text_lengths [B]) -> RaphaelOutput."""

    def __init__(self, config: RaphaelConfig):
        super().__init__()
        self.config = config
        c0 = config.channels[0]
        time_dim = 4 * c0
        groups = config.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(c0, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)

        def stage(in_ch: int, out_ch: int, attention: bool) -> nn.ModuleDict:
            return nn.ModuleDict({"res": ResBlock(in_ch, out_ch, time_dim, groups, config.dropout),
                                  **({"attn": SpatialTransformer(out_ch, config, time_dim)} if attention else {})})

        self.down = nn.ModuleList()
        skips = [c0]
        ch = c0
        for level, (width, attention) in enumerate(zip(config.channels, config.attention_levels)):
            for _ in range(config.layers_per_level):
                self.down.append(stage(ch, width, attention))
                ch = width
                skips.append(ch)
            if level < len(config.channels) - 1:
                self.down.append(nn.ModuleDict({"downsample": nn.Conv2d(ch, ch, 3, stride=2, padding=1)}))
                skips.append(ch)
        self.mid = stage(ch, ch, True)
        self.mid_res = ResBlock(ch, ch, time_dim, groups, config.dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(len(config.channels))):
            width, attention = config.channels[level], config.attention_levels[level]
            for i in range(config.layers_per_level + 1):
                self.up.append(stage(ch + skips.pop(), width, attention))
                ch = width
            if level > 0:
                self.up.append(nn.ModuleDict({"upsample": nn.Conv2d(ch, ch, 3, padding=1)}))
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = nn.Conv2d(ch, config.out_channels, 3, padding=1)
        self.edge_head = EdgeHead(config.edge_channels, config.edge_layers) if config.use_edge else None

    @property
    def num_transformer_blocks(self) -> int:
        return sum(isinstance(m, SpatialTransformer) for m in self.modules())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.config.gradient_checkpointing = enabled
        for m in self.modules():
            if isinstance(m, SpatialTransformer):
                m.gradient_checkpointing = enabled

    def forward(self, x: Tensor, t: Tensor, text_states: Tensor, text_lengths: Optional[Tensor] = None) -> RaphaelOutput:
        batch, _, height, width = x.shape
        if text_lengths is None:
            text_lengths = torch.full((batch,), text_states.shape[1], dtype=torch.long, device=x.device)
        temb = self.time_embed(timestep_embedding(t.expand(batch) if t.dim() == 0 else t, self.config.channels[0]))
        temb = temb.to(x.dtype)
        out = RaphaelOutput(sample=x)

        def run(stage: nn.ModuleDict, h: Tensor) -> Tensor:
            h = stage["res"](h, temb)
            if "attn" in stage:
                h, aux = stage["attn"](h, text_states, text_lengths, temb)
                out.space_routes.append(aux.space_route)
                out.time_routes.append(aux.time_route)
                out.attn_maps.append(aux.attn_map)
                eot = (text_lengths.clamp(min=1) - 1).view(batch, 1, 1).expand(batch, aux.attn_map.shape[1], 1)
                out.pooled_maps.append(aux.attn_map.gather(2, eot).view(batch, h.shape[2], h.shape[3]))
                if aux.balance_loss is not None:
                    out.balance_loss = aux.balance_loss if out.balance_loss is None else out.balance_loss + aux.balance_loss
            return h

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage["downsample"](h) if "downsample" in stage else run(stage, h)
            skips.append(h)
        h = self.mid_res(run(self.mid, h), temb)
        for stage in self.up:
            if "upsample" in stage:
                h = stage["upsample"](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            else:
                h = run(stage, torch.cat([h, skips.pop()], dim=1))
        out.sample = self.conv_out(F.silu(self.norm_out(h)))
        if self.edge_head is not None:
            maps = torch.stack([F.interpolate(m[:, None].float(), size=(height, width), mode="bilinear",
                                              align_corners=False) for m in out.pooled_maps]).mean(dim=0)
            out.edge_logits = self.edge_head(maps.to(x.dtype))
        return out

    # --- diffusers-style persistence -----------------------------------------------------------------------
    def save_pretrained(self, folder: Union[str, Path], state_dict: Optional[Dict[str, Tensor]] = None) -> None:
        """config.json + model.safetensors in `folder`, each written atomically. `state_dict` (default: this
        module's) is for a sharded model, whose full tensors are gathered by the caller."""
        folder = Path(folder)
        self.config.save(folder / "config.json")
        atomic_save_safetensors(self.state_dict() if state_dict is None else state_dict, folder / "model.safetensors",
                                metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "RaphaelUNet":
        folder = Path(folder)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"RaphaelUNet.from_pretrained: {folder / name} does not exist")
        model = cls(RaphaelConfig.load(folder / "config.json"))
        model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
        return model.to(device)


__all__ = ["RaphaelConfig", "RaphaelUNet", "RaphaelOutput", "RaphaelBlock", "atomic_write_bytes",
           "atomic_save_safetensors", "timestep_embedding"]
