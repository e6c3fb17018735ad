"""Edge maps: targets for RAPHAEL's edge supervision and control images for the canny ControlNet (paper
§7.8). A weight-free Sobel detector (edge supervision's default), Canny's detector (ControlNet's), and the HED detector
of ControlNet's annotators (the paper's edge targets), whose weights a user gives as a local file.

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
        raise ValueError(f"{who}: expected float images [B, 3, H, W] in [0, 1], got {tuple(images.shape)} "
                         f"{images.dtype}")


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


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(round(2 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def canny_edges(images: Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> Tensor:
    """Canny's detector on the luma, in torch (what ControlNet's canny annotator computes with OpenCV): Gaussian blur,
    Sobel gradients, non-maximum suppression along the gradient direction, then hysteresis: pixels above `high`
    (as a fraction of the largest possible gradient) are edges, and so are pixels above `low` connected to them.
    Returns binary maps [B, 1, H, W] (float, 0 or 1); sigma = 0 skips the blur (for images of a few pixels' detail)."""
    _check_images(images, "canny_edges")
    if not 0 <= low <= high:
        raise ValueError(f"canny_edges: need 0 <= low <= high, got low={low}, high={high}")
    x = sum(w * images[:, c : c + 1] for c, w in enumerate(_LUMA)).float()
    if sigma > 0:
        x = _gaussian_blur(x, sigma)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    grad = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.stack([kx, kx.t()]).unsqueeze(1))
    gx, gy = grad[:, :1], grad[:, 1:]
    magnitude = torch.sqrt(gx * gx + gy * gy) / (4 * 2**0.5)
    # Non-maximum suppression: keep a pixel if it is no smaller than both neighbours along its gradient direction
    # (quantised to 0, 45, 90, 135 degrees).
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    sector = ((angle + 22.5) // 45).long() % 4  # 0: horizontal gradient, 1: 45 degrees, 2: vertical, 3: 135
    padded = F.pad(magnitude, (1, 1, 1, 1))
    height, width = magnitude.shape[-2:]

    def shifted(dy: int, dx: int) -> Tensor:
        return padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    neighbours = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (a, b) in neighbours.items():
        keep |= (sector == index) & (magnitude >= shifted(*a)) & (magnitude >= shifted(*b))
    thin = magnitude * keep
    strong, weak = thin >= high, thin >= low
    # Hysteresis: grow the strong edges through 8-connected weak pixels until nothing changes.
    edges = strong
    for _ in range(height * width):
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.to(images.dtype)


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


__all__ = ["HEDDetector", "canny_edges", "sobel_edges"]
