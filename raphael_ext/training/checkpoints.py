"""Training checkpoints: `out/checkpoints/step-XXXXXXX/` with the trained parameters, the EMA weights and the optimizer
state as safetensors plus a state.json (step, learning-rate schedule, the run's settings). Each folder is written
into a temporary folder and renamed into place, the newest `keep_last` are kept.

Tensors are full (unsharded) and keyed by parameter name: `unet.<name>`, `text_encoder.<name>`,
`controlnet.<name>` (only trainable parameters: a LoRA checkpoint holds the adapter, not the frozen base), and the
optimizer's `<parameter>.<state>`. So a run saved under FSDP resumes under DDP, on another number of ranks or in one
process, and the other way round. Under FSDP every rank takes part: the shards are gathered to rank 0's CPU memory,
which writes; on load rank 0 reads and checks, then broadcasts.

Resuming takes the newest checkpoint that loads; unreadable or mismatched ones are skipped with their reason (a
run killed while writing, a truncated file), and none readable is an error that lists them. Under torchrun every rank
loads the same one: rank 0's list of folders is the list, and a folder that any rank fails to read is skipped by all.

A folder is written whole into `.step-XXXXXXX.*.tmp` (fsync'ed) and renamed into place, so a process killed at any
moment leaves the previous checkpoints intact; the next save removes such leftovers. Pruning keeps the newest
`keep_last` up to the step just written, by step number, so never that one; a newer one (left by a run that resumed
from an older checkpoint because the newer was unreadable) stays. Test hook: the environment variable
RAPHAEL_EXT_CHECKPOINT_PAUSE=<seconds> makes every write sleep that long half-way (after model.safetensors), so that a
test can kill or signal a process inside a checkpoint write.
"""

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..atomic_io import atomic_save_safetensors, atomic_write_bytes, replace_folder_atomically
from .distributed import any_rank

logger = logging.getLogger(__name__)

FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")
PAUSE_HOOK = "RAPHAEL_EXT_CHECKPOINT_PAUSE"  # test hook: seconds every checkpoint write sleeps half-way


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed (missing, corrupt, or of another model)."""


def checkpoint_folders(root: Path) -> List[Path]:
    """The step-XXXXXXX folders under `root`, newest (highest step) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.name[5:].isdigit() and p.is_dir()), key=_step, reverse=True)


def _step(folder: Path) -> int:
    return int(folder.name[5:])


class Checkpoints:
    """save() / load() / resume() of the checkpoints under `root` for `trained` (an nn.ModuleDict of the models being
    trained, e.g. {"unet": ..., "text_encoder": ...}), their EMA copies `ema` (a ModuleDict, or None), the optimizer
    and the learning-rate schedule."""

    def __init__(self, root: Path, trained: nn.ModuleDict, ema: Optional[nn.ModuleDict], optimizer, lr_schedule,
                 sharded: bool, keep_last: int):
        self.root = Path(root)
        self.trained, self.ema = trained, ema
        self.optimizer, self.lr_schedule = optimizer, lr_schedule
        self.sharded = sharded
        if keep_last < 1:
            raise ValueError(f"Checkpoints: keep_last must be >= 1 (the checkpoint just written is always kept), got "
                             f"{keep_last}")
        self.keep_last = keep_last
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def _options(self, **kwargs) -> StateDictOptions:
        return StateDictOptions(full_state_dict=self.sharded, **kwargs)

    def folder(self, step: int) -> Path:
        return self.root / f"step-{step:07d}"

    def weights_are_finite(self) -> bool:
        """Whether every trained parameter and EMA weight is finite on every rank (each rank checks its own shards;
        every rank gets the same answer)."""
        models = [self.trained] + ([self.ema] if self.ema is not None else [])
        local = [p.to_local() if isinstance(p, DTensor) else p for m in models for p in m.parameters()]
        finite = bool(torch.stack([torch.isfinite(t).all().cpu() for t in local]).all())
        return not any_rank([not finite])[0]

    def trainable_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Names and full shapes of the trained parameters (DTensors report their global shape)."""
        return {name: tuple(p.shape) for name, p in self.trained.named_parameters() if p.requires_grad}

    # --- save -------------------------------------------------------------------------------------------------
    def save(self, step: int, extra_state: dict) -> Path:
        """Writes step-XXXXXXX/ (every rank calls it; rank 0 writes) and prunes older ones beyond keep_last."""
        offload = self.sharded  # gathered into rank 0's CPU memory, not the GPU's
        model = get_model_state_dict(self.trained,
                                     options=self._options(cpu_offload=offload, ignore_frozen_params=True))
        ema = get_model_state_dict(self.ema, options=self._options(cpu_offload=offload)) if self.ema is not None else {}
        optimizer = get_optimizer_state_dict(self.trained, self.optimizer, options=self._options(cpu_offload=offload))
        final = self.folder(step)
        if self.rank != 0:
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".step-*"):  # a write or replacement that a killed process did not finish
            shutil.rmtree(leftover, ignore_errors=True)
        tensors, groups = _flatten_optimizer(optimizer)
        state = {"step": step, "param_groups": groups, "lr_schedule": self.lr_schedule.state_dict(), **extra_state}

        def write(tmp: Path) -> None:
            atomic_save_safetensors(model, tmp / "model.safetensors")
            if os.environ.get(PAUSE_HOOK):
                time.sleep(float(os.environ[PAUSE_HOOK]))
            atomic_save_safetensors(ema, tmp / "ema.safetensors")
            atomic_save_safetensors(tensors, tmp / "optimizer.safetensors")
            atomic_write_bytes(tmp / "state.json", json.dumps(state, indent=1, default=list).encode())

        replace_folder_atomically(final, write)
        # Newer folders (unreadable when this run resumed from an older one) are left alone and not counted.
        for old in [f for f in self.folders() if _step(f) < step][self.keep_last - 1:]:
            shutil.rmtree(old)
        return final

    # --- load -------------------------------------------------------------------------------------------------
    def folders(self) -> List[Path]:
        """Checkpoint folders, newest first."""
        return checkpoint_folders(self.root)

    def load(self, folder: Path) -> dict:
        """Loads a checkpoint folder into the models, EMA, optimizer and schedule; returns its state.json. Every rank
        learns of any rank's failure before anything is loaded, so a checkpoint that one rank cannot read raises
        CheckpointError on every rank: never a hang (FSDP's broadcasts), never ranks that load different ones (DDP)."""
        folder = Path(folder)
        failure = None
        try:
            state, model, ema, optimizer = self._read(folder)
        except Exception as error:  # safetensors, JSON and the checks each raise their own kind
            failure = error
        report = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports = [report]
        if self.world > 1:
            reports = [None] * self.world
            dist.all_gather_object(reports, report if report is None else f"rank {self.rank}: {report}")
        bad = next((r for r in reports if r is not None), None)
        if bad is not None:
            raise CheckpointError(f"checkpoint {folder}: {bad}") from failure
        options = self._options(broadcast_from_rank0=self.sharded, strict=False)  # frozen parameters are not saved
        set_model_state_dict(self.trained, model, options=options)
        if self.ema is not None:
            set_model_state_dict(self.ema, ema, options=self._options(broadcast_from_rank0=self.sharded))
        set_optimizer_state_dict(self.trained, self.optimizer, optimizer,
                                 options=self._options(broadcast_from_rank0=self.sharded))
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        return state

    def resume(self) -> Tuple[Path, dict]:
        """Loads the newest checkpoint that loads; logs the ones it skipped and why. Raises CheckpointError when
        there is none, or none loads (listing every reason). Under torchrun rank 0's folders are tried, newest first,
        on every rank, until one loads on all of them."""
        names = [folder.name for folder in self.folders()]
        if self.world > 1:
            shared = [names]
            dist.broadcast_object_list(shared, src=0)
            names = shared[0]
        skipped = []
        for folder in (self.root / name for name in names):
            try:
                state = self.load(folder)
            except CheckpointError as error:
                skipped.append(str(error))
                logger.warning("resume: skipping %s", error)
                continue
            if skipped and self.rank == 0:
                print(f"resume: took {folder.name}; skipped {len(skipped)} newer checkpoint(s):\n  "
                      + "\n  ".join(skipped))
            return folder, state
        if not skipped:
            raise CheckpointError(f"resume: no checkpoint in {self.root}")
        raise CheckpointError(f"resume: no readable checkpoint in {self.root}:\n  " + "\n  ".join(skipped))

    def _read(self, folder: Path):
        """(state, model, ema, optimizer) of a folder, checked against the trained parameters' names and shapes;
        under FSDP only rank 0 reads the tensors (the others get empty dicts)."""
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"incomplete (missing {missing})")
        state = json.loads((folder / "state.json").read_text())
        absent = [key for key in ("step", "lr_schedule", "param_groups") if key not in state]
        if absent:
            raise ValueError(f"state.json lacks {absent}")
        if self.sharded and self.rank != 0:
            return state, {}, {}, {}
        device = "cpu" if self.sharded else str(next(self.trained.parameters()).device)
        model = load_file(str(folder / "model.safetensors"), device=device)
        ema = load_file(str(folder / "ema.safetensors"), device=device)
        optimizer = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors"), device=device),
                                         state["param_groups"])
        shapes = self.trainable_shapes()
        found = {key: tuple(t.shape) for key, t in model.items()}
        if found != shapes:
            wrong = sorted(set(found.items()) ^ set(shapes.items()))[:3]
            raise ValueError(f"its parameters do not match the model being trained (e.g. {wrong})")
        if self.ema is not None:
            ema_shapes = {name: tuple(t.shape) for name, t in self.ema.state_dict().items()}
            if {key: tuple(t.shape) for key, t in ema.items()} != ema_shapes:
                raise ValueError("its EMA weights do not match the model being trained")
        for param, values in optimizer["state"].items():
            if param not in shapes or tuple(values["exp_avg"].shape) != shapes[param]:
                raise ValueError(f"optimizer state {param!r} does not match a trained parameter")
        return state, model, ema, optimizer


def _flatten_optimizer(state_dict: dict) -> Tuple[Dict[str, torch.Tensor], list]:
    """The optimizer's state keyed "<parameter name>.<state name>" (e.g. "unet.conv_in.weight.exp_avg"), and its
    groups."""
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


__all__ = ["CheckpointError", "Checkpoints", "checkpoint_folders"]
