"""Edge targets for RAPHAEL's edge supervision (SPEC §2.5): a weight-free Sobel detector (the default) and the
HED detector of ControlNet's annotators (the paper uses HED), whose weights a user gives as a local file.

Images are float tensors [B, 3, H, W] in [0, 1]; edge maps are [B, 1, H, W] in [0, 1].
"""

from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

_LUMA = (0.299, 0.587, 0.114)


def _check_images(images: Tensor, who: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{who}: expected float images [B, 3, H, W] in [0, 1], got {tuple(images.shape)} {images.dtype}")


def sobel_edges(images: Tensor, threshold: float = 0.1) -> Tensor:
    """Gradient magnitude of the luma (Sobel, replicate padding), scaled by its maximum possible value (4 sqrt 2)
    and, when threshold > 0, binarised at `threshold`. Deterministic, weight-free, differentiable when not
    binarised."""
    _check_images(images, "sobel_edges")
    luma = sum(w * images[:, c : c + 1] for c, w in enumerate(_LUMA))
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype, device=images.device)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # [2, 1, 3, 3]
    grad = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = grad.square().sum(dim=1, keepdim=True).sqrt() / (4 * 2**0.5)
    return (magnitude > threshold).to(images.dtype) if threshold > 0 else magnitude.clamp(0, 1)


class _DoubleConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(
            *[nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1) for i in range(layers)]
        )
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: Tensor, downsample: bool):
        if downsample:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDDetector(nn.Module):
    """HED edges with the layout of ControlNet's `ControlNetHED_Apache2` annotator (controlnet_aux's HEDdetector):
    five VGG-style blocks, a side output per block, upsampled to the image size, averaged, then a sigmoid.

    `HEDDetector.from_file(path)` loads its weights from a local .safetensors file with that annotator's keys
    (`norm`, `block1.convs.0.weight`, ..., `block5.projection.bias`). The annotator is distributed as a pickle
    (`ControlNetHED.pth`); convert it once with `safetensors.torch.save_file(torch.load(p, weights_only=True), out)`.
    """

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = _DoubleConvBlock(3, 64, 2)
        self.block2 = _DoubleConvBlock(64, 128, 2)
        self.block3 = _DoubleConvBlock(128, 256, 3)
        self.block4 = _DoubleConvBlock(256, 512, 3)
        self.block5 = _DoubleConvBlock(512, 512, 3)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "HEDDetector":
        path = Path(path)
        if path.suffix != ".safetensors" or not path.is_file():
            raise ValueError(f"HEDDetector: expected an existing .safetensors file, got {path}")
        detector = cls()
        detector.load_state_dict(load_file(str(path)))
        return detector.eval().requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        _check_images(images, "HEDDetector")
        height, width = images.shape[-2:]
        h = images * 255.0 - self.norm  # the annotator works on 0..255 RGB
        sides = []
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, side = block(h, downsample=i > 0)
            sides.append(F.interpolate(side, size=(height, width), mode="bilinear", align_corners=False))
        return torch.sigmoid(torch.cat(sides, dim=1).mean(dim=1, keepdim=True))


__all__ = ["HEDDetector", "sobel_edges"]
