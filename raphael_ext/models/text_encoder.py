"""Text encoder of RAPHAEL: OpenCLIP's text tower (the paper uses ViT-g/14's), returning per-token states and the
number of valid tokens, as a diffusers model (save_pretrained / from_pretrained folders). Its tokenizer is
transformers' CLIPTokenizer built from the BPE vocabulary that open_clip bundles (`openclip_tokenizer`), so a pipeline
folder holds it like Stable Diffusion's; it gives open_clip's token ids (tested), and nothing is downloaded.

Pretrained weights come from a local OpenCLIP checkpoint in safetensors format (`from_open_clip`, only its text keys
are read). A `.bin`/`.pt` checkpoint is a pickle and is refused: convert it once, on a machine you trust, with
`safetensors.torch.save_file(torch.load(path, weights_only=True), "open_clip_model.safetensors")`.
"""

import contextlib
import importlib
import json
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file
from torch import Tensor, nn

# Text towers of the presets: the paper's (ViT-g-14: width 1024, 24 layers, 16 heads) and a small one that
# trains on a CPU (same vocabulary and context, so the same tokenizer serves both).
TEXT_CONFIGS = {
    "ViT-g-14": None,  # read from open_clip's model config
    "tiny": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    "small": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}
# The tower each RaphaelUNet preset is paired with (its text_dim is the tower's width).
PRESET_TEXT_ENCODERS = {"tiny": "tiny", "small": "small", "paper": "ViT-g-14"}


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


def openclip_tokenizer(context_length: int = 77):
    """transformers' CLIPTokenizer with open_clip's vocabulary and merges (written to a temporary folder from the file
    open_clip ships): open_clip's ids for every prompt, padded with the end-of-text token (the text encoder zeroes the
    padding, as open_clip does)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer(context_length=context_length)
    with tempfile.TemporaryDirectory() as folder:
        vocab, merges = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
        vocab.write_text(json.dumps(bpe.encoder))
        ranked = sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])
        merges.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in ranked))
        return CLIPTokenizer(str(vocab), str(merges), bos_token="<start_of_text>", eos_token="<end_of_text>",
                             unk_token="<end_of_text>", pad_token="<end_of_text>", model_max_length=context_length)


def tokenize(tokenizer, prompts: Union[str, Sequence[str]]) -> Tensor:
    """int64 [B, context_length] token ids (start, BPE tokens, end, padding; truncated to fit)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class OpenCLIPTextEncoder(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """OpenCLIP text transformer: forward(input_ids [B, L]) -> (states [B, L, width], lengths [B]).

    lengths counts the tokens up to and including the (first) end-of-text token, which is also the pooled token whose
    attention map drives edge supervision; the rest is padding (`text_lengths` of the ops) and is set to
    id 0 before the tower sees it, as open_clip's tokenizer pads.

    Args:
        name: "ViT-g-14" (the paper's), "small", "tiny" or another open_clip model name.

    The tower is frozen (requires_grad False) when built or loaded; `requires_grad_(True)` makes it trainable, and
    encode() then follows autograd. LoRA through PEFT (`add_adapter`) applies to the MLP of every residual block
    (`c_fc`, `c_proj`; open_clip's attention is torch's nn.MultiheadAttention, whose fused projections PEFT's LoRA
    layers do not wrap).
    """

    @register_to_config
    def __init__(self, name: str = "ViT-g-14"):
        super().__init__()
        cfg, embed_dim = text_config(name)
        cfg["output_tokens"] = True
        self.tower = _open_clip().model._build_text_tower(embed_dim, cfg)
        # RAPHAEL reads the per-token states; the pooled embedding's projection (CLIP's contrastive head) would be a
        # parameter without a gradient (which DDP rejects) when the tower is fine-tuned.
        self.tower.text_projection = None
        self.context_length = cfg["context_length"]
        self.width = cfg["width"]
        self.end_of_text = cfg["vocab_size"] - 1  # the BPE vocabulary's last id
        # Frozen unless a trainer unfreezes it (the paper keeps its text tower frozen). This also keeps sampling exact
        # across save and load: torch's MultiheadAttention takes another (fused) code path when no weight requires
        # grad, with different rounding.
        self.requires_grad_(False)

    @classmethod
    def from_open_clip(cls, name: str, checkpoint: Optional[Union[str, Path]] = None) -> "OpenCLIPTextEncoder":
        """The tower of open_clip model `name`, with the text keys of a local OpenCLIP .safetensors checkpoint (random
        weights without one)."""
        encoder = cls(name)
        if checkpoint is not None:
            load_text_weights(encoder.tower, checkpoint)
        return encoder

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def forward(self, input_ids: Tensor) -> Tuple[Tensor, Tensor]:
        lengths = (input_ids == self.end_of_text).int().argmax(dim=-1) + 1
        padding = torch.arange(input_ids.shape[1], device=input_ids.device)[None] >= lengths[:, None]
        _, states = self.tower(input_ids.masked_fill(padding, 0))
        return states, lengths

    def encode(self, tokenizer, prompts: Union[str, Sequence[str]], device=None) -> Tuple[Tensor, Tensor]:
        """States and lengths for prompts, on `device` (default: the encoder's). Follows autograd when the tower has
        trainable parameters (fine-tuning it), and records no graph when it is frozen."""
        ids = tokenize(tokenizer, prompts).to(device or self.device)
        with contextlib.nullcontext() if self.trainable else torch.no_grad():
            return self(ids)


def load_text_weights(tower: nn.Module, checkpoint: Union[str, Path]) -> None:
    """Loads the text keys of an OpenCLIP checkpoint (a full CLIP model or a text-only state dict; keys with or
    without a "text." prefix) into `tower`; every tower parameter must be present."""
    path = Path(checkpoint)
    if path.suffix != ".safetensors":
        raise ValueError(f"OpenCLIPTextEncoder: {path} is not a .safetensors file; pickled checkpoints are not loaded "
                         "(see raphael_ext.models.text_encoder's docstring for a one-line conversion)")
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


__all__ = ["OpenCLIPTextEncoder", "PRESET_TEXT_ENCODERS", "TEXT_CONFIGS", "load_text_weights", "openclip_tokenizer",
           "text_config", "tokenize"]
