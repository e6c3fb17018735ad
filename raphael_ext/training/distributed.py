"""How training spreads over processes: torchrun's process group, DDP for models that fit one device, FSDP2
(`fully_shard`) for those that do not. Kept apart from the loop, as diffusers keeps its training_utils apart."""

import os
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..models.controlnet import RaphaelControlNet
from ..models.text_encoder import OpenCLIPTextEncoder
from ..models.unet import EdgeHead, ResBlock, SpatialTransformer


def setup_distributed() -> None:
    """Joins the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank_and_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def any_rank(flags: List[bool]) -> List[bool]:
    """Per flag, whether it is set on any rank: one all_reduce(MAX), so that every rank takes the same decision (skip
    a step, stop the run); in one process the flags themselves."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [bool(flag) for flag in flags]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def fsdp_units(model: nn.Module) -> list:
    """The modules FSDP2 shards as units, each gathered just before it runs and freed after (gradient checkpointing
    recomputes inside the gathered unit): for a U-Net or ControlNet each ResBlock, transformer block, down/upsampling
    convolution, the edge predictor and the ControlNet's conditioning encoder; for the text encoder each residual
    attention block of the tower. What is left (embeddings, input/output convolutions, zero convolutions, final
    norm) forms the root unit."""
    if isinstance(model, OpenCLIPTextEncoder):
        return list(model.tower.transformer.resblocks)
    units = [m for m in model.modules() if isinstance(m, (ResBlock, SpatialTransformer, EdgeHead))]
    for stage in (*model.down, *getattr(model, "up", [])):
        units += [stage[key] for key in ("downsample", "upsample") if key in stage]
    if isinstance(model, RaphaelControlNet):
        units.append(model.cond_embedding)
    return units


def shard(model: nn.Module, mesh, reshard_after_forward: Optional[bool] = None) -> None:
    """FSDP2 over `mesh`. Parameters stay float32 (the expert ops take one dtype for activations and weights; bf16
    autocast, as under DDP, does the mixed precision)."""
    from torch.distributed.fsdp import fully_shard

    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


__all__ = ["any_rank", "fsdp_units", "rank_and_world", "setup_distributed", "shard"]
