"""Text-image alignment of a pipeline on held-out shapes prompts, scored by the judge (evaluation/judge.py)."""

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image

from ..pipelines.grid import image_grid
from ..pipelines.pipeline_raphael import RaphaelPipeline
from ..training.data import HELD_OUT_SEED, ShapesDataset
from .judge import judge_accuracy, judge_image


def mean_and_stderr(name: str, scores: Sequence[float]) -> Dict[str, float]:
    """{name: mean, name_stderr: standard error of the mean} of per-prompt scores (two or more)."""
    return {name: float(np.mean(scores)), f"{name}_stderr": float(np.std(scores, ddof=1) / np.sqrt(len(scores)))}


def evaluate(pipe: RaphaelPipeline, out: Path, count: int = 64, steps: int = 50, guidance_scale: float = 4.5,
             batch: int = 16, prompt_seed: int = HELD_OUT_SEED) -> Dict[str, float]:
    """Generates `count` held-out prompts, scores them with the judge, writes samples.png and eval.json. prompt_seed:
    the ShapesDataset seed of the prompts (another seed than HELD_OUT_SEED gives a tuning set for recipe searches,
    so the demo's test prompts are not the ones a recipe is picked on)."""
    if count < 2:
        raise ValueError(f"evaluate: count must be >= 2 (a chance level and a standard error need two), got {count}")
    size = pipe.unet.config.sample_size * pipe.vae_stride
    held_out = ShapesDataset(count, size, seed=prompt_seed)
    items = [held_out[i] for i in range(count)]  # rendered once: captions, scenes and the chance level's images
    scenes = [item["objects"] for item in items]
    captions = [item["caption"] for item in items]
    images: List[Image.Image] = []
    pipe.set_progress_bar_config(disable=True)
    for start in range(0, count, batch):  # seeded per batch: the same prompts get the same noise at any batch size
        images += pipe(captions[start : start + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=torch.Generator().manual_seed(start)).images
    verdicts = [judge_image(image, scene) for image, scene in zip(images, scenes)]
    scores = [verdict["score"] for verdict in verdicts]
    passed: Dict[str, List[bool]] = {}
    for verdict in verdicts:
        for kind, check in zip(verdict["kinds"], verdict["checks"]):
            passed.setdefault(kind, []).append(check)
    # Chance level: exact renders of the wrong prompt (the next one) pass some checks, as clean shapes that ignore
    # the prompt would; a model aligns with the text only as far as it scores above this.
    mismatched = [judge_image(items[(i + 1) % count]["image"], scenes[i])["score"] for i in range(count)]
    metrics = {**mean_and_stderr("alignment", scores),
               "chance_alignment": float(np.mean(mismatched)),
               # where the misses are: the fraction of each kind of check passed (colour present, shape, relation)
               "checks_passed": {kind: float(np.mean(checks)) for kind, checks in passed.items()},
               "judge_accuracy_on_renders": judge_accuracy(held_out, count), "prompts": count,
               "sampling_steps": steps, "guidance_scale": guidance_scale}
    out.mkdir(parents=True, exist_ok=True)
    image_grid(images[:16], captions[:16]).save(out / "samples.png")
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    return metrics


__all__ = ["evaluate", "mean_and_stderr"]
