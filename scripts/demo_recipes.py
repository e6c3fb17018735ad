"""The demo's recipe search (README, "The demo run"): trains the tiny preset on shapes with one recipe per run and
scores the EMA pipeline on held-out prompts with the judge, writing one JSON line per run.

    python scripts/demo_recipes.py --out runs/recipes --steps 300 --prompts 32 \\
        --recipe baseline '{}' --recipe text '{"train_text_encoder": true}'

A recipe is TrainConfig fields as JSON ("model" holds RaphaelUNet overrides); the base is the demo's recipe
(raphael_ext.evaluation.demo.DEMO_RECIPE). Scores on 32 prompts move by about +-0.05 between seeds; compare runs at
the same budget and count, and confirm a winner on 64 prompts.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from raphael_ext.evaluation.demo import DEMO_RECIPE, demo_config
from raphael_ext.evaluation.evaluate import evaluate
from raphael_ext.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the runs and results.jsonl")
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts scored per run")
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps when scoring")
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.5], help="guidance scales to score")
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
        history = trainer.train()
        trained = time.time() - started
        pipe = trainer.sampling_pipeline()
        for guidance in args.guidance:
            scored = time.time()
            metrics = evaluate(pipe, out / name / f"eval-g{guidance}", count=args.prompts, steps=args.sampling_steps,
                               guidance_scale=guidance)
            record = {"recipe": name, "overrides": overrides, "steps": args.steps, "guidance": guidance,
                      "alignment": round(metrics["alignment"], 4), "stderr": round(metrics["alignment_stderr"], 4),
                      "chance": round(metrics["chance_alignment"], 4), "train_seconds": round(trained, 1),
                      "eval_seconds": round(time.time() - scored, 1),
                      "final_loss": round(sum(r["loss"] for r in history[-20:]) / len(history[-20:]), 4)}
            print(json.dumps(record), flush=True)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        del trainer, pipe
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
