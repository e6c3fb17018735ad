"""Training RAPHAEL (SPEC §2.5): L = L_denoise + L_edge (only for t <= T_c) + an optional balance loss; AdamW with the
paper's defaults and linear warm-up, EMA weights, caption dropout for classifier-free guidance, multi-scale
buckets, gradient checkpointing, DDP through torchrun, or FSDP2 (`fully_shard`) for models that do not fit one device
(TrainConfig.fsdp). Small and readable, in the spirit of DiT's train.py.

Every random draw of a step (which items, their bucket, caption dropout, timesteps, noise, the gates' noise)
comes from generators seeded by (seed, step, rank), so a run resumed from a checkpoint continues exactly:
the checkpoint holds the model, the EMA, the optimiser, the learning-rate schedule and the step. Checkpoints hold
full (unsharded) tensors keyed by parameter name, so a run saved under FSDP resumes under DDP, on another number
of ranks or in one process, and the other way round.
"""

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .data import FolderDataset, ShapesDataset
from .edges import sobel_edges
from .model import (EdgeHead, RaphaelConfig, RaphaelUNet, ResBlock, SpatialTransformer, atomic_save_safetensors,
                    atomic_write_bytes)
from .nn import EdgeFocalLoss
from .pipeline import RaphaelPipeline, vae_shift, vae_stride
from .text import OpenCLIPTextEncoder

# Next to unet/ and unet_ema/: the run's text tower when it was random (no text_checkpoint).
TEXT_ENCODER_FILE = "text_encoder.safetensors"

# The paper's 9 training buckets (height, width) in pixels.
PAPER_BUCKETS = ((448, 832), (512, 768), (512, 704), (640, 640), (576, 640), (640, 576), (704, 512), (768, 512),
                 (832, 448))


def buckets(sample_size: int, multiple: int) -> List[Tuple[int, int]]:
    """The paper's buckets scaled so that 640x640 becomes sample_size x sample_size, rounded to `multiple`."""
    scale = sample_size / 640
    out = []
    for h, w in PAPER_BUCKETS:
        size = (max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple))
        if size not in out:
            out.append(size)
    return out


class NoiseSchedule:
    """DDPM's forward process with the betas RaphaelPipeline's default DDIM scheduler uses (linear in pixel space,
    scaled-linear in latent space), so training and sampling agree."""

    def __init__(self, config: RaphaelConfig):
        if config.latent:
            betas = torch.linspace(0.00085**0.5, 0.012**0.5, config.num_train_timesteps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(0.0001, 0.02, config.num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the U-Net is trained to output (diffusers' conventions, so its DDIMScheduler samples it)."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        if prediction_type != "v_prediction":
            raise ValueError(f"NoiseSchedule.target: unknown prediction_type {prediction_type!r}")
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data: str = "shapes"  # "shapes" or a folder of images with same-name .txt captions
    out: str = "runs/train"
    steps: int = 1000
    batch_size: int = 16  # global batch (split over the ranks)
    fsdp: bool = False  # under torchrun: shard parameters, gradients, optimizer state and EMA (FSDP2) instead of DDP
    lr: float = 1e-4  # the paper's AdamW settings
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 20000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    edge_weight: float = 1.0
    balance_weight: float = 0.01
    multiscale: bool = True
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0  # EMA sample grid every N steps; 0: never
    checkpoint_every: int = 0  # 0: only at the end
    keep_last: int = 3
    dataset_size: int = 100_000
    text_checkpoint: Optional[str] = None
    vae: Optional[str] = None  # latent presets: a local diffusers AutoencoderKL folder (safetensors) that encodes the images
    model: Dict[str, object] = field(default_factory=dict)  # RaphaelConfig overrides

    def model_config(self) -> RaphaelConfig:
        return RaphaelConfig.preset(self.preset, **self.model)


def _seed(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + part + 1442695040888963407) % (1 << 63)
    return value


class Trainer:
    """Trainer(TrainConfig).train(); Trainer.resume(out folder) continues the latest checkpoint."""

    def __init__(self, config: TrainConfig, device: Optional[str] = None):
        self.config = config
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if config.batch_size % self.world:
            raise ValueError(f"Trainer: batch_size {config.batch_size} must divide over {self.world} processes")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_config = config.model_config()
        self.vae = self._load_vae()
        self.vae_stride = vae_stride(self.vae)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        # Without a process group there is nothing to shard over: fsdp=True then trains like one DDP rank.
        self.sharded = config.fsdp and dist.is_initialized()
        self.unet = RaphaelUNet(self.model_config)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval()
        if self.sharded:  # built on the CPU: fully_shard moves one unit at a time to the device, as shards
            mesh = init_device_mesh(self.device.type, (self.world,))
            shard_unet(self.unet, mesh)
            # Sharded like the model, so the EMA update stays local; resharded after every forward, as it has no
            # backward to do that (FSDP would otherwise keep its root unit gathered after sampling).
            shard_unet(self.ema, mesh, reshard_after_forward=True)
            self.model = self.unet
        else:
            self.unet.to(self.device)
            self.ema.to(self.device)
            self.model = DistributedDataParallel(self.unet) if self.world > 1 else self.unet
        self.text_encoder = OpenCLIPTextEncoder(self.model_config.text_encoder, checkpoint=config.text_checkpoint)
        self.text_encoder.to(self.device)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        warmup = max(1, config.warmup_steps)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.schedule = NoiseSchedule(self.model_config)
        self.edge_loss = EdgeFocalLoss(t_cutoff=self.model_config.t_cutoff)
        size = self.model_config.sample_size * self.vae_stride  # in pixels
        if config.data == "shapes":
            self.dataset = ShapesDataset(config.dataset_size, size, seed=config.seed)
        else:
            self.dataset = FolderDataset(config.data, size)
        multiple = 2 ** (len(self.model_config.channels) - 1) * self.vae_stride
        self.buckets = buckets(size, multiple) if config.multiscale else [(size, size)]
        self.step = 0
        self.out = Path(config.out)
        self.history: List[Dict[str, float]] = []
        self._tensorboard = None  # a SummaryWriter once created, False when tensorboard is not installed

    def _load_vae(self):
        """The latent presets' VAE (None for pixel presets), loaded and checked before anything is built."""
        if not self.model_config.latent:
            if self.config.vae is not None:
                raise ValueError(f"Trainer: preset {self.config.preset!r} diffuses pixels; it takes no vae")
            return None
        if self.config.vae is None:
            raise ValueError(f"Trainer: preset {self.config.preset!r} diffuses in a VAE's latent space; pass vae=<a "
                             "local diffusers AutoencoderKL folder> (--vae), e.g. Stable Diffusion's vae/ folder")
        vae = RaphaelPipeline.load_vae(self.config.vae, device=self.device)
        if vae.config.latent_channels != self.model_config.in_channels:
            raise ValueError(f"Trainer: the VAE has {vae.config.latent_channels} latent channels, the model takes "
                             f"{self.model_config.in_channels}")
        return vae

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1] -> what the U-Net diffuses: the pixels themselves, or a scaled VAE latent sample
        (its noise drawn from `generator` for the global batch, like every draw of a step)."""
        if self.vae is None:
            return images
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        noise = torch.randn((self.config.batch_size, *posterior.mean.shape[1:]), generator=generator)
        noise = noise[self.rank :: self.world].to(posterior.mean)
        latents = posterior.mean + posterior.std * noise
        return ((latents - vae_shift(self.vae)) * self.vae.config.scaling_factor).float()

    # --- data ------------------------------------------------------------------------------------------------
    def batch(self, step: int) -> Dict[str, object]:
        """This rank's share of the global batch of `step`: one bucket for the whole batch."""
        g = torch.Generator().manual_seed(_seed(self.config.seed, step))
        height, width = self.buckets[int(torch.randint(len(self.buckets), (1,), generator=g))]
        indices = torch.randint(len(self.dataset), (self.config.batch_size,), generator=g).tolist()
        dropped = (torch.rand(self.config.batch_size, generator=g) < self.config.caption_dropout).tolist()
        share = slice(self.rank, None, self.world)
        items = [self.dataset[(i, height, width)] for i in indices[share]]
        images = torch.stack([item["image"] for item in items])
        edges = torch.stack([item["edges"] for item in items]) if "edges" in items[0] else sobel_edges((images + 1) / 2)
        captions = ["" if drop else item["caption"] for item, drop in zip(items, dropped[share])]
        return {"images": images, "edges": edges, "captions": captions}

    # --- one step --------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> Dict[str, float]:
        losses = self.compute_gradients(step)
        self.optimizer.step()
        self.lr_schedule.step()
        self._update_ema()
        return losses

    def compute_gradients(self, step: int) -> Dict[str, float]:
        """Forward and backward of `step`'s batch (gradients averaged over the ranks, then clipped); no update."""
        self.unet.train()
        batch = self.batch(step)
        # Timesteps and noise are drawn for the global batch and sliced, so N ranks see what one process would.
        g = torch.Generator().manual_seed(_seed(self.config.seed, step, 1))
        share = slice(self.rank, None, self.world)
        x0 = self.encode(batch["images"].to(self.device), g)
        t = torch.randint(0, self.model_config.num_train_timesteps, (self.config.batch_size,), generator=g)
        noise = torch.randn((self.config.batch_size, *x0.shape[1:]), generator=g)
        t, noise = t[share].to(self.device), noise[share].to(self.device)
        torch.manual_seed(_seed(self.config.seed, step, 1000 + self.rank))  # gate noise and dropout of this step
        states, lengths = self.text_encoder.encode(batch["captions"], device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(self.schedule.add_noise(x0, noise, t), t, states, lengths)
        target = self.schedule.target(self.model_config.prediction_type, x0, noise, t)
        losses = {"denoise": F.mse_loss(out.sample.float(), target)}
        if out.edge_logits is not None:
            edges = F.adaptive_max_pool2d(batch["edges"].to(self.device), out.edge_logits.shape[-2:])
            losses["edge"] = self.config.edge_weight * self.edge_loss(out.edge_logits.float(), edges, t)
        if out.balance_loss is not None:
            losses["balance"] = self.config.balance_weight * out.balance_loss.float()
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.config.grad_clip)
        return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}

    @torch.no_grad()
    def _update_ema(self) -> None:
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.unet.parameters()), 1 - self.config.ema_decay)

    # --- loop ------------------------------------------------------------------------------------------------
    def train(self) -> List[Dict[str, float]]:
        config = self.config
        bar = tqdm(range(self.step, config.steps), initial=self.step, total=config.steps, desc="train",
                   disable=self.rank != 0)
        for step in bar:
            record = {"step": step + 1, **self.train_step(step)}
            self.history.append(record)
            self.step = step + 1
            if self.rank == 0 and (self.step % config.log_every == 0 or self.step == config.steps):
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{self.lr_schedule.get_last_lr()[0]:.2e}")
                self._log(record)
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < config.steps:
                self.save_checkpoint()
            if config.sample_every and self.step % config.sample_every == 0 and (self.rank == 0 or self.sharded):
                self.save_samples()
        self.save_checkpoint()
        return self.history

    def save_samples(self, count: int = 8, steps: int = 25) -> Path:
        """A grid of EMA samples for held-out shapes prompts: out/samples/step-XXXXXXX.png. Under FSDP every rank
        runs it (the EMA's forward gathers its shards); rank 0 writes."""
        from .evaluate import HELD_OUT_SEED, grid

        held_out = ShapesDataset(count, self.model_config.sample_size * self.vae_stride, seed=HELD_OUT_SEED)
        captions = [held_out[i]["caption"] for i in range(count)]
        pipe = RaphaelPipeline(self.ema, self.text_encoder, vae=self.vae)
        images = pipe(captions, num_inference_steps=steps, seed=0, progress=False).images
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            grid(images, captions).save(path)
        return path

    def _log(self, record: Dict[str, float]) -> None:
        """Appends to out/log.jsonl, and to TensorBoard (out/tensorboard) when the tensorboard package is installed."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._tensorboard = False
        if self._tensorboard:
            for key, value in record.items():
                if key != "step":
                    self._tensorboard.add_scalar(f"train/{key}", value, record["step"])
            self._tensorboard.add_scalar("train/lr", self.lr_schedule.get_last_lr()[0], record["step"])

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _full_options(self, **kwargs) -> Optional[StateDictOptions]:
        return StateDictOptions(full_state_dict=True, **kwargs) if self.sharded else None

    def save_checkpoint(self) -> Path:
        """out/checkpoints/step-XXXXXXX/ with model, ema and optimizer safetensors + state.json, written into a
        temporary folder and renamed into place, then `latest` is updated; older ones beyond keep_last go.
        Under FSDP every rank calls it: the shards are gathered to rank 0 (on CPU), which writes."""
        options = self._full_options(cpu_offload=True)
        model = get_model_state_dict(self.unet, options=options)
        ema = get_model_state_dict(self.ema, options=options)
        optimizer = get_optimizer_state_dict(self.unet, self.optimizer, options=options)
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:07d}"
        if self.rank != 0:
            return final
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            atomic_save_safetensors(model, tmp / "model.safetensors")
            atomic_save_safetensors(ema, tmp / "ema.safetensors")
            tensors, groups = _flatten_optimizer(optimizer)
            atomic_save_safetensors(tensors, tmp / "optimizer.safetensors")
            state = {"step": self.step, "train_config": dataclasses.asdict(self.config),
                     "model_config": self.model_config.to_dict(), "param_groups": groups,
                     "lr_schedule": self.lr_schedule.state_dict()}
            atomic_write_bytes(tmp / "state.json", json.dumps(state, indent=1, default=list).encode())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_bytes(root / "latest", final.name.encode())
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[: -self.config.keep_last]:
            shutil.rmtree(old)
        self.unet.save_pretrained(self.out / "unet", state_dict=model)
        self.ema.save_pretrained(self.out / "unet_ema", state_dict=ema)
        text = self.out / TEXT_ENCODER_FILE
        if self.config.text_checkpoint is None and not text.is_file():  # the random tower: sampling needs this one
            self.text_encoder.save(text)
        return final

    def load_checkpoint(self, folder: Path) -> None:
        """Loads a save_checkpoint folder. Under FSDP every rank calls it: rank 0 reads and checks the tensors,
        every rank reads state.json, all learn of any rank's failure before the first broadcast (so a bad
        checkpoint is an error on every rank, never a hang), then set_*_state_dict broadcast and shard."""
        folder = Path(folder)
        needed = ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"]
        missing = [n for n in needed if not (folder / n).is_file()]
        failure = None
        try:
            if missing:
                raise FileNotFoundError(f"Trainer: checkpoint {folder} is incomplete (missing {missing})")
            state, model, ema, optimizer = self._read_checkpoint(folder)
        except Exception as error:  # safetensors, JSON and the checks each raise their own kind
            failure = error
        report = None if failure is None else (isinstance(failure, FileNotFoundError), str(failure))
        reports = [report]
        if self.sharded:
            reports = [None] * self.world
            dist.all_gather_object(reports, report)
        bad = next((r for r in reports if r is not None), None)
        if bad is not None:
            files_missing, message = bad
            if files_missing:
                raise FileNotFoundError(message) from failure
            raise RuntimeError(f"Trainer: checkpoint {folder} is corrupt or from another model: {message}") from failure
        options = self._full_options(broadcast_from_rank0=True)
        set_model_state_dict(self.unet, model, options=options)
        set_model_state_dict(self.ema, ema, options=options)
        set_optimizer_state_dict(self.unet, self.optimizer, optimizer, options=options)
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step = int(state["step"])

    def _read_checkpoint(self, folder: Path):
        """(state, model, ema, optimizer) of a checkpoint folder, checked against this model's parameter names and
        shapes; under FSDP only rank 0 reads the tensors (the others get empty dicts)."""
        state = json.loads((folder / "state.json").read_text())
        absent = [key for key in ("step", "lr_schedule", "param_groups") if key not in state]
        if absent:
            raise ValueError(f"state.json lacks {absent}")
        if self.sharded and self.rank != 0:
            return state, {}, {}, {}
        device = "cpu" if self.sharded else str(self.device)
        model = load_file(str(folder / "model.safetensors"), device=device)
        ema = load_file(str(folder / "ema.safetensors"), device=device)
        optimizer = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors"), device=device),
                                         state["param_groups"])
        shapes = {name: tuple(t.shape) for name, t in self.unet.state_dict().items()}  # full shapes under FSDP too
        for name, tensors in (("model", model), ("ema", ema)):
            found = {key: tuple(t.shape) for key, t in tensors.items()}
            if found != shapes:
                wrong = sorted(set(found.items()) ^ set(shapes.items()))[:3]
                raise ValueError(f"{name} tensors do not match this model (e.g. {wrong})")
        for param, values in optimizer["state"].items():
            if param not in shapes or tuple(values["exp_avg"].shape) != shapes[param]:
                raise ValueError(f"optimizer state {param!r} does not match a parameter of this model")
        return state, model, ema, optimizer

    @classmethod
    def resume(cls, out: str, steps: Optional[int] = None, device: Optional[str] = None,
               checkpoint: Optional[str] = None, **overrides) -> "Trainer":
        """A Trainer continuing the run in `out` from its latest checkpoint (or from `checkpoint`, a step folder),
        optionally with a new step target and other TrainConfig fields that do not change the model (fsdp, vae,
        checkpoint_every, ...); it keeps writing into `out`."""
        root = Path(out) / "checkpoints"
        latest = root / "latest"
        if checkpoint is not None:
            folder = Path(checkpoint)
        elif latest.is_file():
            folder = root / latest.read_text().strip()
        else:
            raise FileNotFoundError(f"Trainer.resume: no checkpoint in {root}")
        state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").is_file() else None
        if state is None:
            raise FileNotFoundError(f"Trainer.resume: {folder} has no state.json")
        config = TrainConfig(**{**state["train_config"], "betas": tuple(state["train_config"]["betas"]), "out": str(out),
                                **overrides})
        if steps is not None:
            config.steps = steps
        trainer = cls(config, device=device)
        trainer.load_checkpoint(folder)
        return trainer


def shard_unet(unet: RaphaelUNet, mesh, reshard_after_forward: Optional[bool] = None) -> None:
    """FSDP2: each ResBlock, transformer block, down/upsampling convolution and the edge predictor is one unit,
    gathered just before it runs and freed after (gradient checkpointing recomputes inside the gathered unit);
    the time embedding and the input/output convolutions form the root unit. Parameters stay float32 (the expert
    ops take one dtype for activations and weights; bf16 autocast, as under DDP, does the mixed precision)."""
    from torch.distributed.fsdp import fully_shard

    units = [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer, EdgeHead))]
    units += [stage[key] for stage in (*unet.down, *unet.up) for key in ("downsample", "upsample") if key in stage]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(unet, mesh=mesh, reshard_after_forward=reshard_after_forward)


def _flatten_optimizer(state_dict: dict) -> Tuple[Dict[str, torch.Tensor], list]:
    """The optimizer's state keyed "<parameter name>.<state name>" (e.g. "conv_in.weight.exp_avg"), and its groups."""
    tensors = {}
    for param, values in state_dict["state"].items():
        for name, value in values.items():
            tensors[f"{param}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], groups: list) -> dict:
    state: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        param, name = key.rsplit(".", 1)
        state.setdefault(param, {})[name] = value.cpu() if name == "step" else value
    return {"state": state, "param_groups": groups}


def setup_distributed() -> None:
    """Joins the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


__all__ = ["TrainConfig", "Trainer", "TEXT_ENCODER_FILE", "NoiseSchedule", "buckets", "PAPER_BUCKETS",
           "setup_distributed", "shard_unet"]
