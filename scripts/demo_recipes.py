"""The demo's recipe search (README, "The demo run"): trains the tiny preset on shapes with one recipe per run and
scores the EMA pipeline on tuning prompts with the judge, writing one JSON line per run, EMA decay and guidance.

    python scripts/demo_recipes.py --out runs/recipes --steps 300 --prompts 32 \\
        --recipe baseline '{}' --recipe text '{"train_text_encoder": true}'

A recipe is TrainConfig fields as JSON ("model" holds RaphaelUNet overrides); the base is the demo's recipe
(raphael_ext.evaluation.demo.DEMO_RECIPE). --ema-decays scores several EMA decays of the same run (each an average
of the same trained weights, kept beside the trainer's own). The prompts are a tuning set (ShapesDataset seed
TUNING_SEED), not the held-out prompts `make demo` is scored on, so a recipe is not picked on its test prompts.
Scores on 32 prompts move by about +-0.05 between seeds; compare runs at the same budget and count, and confirm a
winner on 64 prompts.
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from raphael_ext.evaluation.demo import DEMO_GUIDANCE, DEMO_RECIPE, demo_config
from raphael_ext.evaluation.evaluate import evaluate
from raphael_ext.training.trainer import Trainer

TUNING_SEED = 20_011  # ShapesDataset seed of the tuning prompts (the demo is scored on HELD_OUT_SEED's)


def train(trainer: Trainer, decays):
    """Trains trainer.config.steps steps, keeping one EMA of the U-Net per decay; returns (history, EMAs)."""
    averages = {decay: copy.deepcopy(trainer.unet).requires_grad_(False) for decay in decays}
    history = []
    for step in tqdm(range(trainer.config.steps), desc="train"):
        history.append(trainer.train_step(step))
        for decay, average in averages.items():
            torch._foreach_lerp_(list(average.parameters()), list(trainer.unet.parameters()), 1 - decay)
    return history, averages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the runs and results.jsonl")
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run")
    parser.add_argument("--prompts", type=int, default=32, help="tuning prompts scored per run")
    parser.add_argument("--prompt-seed", type=int, default=TUNING_SEED,
                        help="ShapesDataset seed of the scored prompts (default: the tuning set)")
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps when scoring")
    parser.add_argument("--guidance", type=float, nargs="+", default=[DEMO_GUIDANCE],
                        help="guidance scales to score (default: the demo's)")
    parser.add_argument("--ema-decays", type=float, nargs="+", default=None,
                        help="EMA decays to score (default: the recipe's ema_decay)")
    parser.add_argument("--recipe", nargs=2, action="append", metavar=("NAME", "JSON"), required=True,
                        help="a recipe: its name and its TrainConfig overrides as JSON")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"base recipe: {json.dumps(DEMO_RECIPE)}")
    for name, overrides in args.recipe:
        overrides = json.loads(overrides)
        started = time.time()
        trainer = Trainer(demo_config(out / name, args.steps, **overrides))
        history, averages = train(trainer, args.ema_decays or [trainer.config.ema_decay])
        trained = time.time() - started
        pipe = trainer.sampling_pipeline()
        for decay, average in averages.items():
            pipe.unet.load_state_dict(average.state_dict())
            for guidance in args.guidance:
                scored = time.time()
                metrics = evaluate(pipe, out / name / f"eval-ema{decay}-g{guidance}", count=args.prompts,
                                   steps=args.sampling_steps, guidance_scale=guidance, prompt_seed=args.prompt_seed)
                record = {"recipe": name, "overrides": overrides, "steps": args.steps, "ema_decay": decay,
                          "guidance": guidance, "prompt_seed": args.prompt_seed,
                          "alignment": round(metrics["alignment"], 4), "stderr": round(metrics["alignment_stderr"], 4),
                          "chance": round(metrics["chance_alignment"], 4), "train_seconds": round(trained, 1),
                          "eval_seconds": round(time.time() - scored, 1),
                          "final_loss": round(sum(r["loss"] for r in history[-20:]) / len(history[-20:]), 4)}
                print(json.dumps(record), flush=True)
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
        del trainer, pipe


if __name__ == "__main__":
    main()
