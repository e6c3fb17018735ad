"""Text-to-image sampling with a RAPHAEL U-Net: DDIM (diffusers' DDIMScheduler, or any diffusers scheduler with
the same set_timesteps/step interface), classifier-free guidance, seeds, PIL images; pixel space, or latent
space through a diffusers AutoencoderKL loaded from a local folder.

With `record_paths=True` the pipeline keeps RAPHAEL's diffusion paths (paper Fig. 4, 9, 11): the space expert
each text token chose in every transformer block, the time expert of every block at every step, and the
cross-attention map of every token; `raphael_ext.paths` draws them.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .model import RaphaelUNet
from .text import OpenCLIPTextEncoder


def default_scheduler(unet: RaphaelUNet):
    """DDIM over the model's training schedule: DDPM's linear betas in pixel space, Stable Diffusion's
    scaled-linear betas in latent space."""
    from diffusers import DDIMScheduler

    latent = unet.config.latent
    return DDIMScheduler(
        num_train_timesteps=unet.config.num_train_timesteps,
        beta_start=0.00085 if latent else 0.0001,
        beta_end=0.012 if latent else 0.02,
        beta_schedule="scaled_linear" if latent else "linear",
        clip_sample=not latent,
        set_alpha_to_one=False,
        prediction_type=unet.config.prediction_type,
    )


def vae_shift(vae) -> float:
    """The latent mean some VAEs subtract before scaling (diffusers' `shift_factor`, e.g. SD3's); 0 for SD's."""
    return getattr(vae.config, "shift_factor", None) or 0.0


def vae_stride(vae) -> int:
    """Pixels per latent: 2 ** (number of VAE resolution levels - 1) (8 for Stable Diffusion's VAE); 1 without one."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


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


@dataclass
class PipelineOutput:
    images: List[Image.Image]
    paths: Optional[DiffusionPaths] = None


class RaphaelPipeline:
    """pipeline(prompts, height, width, num_inference_steps=50, guidance_scale=4.5, seed=0) -> PipelineOutput."""

    def __init__(self, unet: RaphaelUNet, text_encoder: OpenCLIPTextEncoder, scheduler=None, vae=None,
                 vae_scaling_factor: Optional[float] = None):
        if unet.config.latent and vae is None:
            raise ValueError("RaphaelPipeline: a latent-space model needs a vae (see RaphaelPipeline.load_vae)")
        self.unet = unet
        self.text_encoder = text_encoder
        self.scheduler = scheduler if scheduler is not None else default_scheduler(unet)
        expected = getattr(getattr(self.scheduler, "config", None), "prediction_type", unet.config.prediction_type)
        if expected != unet.config.prediction_type:
            raise ValueError(f"RaphaelPipeline: the scheduler expects {expected!r} outputs, the U-Net predicts "
                             f"{unet.config.prediction_type!r}")
        self.vae = vae
        self.vae_scaling_factor = vae_scaling_factor or (getattr(getattr(vae, "config", None), "scaling_factor", None)
                                                          or 0.18215)

    @staticmethod
    def load_vae(folder: Union[str, Path], device="cpu", dtype=torch.float32):
        """A diffusers AutoencoderKL from a local folder (config.json + safetensors weights); nothing is downloaded
        and no pickle is read."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, torch_dtype=dtype,
                                            low_cpu_mem_usage=False)
        return vae.to(device).eval().requires_grad_(False)

    @property
    def vae_stride(self) -> int:
        return vae_stride(self.vae)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: Union[str, Sequence[str]], height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = 50, guidance_scale: float = 4.5, seed: Optional[int] = 0,
                 negative_prompt: str = "", record_paths: bool = False, progress: bool = True) -> PipelineOutput:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        config = self.unet.config
        factor = self.vae_stride
        height = height or config.sample_size * factor
        width = width or config.sample_size * factor
        levels = len(config.channels) - 1
        if height % (factor << levels) or width % (factor << levels):
            raise ValueError(f"RaphaelPipeline: height and width must be multiples of {factor << levels}, "
                             f"got {height}x{width}")
        device, dtype = self.device, next(self.unet.parameters()).dtype
        batch = len(prompts)
        states, lengths = self.text_encoder.encode(prompts, device=device)
        use_guidance = guidance_scale != 1.0
        if use_guidance:
            null_states, null_lengths = self.text_encoder.encode([negative_prompt] * batch, device=device)
            states, lengths = torch.cat([null_states, states]), torch.cat([null_lengths, lengths])
        states = states.to(dtype)
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        shape = (batch, config.in_channels, height // factor, width // factor)
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        paths = None
        if record_paths:
            tokenizer = self.text_encoder.tokenizer
            paths = DiffusionPaths(tokens=[[tokenizer.decode([i]).strip() or "<pad>" for i in row[: int(n)].tolist()]
                                           for row, n in zip(self.text_encoder.tokenize(prompts), lengths[-batch:])])
        was_training = self.unet.training
        self.unet.eval()
        try:
            for t in tqdm(self.scheduler.timesteps, desc="sampling", disable=not progress):
                model_in = torch.cat([x, x]) if use_guidance else x
                model_in = self.scheduler.scale_model_input(model_in, t)
                out = self.unet(model_in, t.expand(model_in.shape[0]).to(device), states, lengths)
                prediction = out.sample
                if use_guidance:
                    null, text = prediction.chunk(2)
                    prediction = null + guidance_scale * (text - null)
                if paths is not None:
                    cond = slice(batch, None) if use_guidance else slice(None)
                    paths.record(t, [r[cond] if r is not None else None for r in out.space_routes],
                                 [r[cond] if r is not None else None for r in out.time_routes],
                                 [m[cond] for m in out.attn_maps], shape)
                x = self.scheduler.step(prediction, t, x).prev_sample
        finally:
            self.unet.train(was_training)
        if config.latent:
            x = self.vae.decode(x.to(self.vae.dtype) / self.vae_scaling_factor + vae_shift(self.vae)).sample
        return PipelineOutput(images=to_pil(x), paths=paths)


def to_pil(images: Tensor) -> List[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


__all__ = ["RaphaelPipeline", "PipelineOutput", "DiffusionPaths", "default_scheduler", "to_pil", "vae_stride",
           "vae_shift"]
