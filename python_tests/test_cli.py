"""The training command line and its defaults: flags generated from TrainConfig, warm-ups that train in a short run,
an honest --resume, every component on the training device, and a user's mistakes as one-line usage errors."""

import dataclasses
import json
import subprocess
import sys

import pytest

from raphael_ext.__main__ import RESUME_OPTIONS, _config_options, build_parser, main
from raphael_ext.evaluation.demo import demo_config
from raphael_ext.training.trainer import ConfigError, TrainConfig, Trainer

TINY_MODEL = {"channels": [32, 64], "norm_groups": 8, "space_experts": 2, "time_experts": 2, "edge_channels": 8,
              "sample_size": 8}


def train_parser():
    return build_parser()._subparsers._group_actions[0].choices["train"]


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_trainconfig_field_has_a_flag_with_help():
    actions = {a.dest: a for a in train_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in actions, f"no flag for TrainConfig.{f.name}"
        assert flag_of(f.name) in actions[f.name].option_strings
        assert len(actions[f.name].help) > 20, f.name
        assert f.name in TrainConfig.__doc__  # the Args: section lists it
    for name in ("preset", "lr_schedule", "timestep_sampling", "precision", "controlnet"):
        assert actions[name].choices, f"--{name} has no choices"


def test_the_demo_recipe_runs_from_the_command_line(tmp_path):
    demo = demo_config(tmp_path, steps=1800)
    argv = ["train"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(demo, f.name)
        if value == (f.default_factory() if f.default is dataclasses.MISSING else f.default):
            continue
        if isinstance(value, bool):
            argv.append(flag_of(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, dict):
            argv += [flag_of(f.name), json.dumps(value)]
        elif isinstance(value, tuple):
            argv += [flag_of(f.name), *map(str, value)]
        else:
            argv += [flag_of(f.name), str(value)]
    assert TrainConfig(**_config_options(train_parser().parse_args(argv[1:]))) == demo


def test_default_warmups_train_in_a_short_run_and_the_lr_is_logged(tmp_path):
    config = TrainConfig(out=str(tmp_path / "run"), steps=3, batch_size=2, lr=1e-3, log_every=1, multiscale=False,
                         model=dict(TINY_MODEL))
    assert config.warmup_steps is None and config.resolved_warmup_steps == 1
    assert TrainConfig(steps=10**6).resolved_warmup_steps == 20000  # the paper's, for a paper-length run
    trainer = Trainer(config, device="cpu")
    # diffusers' EMAModel warm-up: the first updates follow the weights, later ones decay at ema_decay
    assert trainer.ema_decay(0) == pytest.approx(0.1) and trainer.ema_decay(10**6) == config.ema_decay
    trainer.train()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lrs == [pytest.approx(1e-3)] * 3


def test_every_component_is_on_the_training_device(tmp_path):
    """LoRA, ControlNet and text-encoder runs from a latent pipeline: the VAE too (the meta device stands in for a
    GPU: nothing may stay on the CPU)."""
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                  layers_per_block=1).save_pretrained(tmp_path / "vae")
    latent = {**TINY_MODEL, "in_channels": 4, "out_channels": 4, "latent": True}
    base = dict(steps=1, batch_size=2, multiscale=False, vae=str(tmp_path / "vae"))
    trainer = Trainer(TrainConfig(out=str(tmp_path / "run"), model=latent, **base), device="cpu")
    trainer.sampling_pipeline().save_pretrained(tmp_path / "pipeline")
    for mode in ({"lora_rank": 2, "train_text_encoder": True}, {"controlnet": "canny"}, {"train_text_encoder": True}):
        trainer = Trainer(TrainConfig(out=str(tmp_path / "adapt"), init_from=str(tmp_path / "pipeline"), **base, **mode),
                          device="meta")
        components = {"unet": trainer.unet, "text_encoder": trainer.text_encoder, "vae": trainer.vae,
                      "controlnet": trainer.controlnet, **{f"ema.{k}": m for k, m in (trainer.ema or {}).items()}}
        for name, module in components.items():
            if module is not None:
                devices = {p.device.type for p in module.parameters()} | {b.device.type for b in module.buffers()}
                assert devices == {"meta"}, (mode, name, devices)


def usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in message
    return message


def test_resume_refuses_a_flag_that_would_change_the_run(capsys, tmp_path):
    message = usage_error(capsys, ["train", "--out", str(tmp_path), "--resume", "--lr", "1", "--preset", "small"])
    assert "--lr, --preset" in message and "--resume" in message
    assert "steps" in RESUME_OPTIONS and "lr" not in RESUME_OPTIONS


@pytest.mark.parametrize("argv, words", [
    (["train", "--out", "{tmp}/run", "--lora-rank", "-1"], "lora_rank must be >= 0"),
    (["train", "--out", "{tmp}/run", "--init-from", "{tmp}/nowhere", "--lora-rank", "4"], "not a pipeline folder"),
    (["train", "--out", "{tmp}/run", "--data", "{tmp}", "--sample-every", "10"], "--validation-prompt"),
    (["train", "--out", "{tmp}/run", "--keep-last", "0"], "keep_last must be >= 1"),
    (["sample", "--pipeline", "{tmp}/nowhere", "--prompt", "a red circle", "--out", "{tmp}/a.png"],
     "not a pipeline folder"),
    (["sample", "--pipeline", "{tmp}/nowhere", "--prompt", " ", "--out", "{tmp}/a.png"], "--prompt is empty"),
    (["evaluate", "--pipeline", "{tmp}/nowhere", "--out", "{tmp}/eval", "--clip-model", "ViT-B-32"],
     "--clip-checkpoint"),
])
def test_a_users_mistake_is_one_line_and_status_2(capsys, tmp_path, argv, words):
    assert words in usage_error(capsys, [a.format(tmp=tmp_path) for a in argv])


def test_usage_errors_print_no_traceback_from_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-P", "-m", "raphael_ext", "sample", "--pipeline",
                             str(tmp_path / "nowhere"), "--prompt", "a red circle", "--out", str(tmp_path / "a.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_sample_grids_of_own_data_need_validation_prompts(tmp_path):
    with pytest.raises(ConfigError, match="validation-prompt"):
        Trainer(TrainConfig(out=str(tmp_path), data=str(tmp_path), sample_every=5))
    config = TrainConfig(out=str(tmp_path / "run"), steps=1, batch_size=2, multiscale=False, model=dict(TINY_MODEL),
                         validation_prompt=("a red circle", "a blue square", "a green triangle"))
    path = Trainer(config, device="cpu").save_samples(steps=2)
    from PIL import Image

    assert Image.open(path).size[0] >= 3 * 8  # one tile per validation prompt


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from raphael_ext.evaluation.demo import _plot_loss

    matplotlib.use("svg")
    _plot_loss([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert matplotlib.get_backend() == "svg"


def test_a_missing_extra_is_named():
    # diffusers probes for scikit-learn on import: load it first, then make scikit-learn uninstallable
    blocker = ("import sys\nimport raphael_ext.pipelines.pipeline_raphael\n"
               "for name in [m for m in sys.modules if m.split('.')[0] == 'sklearn']: del sys.modules[name]\n"
               "class Block:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'sklearn': raise ImportError('blocked')\n"
               "sys.meta_path.insert(0, Block())\n")
    code = blocker + ("try:\n    import raphael_ext.evaluation.analysis\nexcept ImportError as error:\n"
                      "    print(error)\n")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert "pip install 'raphael_ext[eval]'" in result.stdout, result.stdout + result.stderr[-2000:]
