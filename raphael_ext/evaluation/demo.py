"""The CPU demo (`make demo`): train the demo's recipe on shapes for a few minutes, then sample, score and draw it;
the ablation (`make ablation`): the same budget with and without space-MoE; and the module ablation of paper Fig. 6b
(`python -m raphael_ext ablation --modules`)."""

import json
import time
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch

from ..pipelines.paths import plot_attention_maps, plot_space_paths, plot_time_experts
from ..training.data import HELD_OUT_SEED, ShapesDataset
from ..training.trainer import TrainConfig, Trainer
from .evaluate import evaluate

# Training steps of batch 32 for the demo: as many as fit, with sampling and scoring, in ten minutes on two CPU cores
# (measured times: docs/demo.md).
DEMO_STEPS = 1800
# Classifier-free guidance of the demo's samples and score: the weight that aligned best on the tuning prompts in
# every run of the recipe search (scripts/demo_recipes.py); stronger guidance pushes colours out of the palette.
DEMO_GUIDANCE = 2.0
# The demo's recipe (TrainConfig fields; "model" holds RaphaelUNet overrides of the tiny preset); README, "The demo
# run", says why each differs from the paper's, and scripts/demo_recipes.py searched it on tuning prompts: 2x2
# patches and half the tiny preset's widths, 3 space experts rather than 6 and expert FFNs 2x rather than 4x as wide
# as their tokens (faster steps; batches of 32 cost 0.7x per image what batches of 16 do), x0 prediction, a 10x
# learning rate with a fast EMA, square 32x32 batches only (the paper's aspect buckets are for real photos), SD3's
# logit-normal timesteps moved towards less noise and widened, and two conditioning aids of ours (the pooled text
# embedding in the time embedding, positions for the transformer tokens).
DEMO_RECIPE = {"batch_size": 32, "lr": 1e-3, "warmup_steps": 50, "ema_decay": 0.99, "ema_warmup": False,
               "multiscale": False, "timestep_sampling": "logit_normal", "logit_mean": -0.5, "logit_std": 1.3,
               "model": {"prediction_type": "sample", "block_out_channels": [32, 64], "norm_num_groups": 8,
                         "space_experts": 3, "expert_hidden_mult": 2, "pooled_text": True,
                         "positional_embedding": True, "patch_size": 2}}


def demo_config(out: Path, steps: int, **overrides) -> TrainConfig:
    """The demo's TrainConfig: DEMO_RECIPE with `overrides` (a "model" override is merged into the recipe's)."""
    recipe = {**DEMO_RECIPE, **overrides, "model": {**DEMO_RECIPE["model"], **overrides.get("model", {})}}
    # overwrite: a demo always starts afresh, also in the folder of an earlier demo run
    return TrainConfig(preset="tiny", out=str(out), steps=steps, checkpoint_every=0, log_every=10, overwrite=True,
                       **recipe)


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
    metrics = evaluate(pipe, out, count=64, steps=25, guidance_scale=DEMO_GUIDANCE)
    prompt = ShapesDataset(1, trainer.unet.config.sample_size, seed=HELD_OUT_SEED + 1)[0]["caption"]
    paths = pipe([prompt], num_inference_steps=25, guidance_scale=DEMO_GUIDANCE,
                 generator=torch.Generator().manual_seed(0), record_paths=True).paths
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


MODULE_VARIANTS = {"full": {}, "no_space_moe": {"use_space_moe": False}, "no_time_moe": {"use_time_moe": False},
                   "no_edge": {"use_edge": False}}


def module_ablation(out: Path, steps: int = 2 * DEMO_STEPS, seeds: Sequence[int] = (0, 1),
                    variants: Sequence[str] = tuple(MODULE_VARIANTS), guidances: Sequence[float] = (1.5, 3, 4.5, 7.5),
                    count: int = 64) -> Dict[str, object]:
    """Paper Fig. 6b in miniature: the demo's recipe trained `steps` steps per variant (the full model, and without
    space-MoE, time-MoE or edge supervision) and seed, each swept over guidance weights (alignment by the judge and FID
    with the shapes-CNN features, evaluation/quality.py). Writes out/modules.json (per variant and guidance: the mean
    over seeds of alignment and FID with their standard errors over seeds) and modules.png (the trade-off curves)."""
    from .quality import guidance_sweep, shapes_feature_net

    feature = shapes_feature_net(out / "fid_features")
    runs = []
    for variant in variants:
        for seed in seeds:
            folder = out / f"{variant}-seed{seed}"
            started = time.time()
            trainer = Trainer(demo_config(folder, steps, seed=seed, model=MODULE_VARIANTS[variant]))
            trainer.train()
            sweep = guidance_sweep(trainer.sampling_pipeline(), folder / "sweep", guidances=guidances, count=count,
                                   feature=feature)
            runs.append({"variant": variant, "seed": seed, "seconds": round(time.time() - started, 1),
                         "points": sweep["points"]})
            (out / "runs.json").write_text(json.dumps(runs, indent=1))  # kept as the runs finish

    def mean_and_stderr(values):
        values = np.asarray(values, dtype=float)
        stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
        return round(float(values.mean()), 4), round(stderr, 4)

    table = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        table[variant] = []
        for i, guidance in enumerate(guidances):
            alignment = mean_and_stderr([r["points"][i]["alignment"] for r in mine])
            fid = mean_and_stderr([r["points"][i]["fid"] for r in mine])
            table[variant].append({"guidance": guidance, "alignment": alignment[0], "alignment_stderr": alignment[1],
                                   "fid": fid[0], "fid_stderr": fid[1]})
    report = {"steps": steps, "seeds": list(seeds), "prompts": count, "fid_features": feature.description,
              "variants": table}
    (out / "modules.json").write_text(json.dumps(report, indent=1))
    _plot_modules(report, out / "modules.png")
    return report


def _plot_modules(report, path: Path) -> None:
    from ..plotting import subplots

    fig, ax = subplots(figsize=(5.5, 4))
    for variant, points in report["variants"].items():
        ax.errorbar([p["fid"] for p in points], [p["alignment"] for p in points],
                    xerr=[p["fid_stderr"] for p in points], yerr=[p["alignment_stderr"] for p in points],
                    marker="o", capsize=2, label=variant)
        for p in points:
            ax.annotate(f"{p['guidance']:g}", (p["fid"], p["alignment"]), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_xlabel(f"FID ({report['fid_features'].split(':')[0]} features; lower is better)")
    ax.set_ylabel("alignment (judge; higher is better)")
    ax.set_title(f"module ablation, {report['steps']} steps, {len(report['seeds'])} seeds (labels: guidance)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_loss(history, path: Path) -> None:
    from ..plotting import subplots

    fig, ax = subplots(figsize=(5, 3))
    for key in ("loss", "denoise", "edge"):
        if key in history[0]:
            ax.plot([r["step"] for r in history], [r[key] for r in history], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


__all__ = ["DEMO_GUIDANCE", "DEMO_RECIPE", "DEMO_STEPS", "MODULE_VARIANTS", "ablation", "demo", "demo_config",
           "module_ablation"]
