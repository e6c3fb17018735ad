"""Command line: python -m raphael_ext {train, sample, evaluate, demo, ablation} (see --help of each).

    python -m raphael_ext train --preset tiny --data shapes --out runs/x --steps 2000
    torchrun --nproc_per_node 2 -m raphael_ext train ...     # the same, data-parallel (DDP)
    torchrun --nproc_per_node 8 -m raphael_ext train --preset paper --vae sd/vae --fsdp ...   # latent, sharded
    python -m raphael_ext train --out runs/x --resume --steps 4000
    python -m raphael_ext sample --ckpt runs/x/unet_ema --prompt "a red circle above a blue square" --out img.png
    python -m raphael_ext evaluate --ckpt runs/x/unet_ema --out runs/x/eval
    python -m raphael_ext demo --out runs/demo                  # what `make demo` runs
"""

import argparse
import json
import sys
from pathlib import Path

import torch


def _train(args) -> None:
    from .train import TrainConfig, Trainer, setup_distributed

    setup_distributed()
    if args.resume:
        # The run's own settings, except how it is spread over the ranks (--fsdp or not) and where its VAE is.
        trainer = Trainer.resume(args.out, steps=args.steps, fsdp=args.fsdp,
                                 **({"vae": args.vae} if args.vae else {}))
    else:
        config = TrainConfig(preset=args.preset, data=args.data, out=args.out, steps=args.steps or 1000,
                             batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                             checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
                             text_checkpoint=args.text_checkpoint, vae=args.vae, fsdp=args.fsdp,
                             model=json.loads(args.model))
        trainer = Trainer(config)
    trainer.train()


def _pipeline(args):
    from .model import RaphaelUNet
    from .pipeline import RaphaelPipeline
    from .text import OpenCLIPTextEncoder

    from .train import TEXT_ENCODER_FILE

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = RaphaelUNet.from_pretrained(args.ckpt, device=device).eval()
    # Default: the text tower the run trained with (saved next to unet_ema/ when it was random).
    run_text = Path(args.ckpt).parent / TEXT_ENCODER_FILE
    text_checkpoint = args.text_checkpoint or (run_text if run_text.is_file() else None)
    encoder = OpenCLIPTextEncoder(unet.config.text_encoder, checkpoint=text_checkpoint).to(device)
    vae = RaphaelPipeline.load_vae(args.vae, device=device) if args.vae else None
    return RaphaelPipeline(unet, encoder, vae=vae)


def _sample(args) -> None:
    pipe = _pipeline(args)
    result = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        image.save(out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}"))


def _evaluate(args) -> None:
    from .evaluate import evaluate

    metrics = evaluate(_pipeline(args), Path(args.out), count=args.count,
                       steps=args.steps, guidance_scale=args.guidance)
    print(json.dumps(metrics, indent=1))


def _demo(args) -> None:
    from .evaluate import DEMO_STEPS, demo

    print(json.dumps(demo(Path(args.out), steps=args.steps or DEMO_STEPS, use_space_moe=not args.no_space_moe),
                     indent=1))


def _ablation(args) -> None:
    from .evaluate import DEMO_STEPS, demo

    steps = args.steps or DEMO_STEPS
    with_moe = demo(Path(args.out) / "space_moe", steps=steps, use_space_moe=True)
    without = demo(Path(args.out) / "no_space_moe", steps=steps, use_space_moe=False)
    runs = {"with_space_moe": with_moe, "without_space_moe": without}
    report = {"steps": steps, **{name: run["alignment"] for name, run in runs.items()},
              "alignment_stderr": {name: run["alignment_stderr"] for name, run in runs.items()},
              "chance_alignment": with_moe["chance_alignment"],
              "train_seconds": {name: run["train_seconds"] for name, run in runs.items()},
              "final_loss": {name: round(sum(run["loss_curve"][-20:]) / len(run["loss_curve"][-20:]), 4)
                             for name, run in runs.items()}}
    (Path(args.out) / "ablation.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raphael_ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a RAPHAEL model")
    train.add_argument("--preset", default="tiny")
    train.add_argument("--data", default="shapes", help='"shapes" or a folder of images with same-name .txt captions')
    train.add_argument("--out", required=True)
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--warmup-steps", type=int, default=20000)
    train.add_argument("--checkpoint-every", type=int, default=500)
    train.add_argument("--sample-every", type=int, default=0, help="EMA sample grid every N steps (0: never)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--text-checkpoint", default=None, help="local OpenCLIP .safetensors for the text tower")
    train.add_argument("--vae", default=None, help="latent presets: a local diffusers AutoencoderKL folder")
    train.add_argument("--model", default="{}", help='RaphaelConfig overrides as JSON, e.g. \'{"space_experts": 0}\'')
    train.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard the model, EMA and optimizer state over the ranks (FSDP2), not DDP")
    train.set_defaults(run=_train)
    for name, fn in (("sample", _sample), ("evaluate", _evaluate)):
        p = sub.add_parser(name)
        p.add_argument("--ckpt", required=True, help="a save_pretrained folder, e.g. runs/x/unet_ema")
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=50)
        p.add_argument("--guidance", type=float, default=4.5)
        p.add_argument("--text-checkpoint", default=None)
        p.add_argument("--vae", default=None, help="latent models: a local diffusers AutoencoderKL folder")
        if name == "sample":
            p.add_argument("--prompt", action="append", required=True)
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--count", type=int, default=64)
        p.set_defaults(run=fn)
    for name, fn in (("demo", _demo), ("ablation", _ablation)):
        p = sub.add_parser(name, help="train the tiny preset on shapes and evaluate it (CPU, minutes)")
        p.add_argument("--out", default=f"runs/{name}")
        p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")
        if name == "demo":
            p.add_argument("--no-space-moe", action="store_true")
        p.set_defaults(run=fn)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
