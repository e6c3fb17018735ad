"""Text encoder of RAPHAEL: OpenCLIP's text tower (the paper uses ViT-g/14's), returning per-token states and the
number of valid tokens, with open_clip's BPE tokenizer (bundled with open_clip, works offline).

Weights come from a local OpenCLIP checkpoint in safetensors format (only its text keys are read) or stay random;
nothing is downloaded. A `.bin`/`.pt` checkpoint is a pickle and is refused: convert it once, on a machine you
trust, with `safetensors.torch.save_file(torch.load(path, weights_only=True), "open_clip_model.safetensors")`.
"""

import importlib
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

# Text towers of the presets: the paper's (ViT-g-14: width 1024, 24 layers, 16 heads) and a small one that
# trains on a CPU (same vocabulary and context, so the same tokenizer serves both).
TEXT_CONFIGS = {
    "ViT-g-14": None,  # read from open_clip's model config
    "tiny": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    "small": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}


def _open_clip():
    """open_clip, imported when a text tower is built: the rest of the model (U-Net, pipeline with precomputed
    states, benchmarks) works without open_clip_torch installed."""
    try:
        return importlib.import_module("open_clip")
    except ImportError as error:
        raise ImportError("OpenCLIPTextEncoder needs open_clip_torch (pip install open_clip_torch)") from error


def text_config(name: str) -> Tuple[dict, int]:
    """(text_cfg, embed_dim) of a preset name or any open_clip model name."""
    if name in TEXT_CONFIGS and TEXT_CONFIGS[name] is not None:
        cfg = dict(TEXT_CONFIGS[name])
        return cfg, cfg["width"]
    open_clip = _open_clip()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"OpenCLIPTextEncoder: unknown text config {name!r}; use one of {sorted(TEXT_CONFIGS)} or an "
                         f"open_clip model name ({', '.join(open_clip.list_models()[:5])}, ...)")
    return dict(model_cfg["text_cfg"]), model_cfg["embed_dim"]


class OpenCLIPTextEncoder(nn.Module):
    """OpenCLIP text transformer returning (states [B, L, width], lengths [B]).

    lengths counts the tokens up to and including the end-of-text token, which is also the pooled token whose
    attention map drives edge supervision (SPEC §2.5); the rest is padding (`text_lengths` of the ops).

    Args:
        name: "ViT-g-14" (the paper's), "small", "tiny" or another open_clip model name.
        checkpoint: optional local OpenCLIP checkpoint (.safetensors); only the text tower's keys are loaded.
        trainable: False (default) freezes the tower and keeps it in eval mode.
    """

    def __init__(self, name: str = "ViT-g-14", checkpoint: Optional[Union[str, Path]] = None, trainable: bool = False):
        super().__init__()
        cfg, embed_dim = text_config(name)
        cfg["output_tokens"] = True
        self.name = name
        open_clip = _open_clip()
        self.tower = open_clip.model._build_text_tower(embed_dim, cfg)
        self.context_length = cfg["context_length"]
        self.width = cfg["width"]
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)
        if checkpoint is not None:
            load_text_weights(self.tower, checkpoint)
        self.trainable = trainable
        if not trainable:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)

    def save(self, path: Union[str, Path]) -> None:
        """The tower's weights as a .safetensors file that `checkpoint=` reads back (written atomically): a
        random tower is drawn from the global RNG, so a run keeps the one it trained with."""
        from .model import atomic_save_safetensors

        atomic_save_safetensors({f"text.{k}": v for k, v in self.tower.state_dict().items()}, Path(path))

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> Tensor:
        """int64 [B, context_length] token ids (start, BPE tokens, end, zero padding; truncated to fit)."""
        return self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts))

    def forward(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        _, states = self.tower(tokens)
        lengths = tokens.argmax(dim=-1) + 1  # the end-of-text token has the largest id of the vocabulary
        return states, lengths

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]], device=None) -> Tuple[Tensor, Tensor]:
        """States and lengths for prompts, on `device` (default: the encoder's)."""
        device = device or self.tower.positional_embedding.device
        return self(self.tokenize(prompts).to(device))


def load_text_weights(tower: nn.Module, checkpoint: Union[str, Path]) -> None:
    """Loads the text keys of an OpenCLIP checkpoint (a full CLIP model or a text-only state dict; keys with or
    without a "text." prefix) into `tower`; every tower parameter must be present."""
    path = Path(checkpoint)
    if path.suffix != ".safetensors":
        raise ValueError(f"OpenCLIPTextEncoder: {path} is not a .safetensors file; pickled checkpoints are not loaded "
                         "(see raphael_ext.text's docstring for a one-line conversion)")
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIPTextEncoder: checkpoint {path} does not exist")
    wanted = set(tower.state_dict())
    state = {}
    for key, value in load_file(str(path)).items():
        key = key[len("text."):] if key.startswith("text.") else key
        if key in wanted:
            state[key] = value
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"OpenCLIPTextEncoder: {path} lacks text-tower keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} (is it an OpenCLIP checkpoint of the same model?)")
    tower.load_state_dict(state)


__all__ = ["OpenCLIPTextEncoder", "load_text_weights", "text_config", "TEXT_CONFIGS"]
