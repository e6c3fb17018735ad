"""Text-image alignment on held-out shapes prompts (scored by raphael_ext.judge) and the CPU demo run."""

import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

from .data import ShapesDataset
from .judge import judge_accuracy, judge_image
from .paths import plot_attention_maps, plot_space_paths, plot_time_experts
from .pipeline import RaphaelPipeline

HELD_OUT_SEED = 10_007  # training uses seed 0: a different stream of scenes
DEMO_STEPS = 400  # about 8 minutes of training and evaluation on 2 CPU cores, inside the 10-minute budget


def grid(images: List[Image.Image], captions: List[str], columns: int = 4, scale: int = 4) -> Image.Image:
    """Images (upscaled, nearest) with their captions under them."""
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    cell_h = h + 28
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate(zip(images, captions)):
        x, y = (i % columns) * w, (i // columns) * cell_h
        sheet.paste(image.resize((w, h), Image.NEAREST), (x, y))
        words, line, lines = text.split(), "", []
        for word in words:
            if len(line) + len(word) > w // 6:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        draw.text((x + 2, y + h + 1), "\n".join(lines[:2]), fill="black")
    return sheet


def evaluate(pipe: RaphaelPipeline, out: Path, count: int = 64, steps: int = 50, guidance_scale: float = 4.5,
             batch: int = 16) -> Dict[str, float]:
    """Generates `count` held-out prompts, scores them with the judge, writes samples.png and eval.json."""
    if count < 2:
        raise ValueError(f"evaluate: count must be >= 2 (a chance level and a standard error need two), got {count}")
    size = pipe.unet.config.sample_size * pipe.vae_stride
    held_out = ShapesDataset(count, size, seed=HELD_OUT_SEED)
    items = [held_out[i] for i in range(count)]  # rendered once: captions, scenes and the chance level's images
    scenes = [item["objects"] for item in items]
    captions = [item["caption"] for item in items]
    images: List[Image.Image] = []
    for start in range(0, count, batch):
        images += pipe(captions[start : start + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                       seed=start, progress=False).images
    scores = [judge_image(image, scene)["score"] for image, scene in zip(images, scenes)]
    # Chance level: exact renders of the wrong prompt (the next one) pass some checks, as clean shapes that ignore
    # the prompt would; a model aligns with the text only as far as it scores above this.
    mismatched = [judge_image(items[(i + 1) % count]["image"], scenes[i])["score"] for i in range(count)]
    metrics = {"alignment": float(np.mean(scores)),
               "alignment_stderr": float(np.std(scores, ddof=1) / np.sqrt(count)),
               "chance_alignment": float(np.mean(mismatched)),
               "judge_accuracy_on_renders": judge_accuracy(held_out, count), "prompts": count,
               "sampling_steps": steps, "guidance_scale": guidance_scale}
    out.mkdir(parents=True, exist_ok=True)
    grid(images[:16], captions[:16]).save(out / "samples.png")
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def demo(out: Path, steps: int = DEMO_STEPS, use_space_moe: bool = True) -> Dict[str, object]:
    """Trains the tiny preset on shapes (CPU, minutes), then writes samples.png (held-out prompts), paths.png
    (space routes), time_experts.png, attention.png and metrics.json (alignment score, loss curve) into `out`.
    A few minutes of training need another recipe than the paper's: the model predicts x0 rather than the noise
    (an undertrained noise predictor leaves grain all over the image, an undertrained x0 predictor only blurs
    it), with a 10x learning rate (1e-3; 2e-3 diverges) and a fast EMA; see README, "The demo run"."""
    from .train import TrainConfig, Trainer

    started = time.time()
    model = {"prediction_type": "sample", **({} if use_space_moe else {"use_space_moe": False})}
    config = TrainConfig(preset="tiny", out=str(out), steps=steps, batch_size=16, lr=1e-3, warmup_steps=50,
                         ema_decay=0.99, checkpoint_every=0, log_every=10, model=model)
    trainer = Trainer(config)
    history = trainer.train()
    trained = time.time() - started
    pipe = RaphaelPipeline(trainer.ema, trainer.text_encoder)
    metrics = evaluate(pipe, out, count=64, steps=25)
    prompt = ShapesDataset(1, trainer.model_config.sample_size, seed=HELD_OUT_SEED + 1)[0]["caption"]
    paths = pipe([prompt], num_inference_steps=25, seed=0, record_paths=True, progress=False).paths
    if use_space_moe:
        plot_space_paths(paths, out / "paths.png")
    plot_time_experts(paths, out / "time_experts.png")
    plot_attention_maps(paths, out / "attention.png")
    result = {**metrics, "space_moe": use_space_moe, "train_steps": steps, "train_seconds": round(trained, 1),
              "total_seconds": round(time.time() - started, 1), "paths_prompt": prompt,
              "loss_curve": [round(r["loss"], 5) for r in history]}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    _plot_loss(history, out / "loss.png")
    return result


def _plot_loss(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for key in ("loss", "denoise", "edge"):
        if key in history[0]:
            ax.plot([r["step"] for r in history], [r[key] for r in history], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["evaluate", "demo", "grid", "HELD_OUT_SEED", "DEMO_STEPS"]
