"""Image quality as FID, and the guidance trade-off of paper Fig. 6b (alignment against FID over guidance weights).

FID is torchmetrics' FrechetInceptionDistance over the features of a network that maps float images [N, 3, H, W] in
[0, 1] to [N, d]. Nothing is downloaded:

- `ShapesFeatureNet`: for the shapes task, a small CNN trained in seconds on ShapesDataset renders to name their
  colours, shapes and object count (as MNIST papers compute FID with a LeNet); its penultimate layer gives 32-d
  features. Its figures are "FID (shapes-CNN features)": comparable with each other, not with published FIDs.
- `InceptionFeatures`: the standard FID network (Inception-v3 pool3, 2048-d) from a local weights file, for real data.

Alignment is the shapes judge on the shapes task; on a user's own captions (which the judge cannot read) it is the CLIP
score of `OpenCLIPScore`, an open_clip model from a local .safetensors checkpoint.
"""

import json
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._optional import missing_extra
from ..atomic_io import atomic_save_safetensors
from ..pipelines.pipeline_raphael import RaphaelPipeline
from ..training.data import COLORS, HELD_OUT_SEED, SHAPES, ShapeSpec, ShapesDataset
from .evaluate import mean_and_stderr
from .judge import judge_image

try:
    from torchmetrics.image.fid import FrechetInceptionDistance
except ImportError as error:
    raise missing_extra("torchmetrics", "eval") from error

FEATURE_NET_SEED = 20_011  # ShapesDataset seed of the feature net's training renders (not training's, not held-out)
FEATURE_NET_STEPS = 1500  # training steps of the default feature net
FEATURE_NET_SIZE = 32  # the resolution the feature net sees; other sizes are resized to it
MAX_OBJECTS = 3
GUIDANCES = (1.5, 3.0, 4.5, 6.0, 7.5, 9.0)  # paper Fig. 6b's range


def scene_attributes(objects: Sequence[ShapeSpec]) -> Tensor:
    """What the feature net learns to name: which colours and which shapes are present, and the object count
    (one-hot) -> float [len(COLORS) + len(SHAPES) + MAX_OBJECTS] of 0/1."""
    target = torch.zeros(len(COLORS) + len(SHAPES) + MAX_OBJECTS)
    for obj in objects:
        target[list(COLORS).index(obj.color)] = 1
        target[len(COLORS) + SHAPES.index(obj.shape)] = 1
    target[len(COLORS) + len(SHAPES) + len(objects) - 1] = 1
    return target


class ShapesFeatureNet(nn.Module):
    """A LeNet-sized CNN whose penultimate layer (32-d, before its ReLU) gives FID features for the shapes task;
    forward: float images [N, 3, H, W] in [0, 1] -> [N, 32]. The average pool keeps a 4 x 4 grid, so the features
    see where things are (the relations), not only what is there."""

    num_features = 32  # read by torchmetrics (no probe image needed)
    label = "shapes-CNN"
    description = ("shapes-CNN: 32-d penultimate layer of a small CNN trained on ShapesDataset renders to name their "
                   "colours, shapes and count (not Inception-v3; comparable only with other shapes-CNN FIDs)")

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(64 * 16, self.num_features))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(self.num_features, len(COLORS) + len(SHAPES) + MAX_OBJECTS))
        self.scene_accuracy: Optional[float] = None  # set by training or loading

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[-2:] != (FEATURE_NET_SIZE, FEATURE_NET_SIZE):
            x = F.interpolate(x, size=(FEATURE_NET_SIZE, FEATURE_NET_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.body(x * 2 - 1)

    def attribute_logits(self, images: Tensor) -> Tensor:
        return self.head(self(images))


def _renders(count: int, seed: int) -> tuple:
    """(images float [count, 3, 32, 32] in [0, 1], attribute targets [count, 12]) of ShapesDataset scenes."""
    data = ShapesDataset(count, FEATURE_NET_SIZE, seed=seed, max_objects=MAX_OBJECTS)
    items = [data[i] for i in range(count)]
    return (torch.stack([(item["image"] + 1) / 2 for item in items]),
            torch.stack([scene_attributes(item["objects"]) for item in items]))


def scene_accuracy(net: ShapesFeatureNet, images: Tensor, targets: Tensor) -> float:
    """Fraction of scenes whose every attribute (colours, shapes, count) the net names right."""
    with torch.no_grad():
        predicted = net.attribute_logits(images) > 0
    return float((predicted == targets.bool()).all(1).float().mean())


def train_shapes_feature_net(steps: int = FEATURE_NET_STEPS, seed: int = 0, batch: int = 64,
                             renders: int = 4096) -> ShapesFeatureNet:
    """Trains ShapesFeatureNet (half a minute on 2 CPU cores at the default steps) on `renders` ShapesDataset scenes,
    mirrored at random (a mirror image shows the same colours, shapes and count), with a fixed seed: the same
    arguments give the same net. Its scene_accuracy is measured on 512 other renders (0.96 at the defaults)."""
    images, targets = _renders(renders, FEATURE_NET_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ShapesFeatureNet()
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in tqdm(range(steps), desc="shapes feature net", unit="step"):
            pick = torch.randint(0, renders, (batch,))
            mirrored = torch.rand(batch, 1, 1, 1) < 0.5
            batch_images = torch.where(mirrored, images[pick].flip(-1), images[pick])
            loss = F.binary_cross_entropy_with_logits(net.attribute_logits(batch_images), targets[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval().requires_grad_(False)
    net.scene_accuracy = scene_accuracy(net, *_renders(512, FEATURE_NET_SEED + 1))
    return net


def shapes_feature_net(cache_dir: Optional[Union[str, Path]] = None, steps: int = FEATURE_NET_STEPS,
                       seed: int = 0) -> ShapesFeatureNet:
    """The trained ShapesFeatureNet: read from cache_dir/shapes_feature_net_s<seed>_n<steps>.safetensors when there,
    else trained (train_shapes_feature_net) and, with a cache_dir, written there atomically."""
    cached = None if cache_dir is None else Path(cache_dir) / f"shapes_feature_net_s{seed}_n{steps}.safetensors"
    if cached is not None and cached.is_file():
        net = ShapesFeatureNet()
        net.load_state_dict(load_file(str(cached)))
        with safe_open(str(cached), framework="pt") as f:
            net.scene_accuracy = float(f.metadata()["scene_accuracy"])
        return net.eval().requires_grad_(False)
    net = train_shapes_feature_net(steps=steps, seed=seed)
    if cached is not None:
        atomic_save_safetensors(net.state_dict(), cached, metadata={"scene_accuracy": str(net.scene_accuracy)})
    return net


class InceptionFeatures(nn.Module):
    """FID's standard features, Inception-v3 pool3 (2048-d), through torchmetrics' port (needs torch-fidelity), with
    the weights from a local .safetensors file. Nothing is downloaded and no pickle from outside is read: convert the
    FID port's pt_inception-2015-12-05-6726825d.pth once, on a machine you trust, with
    `safetensors.torch.save_file(torch.load(p, weights_only=True), "pt_inception.safetensors")`. (torch-fidelity
    reads weights only from a .pth path, so the tensors are handed to it through a temporary one written here.)
    forward: float images [N, 3, H, W] in [0, 1]."""

    num_features = 2048
    label = "Inception-v3"
    description = "Inception-v3 pool3 (2048-d), the standard FID features"

    def __init__(self, weights_path: Union[str, Path]):
        super().__init__()
        path = Path(weights_path)
        if path.suffix != ".safetensors" or not path.is_file():
            raise FileNotFoundError(f"InceptionFeatures: no .safetensors weights at {path}. FID's Inception-v3 weights "
                                    "are never downloaded here: convert pt_inception-2015-12-05-6726825d.pth once (see "
                                    "this class's docstring) and pass the .safetensors path")
        try:
            import torch_fidelity  # noqa: F401  (torchmetrics' Inception port is built on it)
        except ImportError as error:
            raise ImportError("InceptionFeatures needs torch-fidelity (pip install torch-fidelity); the shapes task "
                              "needs no Inception (ShapesFeatureNet)") from error
        from torchmetrics.image.fid import NoTrainInceptionV3

        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / "pt_inception.pth"
            torch.save(load_file(str(path)), copy)
            self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)],
                                                feature_extractor_weights_path=str(copy))

    def forward(self, images: Tensor) -> Tensor:
        return self.inception((images.clamp(0, 1) * 255).round().to(torch.uint8))


class OpenCLIPScore(nn.Module):
    """CLIP score as torchmetrics defines it (100 * max(cos(image, text), 0), Hessel et al. 2021), computed with the
    open_clip model `name` (e.g. "ViT-B-32") and its whole state dict from a local .safetensors file (open_clip's
    checkpoints are pickles: convert one once with safetensors.torch.save_file(torch.load(path, weights_only=True),
    ...); nothing is downloaded). forward: float images [N, 3, H, W] in [0, 1] and N prompts -> [N] scores."""

    def __init__(self, name: str, checkpoint: Union[str, Path], batch: int = 32):
        super().__init__()
        from ..models.text_encoder import _open_clip

        path = Path(checkpoint)
        if path.suffix != ".safetensors":
            raise ValueError(f"OpenCLIPScore: {path} is not a .safetensors file; pickled checkpoints are not loaded")
        open_clip = _open_clip()
        self.model = open_clip.create_model(name, pretrained=None)
        incompatible = self.model.load_state_dict(load_file(str(path)), strict=False)
        if incompatible.missing_keys or incompatible.unexpected_keys:
            raise ValueError(f"OpenCLIPScore: {path} does not hold open_clip model {name} (missing "
                             f"{incompatible.missing_keys[:3]}, unexpected {incompatible.unexpected_keys[:3]})")
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        size = preprocess["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1), persistent=False)
        self.batch = batch
        self.label = f"CLIP score ({name})"

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or len(images) != len(prompts):
            raise ValueError(f"OpenCLIPScore: expected images [N, 3, H, W] and N prompts, got {tuple(images.shape)} "
                             f"and {len(prompts)} prompts")
        scores = []
        for start in range(0, len(images), self.batch):
            # open_clip resizes the short side and centre-crops: on square images that is this resize
            x = F.interpolate(images[start : start + self.batch].float(), size=self.image_size, mode="bicubic",
                              align_corners=False, antialias=True).clamp(0, 1)
            image = F.normalize(self.model.encode_image((x - self.mean) / self.std), dim=-1)
            tokens = self.tokenizer(list(prompts[start : start + self.batch]))
            text = F.normalize(self.model.encode_text(tokens), dim=-1)
            scores.append(100 * (image * text).sum(-1).clamp_min(0))
        return torch.cat(scores) if scores else images.new_zeros(0)


def frechet_distance(real: Tensor, fake: Tensor, feature: nn.Module, batch: int = 256) -> float:
    """FID between two sets: torchmetrics' FrechetInceptionDistance with `feature` as its network (real and fake are
    what it takes: float images [N, 3, H, W] in [0, 1] for the feature nets here). Each set needs 2 or more items;
    with fewer items than feature dimensions the covariances are singular and FID is biased upward, so compare FIDs
    only at equal counts."""
    metric = FrechetInceptionDistance(feature=feature, normalize=True)
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for start in range(0, len(images), batch):
                metric.update(images[start : start + batch], real=is_real)
        return float(metric.compute())


def _generate(pipe: RaphaelPipeline, captions: List[str], steps: int, guidance_scale: float,
              batch: int) -> np.ndarray:
    """uint8 [N, H, W, 3] images for the captions, seeded per batch as evaluate() seeds them (the same prompts, noise
    and pixels as its PIL images, so the judge gives the same scores)."""
    images = []
    for start in range(0, len(captions), batch):
        images.append(pipe(captions[start : start + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                           generator=torch.Generator().manual_seed(start), output_type="np").images)
    return (np.concatenate(images) * 255).round().astype(np.uint8)


def _as_float(images: np.ndarray) -> Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def load_images(folder: Union[str, Path], size: int = 299, files: Optional[Sequence[Path]] = None) -> Tensor:
    """The images of a folder (png, jpg, jpeg, webp; or those `files`) as float [N, 3, size, size] in [0, 1], each
    resized to cover the square and centre-cropped: real images to compute FID against."""
    from PIL import Image

    from ..training.data import FolderDataset, fit_image

    if files is None:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in FolderDataset.EXTENSIONS)
    if len(files) < 2:
        raise ValueError(f"load_images: FID needs at least 2 images, found {len(files)} in {folder}")
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append((fit_image(image, size, size) + 1) / 2)
    return torch.stack(images)


def guidance_sweep(pipe: RaphaelPipeline, out_dir: Union[str, Path], guidances: Sequence[float] = GUIDANCES,
                   count: int = 64, steps: int = 25, real_images: Optional[Tensor] = None,
                   feature: Optional[nn.Module] = None, feature_cache: Optional[Union[str, Path]] = None,
                   batch: int = 16, prompts: Optional[Sequence[str]] = None,
                   clip_score: Optional[OpenCLIPScore] = None) -> Dict[str, object]:
    """Paper Fig. 6b in miniature: for each guidance weight, the `count` held-out shapes prompts are sampled once and
    scored twice: alignment (the judge; the same figure as evaluate() gives at that count, steps and guidance) and FID
    against real_images (float [N, 3, H, W] in [0, 1]; default: the held-out renders of the same prompts).

    feature: the FID network (e.g. InceptionFeatures(path)); default the shapes feature net (shapes_feature_net,
    cached in feature_cache when given). fid_floor is the FID between the held-out renders and `count` other renders:
    what a perfect generator scores at this count (FID is biased upward at small counts); null with real_images.
    On a user's data, `prompts` (e.g. its captions; the first `count`) replace the shapes prompts, the judge gives way
    to `clip_score` (required then) and real_images (the data's images) to compute FID against are required too.
    clip_score with the shapes prompts adds a CLIP score beside the judge's alignment.

    Writes out_dir/guidance_sweep.json ({"points": [{guidance, alignment, alignment_stderr, clip_score,
    clip_score_stderr, fid}], ...}; alignment only for shapes prompts, clip_score only with clip_score) and
    out_dir/guidance_sweep.png (alignment, or CLIP score without it, against FID, each point labelled)."""
    if prompts is not None and (clip_score is None or real_images is None):
        raise ValueError("guidance_sweep: prompts of your own need clip_score (the judge reads only shapes prompts) "
                         "and real_images to compute FID against")
    count = count if prompts is None else min(count, len(prompts))
    if count < 2:
        raise ValueError(f"guidance_sweep: count must be >= 2 (FID and a standard error need two), got {count}")
    floor, scenes = None, None
    if prompts is None:
        size = pipe.unet.config.sample_size * pipe.vae_stride
        held_out = ShapesDataset(count, size, seed=HELD_OUT_SEED)
        items = [held_out[i] for i in range(count)]
        captions, scenes = [item["caption"] for item in items], [item["objects"] for item in items]
        renders = torch.stack([(item["image"] + 1) / 2 for item in items])
    else:
        captions = list(prompts[:count])
    feature = shapes_feature_net(feature_cache) if feature is None else feature
    if real_images is None:
        others = ShapesDataset(count, size, seed=HELD_OUT_SEED + 1)
        floor = frechet_distance(renders, torch.stack([(others[i]["image"] + 1) / 2 for i in range(count)]), feature)
    reference = renders if real_images is None else real_images
    pipe.set_progress_bar_config(disable=True)
    points = []
    for guidance in tqdm(guidances, desc="guidance sweep", unit="weight"):
        images = _generate(pipe, captions, steps, guidance, batch)
        fake = _as_float(images)
        point = {"guidance": float(guidance)}
        if scenes is not None:
            judged = [judge_image(image, scene)["score"] for image, scene in zip(images, scenes)]
            point.update(mean_and_stderr("alignment", judged))
        if clip_score is not None:
            point.update(mean_and_stderr("clip_score", clip_score(fake, captions).tolist()))
        point["fid"] = frechet_distance(reference, fake, feature)
        points.append(point)
    report = {"points": points, "fid_features": feature.description, "fid_floor": floor,
              "feature_net_scene_accuracy": getattr(feature, "scene_accuracy", None),
              "clip_score_model": None if clip_score is None else clip_score.label,
              "prompt_source": "held-out shapes prompts" if prompts is None else "prompts given",
              "reference": "held-out renders of the prompts" if real_images is None
              else f"real_images ({len(real_images)})", "prompts": count, "sampling_steps": steps}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "guidance_sweep.json").write_text(json.dumps(report, indent=1))
    plot_tradeoff(report, out_dir / "guidance_sweep.png", getattr(feature, "label", type(feature).__name__))
    return report


def plot_tradeoff(report: Dict[str, object], out: Union[str, Path], feature_label: str) -> Path:
    """Alignment (x) against FID (y), one point per guidance weight in sweep order, each labelled; the FID floor
    dashed when known."""
    from ..plotting import subplots

    points = report["points"]
    x = "alignment" if "alignment" in points[0] else "clip_score"
    fig, ax = subplots(figsize=(4.8, 3.6))
    ax.errorbar([p[x] for p in points], [p["fid"] for p in points], xerr=[p[f"{x}_stderr"] for p in points],
                marker="o", capsize=2)
    for p in points:
        ax.annotate(f"{p['guidance']:g}", (p[x], p["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if report["fid_floor"] is not None:
        ax.axhline(report["fid_floor"], color="gray", linestyle="--", lw=1, label="real vs real renders")
        ax.legend(fontsize=8)
    ax.set_xlabel("alignment (shapes judge)" if x == "alignment" else report["clip_score_model"])
    ax.set_ylabel(f"FID ({feature_label} features)")
    ax.set_title(f"guidance trade-off ({report['prompts']} prompts, {report['sampling_steps']} steps)", fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


__all__ = ["FEATURE_NET_SEED", "FEATURE_NET_STEPS", "GUIDANCES", "InceptionFeatures", "OpenCLIPScore",
           "ShapesFeatureNet", "frechet_distance", "guidance_sweep", "plot_tradeoff", "scene_accuracy",
           "scene_attributes", "shapes_feature_net", "train_shapes_feature_net"]
