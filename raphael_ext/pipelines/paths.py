"""RAPHAEL's diffusion paths (paper Fig. 4, 9, 11): `DiffusionPaths`, what RaphaelPipeline(record_paths=True)
records while sampling, and its pictures: which space expert each text token takes through the transformer blocks,
which time expert each block uses over the sampling steps, and each token's cross-attention map."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..plotting import subplots


@dataclass
class DiffusionPaths:
    """Routes recorded while sampling (conditional branch only)."""

    tokens: List[List[str]]  # per prompt, the text tokens (BPE pieces, start and end tokens included)
    timesteps: List[int] = field(default_factory=list)
    space_routes: List[List[Tensor]] = field(default_factory=list)  # [step][block] -> [B, N_y] (CPU, int64)
    time_routes: List[List[Tensor]] = field(default_factory=list)  # [step][block] -> [B]
    attn_maps: List[Tensor] = field(default_factory=list)  # [block] -> [B, h, w, N_y] at the last step

    def record(self, t: int, space_routes, time_routes, attn_maps, sample_shape) -> None:
        self.timesteps.append(int(t))
        self.space_routes.append([r.cpu() if r is not None else None for r in space_routes])
        self.time_routes.append([r.cpu() if r is not None else None for r in time_routes])
        maps = []
        for m in attn_maps:  # [B, h*w, N_y]; blocks differ in resolution, all with the sample's aspect ratio
            height = int(round((m.shape[1] * sample_shape[-2] / sample_shape[-1]) ** 0.5))
            maps.append(m.float().cpu().view(m.shape[0], height, m.shape[1] // height, m.shape[2]))
        self.attn_maps = maps


def plot_space_paths(paths: DiffusionPaths, out: Union[str, Path], prompt: int = 0) -> Path:
    """One line per text token: the space expert it is routed to in each transformer block (last step)."""
    routes = [r for r in paths.space_routes[-1] if r is not None]
    if not routes:
        raise ValueError("plot_space_paths: no space-MoE routes were recorded (space-MoE is off)")
    table = torch.stack([r[prompt] for r in routes])  # [blocks, N_y]
    tokens = paths.tokens[prompt]
    fig, ax = subplots(figsize=(1.0 + 0.45 * table.shape[0], 3.5))
    for i, token in enumerate(tokens):
        jitter = (i - len(tokens) / 2) * 0.03
        ax.plot(range(table.shape[0]), table[:, i].float() + jitter, marker="o", label=token)
    ax.set_xlabel("transformer block")
    ax.set_ylabel("space expert")
    ax.set_yticks(range(int(table.max()) + 1))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title("space-MoE paths per text token", fontsize=9)
    return _save(fig, out)


def plot_time_experts(paths: DiffusionPaths, out: Union[str, Path], prompt: int = 0) -> Path:
    """Heat map of the time expert chosen by every block at every sampling step."""
    rows = [[r[prompt].item() for r in step if r is not None] for step in paths.time_routes]
    if not rows or not rows[0]:
        raise ValueError("plot_time_experts: no time-MoE routes were recorded (time-MoE is off)")
    table = torch.tensor(rows)  # [steps, blocks]
    fig, ax = subplots(figsize=(1.5 + 0.35 * table.shape[1], 1.0 + 0.12 * table.shape[0]))
    image = ax.imshow(table.numpy(), aspect="auto", cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    ax.set_xlabel("transformer block")
    ax.set_ylabel("sampling step (t)")
    ticks = list(range(0, len(paths.timesteps), max(1, len(paths.timesteps) // 8)))
    ax.set_yticks(ticks, [str(paths.timesteps[i]) for i in ticks])
    fig.colorbar(image, ax=ax, label="time expert")
    ax.set_title("time-MoE expert per block and step", fontsize=9)
    return _save(fig, out)


def plot_attention_maps(paths: DiffusionPaths, out: Union[str, Path], prompt: int = 0) -> Path:
    """Each token's cross-attention map (last step), averaged over the blocks at the finest resolution."""
    size = max(m.shape[1:3] for m in paths.attn_maps)
    maps = torch.stack([F.interpolate(m[prompt].permute(2, 0, 1)[None], size=size, mode="bilinear",
                                      align_corners=False)[0] for m in paths.attn_maps]).mean(0)  # [N_y, h, w]
    tokens = paths.tokens[prompt]
    fig, axes = subplots(1, len(tokens), figsize=(1.6 * len(tokens), 1.9), squeeze=False)
    for ax, i in zip(axes[0], range(len(tokens))):
        ax.imshow(maps[i].numpy(), cmap="viridis")
        ax.set_title(tokens[i], fontsize=8)
        ax.axis("off")
    return _save(fig, out)


def _save(fig, out: Union[str, Path]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


__all__ = ["DiffusionPaths", "plot_attention_maps", "plot_space_paths", "plot_time_experts"]
