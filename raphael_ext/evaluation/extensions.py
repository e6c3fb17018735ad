"""The paper's extensions (§7.8) shown on a CPU with the demo's pipeline: a LoRA that teaches the model a colour word
it has never seen, and a canny ControlNet that puts the shapes where the edges of a control image are. Each trains
from a pipeline folder (e.g. runs/demo/pipeline) through the trainer, then measures what changed and draws it:

    python -m raphael_ext demo-lora --pipeline runs/demo/pipeline --out runs/lora_demo
    python -m raphael_ext demo-controlnet --pipeline runs/demo/pipeline --out runs/controlnet_demo
"""

import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

from ..models.edges import canny_edges
from ..pipelines.grid import image_grid
from ..pipelines.pipeline_raphael import RaphaelPipeline
from ..training.data import BACKGROUND, HELD_OUT_SEED, ShapesDataset, render
from ..training.trainer import TrainConfig, Trainer
from .evaluate import mean_and_stderr
from .judge import find_object, judge_image


def _pipeline(folder: Path) -> RaphaelPipeline:
    pipe = RaphaelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe: RaphaelPipeline, captions: List[str], steps: int, guidance: float, batch: int = 16,
            **kwargs) -> List[Image.Image]:
    """Images for captions, seeded per batch (the same prompt gets the same noise in every pipeline)."""
    images = []
    for start in range(0, len(captions), batch):
        extra = {k: (v[start : start + batch] if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        images += pipe(captions[start : start + batch], num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(start), **extra).images
    return images


def _score(images, items) -> Dict[str, float]:
    return mean_and_stderr("alignment", [judge_image(image, item["objects"])["score"]
                                         for image, item in zip(images, items)])


def lora_demonstration(pipeline: Path, out: Path, color: str = "orange", steps: int = 300, rank: int = 8,
                       count: int = 32, sampling_steps: int = 25, guidance: float = 4.5,
                       data_size: int = 1000) -> Dict[str, object]:
    """Trains a rank-`rank` LoRA (attention and expert FFNs) on scenes whose first object is `color`, a word the base
    never saw, written as an image folder with captions (the real-data path). Scores held-out `color` prompts and the
    usual held-out prompts with the judge, without and with the adapter; writes lora/ (the adapter alone),
    lora_samples.png (rows: base, LoRA) and lora.json."""
    started = time.time()
    out = Path(out)
    base = _pipeline(pipeline)
    size = base.unet.config.sample_size * base.vae_stride
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    teaching = ShapesDataset(data_size, size, seed=1, first_color=color)
    for i in range(data_size):
        item = teaching[i]
        pixels = ((item["image"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(data / f"{i:05d}.png")
        (data / f"{i:05d}.txt").write_text(item["caption"])
    config = TrainConfig(data=str(data), out=str(out / "run"), init_from=str(pipeline), lora_rank=rank,
                         lora_experts=True, steps=steps, batch_size=16, lr=1e-3, warmup_steps=20, multiscale=False,
                         log_every=10, checkpoint_every=0, caption_dropout=0.1, overwrite=True)
    Trainer(config).train()
    trained = time.time() - started

    new_word = ShapesDataset(count, size, seed=HELD_OUT_SEED, first_color=color)
    usual = ShapesDataset(count, size, seed=HELD_OUT_SEED)
    results = {}
    adapted = _pipeline(pipeline)
    adapted.load_lora_weights(out / "run" / "lora")
    for name, pipe in (("base", base), ("lora", adapted)):
        for prompts_name, dataset in ((f"{color}_prompts", new_word), ("usual_prompts", usual)):
            items = [dataset[i] for i in range(count)]
            images = _sample(pipe, [it["caption"] for it in items], sampling_steps, guidance)
            results[f"{name}/{prompts_name}"] = _score(images, items)
            if prompts_name != "usual_prompts":
                results[f"{name}/{color}_found"] = float(np.mean([find_object(np.asarray(im), color) is not None
                                                                  for im in images]))
                if name == "base":
                    base_images = images
                else:
                    captions = [it["caption"] for it in items[:8]]
                    sheet = image_grid(base_images[:8] + images[:8], captions + captions, columns=8)
                    sheet.save(out / "lora_samples.png")
    report = {"color": color, "rank": rank, "train_steps": steps, "train_seconds": round(trained, 1),
              "prompts": count,
              "adapter_bytes": (out / "run" / "lora" / "pytorch_lora_weights.safetensors").stat().st_size,
              **{k: (round(v, 4) if isinstance(v, float) else {kk: round(vv, 4) for kk, vv in v.items()})
                 for k, v in results.items()}}
    (out / "lora.json").write_text(json.dumps(report, indent=1))
    return report


def placement(image, objects, size) -> Dict[str, float]:
    """How well an image's shapes sit where a scene's are: IoU of the foreground (pixels away from the background
    colour) with the scene's objects, and the mean IoU of each object's colour blob with that object."""
    pixels = np.asarray(image, dtype=np.int16)
    _, masks, _ = render(objects, size, size)
    foreground = np.abs(pixels - np.array(BACKGROUND, dtype=np.int16)).max(axis=-1) > 60
    truth = masks.any(axis=0)
    fg_iou = (foreground & truth).sum() / max(1, (foreground | truth).sum())
    object_ious = []
    for obj, mask in zip(objects, masks):
        blob = find_object(np.asarray(image), obj.color)
        blob = np.zeros_like(mask) if blob is None else blob
        object_ious.append((blob & mask).sum() / max(1, (blob | mask).sum()))
    return {"foreground_iou": float(fg_iou), "object_iou": float(np.mean(object_ious))}


def controlnet_demonstration(pipeline: Path, out: Path, steps: int = 300, count: int = 32, sampling_steps: int = 25,
                             guidance: float = 4.5) -> Dict[str, object]:
    """Trains a canny ControlNet on shapes from the pipeline (frozen), then draws held-out prompts with the Canny edges
    of their own scene as the control image, with the ControlNet at scale 0 (the base) and 1; measures where the shapes
    land (placement()) and the judge's alignment; writes controlnet/, controlnet_samples.png (rows: control edges,
    scale 0, scale 1) and controlnet.json."""
    started = time.time()
    out = Path(out)
    config = TrainConfig(out=str(out / "run"), init_from=str(pipeline), controlnet="canny", steps=steps,
                         batch_size=16, lr=1e-3, warmup_steps=20, ema_decay=0.99, ema_warmup=False, log_every=10,
                         checkpoint_every=0,
                         overwrite=True)
    Trainer(config).train()
    trained = time.time() - started
    pipe = _pipeline(out / "run" / "pipeline")
    size = pipe.unet.config.sample_size * pipe.vae_stride
    held_out = ShapesDataset(count, size, seed=HELD_OUT_SEED)
    items = [held_out[i] for i in range(count)]
    captions = [it["caption"] for it in items]
    control = torch.stack([(it["image"] + 1) / 2 for it in items])
    results, rows = {}, {}
    for scale in (0.0, 1.0):
        images = _sample(pipe, captions, sampling_steps, guidance, control_image=control,
                         controlnet_conditioning_scale=scale)
        measured = [placement(im, it["objects"], size) for im, it in zip(images, items)]
        results[f"scale_{scale:g}"] = {**_score(images, items),
                                       **{k: float(np.mean([m[k] for m in measured])) for k in measured[0]}}
        rows[scale] = images[:8]
    edges = canny_edges(control[:8])
    edge_images = [Image.fromarray((e[0].numpy() * 255).astype(np.uint8)).convert("RGB") for e in edges]
    image_grid(edge_images + rows[0.0] + rows[1.0], captions[:8] * 3, columns=8).save(out / "controlnet_samples.png")
    report = {"train_steps": steps, "train_seconds": round(trained, 1), "prompts": count,
              **{k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in results.items()}}
    (out / "controlnet.json").write_text(json.dumps(report, indent=1))
    return report


__all__ = ["controlnet_demonstration", "lora_demonstration", "placement"]
