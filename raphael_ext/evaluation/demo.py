"""The CPU demo (`make demo`): train the tiny preset on shapes for a few minutes, then sample, score and draw it; and the
ablation (`make ablation`): the same budget with and without space-MoE."""

import json
import time
from pathlib import Path
from typing import Dict

import torch

from ..pipelines.paths import plot_attention_maps, plot_space_paths, plot_time_experts
from ..training.data import HELD_OUT_SEED, ShapesDataset
from ..training.trainer import TrainConfig, Trainer
from .evaluate import evaluate

DEMO_STEPS = 400  # about 8 minutes of training and evaluation on 2 CPU cores, inside the 10-minute budget
# The demo's recipe (TrainConfig fields; "model" holds RaphaelUNet overrides of the tiny preset); README, "The demo run",
# says why each differs from the paper's, and scripts/demo_recipes.py searched it.
DEMO_RECIPE = {"batch_size": 16, "lr": 1e-3, "warmup_steps": 50, "ema_decay": 0.99,
               "model": {"prediction_type": "sample"}}


def demo_config(out: Path, steps: int, **overrides) -> TrainConfig:
    """The demo's TrainConfig: DEMO_RECIPE with `overrides` (a "model" override is merged into the recipe's)."""
    recipe = {**DEMO_RECIPE, **overrides, "model": {**DEMO_RECIPE["model"], **overrides.get("model", {})}}
    return TrainConfig(preset="tiny", out=str(out), steps=steps, checkpoint_every=0, log_every=10, **recipe)


def demo(out: Path, steps: int = DEMO_STEPS, use_space_moe: bool = True) -> Dict[str, object]:
    """Trains the tiny preset on shapes (CPU, minutes), then writes into `out`: pipeline/ (the EMA weights), samples.png
    (held-out prompts), paths.png (space routes), time_experts.png, attention.png, loss.png and metrics.json (alignment
    score with its chance level, loss curve, times). A few minutes of training need another recipe than the paper's:
    the model predicts x0 rather than the noise (an undertrained noise predictor leaves grain all over the image, an
    undertrained x0 predictor only blurs it), with a 10x learning rate (1e-3; 2e-3 diverges) and a fast EMA; see
    README, "The demo run"."""
    started = time.time()
    trainer = Trainer(demo_config(out, steps, **({} if use_space_moe else {"model": {"use_space_moe": False}})))
    history = trainer.train()
    trained = time.time() - started
    pipe = trainer.sampling_pipeline()
    metrics = evaluate(pipe, out, count=64, steps=25)
    prompt = ShapesDataset(1, trainer.unet.config.sample_size, seed=HELD_OUT_SEED + 1)[0]["caption"]
    paths = pipe([prompt], num_inference_steps=25, generator=torch.Generator().manual_seed(0), record_paths=True).paths
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


def ablation(out: Path, steps: int = DEMO_STEPS) -> Dict[str, object]:
    """demo() with and without space-MoE at the same budget; out/ablation.json sets their scores side by side."""
    runs = {"with_space_moe": demo(out / "space_moe", steps=steps, use_space_moe=True),
            "without_space_moe": demo(out / "no_space_moe", steps=steps, use_space_moe=False)}
    report = {"steps": steps, **{name: run["alignment"] for name, run in runs.items()},
              "alignment_stderr": {name: run["alignment_stderr"] for name, run in runs.items()},
              "chance_alignment": runs["with_space_moe"]["chance_alignment"],
              "train_seconds": {name: run["train_seconds"] for name, run in runs.items()},
              "final_loss": {name: round(sum(run["loss_curve"][-20:]) / len(run["loss_curve"][-20:]), 4)
                             for name, run in runs.items()}}
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    return report


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


__all__ = ["DEMO_RECIPE", "DEMO_STEPS", "ablation", "demo", "demo_config"]
