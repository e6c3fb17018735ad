"""Command line: python -m raphael_ext {train, sample, evaluate, demo, ablation, convert} (see --help of each).

    python -m raphael_ext train --preset tiny --data shapes --out runs/x --steps 2000      # writes runs/x/pipeline
    torchrun --nproc_per_node 2 -m raphael_ext train ...     # the same, data-parallel (DDP)
    torchrun --nproc_per_node 8 -m raphael_ext train --preset paper --vae sd/vae --fsdp ...   # latent, sharded
    python -m raphael_ext train --out runs/x --resume --steps 4000
    python -m raphael_ext train --init-from runs/x/pipeline --lora-rank 8 --out runs/lora   # writes runs/lora/lora
    python -m raphael_ext train --init-from runs/x/pipeline --controlnet canny --out runs/cn
    python -m raphael_ext sample --pipeline runs/x/pipeline --prompt "a red circle above a blue square" --out img.png
    python -m raphael_ext evaluate --pipeline runs/x/pipeline --out runs/x/eval
    python -m raphael_ext evaluate --pipeline runs/x/pipeline --guidance 1.5,3,4.5,6,7.5,9 --out runs/x/sweep
    python -m raphael_ext analyze --pipeline runs/x/pipeline --out runs/x/analysis
    python -m raphael_ext demo --out runs/demo                  # what `make demo` runs
    python -m raphael_ext convert runs/old runs/old/pipeline    # a run of raphael_ext 0.1 as a pipeline folder
"""

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import torch


# What `train --resume` may change: how and where the run goes on, never what it trains.
RESUME_OPTIONS = ("steps", "fsdp", "vae", "data_workers", "compile", "checkpoint_every", "sample_every", "log_every",
                  "keep_last", "max_nonfinite_steps", "validation_prompt")


class UsageError(Exception):
    """A user's mistake on the command line: printed as one line, exit status 2 (argparse's convention)."""


def _config_options(args) -> dict:
    """The TrainConfig fields given on the command line (the train parser's flags default to absent)."""
    from .training.trainer import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {name: tuple(value) if isinstance(value, list) else value for name, value in vars(args).items()
            if name in names}


def _train(args) -> None:
    from .training.distributed import setup_distributed
    from .training.trainer import PREEMPTED_EXIT_STATUS, ConfigError, DivergenceError, Preempted, TrainConfig, Trainer

    options = _config_options(args)
    try:
        if args.resume:
            changed = sorted(set(options) - set(RESUME_OPTIONS) - {"out"})
            if changed:
                flags = ", ".join("--" + name.replace("_", "-") for name in changed)
                raise UsageError(f"--resume continues the run as it was configured; {flags} would change it: drop "
                                 f"{'it' if len(changed) == 1 else 'them'}, or start a new run in another --out")
            setup_distributed()
            for name, value in options.items():
                if name != "out":
                    print(f"resume: --{name.replace('_', '-')} {value}", file=sys.stderr)
            trainer = Trainer.resume(**options)
        else:
            setup_distributed()
            trainer = Trainer(TrainConfig(**options))
        trainer.train()
    except (ConfigError, FileExistsError) as error:
        raise UsageError(str(error)) from error
    except Preempted:  # the checkpoint of the step reached is written; the message is printed
        raise SystemExit(PREEMPTED_EXIT_STATUS)
    except DivergenceError as error:
        raise SystemExit(f"train: {error}")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with its type, choices and help; absent unless given, so --resume can tell
    which were."""
    from .training.trainer import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs = {"default": argparse.SUPPRESS, "choices": f.metadata.get("choices"),
                  "help": (f.metadata["help"] + ("" if f.name == "out" else f" (default: {default!r})")).replace(
                      "%", "%%")}
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, dict):
            kwargs["type"], kwargs["metavar"] = _json_object, "JSON"
        elif f.name == "betas":
            kwargs["type"], kwargs["nargs"], kwargs["metavar"] = float, 2, ("BETA1", "BETA2")
        elif f.name == "validation_prompt":
            kwargs["action"] = "append"
        elif "choices" not in f.metadata:
            kwargs["type"] = _field_type(f)
        parser.add_argument(flag, required=f.name == "out", **kwargs)


def _field_type(f):
    """int, float or str of a field typed X or Optional[X]."""
    for kind in (int, float, str):
        if f.type is kind or f.type == typing.Optional[kind]:
            return kind
    raise TypeError(f"TrainConfig.{f.name}: no command-line type for {f.type}")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. \'{"space_experts": 0}\'')
    return value


def _pipeline(args):
    from .pipelines.pipeline_raphael import RaphaelPipeline, load_vae

    if not (Path(args.pipeline) / "model_index.json").is_file():
        raise UsageError(f"--pipeline {args.pipeline} is not a pipeline folder (no model_index.json): pass the "
                         "pipeline/ folder that a training run wrote, e.g. runs/x/pipeline")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = RaphaelPipeline.from_pretrained(args.pipeline)
    if args.vae:
        pipe.register_modules(vae=load_vae(args.vae))
    if getattr(args, "lora", None):
        pipe.load_lora_weights(args.lora)
        pipe.set_adapters(["default"], [args.lora_scale])
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _sample(args) -> None:
    from PIL import Image

    if not all(prompt.strip() for prompt in args.prompt):
        raise UsageError("--prompt is empty: give the words to draw (an empty prompt draws the unconditional image; "
                         "for that, pass --guidance 1 with a prompt of your choice)")
    pipe = _pipeline(args)
    if args.control_image and getattr(pipe, "controlnet", None) is None:
        raise UsageError(f"--control-image needs a pipeline with a ControlNet; {args.pipeline} has none (train one "
                         "with train --controlnet canny --init-from PIPELINE, then sample its pipeline)")
    control = Image.open(args.control_image) if args.control_image else None
    result = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=torch.Generator().manual_seed(args.seed), control_image=control,
                  controlnet_conditioning_scale=args.controlnet_scale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        image.save(out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}"))


def _evaluate(args) -> None:
    """The judge's score on held-out shapes prompts (eval.json); with several guidance weights ("1.5,3,4.5") or with
    a user's data, images or scorers, the guidance sweep of paper Fig. 6b (guidance_sweep.json)."""
    guidances = [float(g) for g in args.guidance.split(",")]
    own_data = args.data or args.real_images or args.clip_model or args.clip_checkpoint or args.inception_weights
    if len(guidances) == 1 and not own_data:
        from .evaluation.evaluate import evaluate

        metrics = evaluate(_pipeline(args), Path(args.out), count=args.count, steps=args.steps,
                           guidance_scale=guidances[0])
    else:
        from .evaluation.quality import InceptionFeatures, OpenCLIPScore, guidance_sweep, load_images

        if bool(args.clip_model) != bool(args.clip_checkpoint):
            raise UsageError("--clip-model and --clip-checkpoint go together (an open_clip model name and its local "
                             "weights)")
        if args.data and not args.inception_weights:  # the shapes-CNN's features mean nothing on other images
            raise UsageError("--data: FID on real images needs --inception-weights (local .safetensors)")
        clip_score = OpenCLIPScore(args.clip_model, args.clip_checkpoint) if args.clip_model else None
        feature = InceptionFeatures(args.inception_weights) if args.inception_weights else None
        prompts, real = None, load_images(args.real_images) if args.real_images else None
        if args.data:  # the first --count captions are the prompts, their images the FID reference (as on shapes)
            from .training.data import FolderDataset

            data = FolderDataset(args.data, size=299)
            prompts = data.captions[: args.count]
            real = real if real is not None else load_images(args.data, files=data.files[: args.count])
        metrics = guidance_sweep(_pipeline(args), Path(args.out), guidances=guidances, count=args.count,
                                 steps=args.steps, real_images=real, feature=feature,
                                 feature_cache=Path(args.out) / "fid_features", prompts=prompts,
                                 clip_score=clip_score)
    print(json.dumps(metrics, indent=1))


def _analyze(args) -> None:
    from .evaluation.analysis import analyze

    families = args.families.split(",") if args.families else None
    if args.word_lists:
        from .evaluation.analysis import load_word_lists

        try:
            load_word_lists(args.word_lists)
        except ValueError as error:
            raise UsageError(f"--word-lists: {error}") from error
    result = analyze(_pipeline(args), Path(args.out), families=families, word_lists=args.word_lists,
                     samples_per_concept=args.samples, steps=args.steps, seed=args.seed, folds=args.folds)
    print(json.dumps(result, indent=1))


def _demo(args) -> None:
    from .evaluation.demo import DEMO_STEPS, demo

    result = demo(Path(args.out), steps=args.steps or DEMO_STEPS, use_space_moe=not args.no_space_moe)
    print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=1))


def _ablation(args) -> None:
    from .evaluation.demo import DEMO_STEPS, ablation, module_ablation

    if args.modules:
        report = module_ablation(Path(args.out), steps=args.steps or 2 * DEMO_STEPS,
                                 seeds=[int(s) for s in args.seeds.split(",")],
                                 guidances=[float(g) for g in args.guidance.split(",")], count=args.count)
    else:
        report = ablation(Path(args.out), steps=args.steps or DEMO_STEPS)
    print(json.dumps(report, indent=1))


def _demo_lora(args) -> None:
    from .evaluation.extensions import lora_demonstration

    report = lora_demonstration(Path(args.pipeline), Path(args.out), steps=args.steps, rank=args.rank)
    print(json.dumps(report, indent=1))


def _demo_controlnet(args) -> None:
    from .evaluation.extensions import controlnet_demonstration

    print(json.dumps(controlnet_demonstration(Path(args.pipeline), Path(args.out), steps=args.steps), indent=1))


def _convert(args) -> None:
    from .pipelines.convert import convert_legacy_run

    folder = convert_legacy_run(Path(args.run), Path(args.out), text_checkpoint=args.text_checkpoint, vae=args.vae)
    print(f"wrote {folder}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m raphael_ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a RAPHAEL U-Net (or a LoRA, or a ControlNet, on a trained pipeline)",
                           description="Train a RAPHAEL U-Net (or a LoRA, or a ControlNet, on a trained pipeline). "
                                       "Every option is a field of raphael_ext.training.TrainConfig.")
    _add_config_arguments(train)
    train.add_argument("--resume", action="store_true",
                       help="continue the newest checkpoint that every rank can read in --out, with the run's own "
                            f"settings; only --{', --'.join(o.replace('_', '-') for o in RESUME_OPTIONS)} may change")
    train.set_defaults(handler=_train)

    for name, fn, text in (("sample", _sample, "draw images for prompts with a pipeline"),
                           ("evaluate", _evaluate, "score a pipeline on held-out shapes prompts (the judge)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--pipeline", required=True, help="a pipeline folder, e.g. runs/x/pipeline")
        p.add_argument("--out", required=True, help="image file" if name == "sample" else "folder for eval.json and "
                                                                                           "samples.png")
        p.add_argument("--steps", type=int, default=50, help="sampling steps")
        if name == "sample":
            p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale")
        else:
            p.add_argument("--guidance", default="4.5", help="guidance scale, or several (e.g. 1.5,3,4.5,6,7.5,9) for "
                                                             "the alignment vs FID sweep (guidance_sweep.json, .png)")
        p.add_argument("--vae", default=None, help="a local AutoencoderKL folder, for a latent pipeline saved without")
        p.add_argument("--lora", default=None, help="a LoRA (folder or pytorch_lora_weights.safetensors) to apply")
        p.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora (0: off)")
        if name == "sample":
            p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several images)")
            p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
            p.add_argument("--control-image", default=None,
                           help="with a ControlNet pipeline: an image whose Canny edges (or an edge map) steer it")
            p.add_argument("--controlnet-scale", type=float, default=1.0, help="strength of the ControlNet (0: off)")
        else:
            p.add_argument("--count", type=int, default=64, help="held-out prompts to score")
            p.add_argument("--real-images", default=None,
                           help="sweep on real data: a folder of images to compute FID against (default: renders)")
            p.add_argument("--data", default=None,
                           help="sweep on your data: a folder of images with .txt captions (as train --data); the "
                                "captions are the prompts (scored by CLIP score), the images the FID reference")
            p.add_argument("--clip-model", default=None, help="CLIP score: an open_clip model name, e.g. ViT-B-32")
            p.add_argument("--clip-checkpoint", default=None,
                           help="CLIP score: that model's local weights (.safetensors, the whole open_clip state dict)")
            p.add_argument("--inception-weights", default=None,
                           help="sweep on real data: local Inception-v3 weights (.safetensors) for the standard FID "
                                "(default: the shapes-CNN features)")
        p.set_defaults(handler=fn)

    analyze = sub.add_parser("analyze", help="what the experts learn (paper §3.1, Fig. 9): concepts named from their "
                                             "diffusion paths, time experts' division of the steps")
    analyze.add_argument("--pipeline", required=True, help="a pipeline folder, e.g. runs/x/pipeline")
    analyze.add_argument("--out", required=True, help="folder for analysis.json and the pictures")
    analyze.add_argument("--families", default=None, help="concept families, e.g. color,shape (default: color, shape, "
                                                          "count, relation)")
    analyze.add_argument("--word-lists", default=None,
                         help='your own concepts: JSON {"family": {"concept": ["a prompt with {concept}", ...]}}')
    analyze.add_argument("--samples", type=int, default=40, help="prompts per concept")
    analyze.add_argument("--steps", type=int, default=50, help="sampling steps for the time-expert statistics")
    analyze.add_argument("--seed", type=int, default=0, help="seed of the prompts and the cross-validation folds")
    analyze.add_argument("--folds", type=int, default=5, help="cross-validation folds of the route classifier")
    analyze.add_argument("--vae", default=None,
                         help="a local AutoencoderKL folder, for a latent pipeline saved without")
    analyze.set_defaults(handler=_analyze)

    demo = sub.add_parser("demo", help="train the tiny preset on shapes and score it (CPU, minutes; make demo)")
    demo.add_argument("--out", default="runs/demo", help="folder for pipeline/, the pictures and metrics.json")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")
    demo.add_argument("--no-space-moe", action="store_true", help="the same run without space-MoE")
    demo.set_defaults(handler=_demo)
    ablation = sub.add_parser("ablation", help="the demo with and without space-MoE, scores side by side "
                                               "(make ablation)")
    ablation.add_argument("--out", default="runs/ablation", help="folder for both runs and ablation.json")
    ablation.add_argument("--steps", type=int, default=None,
                          help="training steps of each run (default: the demo's; with --modules twice that)")
    ablation.add_argument("--modules", action="store_true",
                          help="paper Fig. 6b: the full model and without space-MoE, time-MoE or edge supervision, "
                               "each over seeds and guidance weights (modules.json, modules.png)")
    ablation.add_argument("--seeds", default="0,1", help="with --modules: training seeds")
    ablation.add_argument("--guidance", default="1.5,3,4.5,7.5", help="with --modules: guidance weights")
    ablation.add_argument("--count", type=int, default=64, help="with --modules: held-out prompts per point")
    ablation.set_defaults(handler=_ablation)

    lora = sub.add_parser("demo-lora", help="teach a pipeline a new colour word with a LoRA and measure it "
                                             "(make demo-lora)")
    lora.add_argument("--pipeline", default="runs/demo/pipeline", help="the pipeline to adapt (the demo's)")
    lora.add_argument("--out", default="runs/lora_demo", help="folder for the data, the run, lora.json and pictures")
    lora.add_argument("--steps", type=int, default=300, help="LoRA training steps")
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank")
    lora.set_defaults(handler=_demo_lora)
    control = sub.add_parser("demo-controlnet", help="train a canny ControlNet on a pipeline and measure where it puts "
                                                     "the shapes (make demo-controlnet)")
    control.add_argument("--pipeline", default="runs/demo/pipeline", help="the pipeline to control (the demo's)")
    control.add_argument("--out", default="runs/controlnet_demo", help="folder for the run, controlnet.json, pictures")
    control.add_argument("--steps", type=int, default=300, help="ControlNet training steps")
    control.set_defaults(handler=_demo_controlnet)

    convert = sub.add_parser("convert", help="turn a raphael_ext 0.1 run folder (unet_ema/, text_encoder.safetensors) "
                                             "into a pipeline folder")
    convert.add_argument("run", help="the old run folder (or its unet_ema/ folder)")
    convert.add_argument("out", help="the pipeline folder to write")
    convert.add_argument("--text-checkpoint", default=None,
                         help="OpenCLIP .safetensors the run trained with (default: the run's "
                              "text_encoder.safetensors)")
    convert.add_argument("--vae", default=None, help="latent runs: the local AutoencoderKL folder they used")
    convert.set_defaults(handler=_convert)

    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except UsageError as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
