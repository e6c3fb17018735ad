"""Training data: `ShapesDataset`, a procedural text-to-image set whose captions can be checked from the pixels
(1-3 coloured shapes with their relative position), and `FolderDataset` for real image + caption folders.

ShapesDataset is deterministic: item i depends only on (seed, i, size), so any bucket size renders the same
scene. Besides the image it returns the exact edge map and a mask per object, which is what edge supervision
and the alignment judge need.
"""

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (150, 60, 190), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
# Colours no ShapesDataset scene has by default: new words for a LoRA to teach (evaluation/extensions.py).
EXTRA_COLORS: Dict[str, Tuple[int, int, int]] = {"orange": (245, 140, 20)}
PALETTE = {**COLORS, **EXTRA_COLORS}  # every colour a scene may use, by name
BACKGROUND = (40, 40, 40)
RELATIONS = ("to the left of", "to the right of", "above", "below")
HELD_OUT_SEED = 10_007  # ShapesDataset seed of evaluation's held-out scenes (training uses seed 0 by default)


@dataclass
class ShapeSpec:
    """One object: its shape, colour name, centre (fractions of width and height) and size (fraction of the
    shorter side: the circle's diameter, the square's side, the triangle's height)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float


def relation(a: ShapeSpec, b: ShapeSpec) -> str:
    """Where a is relative to b, along the axis on which their centres differ most."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def caption(objects: Sequence[ShapeSpec]) -> str:
    names = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape}" for o in objects]
    if len(objects) == 1:
        return names[0]
    if len(objects) == 2:
        return f"{names[0]} {relation(objects[0], objects[1])} {names[1]}"
    return f"{names[0]} {relation(objects[0], objects[1])} {names[1]}, and {names[2]}"


def sample_scene(rng: random.Random, max_objects: int = 3, colors: Sequence[str] = tuple(COLORS),
                 first_color: Optional[str] = None) -> List[ShapeSpec]:
    """1..max_objects objects of distinct colours inside the image, centres at least 0.4 apart along some axis:
    with sizes <= 0.38 they never overlap, and the relation in the caption is unambiguous."""
    count = rng.randint(1, max_objects)
    if first_color is None:
        colors = rng.sample(sorted(colors), count)
    else:  # the first object in first_color (a scene that teaches that word), the others from `colors`
        colors = [first_color] + rng.sample(sorted(c for c in colors if c != first_color), count - 1)
    while True:  # rejection sampling; a layout with no room left for the next object starts over
        objects: List[ShapeSpec] = []
        for _ in range(50 * count):
            size = rng.uniform(0.22, 0.38)
            margin = size / 2 + 0.02
            spec = ShapeSpec(rng.choice(SHAPES), colors[len(objects)], rng.uniform(margin, 1 - margin),
                             rng.uniform(margin, 1 - margin), size)
            if all(max(abs(spec.cx - o.cx), abs(spec.cy - o.cy)) > 0.4 for o in objects):
                objects.append(spec)
                if len(objects) == count:
                    return objects


def shape_mask(spec: ShapeSpec, height: int, width: int) -> np.ndarray:
    """Exact coverage of pixel centres by the shape (bool [H, W])."""
    unit = min(height, width)
    ys, xs = np.mgrid[0:height, 0:width]
    x = (xs + 0.5 - spec.cx * width) / unit  # shape-local coordinates in units of the shorter side
    y = (ys + 0.5 - spec.cy * height) / unit
    half = spec.size / 2
    if spec.shape == "circle":
        return x * x + y * y <= half * half
    if spec.shape == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    # upright isosceles triangle of height `size` and base `size`, centred on its bounding box
    inside_y = (y >= -half) & (y <= half)
    return inside_y & (np.abs(x) <= (y + half) / 2)


def render(objects: Sequence[ShapeSpec], height: int, width: int):
    """(image uint8 [H, W, 3], visible object masks bool [n, H, W], edges bool [H, W]); later objects on top."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    owner = np.full((height, width), -1, dtype=np.int64)
    for i, spec in enumerate(objects):
        covered = shape_mask(spec, height, width)
        image[covered] = PALETTE[spec.color]
        owner[covered] = i
    masks = np.stack([owner == i for i in range(len(objects))]) if objects else np.zeros((0, height, width), bool)
    edges = np.zeros((height, width), dtype=bool)  # a pixel whose 4-neighbour belongs to another region
    edges[:, 1:] |= owner[:, 1:] != owner[:, :-1]
    edges[:, :-1] |= owner[:, :-1] != owner[:, 1:]
    edges[1:, :] |= owner[1:, :] != owner[:-1, :]
    edges[:-1, :] |= owner[:-1, :] != owner[1:, :]
    return image, masks, edges


class ShapesDataset(Dataset):
    """`length` procedural scenes. item -> dict(image [3, H, W] in [-1, 1], edges [1, H, W] in {0, 1},
    masks [3, H, W] (visible part of each object, zero rows for absent ones), caption, objects).

    first_color (e.g. "orange", from EXTRA_COLORS) puts the first object of every scene in that colour: data that
    teaches a new colour word."""

    def __init__(self, length: int = 10000, size: Union[int, Tuple[int, int]] = 32, seed: int = 0,
                 max_objects: int = 3, first_color: Optional[str] = None):
        if first_color is not None and first_color not in PALETTE:
            raise ValueError(f"ShapesDataset: first_color must be one of {sorted(PALETTE)}, got {first_color!r}")
        self.length = length
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.seed = seed
        self.max_objects = max_objects
        self.first_color = first_color

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> List[ShapeSpec]:
        if not 0 <= index < self.length:
            raise IndexError(f"ShapesDataset: index {index} out of range [0, {self.length})")
        return sample_scene(random.Random(f"{self.seed}:{index}"), self.max_objects, first_color=self.first_color)

    def item(self, index: int, height: int, width: int) -> dict:
        """Item `index` rendered at height x width (what a bucket sampler asks for)."""
        objects = self.scene(index)
        image, masks, edges = render(objects, height, width)
        padded = np.zeros((self.max_objects, height, width), dtype=bool)
        padded[: len(objects)] = masks
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0,
            "edges": torch.from_numpy(edges)[None].float(),
            "masks": torch.from_numpy(padded).float(),
            "caption": caption(objects),
            "objects": objects,
        }

    def __getitem__(self, index: Union[int, Tuple[int, int, int]]) -> dict:
        if isinstance(index, tuple):  # (index, height, width) from a bucket sampler
            return self.item(*index)
        return self.item(index, *self.size)


def fit_pixels(image: Image.Image, height: int, width: int) -> Tensor:
    """An RGB image resized (bicubic) to cover height x width and centre-cropped to it, as uint8 [3, H, W] (a quarter
    of the float tensor's bytes, for data-loader workers to send)."""
    image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    image = image.resize((max(width, math.ceil(image.width * scale)), max(height, math.ceil(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def pixels_to_unit_range(pixels: Tensor) -> Tensor:
    """uint8 pixels (CPU) -> float32 in [-1, 1], the range the models are trained on (x / 127.5 - 1, each step rounded
    as in float32 torch). In numpy, single-threaded: ATen shares out even this small op among its threads, and in the
    trainer's process, with data-loader workers on every core, its second thread waits for a core (on 2 cores with
    2 workers a batch of 16 x 3 x 128 x 128 took 8 ms of the process's time this way, against 0.3)."""
    scaled = np.divide(pixels.numpy(), np.float32(127.5), dtype=np.float32)
    return torch.from_numpy(np.subtract(scaled, np.float32(1.0), out=scaled))


def fit_image(image: Image.Image, height: int, width: int) -> Tensor:
    """fit_pixels as float32 [3, H, W] in [-1, 1]."""
    return pixels_to_unit_range(fit_pixels(image, height, width))


def load_image(data: Union[Path, bytes], min_size: int) -> Tuple[Optional[Image.Image], Optional[str]]:
    """(the decoded image, None), or (None, why it cannot be used): unreadable, truncated, or shorter side below
    min_size. Every pixel is decoded, so a truncated file fails here and not later in training."""
    image = None
    try:
        image = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        if image is not None:
            image.close()
        return None, f"unreadable image ({type(error).__name__}: {str(error)[:80]})"
    if min(image.size) < min_size:
        image.close()
        return None, f"too small ({image.width}x{image.height} < {min_size} px)"
    return image, None


def check_image(data: Union[Path, bytes], min_size: int) -> Optional[str]:
    """Why an image cannot be used (None if it can); see load_image."""
    image, reason = load_image(data, min_size)
    if image is not None:
        image.close()
    return reason


class FolderDataset(Dataset):
    """Images with same-name .txt captions in a folder (png/jpg/jpeg/webp), resized and centre-cropped to the requested
    size; edges come from `raphael_ext.models.edges.sobel_edges` at training time.

    The folder is scanned once when the dataset is made: every image is decoded and its caption read, and the pairs
    that cannot be used are set aside with the reason (`skipped`: unreadable or truncated image, missing or empty
    caption, shorter side below `min_size`, default half the training size). A file that fails later (changed on
    disk) raises from __getitem__; the trainer then takes the next item and counts the failure in its log.

    `scan` takes the result of another dataset's `scan()` on the same folder instead of scanning again: one rank
    decodes the folder and shares that small list with the others (torch.distributed.broadcast_object_list)."""

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

    def __init__(self, folder: Union[str, Path], size: Union[int, Tuple[int, int]] = 256,
                 min_size: Optional[int] = None, scan: Optional[dict] = None):
        self.folder = Path(folder)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        min_size = min(self.size) // 2 if min_size is None else min_size
        if not self.folder.is_dir():
            raise ValueError(f"FolderDataset: {self.folder} is not a folder")
        self.files: List[Path] = []
        self.captions: List[str] = []
        self.skipped: List[Tuple[str, str]] = []  # (file name, reason)
        if scan is not None:
            self.files = [self.folder / name for name in scan["files"]]
            self.captions = list(scan["captions"])
            self.skipped = [tuple(entry) for entry in scan["skipped"]]
        else:
            self._scan(min_size)
        if not self.files:
            raise ValueError(f"FolderDataset: no usable image with a same-name .txt caption in {self.folder} "
                             f"({len(self.skipped)} skipped: {self.skipped[:3]})")

    def _scan(self, min_size: int) -> None:
        for path in sorted(p for p in self.folder.iterdir() if p.suffix.lower() in self.EXTENSIONS):
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text(errors="replace").strip() if caption_file.is_file() else None
            reason = ("missing caption (.txt)" if caption is None else "empty caption" if not caption
                      else check_image(path, min_size))
            if reason is None:
                self.files.append(path)
                self.captions.append(caption)
            else:
                self.skipped.append((path.name, reason))

    def scan(self) -> dict:
        """What the scan found, as plain lists (file names relative to the folder): the `scan` argument of another
        FolderDataset on the same folder."""
        return {"files": [path.name for path in self.files], "captions": list(self.captions),
                "skipped": [list(entry) for entry in self.skipped]}

    def summary(self) -> dict:
        """What the scan found: usable pairs and skipped files by reason (for the training log)."""
        reasons: Dict[str, int] = {}
        for _, reason in self.skipped:
            key = reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        return {"usable": len(self.files), "skipped": len(self.skipped), "skipped_by_reason": reasons,
                "skipped_files": self.skipped[:20]}

    def __len__(self) -> int:
        return len(self.files)

    def item(self, index: int, height: int, width: int) -> dict:
        with Image.open(self.files[index]) as image:
            return {"image": fit_image(image, height, width), "caption": self.captions[index]}

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return self.item(*index)
        return self.item(index, *self.size)


__all__ = ["COLORS", "EXTRA_COLORS", "PALETTE", "HELD_OUT_SEED", "SHAPES", "ShapeSpec", "ShapesDataset",
           "FolderDataset", "caption", "relation", "render",
           "sample_scene", "shape_mask", "fit_image", "fit_pixels", "pixels_to_unit_range", "check_image", "load_image"]
