"""Text-to-image sampling with RAPHAEL as a diffusers `DiffusionPipeline`: components unet (RaphaelUNet),
text_encoder (OpenCLIPTextEncoder), tokenizer (CLIPTokenizer), scheduler (DDIM by default; any diffusers scheduler
swaps in with `from_config`), an optional vae (AutoencoderKL, for latent models) and an optional controlnet
(RaphaelControlNet). Classifier-free guidance runs the unconditional and conditional halves in one batch.

    pipe = RaphaelPipeline.from_preset("tiny")                          # random weights; or .from_pretrained(folder)
    image = pipe("a red circle to the left of a blue square", generator=torch.Generator().manual_seed(0)).images[0]
    pipe.save_pretrained("folder")                                      # model_index.json + one folder per component

diffusers' conventions hold: `generator` also drives stochastic schedulers (DDPM, Euler ancestral, DDIM with eta > 0),
`encode_prompt` returns states and attention masks that `__call__` takes as `prompt_embeds`, `callback_on_step_end`
may replace the latents, guidance runs for `guidance_scale > 1`, and LoRAs load through diffusers' `LoraBaseMixin`:

    pipe.load_lora_weights("style", adapter_name="style"); pipe.load_lora_weights("shapes", adapter_name="shapes")
    pipe.set_adapters(["style", "shapes"], [0.7, 1.0]); pipe.fuse_lora(); pipe.unfuse_lora(); pipe.unload_lora_weights()

With `record_paths=True` the output also holds RAPHAEL's diffusion paths (paper Fig. 4, 9, 11): the space expert each
text token chose in every transformer block, the time expert of every block at every step, and the cross-attention
map of every token; `raphael_ext.pipelines.paths` draws them.
"""

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
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


def lengths_to_mask(lengths: Tensor, tokens: int) -> Tensor:
    """diffusers' attention mask [B, tokens] (1 for a prompt's tokens) of text lengths [B]."""
    return (torch.arange(tokens, device=lengths.device)[None] < lengths[:, None]).long()


class RaphaelPipeline(DiffusionPipeline, RaphaelLoraLoaderMixin):
    """Sampling with RAPHAEL; LoRA adapters load with load_lora_weights (pipelines/lora.py). Any component but the
    tokenizer and scheduler may be left out (None): a pipeline without unet encodes prompts only."""

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"
    _optional_components = ["unet", "text_encoder", "vae", "controlnet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask",
                               "negative_prompt_attention_mask"]

    def __init__(self, unet: Optional[RaphaelUNet], text_encoder: Optional[OpenCLIPTextEncoder], tokenizer, scheduler,
                 vae=None, controlnet: Optional[RaphaelControlNet] = None):
        super().__init__()
        if unet is not None:
            expected = getattr(scheduler.config, "prediction_type", unet.config.prediction_type)
            if expected != unet.config.prediction_type:
                raise ValueError(f"RaphaelPipeline: the scheduler expects {expected!r} outputs, the U-Net predicts "
                                 f"{unet.config.prediction_type!r}")
        if unet is not None and text_encoder is not None and text_encoder.width != unet.config.cross_attention_dim:
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

    def _encode_text(self, prompts: List[str], device, lora_scale: Optional[float]) -> Tuple[Tensor, Tensor]:
        """(states [B, L, width], attention mask [B, L]) of the text encoder, its LoRA adapters scaled by lora_scale
        for this call (diffusers' `cross_attention_kwargs={"scale": ...}`)."""
        if lora_scale is not None:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            states, lengths = self.text_encoder.encode(self.tokenizer, prompts, device=device)
        finally:
            if lora_scale is not None:
                unscale_lora_layers(self.text_encoder, lora_scale)
        return states, lengths_to_mask(lengths, states.shape[1])

    def encode_prompt(
        self,
        prompt: Union[str, List[str], None],
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: Union[str, List[str], None] = None,
        prompt_embeds: Optional[Tensor] = None,
        negative_prompt_embeds: Optional[Tensor] = None,
        prompt_attention_mask: Optional[Tensor] = None,
        negative_prompt_attention_mask: Optional[Tensor] = None,
        lora_scale: Optional[float] = None,
    ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        r"""
        Encodes the prompt into text states, as diffusers' pipelines with masked text (PixArt-alpha, Sana) do: RAPHAEL
        needs each prompt's attention mask beside its states, for the cross-attention mask and the space experts.

        Args:
            prompt (`str` or `List[str]`, *optional*): The prompt(s); not needed when `prompt_embeds` is given.
            device (`torch.device`, *optional*): Where the states go; the pipeline's execution device by default.
            num_images_per_prompt (`int`, defaults to 1): Each prompt's states are repeated this many times.
            do_classifier_free_guidance (`bool`, defaults to `True`): Whether to encode the negative prompt too.
            negative_prompt (`str` or `List[str]`, *optional*): What guidance steers away from; "" by default.
            prompt_embeds (`torch.Tensor`, *optional*): Precomputed text states `[B, L, width]`.
            negative_prompt_embeds (`torch.Tensor`, *optional*): Precomputed negative text states.
            prompt_attention_mask (`torch.Tensor`, *optional*): `[B, L]` mask of `prompt_embeds` (all ones if left
                out).
            negative_prompt_attention_mask (`torch.Tensor`, *optional*): `[B, L]` mask of `negative_prompt_embeds`.
            lora_scale (`float`, *optional*): Scale of the text encoder's LoRA adapters for this call.

        Returns:
            `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`, the
            negative ones None without guidance.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("RaphaelPipeline: give prompt or prompt_embeds")
            prompt_embeds, prompt_attention_mask = self._encode_text(
                [prompt] if isinstance(prompt, str) else list(prompt), device, lora_scale)
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != batch:
                raise ValueError(f"RaphaelPipeline: negative_prompt has {len(negatives)} entries for a batch of "
                                 f"{batch} prompts; give one string or one per prompt")
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(negatives, device, lora_scale)
        elif negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(negative_prompt_embeds.shape[:2], dtype=torch.long,
                                                        device=negative_prompt_embeds.device)
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != batch:
            raise ValueError(f"RaphaelPipeline: negative_prompt_embeds has batch {negative_prompt_embeds.shape[0]}, "
                             f"prompt_embeds {batch}")

        def repeat(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_attention_mask = None
        return (repeat(prompt_embeds), repeat(prompt_attention_mask), repeat(negative_prompt_embeds),
                repeat(negative_prompt_attention_mask))

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        """scheduler.step's generator and eta, for the schedulers that take them (as diffusers' pipelines do): a
        stochastic scheduler then draws its noise from the generator, not the global RNG."""
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in parameters:
            extra["eta"] = eta
        if "generator" in parameters:
            extra["generator"] = generator
        return extra

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance runs only for guidance_scale > 1 (diffusers' convention: 1 or less is the conditional model)."""
        return self._guidance_scale > 1

    @property
    def cross_attention_kwargs(self) -> Optional[dict]:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

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
        prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.5,
        negative_prompt: Union[str, List[str], None] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[Tensor] = None,
        prompt_embeds: Optional[Tensor] = None,
        negative_prompt_embeds: Optional[Tensor] = None,
        prompt_attention_mask: Optional[Tensor] = None,
        negative_prompt_attention_mask: Optional[Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable[..., dict]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        control_image=None,
        controlnet_conditioning_scale: float = 1.0,
        record_paths: bool = False,
    ) -> Union[RaphaelPipelineOutput, tuple]:
        r"""
        Images for a prompt (diffusers' StableDiffusionPipeline.__call__ conventions).

        Args:
            prompt (`str` or `List[str]`, *optional*): The prompt(s); or give `prompt_embeds`.
            height (`int`, *optional*): Image height in pixels; the U-Net's sample size by default.
            width (`int`, *optional*): Image width in pixels; the U-Net's sample size by default.
            num_inference_steps (`int`, defaults to 50): Denoising steps.
            guidance_scale (`float`, defaults to 4.5): Classifier-free guidance scale; guidance runs only above 1.
            negative_prompt (`str` or `List[str]`, *optional*): What guidance steers away from: one string, or one
                per prompt.
            num_images_per_prompt (`int`, defaults to 1): Images made for each prompt.
            eta (`float`, defaults to 0.0): DDIM's eta (the noise of each step), for schedulers that take it.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): Draws the initial noise and every
                stochastic scheduler step, so the same generator gives the same images whatever the global seed.
            latents (`torch.Tensor`, *optional*): Initial noise `[B, C, h, w]` (unscaled; multiplied by the
                scheduler's `init_noise_sigma`).
            prompt_embeds (`torch.Tensor`, *optional*): Text states from `encode_prompt`, in place of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*): Negative text states from `encode_prompt`.
            prompt_attention_mask (`torch.Tensor`, *optional*): The mask `encode_prompt` returned with
                `prompt_embeds` (all tokens if left out).
            negative_prompt_attention_mask (`torch.Tensor`, *optional*): The mask of `negative_prompt_embeds`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): Whether to return a `RaphaelPipelineOutput` or a tuple.
            cross_attention_kwargs (`dict`, *optional*): Passed to the U-Net; its `"scale"` scales the LoRA adapters
                of the U-Net and the text encoder for this call.
            callback_on_step_end (`Callable`, *optional*): Called after every step as
                `callback_on_step_end(pipe, step, timestep, callback_kwargs)`; the tensors it returns in its dict
                replace the pipeline's (e.g. `latents`).
            callback_on_step_end_tensor_inputs (`List[str]`, defaults to `["latents"]`): Which tensors
                (`_callback_tensor_inputs`) the callback gets.
            control_image (`PIL.Image.Image` or `torch.Tensor`, *optional*): An image whose Canny edges (or an edge
                map) steer the ControlNet (requires the controlnet component).
            controlnet_conditioning_scale (`float`, defaults to 1.0): Scales the ControlNet's residuals (0: no effect).
            record_paths (`bool`, defaults to `False`): Also return RAPHAEL's diffusion paths (needs `prompt`).

        Returns:
            `RaphaelPipelineOutput` (images, paths), or the tuple `(images, paths)` with `return_dict=False`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, output_type,
                          callback_on_step_end_tensor_inputs, control_image, record_paths)
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        config = self.unet.config
        stride = self.vae_stride
        height = height or config.sample_size * stride
        width = width or config.sample_size * stride
        multiple = stride * self.unet.sample_stride
        if height % multiple or width % multiple:
            raise ValueError(f"RaphaelPipeline: height and width must be multiples of {multiple}, got {height}x{width}")
        device, dtype = self._execution_device, self.unet.dtype

        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = \
            self.encode_prompt(prompt, device, num_images_per_prompt, self.do_classifier_free_guidance,
                               negative_prompt, prompt_embeds, negative_prompt_embeds, prompt_attention_mask,
                               negative_prompt_attention_mask, lora_scale=lora_scale)
        batch = prompt_embeds.shape[0]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"RaphaelPipeline: {len(generator)} generators for a batch of {batch} images "
                             f"(prompts x num_images_per_prompt)")
        control = None
        if control_image is not None:
            control = self.prepare_control_image(control_image, batch // num_images_per_prompt, height, width,
                                                 device, dtype).repeat_interleave(num_images_per_prompt, dim=0)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        shape = (batch, config.in_channels, height // stride, width // stride)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype) if latents is None else latents
        latents = noise.to(device, dtype) * self.scheduler.init_noise_sigma  # after set_timesteps, which sets it
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        paths = None
        if record_paths:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            ids = tokenize(self.tokenizer, prompts).repeat_interleave(num_images_per_prompt, dim=0)
            paths = DiffusionPaths(tokens=[[self.tokenizer.decode([i]).strip() for i in row[: int(n)].tolist()]
                                           for row, n in zip(ids, prompt_attention_mask.sum(-1))])
        tensors = dict(latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                       prompt_attention_mask=prompt_attention_mask,
                       negative_prompt_attention_mask=negative_prompt_attention_mask)
        # Sampling routes without the gates' training noise, whatever mode the models were left in.
        modes = [(m, m.training) for m in (self.unet, self.controlnet) if m is not None]
        for model, _ in modes:
            model.eval()
        try:
            latents = self._denoise(tensors, control, controlnet_conditioning_scale, extra_step_kwargs,
                                    callback_on_step_end, callback_on_step_end_tensor_inputs, paths, shape)
        finally:
            for model, training in modes:
                model.train(training)
        if output_type == "latent":
            images = latents
        else:
            x = latents
            if self.vae is not None:
                x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor + vae_shift(self.vae)).sample
            images = self.image_processor.postprocess(x.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, paths)
        return RaphaelPipelineOutput(images=images, paths=paths)

    def check_inputs(self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, output_type,
                     callback_on_step_end_tensor_inputs, control_image, record_paths) -> None:
        """Clear errors for arguments that cannot work together, before any model runs."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"RaphaelPipeline: output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("RaphaelPipeline: give exactly one of prompt and prompt_embeds")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("RaphaelPipeline: give at most one of negative_prompt and negative_prompt_embeds")
        if prompt is not None and isinstance(negative_prompt, (list, tuple)):
            batch = 1 if isinstance(prompt, str) else len(prompt)
            if len(negative_prompt) != batch:
                raise ValueError(f"RaphaelPipeline: negative_prompt has {len(negative_prompt)} entries for "
                                 f"{batch} prompts; give one string or one per prompt")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"RaphaelPipeline: callback_on_step_end_tensor_inputs must be in "
                             f"{self._callback_tensor_inputs}, got {unknown}")
        if self.unet is None:
            raise ValueError("RaphaelPipeline: sampling needs the unet component (this pipeline encodes prompts only)")
        if self.unet.config.latent and self.vae is None and output_type != "latent":
            raise ValueError("RaphaelPipeline: a latent-space U-Net needs a vae to decode (or output_type='latent')")
        if control_image is not None and self.controlnet is None:
            raise ValueError("RaphaelPipeline: control_image needs a controlnet component")
        if record_paths and prompt is None:
            raise ValueError("RaphaelPipeline: record_paths needs prompt (the tokens label the paths)")

    def _denoise(self, tensors: dict, control, controlnet_scale, extra_step_kwargs, callback_on_step_end,
                 callback_tensor_inputs, paths, shape) -> Tensor:
        """The sampling loop: x_T -> x_0 with classifier-free guidance (unconditional half first). tensors holds
        latents and the text states, which callback_on_step_end may replace."""
        device = tensors["latents"].device
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            x = tensors["latents"]
            guided = self.do_classifier_free_guidance
            states, mask = tensors["prompt_embeds"], tensors["prompt_attention_mask"]
            if guided:
                states = torch.cat([tensors["negative_prompt_embeds"], states])
                mask = torch.cat([tensors["negative_prompt_attention_mask"], mask])
            states, lengths = states.to(self.unet.dtype), mask.sum(-1)
            model_in = torch.cat([x, x]) if guided else x
            model_in = self.scheduler.scale_model_input(model_in, t)
            timestep = t.expand(model_in.shape[0]).to(device)
            residuals = {}
            if control is not None:
                down, mid = self.controlnet(model_in, timestep, states, lengths,
                                            controlnet_cond=torch.cat([control, control]) if guided else control,
                                            conditioning_scale=controlnet_scale)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            out = self.unet(model_in, timestep, states, lengths, cross_attention_kwargs=self.cross_attention_kwargs,
                            **residuals)
            prediction = out.sample
            if guided:
                null, text = prediction.chunk(2)
                prediction = null + self.guidance_scale * (text - null)
            if paths is not None:
                cond = slice(x.shape[0], None) if guided else slice(None)
                paths.record(t, [r[cond] if r is not None else None for r in out.space_routes],
                             [r[cond] if r is not None else None for r in out.time_routes],
                             [m[cond] for m in out.attn_maps], shape)
            tensors["latents"] = self.scheduler.step(prediction, t, x, **extra_step_kwargs).prev_sample
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_tensor_inputs})
                tensors.update({k: v for k, v in (outputs or {}).items() if k in tensors})
        return tensors["latents"]


__all__ = ["RaphaelPipeline", "RaphaelPipelineOutput", "default_scheduler", "load_vae", "vae_shift", "vae_stride"]
