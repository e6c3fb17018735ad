"""LoRA adapters of a RaphaelPipeline (paper §7.8) in diffusers' file layout: one pytorch_lora_weights.safetensors
with the adapter weights of each component under its name ("unet.", "text_encoder.") and each component's LoraConfig
as metadata, so the file alone recreates the adapter. RaphaelPipeline is a diffusers LoraBaseMixin: the adapters of both
components load, combine with scales, fuse and unload as in Stable Diffusion's pipelines."""

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from diffusers.loaders.lora_base import LoraBaseMixin
from safetensors import safe_open
from safetensors.torch import load_file

from ..atomic_io import atomic_save_safetensors

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key
LORA_COMPONENTS = ("unet", "text_encoder")


def save_lora_weights(folder: Union[str, Path], state: Dict[str, torch.Tensor], configs: Dict[str, object]) -> Path:
    """Writes folder/pytorch_lora_weights.safetensors atomically. state: trainable parameters keyed
    "<component>.<module>.lora_A.<adapter>.weight" (a model's state dict with frozen parameters left out); configs:
    the LoraConfig of each component."""
    tensors = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            head, kind, rest = key.partition(".lora_A." if ".lora_A." in key else ".lora_B.")
            tensors[f"{head}{kind}{rest.split('.', 1)[1]}"] = value  # drop the adapter name, as PEFT saves it
    metadata = {}
    for component, config in configs.items():
        metadata.update(_adapter_metadata(component, config))
    return _write_lora_file(Path(folder) / LORA_WEIGHT_NAME, tensors, metadata)


def _write_lora_file(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, object]) -> Path:
    atomic_save_safetensors(tensors, path, metadata={"format": "pt",
                                                     LORA_ADAPTER_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path


def read_lora_weights(path: Union[str, Path]):
    """(state dict, metadata dict) of a LoRA file or of the folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if path.suffix != ".safetensors" or not path.is_file():
        raise FileNotFoundError(f"LoRA weights: expected a .safetensors file (or a folder with {LORA_WEIGHT_NAME}), "
                                f"got {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
    return load_file(str(path)), metadata


def _adapter_metadata(component: str, config) -> Dict[str, object]:
    """A LoraConfig (or its dict) as metadata entries "<component>.<field>"."""
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {f"{component}.{name}": sorted(value) if isinstance(value, set) else value
            for name, value in settings.items()}


class RaphaelLoraLoaderMixin(LoraBaseMixin):
    """diffusers' LoRA API for a pipeline with unet and text_encoder components (each a PeftAdapterMixin), as
    StableDiffusionLoraLoaderMixin gives it: load_lora_weights / lora_state_dict / save_lora_weights here;
    set_adapters (several adapters, a scale each), fuse_lora / unfuse_lora, unload_lora_weights, disable_lora /
    enable_lora, get_active_adapters, get_list_adapters and delete_adapters from LoraBaseMixin."""

    _lora_loadable_modules = ["unet", "text_encoder"]
    unet_name = "unet"
    text_encoder_name = "text_encoder"

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, return_lora_metadata: bool = False, **kwargs):
        """The weights (keys "unet.<module>.lora_A.weight", ...) of a LoRA file or of the folder holding one, and with
        return_lora_metadata=True the metadata ("<component>.<LoraConfig field>"). A state dict passes through."""
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            state, metadata = pretrained_model_name_or_path_or_dict, kwargs.get("metadata") or {}
        else:
            path = Path(pretrained_model_name_or_path_or_dict)
            if kwargs.get("weight_name"):
                path = path / kwargs["weight_name"]
            state, metadata = read_lora_weights(path)
        return (state, metadata) if return_lora_metadata else state

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: Optional[str] = None,
                          **kwargs) -> None:
        """Loads a LoRA (a pytorch_lora_weights.safetensors file or its folder) into each component it has weights
        for, as adapter `adapter_name` ("default", or "default_<n>" when that is taken), and makes it the active one
        (set_adapters combines several). The adapter is injected from its saved LoraConfig, then PEFT sets its
        weights."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        state, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, return_lora_metadata=True,
                                               **kwargs)
        taken = {name for names in self.get_list_adapters().values() for name in names}
        if adapter_name is None:
            adapter_name = "default" if "default" not in taken else f"default_{len(taken)}"
        if adapter_name in taken:
            raise ValueError(f"load_lora_weights: an adapter named {adapter_name!r} is loaded already")
        fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        loaded = []
        for name in self._lora_loadable_modules:
            component = getattr(self, name, None)
            weights = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
            if component is None or not weights:
                continue
            settings = {k[len(name) + 1:]: v for k, v in metadata.items() if k.startswith(f"{name}.")}
            if not settings:
                raise ValueError(f"load_lora_weights: the LoRA has {name} weights but no LoraConfig in its metadata")
            component.add_adapter(LoraConfig(**{k: v for k, v in settings.items() if k in fields}), adapter_name)
            result = set_peft_model_state_dict(component, weights, adapter_name=adapter_name)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if unexpected:
                raise ValueError(f"load_lora_weights: {name} has no modules for {unexpected[:3]}")
            loaded.append(name)
        if not loaded:
            raise ValueError(f"load_lora_weights: the LoRA holds no weights for {self._lora_loadable_modules}")

    def fuse_lora(self, components: Sequence[str] = ("unet", "text_encoder"), lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: Optional[List[str]] = None, **kwargs) -> None:
        """Merges the active adapters (or adapter_names) into the base weights, scaled by lora_scale: the same
        outputs without the LoRA cost (StableDiffusionLoraLoaderMixin's defaults: both components)."""
        super().fuse_lora(components=list(components), lora_scale=lora_scale, safe_fusing=safe_fusing,
                          adapter_names=adapter_names, **kwargs)

    def unfuse_lora(self, components: Sequence[str] = ("unet", "text_encoder"), **kwargs) -> None:
        """Takes the fused adapters back out of the base weights."""
        super().unfuse_lora(components=list(components), **kwargs)

    @classmethod
    def save_lora_weights(cls, save_directory: Union[str, Path], unet_lora_layers: Optional[dict] = None,
                          text_encoder_lora_layers: Optional[dict] = None, unet_lora_adapter_metadata=None,
                          text_encoder_lora_adapter_metadata=None, weight_name: str = LORA_WEIGHT_NAME,
                          **kwargs) -> Path:
        """Writes a LoRA as diffusers' pipelines do: *_lora_layers are PEFT state dicts of one adapter
        (peft.utils.get_peft_model_state_dict(model, adapter_name=...)), *_lora_adapter_metadata its LoraConfig (or
        LoraConfig.to_dict()), kept in the file so that it alone recreates the adapter."""
        parts = {"unet": (unet_lora_layers, unet_lora_adapter_metadata),
                 "text_encoder": (text_encoder_lora_layers, text_encoder_lora_adapter_metadata)}
        tensors, metadata = {}, {}
        for component, (layers, config) in parts.items():
            if not layers:
                continue
            if config is None:
                raise ValueError(f"save_lora_weights: {component}_lora_adapter_metadata (its LoraConfig) is needed")
            tensors.update({f"{component}.{k}": v for k, v in layers.items()})
            metadata.update(_adapter_metadata(component, config))
        if not tensors:
            raise ValueError("save_lora_weights: give unet_lora_layers and/or text_encoder_lora_layers")
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        return _write_lora_file(Path(save_directory) / weight_name, tensors, metadata)


__all__ = ["LORA_WEIGHT_NAME", "RaphaelLoraLoaderMixin", "read_lora_weights", "save_lora_weights"]
