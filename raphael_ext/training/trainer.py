"""Training RAPHAEL: L = L_denoise + L_edge (only for t <= T_c) + an optional balance loss; AdamW with the
paper's defaults and linear warm-up, EMA weights, caption dropout for classifier-free guidance, multi-scale buckets,
DDP through torchrun or FSDP2 (training/distributed.py), checkpoints that resume exactly (training/checkpoints.py).
Small and readable, in the spirit of DiT's train.py. What is trained:

- the U-Net (default), optionally with the text encoder (`train_text_encoder`, its own learning rate `text_lr`);
- a LoRA adapter (`lora_rank`, paper §7.8) on the attention projections of a pipeline (`init_from`), optionally also
  on the expert FFNs (`lora_experts`) and the text tower; only the adapter trains and is saved;
- a canny ControlNet (`controlnet="canny"`, paper §7.8) on a frozen pipeline (`init_from`).

Every random draw of a step (which items, their bucket, caption dropout, timesteps, noise, the gates' noise) comes
from generators seeded by (seed, step, rank), so a run resumed from a checkpoint continues exactly. A run ends by
writing `out/pipeline/` (EMA weights; a from_pretrained folder), plus `out/lora/` or `out/controlnet/`.

Faults: SIGTERM or SIGUSR1 (a scheduler's notice before it kills the job) ends the step in progress on every rank,
writes its checkpoint and raises Preempted; a non-finite loss or gradient skips the update, and `max_nonfinite_steps`
of them in a row raise DivergenceError; a fresh run refuses an `out` that holds another run's checkpoints.
"""

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..atomic_io import replace_folder_atomically
from ..models.controlnet import RaphaelControlNet
from ..models.edges import canny_edges, sobel_edges
from ..models.text_encoder import PRESET_TEXT_ENCODERS, OpenCLIPTextEncoder, openclip_tokenizer, tokenize
from ..models.unet import PRESETS, RaphaelUNet
from ..nn import EdgeFocalLoss
from ..pipelines.pipeline_raphael import RaphaelPipeline, default_scheduler, load_vae, vae_shift, vae_stride
from .checkpoints import Checkpoints, CheckpointError, checkpoint_folders
from ..pipelines.grid import image_grid
from .data import HELD_OUT_SEED, FolderDataset, ShapesDataset
from .shards import ShardStream, is_shard_pattern
from .distributed import any_rank, rank_and_world, shard

# The paper's 9 training buckets (height, width) in pixels.
PAPER_BUCKETS = ((448, 832), (512, 768), (512, 704), (640, 640), (576, 640), (640, 576), (704, 512), (768, 512),
                 (832, 448))
# What a LoRA adapts (diffusers' attention names; the experts through PEFT's target_parameters, see nn.ExpertFFNs).
LORA_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_EXPERTS = ["experts.w1", "experts.w2"]
LORA_TEXT_TOWER = ["c_fc", "c_proj"]  # the MLP of each residual block of open_clip's text transformer
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LR_SCHEDULES = ("constant", "cosine", "linear")  # TrainConfig.lr_schedule: after the warm-up
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")  # TrainConfig.timestep_sampling
PRECISIONS = ("auto", "bf16", "fp32")  # TrainConfig.precision
# TrainConfig.compile: torch.compile backends, as accelerate's --dynamo_backend ("none": eager).
COMPILE_BACKENDS = ("none", "inductor", "aot_eager")
PAPER_WARMUP_STEPS = 20000
# What SLURM (scancel, --signal, often USR1), Kubernetes and most schedulers send a while before they kill a job.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The CLI's exit status after a preemption: sysexits.h's EX_TEMPFAIL ("try again later"). Not 0, which would tell a
# scheduler or a retry loop that the run is done, nor 1, which would say it failed: it stopped cleanly and continues
# with --resume.
PREEMPTED_EXIT_STATUS = 75


class Preempted(Exception):
    """train() stopped on SIGTERM/SIGUSR1 after writing the checkpoint of the step it reached."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"preempted by {signal_name} at step {step}: wrote {checkpoint}; continue with --resume "
                         "(Trainer.resume)")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class ConfigError(ValueError):
    """A TrainConfig that cannot run (a user's mistake; the CLI prints it as a usage error, exit status 2)."""


class DivergenceError(RuntimeError):
    """Training diverged: non-finite losses or gradients for max_nonfinite_steps steps in a row, or weights that are
    not finite (never written)."""


@dataclasses.dataclass(frozen=True)
class BucketSchedule:
    """The image size of every step: one of `buckets` drawn first from the step's generator, halved (kept a multiple
    of `multiple`) for the first `low_res_steps`. Plain data, so that data-loader workers can resize a step's images
    ahead of it."""

    seed: int
    buckets: Tuple[Tuple[int, int], ...]
    low_res_steps: int
    multiple: int

    def __call__(self, step: int, generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
        """(height, width) of `step`; `generator`: the step's own, when the caller draws more from it."""
        if generator is None:
            generator = torch.Generator().manual_seed(_seed(self.seed, step))
        height, width = self.buckets[int(torch.randint(len(self.buckets), (1,), generator=generator))]
        if step < self.low_res_steps:
            height, width = (max(self.multiple, size // 2 // self.multiple * self.multiple) for size in (height, width))
        return height, width


def buckets(sample_size: int, multiple: int) -> List[Tuple[int, int]]:
    """The paper's buckets scaled so that 640x640 becomes sample_size x sample_size, rounded to `multiple`."""
    scale = sample_size / 640
    out = []
    for h, w in PAPER_BUCKETS:
        size = (max(multiple, round(h * scale / multiple) * multiple),
                max(multiple, round(w * scale / multiple) * multiple))
        if size not in out:
            out.append(size)
    return out


def training_target(scheduler, prediction_type: str, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to output, with diffusers' conventions (so its scheduler samples it)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"training_target: unknown prediction_type {prediction_type!r}")


def _option(default, help: str, choices: Optional[Sequence[str]] = None):
    """A TrainConfig field with the help text (and choices) its command-line flag shows."""
    metadata = {"help": help, **({"choices": tuple(choices)} if choices else {})}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """What a training run does. `python -m raphael_ext train` has one flag per field (--batch-size for
    batch_size); the arguments, with their defaults, are listed below (generated from the fields' help)."""

    preset: str = _option("tiny", "model size", choices=PRESETS)
    data: str = _option("shapes", '"shapes" (procedural scenes), a folder of images with same-name .txt captions, or '
                                  'WebDataset tar shards ("data/shard-{000000..000099}.tar": jpg/png/webp + txt)')
    data_workers: int = _option(0, "WebDataset shards: data-loader processes decoding them (0: the trainer's own)")
    out: str = _option("runs/train", "run folder: checkpoints/, log.jsonl, samples/, pipeline/")
    steps: int = _option(1000, "training steps")
    batch_size: int = _option(16, "global batch, split over the ranks")
    fsdp: bool = _option(False, "under torchrun: shard parameters, gradients, optimizer state and EMA (FSDP2), "
                                "not DDP")
    lr: float = _option(1e-4, "AdamW learning rate (the paper's)")
    betas: Tuple[float, float] = _option((0.9, 0.999), "AdamW betas (the paper's)")
    weight_decay: float = _option(0.0, "AdamW weight decay")
    warmup_steps: Optional[int] = _option(None, "linear learning-rate warm-up in steps (default: 5 % of --steps, at "
                                                "most the paper's 20000)")
    lr_schedule: str = _option("constant", "after the warm-up: constant (the paper's) or a cosine or linear decay "
                                           "to 0 at --steps", choices=LR_SCHEDULES)
    grad_clip: float = _option(1.0, "clip the gradients' global norm to this (0: no clipping)")
    compile: str = _option("none", "torch.compile the U-Net (or the ControlNet) of the training step with this "
                                   "backend: inductor (generated kernels; pays off in long runs with few image sizes, "
                                   "docs/performance.md), aot_eager (traced, not generated: checks that a model "
                                   "compiles)", choices=COMPILE_BACKENDS)
    precision: str = _option("auto", "auto: bf16 autocast on GPUs, float32 on CPUs; bf16: autocast everywhere; fp32",
                             choices=PRECISIONS)
    ema_decay: float = _option(0.999, "decay of the EMA weights that the saved pipeline holds")
    ema_warmup: bool = _option(True, "EMA warm-up as diffusers' EMAModel: decay min(ema_decay, (1 + n) / (10 + n)) "
                                     "at the n-th update, so the random initial weights fade out in a short run")
    caption_dropout: float = _option(0.1, "share of captions replaced by the empty prompt (for classifier-free "
                                          "guidance)")
    edge_weight: float = _option(1.0, "weight of the edge loss (paper: 1)")
    timestep_sampling: str = _option("uniform", "training timesteps: uniform (the paper's, DDPM's) or logit_normal "
                                                "(SD3's: trains the middle of the noise range more often)",
                                     choices=TIMESTEP_SAMPLINGS)
    logit_mean: float = _option(0.0, "logit_normal: mean of the normal whose sigmoid is t / 1000")
    logit_std: float = _option(1.0, "logit_normal: standard deviation of that normal")
    balance_weight: float = _option(0.01, "weight of the experts' load-balancing loss")
    multiscale: bool = _option(True, "train on the paper's aspect-ratio buckets (else square images only)")
    low_res_steps: int = _option(0, "the first N steps at half the training resolution (a fast start)")
    seed: int = _option(0, "seed of every random draw (weights, data, noise)")
    log_every: int = _option(10, "a log.jsonl record every N steps")
    sample_every: int = _option(0, "EMA sample grid every N steps (0: never)")
    checkpoint_every: int = _option(0, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _option(3, "checkpoints kept (the newest by step, >= 1)")
    dataset_size: int = _option(100_000, "shapes data: scenes per epoch")
    text_checkpoint: Optional[str] = _option(None, "a local OpenCLIP .safetensors with the preset's text tower "
                                                   "(default: random weights)")
    vae: Optional[str] = _option(None, "latent presets: a local diffusers AutoencoderKL folder (safetensors)")
    model: Dict[str, object] = _option({}, 'RaphaelUNet overrides of the preset, as JSON, e.g. '
                                           '\'{"space_experts": 0}\'')
    init_from: Optional[str] = _option(None, "a pipeline folder to start from (needed by --lora-rank and "
                                             "--controlnet)")
    train_text_encoder: bool = _option(False, "fine-tune the text tower too (with --lora-rank: a LoRA on it)")
    text_lr: Optional[float] = _option(None, "the text tower's learning rate (default: --lr)")
    lora_rank: int = _option(0, "> 0: train a LoRA adapter of this rank on --init-from's U-Net; saved alone in "
                                "OUT/lora/")
    lora_alpha: Optional[float] = _option(None, "LoRA alpha (the update is scaled by alpha / rank; default: rank)")
    lora_experts: bool = _option(False, "the LoRA also adapts every expert FFN")
    controlnet: Optional[str] = _option(None, "train a ControlNet on Canny edges of the training images, "
                                              "--init-from's pipeline frozen", choices=("canny",))
    validation_prompt: Tuple[str, ...] = _option((), "a prompt of the sample grids (repeat for several; default: "
                                                     "held-out shapes prompts on shapes data, none otherwise)")
    grad_accum: int = _option(1, "micro-batches per step: each rank's share of the batch goes through in N parts, "
                                 "one update")
    max_nonfinite_steps: int = _option(10, "a non-finite loss or gradient skips the step; this many in a row stop the "
                                           "run")
    overwrite: bool = _option(False, "a fresh run into an --out folder holding another run's checkpoints deletes "
                                     "them")

    @property
    def resolved_warmup_steps(self) -> int:
        """The warm-up in steps: warmup_steps, or 5 % of the run (at most the paper's 20 000) when it is None."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, min(PAPER_WARMUP_STEPS, round(0.05 * self.steps)))

    @property
    def mode(self) -> str:
        return "lora" if self.lora_rank > 0 else "controlnet" if self.controlnet else "full"


def _document_fields(cls):
    """Appends an Args: section, one line per field with its default and help (diffusers' docstring style)."""
    lines = ["", "    Args:"]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"        {f.name} (`{getattr(f.type, '__name__', f.type)}`, defaults to `{default!r}`):")
        lines.append(f"            {f.metadata['help']}" + (f" One of {list(f.metadata['choices'])}."
                                                           if "choices" in f.metadata else ""))
    cls.__doc__ = cls.__doc__.rstrip() + "\n" + "\n".join(lines) + "\n"
    return cls


_document_fields(TrainConfig)


def _seed(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + part + 1442695040888963407) % (1 << 63)
    return value


class Trainer:
    """Trainer(TrainConfig).train(); Trainer.resume(out folder) continues the newest checkpoint that loads."""

    def __init__(self, config: TrainConfig, device: Optional[str] = None):
        self.config = config
        self._check(config)
        self.rank, self.world = rank_and_world()
        if config.batch_size % (self.world * config.grad_accum):
            raise ConfigError(f"Trainer: batch_size {config.batch_size} must divide over {self.world} processes x "
                             f"{config.grad_accum} micro-batches (grad_accum)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.unet, self.text_encoder, self.tokenizer, self.vae = self._components()
        self.vae_stride = vae_stride(self.vae)
        self.scheduler = default_scheduler(self.unet)
        self.controlnet = None
        if config.mode == "controlnet":
            self.controlnet = RaphaelControlNet.from_unet(self.unet, conditioning_downscale=self.vae_stride)
        self.trained = self._select_trained()
        self.ema = None
        if config.mode != "lora":  # a LoRA is trained and saved as it is, like diffusers' LoRA scripts
            self.ema = nn.ModuleDict({k: copy.deepcopy(m).requires_grad_(False).eval()
                                      for k, m in self.trained.items()})
        # Without a process group there is nothing to shard over: fsdp=True then trains like one DDP rank.
        self.sharded = config.fsdp and dist.is_initialized()
        self.forward_models = self._distribute()
        if config.compile != "none":  # in place (nn.Module.compile): state-dict names and DDP/FSDP wrappers unchanged
            (self.controlnet or self.unet).compile(backend=config.compile)
        groups = [{"params": [p for k, m in self.trained.items() if k != "text_encoder" for p in m.parameters()
                              if p.requires_grad], "lr": config.lr}]
        if "text_encoder" in self.trained:
            groups.append({"params": [p for p in self.trained["text_encoder"].parameters() if p.requires_grad],
                           "lr": config.text_lr or config.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.checkpoints = Checkpoints(Path(config.out) / "checkpoints", self.trained, self.ema, self.optimizer,
                                       self.lr_schedule, self.sharded, config.keep_last)
        self.edge_loss = EdgeFocalLoss(t_cutoff=self.unet.config.t_cutoff)
        self.out = Path(config.out)
        self._tensorboard = None  # a SummaryWriter once created, False when tensorboard is not installed
        size = self.unet.config.sample_size * self.vae_stride  # in pixels
        multiple = self.unet.sample_stride * self.vae_stride
        self.sizes = BucketSchedule(config.seed, tuple(buckets(size, multiple) if config.multiscale else [(size, size)]),
                                    config.low_res_steps, multiple)
        self.dataset = self._dataset(size)
        self.step = 0
        self.last_checkpoint: Optional[Path] = None  # the newest checkpoint of this run (written or resumed)
        self.stop_signal: Optional[str] = None  # the first preemption signal received while train() runs
        self.data_failures = 0
        self.nonfinite_steps = 0
        self.history: List[Dict[str, float]] = []

    # --- construction -----------------------------------------------------------------------------------------
    @staticmethod
    def _check(config: TrainConfig) -> None:
        if config.lora_rank < 0:
            raise ConfigError(f"Trainer: lora_rank must be >= 0, got {config.lora_rank}")
        if config.lora_rank and config.controlnet:
            raise ConfigError("Trainer: train a LoRA (lora_rank) or a ControlNet (controlnet), not both at once")
        if config.controlnet not in (None, "canny"):
            raise ConfigError(f"Trainer: controlnet must be None or 'canny', got {config.controlnet!r}")
        if config.mode != "full" and config.init_from is None:
            raise ConfigError(f"Trainer: {config.mode} training adapts a trained pipeline; pass init_from=<pipeline "
                             "folder> (--init-from)")
        if config.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"Trainer: lr_schedule must be one of {LR_SCHEDULES}, got {config.lr_schedule!r}")
        if config.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(f"Trainer: timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got "
                             f"{config.timestep_sampling!r}")
        if config.logit_std <= 0:
            raise ConfigError(f"Trainer: logit_std must be positive, got {config.logit_std}")
        if config.compile not in COMPILE_BACKENDS:
            raise ConfigError(f"Trainer: compile must be one of {COMPILE_BACKENDS}, got {config.compile!r}")
        if config.precision not in PRECISIONS:
            raise ConfigError(f"Trainer: precision must be one of {PRECISIONS}, got {config.precision!r}")
        if config.controlnet and config.train_text_encoder:
            raise ConfigError("Trainer: ControlNet training keeps the text encoder frozen (train_text_encoder=False)")
        if config.sample_every and config.data != "shapes" and not config.validation_prompt:
            raise ConfigError("Trainer: sample grids of your own data need prompts: pass --validation-prompt (one or "
                              "more), or --sample-every 0")
        if config.keep_last < 1:
            raise ConfigError(f"Trainer: keep_last must be >= 1 (the checkpoint just written is always kept), got "
                              f"{config.keep_last}")
        if config.warmup_steps is not None and config.warmup_steps < 0:
            raise ConfigError(f"Trainer: warmup_steps must be >= 0, got {config.warmup_steps}")
        if config.init_from is not None and not (Path(config.init_from) / "model_index.json").is_file():
            raise ConfigError(f"Trainer: init_from {config.init_from!r} is not a pipeline folder (no "
                              "model_index.json); pass the pipeline/ folder a training run wrote")
        if config.grad_accum < 1 or config.max_nonfinite_steps < 1:
            raise ConfigError(f"Trainer: grad_accum and max_nonfinite_steps must be >= 1, got {config.grad_accum} and "
                             f"{config.max_nonfinite_steps}")

    def _components(self):
        """(unet, text_encoder, tokenizer, vae): from init_from's pipeline, or the preset's fresh U-Net and tower."""
        config = self.config
        if config.init_from is not None:
            pipe = RaphaelPipeline.from_pretrained(config.init_from)
            unet, text_encoder, tokenizer, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
            if vae is None and config.vae is not None:
                vae = load_vae(config.vae, device=self.device)
        else:
            unet = RaphaelUNet.from_preset(config.preset, **config.model)
            text_encoder = OpenCLIPTextEncoder.from_open_clip(PRESET_TEXT_ENCODERS[config.preset],
                                                              config.text_checkpoint)
            tokenizer = openclip_tokenizer(text_encoder.context_length)
            vae = self._load_vae(unet)
        if unet.config.latent and vae is None:
            raise ValueError("Trainer: this U-Net diffuses in a VAE's latent space; pass vae=<a local diffusers "
                             "AutoencoderKL folder> (--vae), e.g. Stable Diffusion's vae/ folder")
        if vae is not None and vae.config.latent_channels != unet.config.in_channels:
            raise ValueError(f"Trainer: the VAE has {vae.config.latent_channels} latent channels, the U-Net takes "
                             f"{unet.config.in_channels}")
        text_encoder.eval()
        return unet, text_encoder, tokenizer, vae

    def _load_vae(self, unet: RaphaelUNet):
        if not unet.config.latent:
            if self.config.vae is not None:
                raise ValueError(f"Trainer: preset {self.config.preset!r} diffuses pixels; it takes no vae")
            return None
        return load_vae(self.config.vae, device=self.device) if self.config.vae is not None else None

    def _select_trained(self) -> nn.ModuleDict:
        """Marks what trains (requires_grad) and returns those models by name."""
        config = self.config
        trained = {}
        if config.mode == "controlnet":
            self.unet.requires_grad_(False)
            trained["controlnet"] = self.controlnet.train()
        elif config.mode == "lora":
            from peft import LoraConfig

            alpha = config.lora_alpha or config.lora_rank
            self.unet.requires_grad_(False)
            self.unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, target_modules=LORA_ATTENTION,
                                             target_parameters=LORA_EXPERTS if config.lora_experts else None))
            trained["unet"] = self.unet
            if config.train_text_encoder:
                self.text_encoder.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha,
                                                         target_modules=LORA_TEXT_TOWER))
                trained["text_encoder"] = self.text_encoder
        else:
            trained["unet"] = self.unet.requires_grad_(True)
            if config.train_text_encoder:
                trained["text_encoder"] = self.text_encoder.requires_grad_(True)
        for model in trained.values():
            model.train()
        return nn.ModuleDict(trained)

    def _distribute(self) -> Dict[str, nn.Module]:
        """Places every model and returns what the step calls for each trained one: FSDP2 shards of the trained
        models and their EMA (built on the CPU, fully_shard moves one unit at a time to the device), a DDP wrapper,
        or the model itself in one process. Frozen models are replicated."""
        for frozen in (self.unet, self.text_encoder, self.vae):
            if frozen is not None and not any(frozen is m for m in self.trained.values()):
                frozen.to(self.device)
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (self.world,))
            for name, model in self.trained.items():
                shard(model, mesh)
                if self.ema is not None:
                    # Sharded like the model, so the EMA update stays local; resharded after every forward, as it has
                    # no backward to do that (FSDP would otherwise keep its root unit gathered after sampling).
                    shard(self.ema[name], mesh, reshard_after_forward=True)
            return dict(self.trained.items())
        self.trained.to(self.device)
        if self.ema is not None:
            self.ema.to(self.device)
        if self.world > 1:
            return {name: DistributedDataParallel(model) for name, model in self.trained.items()}
        return dict(self.trained.items())

    # --- data ------------------------------------------------------------------------------------------------
    def _dataset(self, size: int, stream_state: Optional[dict] = None):
        """ShapesDataset, a scanned FolderDataset (what it skipped is printed and logged) or a ShardStream."""
        config = self.config
        if config.data == "shapes":
            return ShapesDataset(config.dataset_size, size, seed=config.seed)
        if is_shard_pattern(config.data):
            share = len(range(self.rank, config.batch_size, self.world))
            return ShardStream(config.data, share, self.sizes, self.rank, self.world, config.data_workers, config.seed,
                               min_size=size // 2, state=stream_state)
        # Rank 0 decodes the folder once and shares what it found, rather than every rank decoding every image.
        scan = [FolderDataset(config.data, size).scan() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(scan, src=0)
        dataset = FolderDataset(config.data, size, scan=scan[0])
        if self.rank == 0:
            summary = dataset.summary()
            print(f"data: {summary['usable']} usable image-caption pairs in {config.data}, {summary['skipped']} skipped"
                  + "".join(f"\n  {name}: {reason}" for name, reason in dataset.skipped[:20]))
            self._log({"event": "data_scan", **summary})
        return dataset

    def batch(self, step: int) -> Dict[str, object]:
        """This rank's share of the global batch of `step`: one bucket for the whole batch. An item that fails to load
        (a file changed on disk, a broken sample in a shard) is replaced by the next one and counted."""
        g = torch.Generator().manual_seed(_seed(self.config.seed, step))
        height, width = self.sizes(step, g)
        indices = torch.randint(len(self.dataset), (self.config.batch_size,), generator=g).tolist() \
            if not isinstance(self.dataset, ShardStream) else [0] * self.config.batch_size
        dropped = (torch.rand(self.config.batch_size, generator=g) < self.config.caption_dropout).tolist()
        share = slice(self.rank, None, self.world)
        failures = 0
        if isinstance(self.dataset, ShardStream):  # decoded and resized to this step's size by the stream
            images, captions, failures = self.dataset.batch(step)
            items = [{"image": image, "caption": caption} for image, caption in zip(images, captions)]
        else:
            items = []
            for index in indices[share]:
                for attempt in range(len(self.dataset)):
                    try:
                        items.append(self.dataset[((index + attempt) % len(self.dataset), height, width)])
                        break
                    except (OSError, ValueError):
                        failures += 1
                else:
                    raise RuntimeError("Trainer: no item of the dataset loads any more")
        images = torch.stack([item["image"] for item in items])
        edges = torch.stack([item["edges"] for item in items]) if "edges" in items[0] else sobel_edges((images + 1) / 2)
        captions = ["" if drop else item["caption"] for item, drop in zip(items, dropped[share])]
        return {"images": images, "edges": edges, "captions": captions, "failures": failures}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1] -> what the U-Net diffuses: the pixels themselves, or a scaled VAE latent sample
        (its noise drawn from `generator` for the global batch, like every draw of a step)."""
        if self.vae is None:
            return images
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        noise = torch.randn((self.config.batch_size, *posterior.mean.shape[1:]), generator=generator)
        noise = noise[self.rank :: self.world].to(posterior.mean)
        latents = posterior.mean + posterior.std * noise
        return ((latents - vae_shift(self.vae)) * self.vae.config.scaling_factor).float()

    def encode_text(self, captions: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Text states and lengths, with gradients when the text encoder (or its adapter) trains."""
        encoder = self.forward_models.get("text_encoder", self.text_encoder)
        module = encoder.module if isinstance(encoder, DistributedDataParallel) else encoder
        ids = tokenize(self.tokenizer, captions).to(self.device)
        if module.trainable:
            return encoder(ids)
        with torch.no_grad():
            return encoder(ids)

    # --- one step --------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> Dict[str, float]:
        """One update; none when the loss or a gradient is not finite on any rank: the weights, EMA and optimizer state
        stay as they were (the record says "nonfinite": 1), and the learning-rate schedule moves on with the step."""
        losses = self.compute_gradients(step)
        losses["lr"] = self.lr_schedule.get_last_lr()[0]  # the U-Net's learning rate of this step
        if any_rank([not (math.isfinite(losses["loss"]) and math.isfinite(losses["grad_norm"]))])[0]:
            self.optimizer.zero_grad(set_to_none=True)
            losses["nonfinite"] = 1
        else:
            self.optimizer.step()
            self._update_ema(step)
        self.lr_schedule.step()
        return losses

    def compute_gradients(self, step: int) -> Dict[str, float]:
        """Forward and backward of `step`'s batch (gradients averaged over the ranks, then clipped); no update. With
        grad_accum N each rank's share goes through in N micro-batches whose gradients add up to the share's; the
        ranks exchange gradients only after the last one."""
        for model in self.trained.values():
            model.train()
        batch = self.batch(step)
        # Timesteps and noise are drawn for the global batch and sliced, so N ranks see what one process would.
        g = torch.Generator().manual_seed(_seed(self.config.seed, step, 1))
        share = slice(self.rank, None, self.world)
        x0 = self.encode_images(batch["images"].to(self.device), g)
        t = self.sample_timesteps(g)
        noise = torch.randn((self.config.batch_size, *x0.shape[1:]), generator=g)
        t, noise = t[share].to(self.device), noise[share].to(self.device)
        torch.manual_seed(_seed(self.config.seed, step, 1000 + self.rank))  # gate noise and dropout of this step
        self.optimizer.zero_grad(set_to_none=True)
        parts = self.config.grad_accum
        size = len(t) // parts
        record: Dict[str, float] = {}
        for i in range(parts):
            part = slice(i * size, (i + 1) * size)
            with self._gradient_sync(i == parts - 1):
                losses = self._losses(batch, x0[part], t[part], noise[part], part)
                loss = sum(losses.values())
                (loss / parts).backward()
            for key, value in {"loss": loss, **losses}.items():
                record[key] = record.get(key, 0.0) + value.item() / parts
        norm = torch.nn.utils.clip_grad_norm_([p for m in self.trained.values() for p in m.parameters()
                                               if p.requires_grad],
                                              self.config.grad_clip if self.config.grad_clip > 0 else math.inf)
        record["grad_norm"] = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()  # before clipping
        if batch["failures"]:
            record["data_failures"] = batch["failures"]  # items skipped on this rank
        return record

    def _losses(self, batch: Dict[str, object], x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                part: slice) -> Dict[str, torch.Tensor]:
        """The loss terms of the micro-batch `part` of this rank's share."""
        states, lengths = self.encode_text(batch["captions"][part])
        noisy = self.scheduler.add_noise(x0, noise, t)
        autocast = self.config.precision == "bf16" or (self.config.precision == "auto" and self.device.type == "cuda")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            residuals = {}
            if self.controlnet is not None:
                control = canny_edges((batch["images"][part].to(self.device) + 1) / 2)
                down, mid = self.forward_models["controlnet"](noisy, t, states, lengths, controlnet_cond=control)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            out = self.forward_models.get("unet", self.unet)(noisy, t, states, lengths, **residuals)
        target = training_target(self.scheduler, self.unet.config.prediction_type, x0, noise, t)
        losses = {"denoise": F.mse_loss(out.sample.float(), target)}
        if out.edge_logits is not None and self.controlnet is None:
            edges = F.adaptive_max_pool2d(batch["edges"][part].to(self.device), out.edge_logits.shape[-2:])
            losses["edge"] = self.config.edge_weight * self.edge_loss(out.edge_logits.float(), edges, t)
        if out.balance_loss is not None and self.config.mode == "full":
            losses["balance"] = self.config.balance_weight * out.balance_loss.float()
        return losses

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool):
        """Whether the backward inside exchanges gradients between the ranks: off for the inner micro-batches of
        gradient accumulation (DDP's no_sync(), FSDP2's set_requires_gradient_sync(False)), which add up locally."""
        if self.sharded:
            for model in self.trained.values():
                model.set_requires_gradient_sync(enabled)
        with contextlib.ExitStack() as stack:
            if not enabled:
                for model in self.forward_models.values():
                    if isinstance(model, DistributedDataParallel):
                        stack.enter_context(model.no_sync())
            yield

    def _lr_factor(self, step: int) -> float:
        """A linear warm-up (the first step at 1/warmup_steps of the lr), then constant or a cosine or linear decay
        that reaches 0 at config.steps."""
        warmup, steps = max(1, self.config.resolved_warmup_steps), self.config.steps
        if step < warmup or self.config.lr_schedule == "constant":
            return min(1.0, (step + 1) / warmup)
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if self.config.lr_schedule == "cosine" else 1 - progress

    def sample_timesteps(self, generator: torch.Generator) -> torch.Tensor:
        """The global batch's training timesteps (TrainConfig.timestep_sampling)."""
        steps, batch = self.unet.config.num_train_timesteps, self.config.batch_size
        if self.config.timestep_sampling == "uniform":
            return torch.randint(0, steps, (batch,), generator=generator)
        u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=self.config.logit_mean,
                                                  logit_std=self.config.logit_std, generator=generator)
        return (u * steps).long().clamp(max=steps - 1)

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        if self.ema is None:
            return
        decay = self.ema_decay(step)
        for name, model in self.trained.items():
            torch._foreach_lerp_(list(self.ema[name].parameters()), list(model.parameters()), 1 - decay)

    def ema_decay(self, step: int) -> float:
        """The EMA's decay at (0-based) `step`: with ema_warmup diffusers' EMAModel warm-up, min(ema_decay,
        (1 + step) / (10 + step)), so a short run's EMA is not mostly its random initial weights."""
        if not self.config.ema_warmup:
            return self.config.ema_decay
        return min(self.config.ema_decay, (1 + step) / (10 + step))

    # --- loop ------------------------------------------------------------------------------------------------
    def train(self) -> List[Dict[str, float]]:
        """Steps up to config.steps, then the last checkpoint and out/pipeline/. Raises Preempted after SIGTERM or
        SIGUSR1 (the step in progress ends and is checkpointed first), DivergenceError after max_nonfinite_steps
        non-finite steps in a row (nothing is written), FileExistsError for a fresh run into another run's folder."""
        config = self.config
        if self.last_checkpoint is None:
            self._claim_out_folder()
        bar = tqdm(range(self.step, config.steps), initial=self.step, total=config.steps, desc="train",
                   disable=self.rank != 0)
        in_a_row = 0
        with self._preemption_signals():
            for step in bar:
                record = {"step": step + 1, **self.train_step(step)}
                self.data_failures += record.pop("data_failures", 0)
                if self.data_failures:
                    record["data_failures"] = self.data_failures  # items skipped on rank 0 since the run (re)started
                in_a_row = in_a_row + 1 if "nonfinite" in record else 0
                self.nonfinite_steps += "nonfinite" in record
                if self.nonfinite_steps:
                    record["nonfinite_steps"] = self.nonfinite_steps  # steps skipped since the run (re)started
                self.history.append(record)
                self.step = step + 1
                if self.rank == 0 and (self.step % config.log_every == 0 or self.step == config.steps or in_a_row):
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{self.lr_schedule.get_last_lr()[0]:.2e}")
                    self._log(record)
                if in_a_row >= config.max_nonfinite_steps:
                    bar.close()
                    raise DivergenceError(
                        f"training diverged: the loss or the gradients were not finite at steps "
                        f"{self.step - in_a_row + 1} to {self.step} ({in_a_row} in a row, max_nonfinite_steps; each "
                        f"skipped); last good checkpoint: {self.last_checkpoint or 'none'}; nothing more written. "
                        "Lower the learning rate or check the data.")
                # Every rank stops at the same step, whichever rank the signal reached; at the last step the run
                # simply ends (its checkpoint and pipeline follow).
                stop = any_rank([self.stop_signal is not None])[0] and self.step < config.steps
                # No periodic checkpoint amid non-finite steps: the last good one predates them.
                if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < config.steps \
                        and not in_a_row or stop:
                    self.save_checkpoint()
                if stop:
                    bar.close()
                    preempted = Preempted(self.stop_signal or "a signal to another rank", self.step,
                                          self.last_checkpoint)
                    if self.rank == 0:
                        self._log({"event": "preempted", "signal": preempted.signal_name, "step": self.step})
                        print(preempted, flush=True)
                    raise preempted
                if config.sample_every and self.step % config.sample_every == 0 and (self.rank == 0 or self.sharded):
                    self.save_samples()
            if self.last_checkpoint != self.checkpoints.folder(self.step):
                self.save_checkpoint()
            self.save_outputs()
        return self.history

    @contextlib.contextmanager
    def _preemption_signals(self):
        """While training, SIGTERM and SIGUSR1 only note that the job is to stop (train() ends the step, writes its
        checkpoint and raises Preempted); a second one is ignored, so it cannot interrupt that checkpoint. Signal
        handlers exist in the main thread only: elsewhere the signals keep their default (the process ends)."""
        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum, frame):
            self.stop_signal = self.stop_signal or signal.Signals(signum).name

        previous = {signum: signal.signal(signum, note) for signum in PREEMPTION_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _claim_out_folder(self) -> None:
        """A fresh run never mixes its checkpoints with another run's (a later resume would continue the wrong one,
        pruning would delete the new ones): their folder is refused, or with config.overwrite emptied."""
        existing = checkpoint_folders(self.checkpoints.root)
        if not existing:
            return
        if not self.config.overwrite:
            raise FileExistsError(
                f"Trainer: {self.out} holds another run's checkpoints ({existing[0].name}, {len(existing)} in all): "
                "continue that run with --resume (Trainer.resume), start afresh there with --overwrite "
                "(overwrite=True: deletes them), or choose another --out")
        if self.rank == 0:
            shutil.rmtree(self.checkpoints.root)

    def sampling_pipeline(self) -> RaphaelPipeline:
        """The pipeline of what was trained so far: EMA weights (the U-Net with its LoRA adapter in LoRA runs)."""
        ema = self.ema or {}
        unet = ema["unet"] if "unet" in ema else self.unet
        text_encoder = ema["text_encoder"] if "text_encoder" in ema else self.text_encoder
        controlnet = ema["controlnet"] if "controlnet" in ema else None
        pipe = RaphaelPipeline(unet, text_encoder, self.tokenizer, self.scheduler, vae=self.vae, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_samples(self, count: int = 8, steps: int = 25) -> Path:
        """A grid of EMA samples: out/samples/step-XXXXXXX.png, for the validation prompts or, on shapes data, held-out
        shapes prompts (ControlNet runs steer them with the Canny edges of the held-out scenes). Under FSDP every rank
        runs it (the EMA's forward gathers its shards); rank 0 writes."""
        held_out = ShapesDataset(count, self.unet.config.sample_size * self.vae_stride, seed=HELD_OUT_SEED)
        items = [held_out[i] for i in range(count)]
        captions = list(self.config.validation_prompt) or [item["caption"] for item in items]
        control = None
        if self.controlnet is not None:
            control = torch.stack([(items[i % count]["image"] + 1) / 2 for i in range(len(captions))])
        images = self.sampling_pipeline()(captions, num_inference_steps=steps, control_image=control,
                                          generator=torch.Generator().manual_seed(0)).images
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            image_grid(images, captions).save(path)
        return path

    def _log(self, record: Dict[str, object]) -> None:
        """Appends to out/log.jsonl, and to TensorBoard (out/tensorboard) when the tensorboard package is installed."""
        self.out.mkdir(parents=True, exist_ok=True)
        # Non-finite values as strings ("nan", "inf"): json.dumps would write NaN, which strict JSON readers reject.
        record = {k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in record.items()}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._tensorboard = False
        if self._tensorboard and "step" in record:  # training records; events (the data scan) stay in log.jsonl
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"train/{key}", value, record["step"])
            self._tensorboard.add_scalar("train/lr", self.lr_schedule.get_last_lr()[0], record["step"])

    # --- checkpoints and outputs ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """out/checkpoints/step-XXXXXXX (every rank calls it); weights that are not finite are never written."""
        self._check_finite("checkpoint")
        extra = {"train_config": dataclasses.asdict(self.config)}
        if isinstance(self.dataset, ShardStream):  # every rank's position in its share of the shards
            states = [self.dataset.state()]
            if self.world > 1:
                states = [None] * self.world
                dist.all_gather_object(states, self.dataset.state())
            extra["data_state"] = states
        self.last_checkpoint = self.checkpoints.save(self.step, extra)
        return self.last_checkpoint

    def _check_finite(self, what: str) -> None:
        if not self.checkpoints.weights_are_finite():
            raise DivergenceError(f"Trainer: the weights are not finite at step {self.step}; no {what} written (last "
                                  f"good checkpoint: {self.last_checkpoint or 'none'})")

    def _full_copy(self, model: nn.Module, state: Dict[str, torch.Tensor]) -> nn.Module:
        """`model` with full weights for saving: itself in one process or under DDP; under FSDP a new CPU instance
        (from its config) holding the gathered `state`."""
        if not self.sharded:
            return model
        copy_ = type(model).from_config(model.config)
        copy_.load_state_dict(state)
        return copy_

    def _gathered(self, models: nn.ModuleDict) -> Dict[str, Dict[str, torch.Tensor]]:
        """Per model name, its full state dict (every rank takes part under FSDP; gathered to rank 0's CPU)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True) if self.sharded else None
        state = get_model_state_dict(models, options=options) if self.sharded else {}
        return {name: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")} for name in models}

    def save_outputs(self) -> None:
        """out/pipeline/ (the EMA weights as a RaphaelPipeline folder), and the adapter alone in out/lora/ (LoRA runs)
        or the ControlNet alone in out/controlnet/ (ControlNet runs). Weights that are not finite are never written."""
        self._check_finite("pipeline")
        if self.config.mode == "lora":
            self.save_lora(self.out / "lora")
            return
        gathered = self._gathered(self.ema)
        if self.rank != 0:
            return
        ema = {name: self._full_copy(model, gathered[name]) for name, model in self.ema.items()}
        pipe = RaphaelPipeline(ema.get("unet", self.unet), ema.get("text_encoder", self.text_encoder), self.tokenizer,
                               self.scheduler, vae=self.vae, controlnet=ema.get("controlnet"))
        replace_folder_atomically(self.out / "pipeline", lambda tmp: pipe.save_pretrained(tmp))
        if "controlnet" in ema:
            replace_folder_atomically(self.out / "controlnet", lambda tmp: ema["controlnet"].save_pretrained(tmp))

    def save_lora(self, folder: Path) -> None:
        """The adapter alone: out/lora/pytorch_lora_weights.safetensors with diffusers' key and metadata layout
        ("unet." and "text_encoder." prefixes, the LoraConfig of each as metadata)."""
        from ..pipelines.lora import save_lora_weights

        state = get_model_state_dict(self.trained, options=StateDictOptions(
            full_state_dict=self.sharded, cpu_offload=self.sharded, ignore_frozen_params=True))
        if self.rank == 0:
            configs = {name: model.peft_config["default"] for name, model in self.trained.items()}
            save_lora_weights(folder, state, configs)

    @classmethod
    def resume(cls, out: str, steps: Optional[int] = None, device: Optional[str] = None, **overrides) -> "Trainer":
        """A Trainer continuing the run in `out` from its newest checkpoint that loads, optionally with a new step
        target and other TrainConfig fields that do not change the model (fsdp, vae, checkpoint_every, ...); it keeps
        writing into `out`."""
        root = Path(out) / "checkpoints"
        settings = None
        for folder in checkpoint_folders(root):
            try:
                settings = json.loads((folder / "state.json").read_text())["train_config"]
                break
            except (OSError, ValueError, KeyError):
                continue  # Checkpoints.resume reports it
        if settings is None:
            raise CheckpointError(f"Trainer.resume: no checkpoint with a readable state.json in {root}")
        settings.setdefault("ema_warmup", False)  # runs written before the EMA warm-up existed trained without it
        settings["validation_prompt"] = tuple(settings.get("validation_prompt", ()))
        config = TrainConfig(**{**settings, "betas": tuple(settings["betas"]), "out": str(out), **overrides})
        if steps is not None:
            config.steps = steps
        trainer = cls(config, device=device)
        trainer.last_checkpoint, state = trainer.checkpoints.resume()
        trainer.step = int(state["step"])
        if isinstance(trainer.dataset, ShardStream) and state.get("data_state"):
            states = state["data_state"]
            mine = states[trainer.rank] if len(states) == trainer.world else {  # other ranks: restart the epoch
                "world": len(states), "positions": [p for s in states for p in s["positions"]]}
            size = trainer.unet.config.sample_size * trainer.vae_stride
            trainer.dataset = trainer._dataset(size, stream_state=mine)
        return trainer


__all__ = ["ConfigError", "DivergenceError", "LORA_ATTENTION", "LORA_EXPERTS", "LORA_TEXT_TOWER", "PAPER_BUCKETS",
           "PREEMPTED_EXIT_STATUS", "BucketSchedule", "Preempted", "TrainConfig", "Trainer", "buckets", "training_target"]
