"""LoRA adapters of a RaphaelPipeline (paper §7.8) in diffusers' file layout: one pytorch_lora_weights.safetensors
with the adapter weights of each component under its name ("unet.", "text_encoder.") and each component's LoraConfig
as metadata, so the file alone recreates the adapter. Loading goes through the components' PeftAdapterMixin."""

import dataclasses
import json
from pathlib import Path
from typing import Dict, Union

import torch
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
        for name, value in config.to_dict().items():
            metadata[f"{component}.{name}"] = sorted(value) if isinstance(value, set) else value
    path = Path(folder) / LORA_WEIGHT_NAME
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


class RaphaelLoraLoaderMixin:
    """load_lora_weights / fuse_lora / unfuse_lora / set_adapters / disable_lora / enable_lora for a pipeline with
    unet and text_encoder components (each a PeftAdapterMixin)."""

    def _lora_components(self):
        return [(name, getattr(self, name)) for name in LORA_COMPONENTS if getattr(self, name, None) is not None]

    def load_lora_weights(self, path: Union[str, Path], adapter_name: str = "default") -> None:
        """Loads a LoRA (a pytorch_lora_weights.safetensors file or its folder) into each component it has weights
        for, as adapter `adapter_name`, and activates it. The adapter is injected from its saved LoraConfig, then the
        weights are set (PEFT injects adapters on parameters, as for the experts, only that way)."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        state, metadata = read_lora_weights(path)
        fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        loaded = []
        for name, component in self._lora_components():
            weights = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
            if not weights:
                continue
            settings = {k[len(name) + 1:]: v for k, v in metadata.items() if k.startswith(f"{name}.")}
            if not settings:
                raise ValueError(f"load_lora_weights: {path} has {name} weights but no LoraConfig in its metadata")
            component.add_adapter(LoraConfig(**{k: v for k, v in settings.items() if k in fields}), adapter_name)
            result = set_peft_model_state_dict(component, weights, adapter_name=adapter_name)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if unexpected:
                raise ValueError(f"load_lora_weights: {name} has no modules for {unexpected[:3]}")
            loaded.append(name)
        if not loaded:
            raise ValueError(f"load_lora_weights: {path} holds no weights for {LORA_COMPONENTS}")

    def _adapted(self):
        return [(name, c) for name, c in self._lora_components() if getattr(c, "_hf_peft_config_loaded", False)]

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activates adapters with a scale each (diffusers' set_adapters): weight 0 turns one off, 0.5 halves it."""
        for _, component in self._adapted():
            component.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Merges the active adapters into the base weights (scaled by lora_scale): the same outputs, no LoRA cost."""
        for _, component in self._adapted():
            component.fuse_lora(lora_scale=lora_scale)

    def unfuse_lora(self) -> None:
        for _, component in self._adapted():
            component.unfuse_lora()

    def disable_lora(self) -> None:
        for _, component in self._adapted():
            component.disable_lora()

    def enable_lora(self) -> None:
        for _, component in self._adapted():
            component.enable_lora()


__all__ = ["LORA_WEIGHT_NAME", "RaphaelLoraLoaderMixin", "read_lora_weights", "save_lora_weights"]
