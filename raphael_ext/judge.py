"""A deterministic judge of text-image alignment for ShapesDataset prompts: it reads each requested object's colour,
shape and the pair's relative position from the pixels. No weights, so its verdicts are reproducible; its own
accuracy on rendered scenes is measured by `judge_accuracy` (and tested to be >= 95 %).

Per prompt it makes 2 checks per object (the colour is present; the blob of that colour has the right shape) and
one for the relation of the first two objects; the score is the fraction of checks passed.
"""

import math
from typing import Dict, List, Sequence

import numpy as np
import torch

from .data import COLORS, ShapeSpec, ShapesDataset, relation

# Fill ratio of each shape in its bounding box: a circle covers pi/4, a square all, a triangle half.
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
COLOR_TOLERANCE = 60  # max |channel difference| to count a pixel as a palette colour
MIN_PIXELS = 6


def _as_uint8(image) -> np.ndarray:
    """PIL image, uint8 [H, W, 3] array or float tensor [3, H, W] in [-1, 1] -> uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.asarray(image, dtype=np.uint8)[..., :3]


def find_object(pixels: np.ndarray, color: str):
    """(mask of the pixels of `color`, or None when fewer than MIN_PIXELS match)."""
    target = np.array(COLORS[color], dtype=np.int16)
    mask = np.abs(pixels.astype(np.int16) - target).max(axis=-1) <= COLOR_TOLERANCE
    return mask if mask.sum() >= MIN_PIXELS else None


def classify_shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    return min(FILL, key=lambda name: abs(FILL[name] - fill))


def judge_image(image, objects: Sequence[ShapeSpec]) -> Dict[str, object]:
    """Checks and score of one image against the scene its prompt describes."""
    pixels = _as_uint8(image)
    height, width = pixels.shape[:2]
    checks: List[bool] = []
    found = []
    for obj in objects:
        mask = find_object(pixels, obj.color)
        checks.append(mask is not None)
        checks.append(mask is not None and classify_shape(mask) == obj.shape)
        if mask is not None:
            ys, xs = np.nonzero(mask)
            found.append(ShapeSpec(obj.shape, obj.color, (xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height, 0.0))
        else:
            found.append(None)
    if len(objects) >= 2:
        checks.append(found[0] is not None and found[1] is not None
                      and relation(found[0], found[1]) == relation(objects[0], objects[1]))
    return {"checks": checks, "score": float(np.mean(checks))}


def judge_accuracy(dataset: ShapesDataset, count: int = 200) -> float:
    """Fraction of the judge's checks that pass on the dataset's own renders (the judge's accuracy)."""
    checks = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        checks += judge_image(item["image"], item["objects"])["checks"]
    return float(np.mean(checks))


__all__ = ["judge_image", "judge_accuracy", "classify_shape", "find_object"]
