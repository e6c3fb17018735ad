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

from ..training.data import PALETTE, ShapeSpec, ShapesDataset, relation

# Fill ratio of each shape in its bounding box: a circle covers pi/4, a square all, a triangle half.
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
COLOR_TOLERANCE = 60  # max |channel difference| to count a pixel as a palette colour
MIN_PIXELS = 6
MIN_SIZE = 0.22  # the smallest object ShapesDataset draws, as a fraction of the shorter side


def _as_uint8(image) -> np.ndarray:
    """PIL image, uint8 [H, W, 3] array or float tensor [3, H, W] in [-1, 1] -> uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(1, 2, 0).cpu().numpy()
    return np.asarray(image, dtype=np.uint8)[..., :3]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a bool mask (the scattered pixels of noise form small ones)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        current += 1
        labels[start] = current
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def find_object(pixels: np.ndarray, color: str):
    """The blob of `color`: the largest connected region of pixels within COLOR_TOLERANCE of the palette colour,
    or None when it is smaller than half the smallest object the dataset draws or not compact (noise)."""
    target = np.array(PALETTE[color], dtype=np.int16)
    blob = largest_component(np.abs(pixels.astype(np.int16) - target).max(axis=-1) <= COLOR_TOLERANCE)
    smallest = 0.5 * (MIN_SIZE * min(pixels.shape[:2])) ** 2 * FILL["triangle"]
    if blob.sum() < max(MIN_PIXELS, smallest):
        return None
    ys, xs = np.nonzero(blob)
    if blob.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)) < 0.35:
        return None
    return blob


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
    return {"checks": checks, "kinds": check_kinds(objects), "score": float(np.mean(checks))}


def check_kinds(objects: Sequence[ShapeSpec]) -> List[str]:
    """What each of judge_image's checks tests: "color" (the object's colour is present), "shape" (its blob has the
    right shape) per object, then "relation" (the first two objects' relative position)."""
    return ["color", "shape"] * len(objects) + (["relation"] if len(objects) >= 2 else [])


def judge_accuracy(dataset: ShapesDataset, count: int = 200) -> float:
    """Fraction of the judge's checks that pass on the dataset's own renders (the judge's accuracy)."""
    checks = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        checks += judge_image(item["image"], item["objects"])["checks"]
    return float(np.mean(checks))


__all__ = ["judge_image", "judge_accuracy", "check_kinds", "classify_shape", "find_object"]
