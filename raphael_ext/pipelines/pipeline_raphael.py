"""Text-to-image sampling with RAPHAEL as a diffusers `DiffusionPipeline`: components unet (RaphaelUNet),
text_encoder (OpenCLIPTextEncoder), tokenizer (CLIPTokenizer), scheduler (DDIM by default; any diffusers scheduler
swaps in with `from_config`), an optional vae (AutoencoderKL, for latent models) and an optional controlnet
(RaphaelControlNet). Classifier-free guidance runs the unconditional and conditional halves in one batch.

    pipe = RaphaelPipeline.from_preset("tiny")                          # random weights; or .from_pretrained(folder)
    image = pipe("a red circle to the left of a blue square", generator=torch.Generator().manual_seed(0)).images[0]
    pipe.save_pretrained("folder")                                      # model_index.json + one folder per component

With `record_paths=True` the output also holds RAPHAEL's diffusion paths (paper Fig. 4, 9, 11): the space expert each
text token chose in every transformer block, the time expert of every block at every step, and the cross-attention
map of every token; `raphael_ext.pipelines.paths` draws them.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..models.controlnet import RaphaelControlNet
from ..models.edges import canny_edges
from ..models.text_encoder import PRESET_TEXT_ENCODERS, OpenCLIPTextEncoder, openclip_tokenizer, tokenize
from ..models.unet import RaphaelUNet
from .lora import RaphaelLoraLoaderMixin
from .paths import DiffusionPaths


def default_scheduler(unet: RaphaelUNet) -> DDIMScheduler:
    """DDIM over the model's training schedule: DDPM's linear betas in pixel space, Stable Diffusion's
    scaled-linear betas in latent space."""
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


def load_vae(folder, device="cpu", dtype=torch.float32):
    """A diffusers AutoencoderKL from a local folder (config.json + safetensors weights); nothing is downloaded and no
    pickle is read."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, torch_dtype=dtype,
                                        low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


@dataclass
class RaphaelPipelineOutput(BaseOutput):
    """images: PIL images, a float numpy array [B, H, W, 3] in [0, 1] or a tensor [B, 3, H, W] in [0, 1]
    (output_type "pil", "np", "pt"), or the final latents (output_type "latent"); paths: the diffusion paths when
    record_paths=True."""

    images: Union[List[PIL.Image.Image], np.ndarray, Tensor]
    paths: Optional[DiffusionPaths] = None


class RaphaelPipeline(DiffusionPipeline, RaphaelLoraLoaderMixin):
    """Sampling with RAPHAEL; LoRA adapters load with load_lora_weights (pipelines/lora.py)."""

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"
    _optional_components = ["vae", "controlnet"]

    def __init__(self, unet: RaphaelUNet, text_encoder: OpenCLIPTextEncoder, tokenizer, scheduler, vae=None,
                 controlnet: Optional[RaphaelControlNet] = None):
        super().__init__()
        expected = getattr(scheduler.config, "prediction_type", unet.config.prediction_type)
        if expected != unet.config.prediction_type:
            raise ValueError(f"RaphaelPipeline: the scheduler expects {expected!r} outputs, the U-Net predicts "
                             f"{unet.config.prediction_type!r}")
        if text_encoder.width != unet.config.cross_attention_dim:
            raise ValueError(f"RaphaelPipeline: the text encoder's width {text_encoder.width} differs from the U-Net's "
                             f"cross_attention_dim {unet.config.cross_attention_dim}")
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae,
                              controlnet=controlnet)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_stride, do_normalize=True)

    @classmethod
    def from_preset(cls, name: str, vae=None, **unet_overrides) -> "RaphaelPipeline":
        """A pipeline with freshly initialised weights: RaphaelUNet.from_preset(name, **unet_overrides), the preset's
        OpenCLIP tower (random; see OpenCLIPTextEncoder.from_open_clip for real weights), open_clip's tokenizer and
        DDIM. Latent presets ("small", "paper") need a vae to decode (or output_type="latent")."""
        unet = RaphaelUNet.from_preset(name, **unet_overrides)
        text_encoder = OpenCLIPTextEncoder(PRESET_TEXT_ENCODERS[name]).eval()
        tokenizer = openclip_tokenizer(text_encoder.context_length)
        return cls(unet, text_encoder, tokenizer, default_scheduler(unet), vae=vae)

    @property
    def vae_stride(self) -> int:
        return vae_stride(self.vae)

    def encode_prompt(self, prompts: Sequence[str], device) -> tuple:
        """(states [B, L, width], lengths [B]) of the text encoder for prompts."""
        return self.text_encoder.encode(self.tokenizer, list(prompts), device=device)

    def prepare_control_image(self, control_image, batch: int, height: int, width: int, device,
                              dtype) -> Tensor:
        """An edge map [batch, 1, height, width] in {0, 1}: a PIL image or [B, 3, H, W] tensor in [0, 1] gets Canny
        edges; a single-channel one ("L" image or [B, 1, H, W]) is taken as the edge map."""
        if isinstance(control_image, PIL.Image.Image):
            control_image = [control_image]
        if isinstance(control_image, list):
            arrays = [np.asarray(im.convert("RGB") if im.mode != "L" else im, dtype=np.float32) / 255.0
                      for im in control_image]
            control_image = torch.stack([torch.from_numpy(a) for a in arrays])
            control_image = (control_image.unsqueeze(1) if control_image.dim() == 3
                             else control_image.permute(0, 3, 1, 2))
        if not torch.is_tensor(control_image) or control_image.dim() != 4 or control_image.shape[1] not in (1, 3):
            raise ValueError("RaphaelPipeline: control_image must be a PIL image, a list of them, or a tensor "
                             "[B, 3, H, W] (an image) / [B, 1, H, W] (an edge map) in [0, 1]")
        image = control_image.float().to(device)
        edges = canny_edges(image) if image.shape[1] == 3 else image
        if edges.shape[-2:] != (height, width):
            edges = torch.nn.functional.interpolate(edges, size=(height, width), mode="bilinear", align_corners=False)
        if edges.shape[0] == 1 and batch > 1:
            edges = edges.expand(batch, -1, -1, -1)
        if edges.shape[0] != batch:
            raise ValueError(f"RaphaelPipeline: {edges.shape[0]} control images for {batch} prompts")
        return edges.to(dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.5,
        negative_prompt: Union[str, Sequence[str]] = "",
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[Tensor] = None,
        output_type: str = "pil",
        control_image=None,
        controlnet_conditioning_scale: float = 1.0,
        record_paths: bool = False,
        return_dict: bool = True,
    ) -> Union[RaphaelPipelineOutput, tuple]:
        """Images for `prompt`. generator: a torch.Generator (or one per prompt) for the initial noise, so the same
        seed gives the same images; control_image: an image whose Canny edges (or an edge map) steer the ControlNet
        (requires the controlnet component), scaled by controlnet_conditioning_scale (0: no effect)."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"RaphaelPipeline: output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
        config = self.unet.config
        stride = self.vae_stride
        height = height or config.sample_size * stride
        width = width or config.sample_size * stride
        multiple = stride * self.unet.sample_stride
        if height % multiple or width % multiple:
            raise ValueError(f"RaphaelPipeline: height and width must be multiples of {multiple}, got {height}x{width}")
        if config.latent and self.vae is None and output_type != "latent":
            raise ValueError("RaphaelPipeline: a latent-space U-Net needs a vae to decode (or output_type='latent')")
        if control_image is not None and self.controlnet is None:
            raise ValueError("RaphaelPipeline: control_image needs a controlnet component")
        device, dtype = self._execution_device, self.unet.dtype

        states, lengths = self.encode_prompt(prompts, device)
        use_guidance = guidance_scale != 1.0
        if use_guidance:
            null_states, null_lengths = self.encode_prompt(negatives, device)
            states, lengths = torch.cat([null_states, states]), torch.cat([null_lengths, lengths])
        states = states.to(dtype)
        control = None
        if control_image is not None:
            control = self.prepare_control_image(control_image, batch, height, width, device, dtype)
            control = torch.cat([control, control]) if use_guidance else control

        shape = (batch, config.in_channels, height // stride, width // stride)
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype) if latents is None else latents
        x = x.to(device, dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        paths = None
        if record_paths:
            ids = tokenize(self.tokenizer, prompts)
            paths = DiffusionPaths(tokens=[[self.tokenizer.decode([i]).strip() for i in row[: int(n)].tolist()]
                                           for row, n in zip(ids, lengths[-batch:])])
        # Sampling routes without the gates' training noise, whatever mode the models were left in.
        modes = [(m, m.training) for m in (self.unet, self.controlnet) if m is not None]
        for model, _ in modes:
            model.eval()
        try:
            x = self._denoise(x, states, lengths, control, guidance_scale, controlnet_conditioning_scale, paths,
                              batch, shape, device)
        finally:
            for model, training in modes:
                model.train(training)
        if output_type == "latent":
            images = x
        else:
            if self.vae is not None:
                x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor + vae_shift(self.vae)).sample
            images = self.image_processor.postprocess(x.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, paths)
        return RaphaelPipelineOutput(images=images, paths=paths)

    def _denoise(self, x, states, lengths, control, guidance_scale, controlnet_scale, paths, batch, shape, device):
        """The sampling loop: x_T -> x_0 with classifier-free guidance (unconditional half first)."""
        use_guidance = guidance_scale != 1.0
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([x, x]) if use_guidance else x
            model_in = self.scheduler.scale_model_input(model_in, t)
            timestep = t.expand(model_in.shape[0]).to(device)
            residuals = {}
            if control is not None:
                down, mid = self.controlnet(model_in, timestep, states, lengths, controlnet_cond=control,
                                            conditioning_scale=controlnet_scale)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            out = self.unet(model_in, timestep, states, lengths, **residuals)
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
        return x


__all__ = ["RaphaelPipeline", "RaphaelPipelineOutput", "default_scheduler", "load_vae", "vae_shift", "vae_stride"]
