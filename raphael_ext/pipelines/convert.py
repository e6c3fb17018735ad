"""Runs written by raphael_ext 0.1 (before the diffusers layout) as pipeline folders: `python -m raphael_ext convert
RUN OUT`. Such a run holds unet_ema/ (config.json of RaphaelConfig + model.safetensors) and, when its text tower was
random, text_encoder.safetensors beside it."""

import json
from pathlib import Path
from typing import Optional, Union

from ..atomic_io import replace_folder_atomically
from ..models.text_encoder import OpenCLIPTextEncoder, openclip_tokenizer
from ..models.unet import LEGACY_WEIGHTS, RaphaelUNet
from .pipeline_raphael import RaphaelPipeline, default_scheduler, load_vae

LEGACY_TEXT_ENCODER = "text_encoder.safetensors"


def convert_legacy_run(run: Union[str, Path], out: Union[str, Path], text_checkpoint: Optional[str] = None,
                       vae: Optional[str] = None) -> Path:
    """Writes `out` as a RaphaelPipeline folder from a 0.1 run folder (or its unet_ema/ folder): the EMA U-Net with
    its weights renamed (RaphaelUNet.from_legacy_folder), the text tower it trained with (the run's
    text_encoder.safetensors, or `text_checkpoint`), open_clip's tokenizer, DDIM and, for latent runs, `vae`."""
    run = Path(run)
    unet_folder = run if (run / LEGACY_WEIGHTS).is_file() else run / "unet_ema"
    if not (unet_folder / LEGACY_WEIGHTS).is_file():
        raise FileNotFoundError(f"convert: {run} is not a raphael_ext 0.1 run (no unet_ema/{LEGACY_WEIGHTS})")
    tower = json.loads((unet_folder / "config.json").read_text()).get("text_encoder", "tiny")
    unet = RaphaelUNet.from_legacy_folder(unet_folder)
    checkpoint = text_checkpoint or (unet_folder.parent / LEGACY_TEXT_ENCODER
                                     if (unet_folder.parent / LEGACY_TEXT_ENCODER).is_file() else None)
    if checkpoint is None:
        raise FileNotFoundError(f"convert: no {LEGACY_TEXT_ENCODER} beside {unet_folder}; pass the OpenCLIP checkpoint "
                                "the run trained with (--text-checkpoint)")
    text_encoder = OpenCLIPTextEncoder.from_open_clip(tower, checkpoint)
    pipe = RaphaelPipeline(unet, text_encoder, openclip_tokenizer(text_encoder.context_length), default_scheduler(unet),
                           vae=load_vae(vae) if vae else None)
    return replace_folder_atomically(Path(out), lambda tmp: pipe.save_pretrained(tmp))


__all__ = ["convert_legacy_run"]
