"""Trainer: learning on a fixed batch, the edge-loss gate, text-encoder fine-tuning, LoRA and ControlNet runs, exact
resume, checkpoint safety, DDP and FSDP, CLI."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from raphael_ext import RaphaelPipeline
from raphael_ext.training.checkpoints import CheckpointError
from raphael_ext.training.trainer import TrainConfig, Trainer, buckets, training_target

SMALL_MODEL = {"channels": [32, 64], "norm_groups": 8, "space_experts": 3, "time_experts": 2, "edge_channels": 8,
               "sample_size": 16}


def config(tmp_path, **overrides):
    base = dict(out=str(tmp_path / "run"), steps=4, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1,
                multiscale=False, dataset_size=64, model=dict(SMALL_MODEL))
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_steps_on_a_fixed_batch_lower_its_loss(tmp_path, prediction_type):
    trainer = Trainer(config(tmp_path, caption_dropout=0.0, model={**SMALL_MODEL, "prediction_type": prediction_type}),
                      device="cpu")
    losses = [trainer.train_step(0)["loss"] for _ in range(8)]  # step 0's batch, timesteps and noise every time
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_follow_diffusers(prediction_type):
    """The training target is what diffusers' schedulers take back: noise, x0, or DDPMScheduler.get_velocity."""
    from diffusers import DDPMScheduler

    from raphael_ext import RaphaelUNet
    from raphael_ext.pipelines.pipeline_raphael import default_scheduler

    scheduler = default_scheduler(RaphaelUNet.from_preset("tiny", prediction_type=prediction_type))
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))
    expected = {"epsilon": noise, "sample": x0, "v_prediction": reference.get_velocity(x0, noise, t)}[prediction_type]
    torch.testing.assert_close(training_target(scheduler, prediction_type, x0, noise, t), expected)


def test_latent_presets_train_through_a_local_vae(tmp_path):
    """Latent diffusion: images are encoded by a local AutoencoderKL (here a small random one, stride 2), the
    loss on a fixed batch falls, and the sample grid decodes through the same VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                  layers_per_block=1).save_pretrained(tmp_path / "vae")
    latent = {**SMALL_MODEL, "in_channels": 4, "out_channels": 4, "sample_size": 8, "latent": True}
    with pytest.raises(ValueError, match="AutoencoderKL folder"):
        Trainer(config(tmp_path, model=latent), device="cpu")
    with pytest.raises(ValueError, match="takes no vae"):
        Trainer(config(tmp_path, vae=str(tmp_path / "vae")), device="cpu")
    with pytest.raises(ValueError, match="latent channels"):
        Trainer(config(tmp_path, model={**latent, "in_channels": 3}, vae=str(tmp_path / "vae")), device="cpu")
    trainer = Trainer(config(tmp_path, model=latent, vae=str(tmp_path / "vae"), caption_dropout=0.0), device="cpu")
    assert trainer.vae_stride == 2 and trainer.batch(0)["images"].shape[-1] == 16
    g = torch.Generator().manual_seed(0)
    assert trainer.encode_images(trainer.batch(0)["images"], g).shape == (4, 4, 8, 8)
    losses = [trainer.train_step(0)["loss"] for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses
    from PIL import Image

    assert Image.open(trainer.save_samples(count=2, steps=2)).size == (4 * 16 * 4, 16 * 4 + 28)  # one row of 4 cells


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    """With torch.utils.tensorboard importable (here a recording stand-in) every logged record becomes scalars."""
    import types

    written = []

    class RecordingWriter:
        def __init__(self, logdir):
            written.append(("logdir", logdir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=RecordingWriter))
    trainer = Trainer(config(tmp_path, steps=2), device="cpu")
    trainer.train()
    assert written[0] == ("logdir", str(tmp_path / "run" / "tensorboard"))
    assert {("train/loss", 1), ("train/denoise", 2), ("train/lr", 2)} <= set(written[1:])
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2


def test_edge_loss_only_for_small_timesteps(tmp_path):
    never = Trainer(config(tmp_path, model={**SMALL_MODEL, "t_cutoff": -1}), device="cpu")
    assert all(never.train_step(s)["edge"] == 0.0 for s in range(3))
    always = Trainer(config(tmp_path, model={**SMALL_MODEL, "t_cutoff": 1000}), device="cpu")
    assert all(always.train_step(s)["edge"] > 0.0 for s in range(3))


def test_compiled_training_step_matches_eager(tmp_path):
    """--compile: the U-Net compiled in place computes the step's loss and gradients as eager does, through the ops'
    fake kernels and autograd formulas (aot_eager: traced, no code generated, so the test stays quick), and keeps its
    state-dict names. inductor's run on the demo's model is timed in benchmarks/test_train_step.py."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = Trainer(config(tmp_path / "eager", steps=2), device="cpu")
    compiled = Trainer(config(tmp_path / "compiled", steps=2, compile="aot_eager"), device="cpu")
    assert compiled.unet._compiled_call_impl is not None and eager.unet._compiled_call_impl is None
    for step in range(2):
        expected, got = eager.compute_gradients(step), compiled.compute_gradients(step)
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), (step, expected, got)
        for (name, a), b in zip(eager.unet.named_parameters(), compiled.unet.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # traced, not only wrapped
    assert compiled.unet.state_dict().keys() == eager.unet.state_dict().keys()
    with pytest.raises(ValueError, match="compile must be one of"):
        Trainer(config(tmp_path / "bad", compile="yes"), device="cpu")


def test_resume_continues_exactly(tmp_path):
    full = Trainer(config(tmp_path, steps=6, checkpoint_every=3, keep_last=5), device="cpu")
    history = full.train()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000003", "step-0000006"]
    shutil.copytree(root / "step-0000003", tmp_path / "copy" / "checkpoints" / "step-0000003")
    resumed = Trainer.resume(str(tmp_path / "copy"), device="cpu")
    assert resumed.step == 3 and resumed.config.steps == 6
    rest = resumed.train()
    assert [r["loss"] for r in rest] == [r["loss"] for r in history[3:]]
    for a, b in zip(full.unet.parameters(), resumed.unet.parameters()):
        assert torch.equal(a, b)
    pipe = RaphaelPipeline.from_pretrained(tmp_path / "copy" / "pipeline")  # the run's output: the EMA weights
    for a, b in zip(pipe.unet.parameters(), resumed.ema["unet"].parameters()):
        assert torch.equal(a, b)


def test_resume_takes_the_newest_checkpoint_that_loads(tmp_path, capsys):
    """A truncated newest checkpoint (a run killed while writing, a full disk) is skipped with its reason, the older
    good one resumes; none readable is an error naming each one."""
    trainer = Trainer(config(tmp_path, steps=4, checkpoint_every=2), device="cpu")
    trainer.train()
    root = tmp_path / "run" / "checkpoints"
    newest = root / "step-0000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed = Trainer.resume(str(tmp_path / "run"), device="cpu")
    assert resumed.step == 2
    assert "skipped 1 newer checkpoint" in capsys.readouterr().out
    (root / "step-0000002" / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no readable checkpoint(.|\n)*step-0000004(.|\n)*incomplete"):
        Trainer.resume(str(tmp_path / "run"), device="cpu")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer.resume(str(tmp_path / "nothing"))


def test_bad_checkpoints_give_clear_errors_and_keep_the_last_good_one(tmp_path):
    trainer = Trainer(config(tmp_path, steps=2), device="cpu")
    trainer.train()
    root = tmp_path / "run" / "checkpoints"
    good = root / "step-0000002"
    other = Trainer(config(tmp_path, out=str(tmp_path / "other"), steps=1,
                           model={**SMALL_MODEL, "space_experts": 2}), device="cpu")
    other.train()
    with pytest.raises(CheckpointError, match="do not match the model being trained"):
        trainer.checkpoints.load(tmp_path / "other" / "checkpoints" / "step-0000001")
    # A save that fails half-way leaves the previous checkpoint untouched and no temporary folder behind.
    trainer.step = 3
    original = trainer.lr_schedule.state_dict
    trainer.lr_schedule.state_dict = lambda: (_ for _ in ()).throw(OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    trainer.lr_schedule.state_dict = original
    assert [p.name for p in root.iterdir()] == ["step-0000002"] and (good / "state.json").is_file()
    (good / "optimizer.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="optimizer|safetensors|header"):
        trainer.checkpoints.load(good)


def test_fine_tuning_the_text_encoder(tmp_path):
    """train_text_encoder: the tower's weights change (at its own learning rate), the loss differs from a frozen run on
    the same batches, and the checkpoint and the run's pipeline hold the trained tower."""
    frozen = Trainer(config(tmp_path, out=str(tmp_path / "frozen"), caption_dropout=0.0), device="cpu")
    tuned = Trainer(config(tmp_path, out=str(tmp_path / "tuned"), caption_dropout=0.0, train_text_encoder=True,
                           text_lr=5e-3), device="cpu")
    start = {k: v.clone() for k, v in tuned.text_encoder.state_dict().items()}
    assert [g["lr"] for g in tuned.optimizer.param_groups] == [1e-3, 5e-3]
    frozen_losses = [r["loss"] for r in frozen.train()]
    tuned_losses = [r["loss"] for r in tuned.train()]
    assert frozen_losses[0] == tuned_losses[0] and frozen_losses[1:] != tuned_losses[1:]
    changed = [k for k, v in tuned.text_encoder.state_dict().items() if not torch.equal(v, start[k])]
    assert "tower.token_embedding.weight" in changed and len(changed) > len(start) // 2
    assert all(torch.equal(v, frozen.text_encoder.state_dict()[k]) for k, v in start.items())  # frozen stays
    pipe = RaphaelPipeline.from_pretrained(tmp_path / "tuned" / "pipeline")
    for a, b in zip(pipe.text_encoder.parameters(), tuned.ema["text_encoder"].parameters()):
        assert torch.equal(a, b)
    resumed = Trainer.resume(str(tmp_path / "tuned"), device="cpu")
    assert resumed.config.train_text_encoder
    for a, b in zip(resumed.text_encoder.parameters(), tuned.text_encoder.parameters()):
        assert torch.equal(a, b)
    assert len(resumed.optimizer.state) == len([p for p in resumed.trained.parameters() if p.requires_grad])


@pytest.fixture(scope="module")
def base_pipeline(tmp_path_factory):
    """A pipeline folder from a 2-step run, for the LoRA and ControlNet runs to start from."""
    out = tmp_path_factory.mktemp("base")
    Trainer(config(out, steps=2), device="cpu").train()
    return out / "run" / "pipeline"


def test_lora_run_trains_and_saves_only_the_adapter(tmp_path, base_pipeline):
    with pytest.raises(ValueError, match="init_from"):
        Trainer(config(tmp_path, lora_rank=4), device="cpu")
    trainer = Trainer(config(tmp_path, init_from=str(base_pipeline), lora_rank=4, lora_experts=True,
                             train_text_encoder=True), device="cpu")
    base = {k: v.clone() for k, v in trainer.unet.state_dict().items() if "lora_" not in k}
    trainer.compute_gradients(0)
    with_grad = [n for n, p in trainer.trained.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any("experts" in n for n in with_grad) and any(n.startswith("text_encoder.") for n in with_grad)
    trainer.train()
    after = {k: v for k, v in trainer.unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base is frozen
    adapter = tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"
    full = base_pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    assert adapter.stat().st_size < 0.25 * full.stat().st_size
    pipe = RaphaelPipeline.from_pretrained(base_pipeline)
    pipe.load_lora_weights(adapter.parent)
    trained = {k: v for k, v in trainer.unet.state_dict().items() if "lora_" in k}
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    resumed = Trainer.resume(str(tmp_path / "run"), steps=5, device="cpu")
    assert resumed.step == 4 and all(torch.equal(v, dict(resumed.unet.state_dict())[k]) for k, v in trained.items())


def test_controlnet_run(tmp_path, base_pipeline):
    trainer = Trainer(config(tmp_path, init_from=str(base_pipeline), controlnet="canny", sample_every=4), device="cpu")
    trainer.compute_gradients(0)
    assert all(p.grad is None for p in trainer.unet.parameters())
    assert trainer.controlnet.cond_embedding.layers[0].weight.grad is not None
    trainer.train()
    pipe = RaphaelPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.controlnet is not None and (tmp_path / "run" / "controlnet" / "config.json").is_file()
    for a, b in zip(pipe.controlnet.parameters(), trainer.ema["controlnet"].parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / "run" / "samples" / "step-0000004.png").is_file()


def test_buckets_follow_the_paper():
    sizes = buckets(640, 64)
    assert (448, 832) in sizes and (640, 640) in sizes and len(sizes) == 9
    assert all(h % 4 == 0 and w % 4 == 0 for h, w in buckets(32, 4))


def _distributed_worker(rank, world, port, args, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        trainer = Trainer(TrainConfig(**args), device="cpu")
        assert trainer.sharded == args["fsdp"]
        if trainer.sharded:  # each rank holds half of every parameter
            weight = trainer.unet.conv_in.weight
            assert weight.to_local().shape[0] * world == weight.shape[0]
        trainer.train_step(0)
        trainer.step = 1  # what train() records after step 0
        trainer.save_checkpoint()  # under FSDP a collective: rank 0 writes the gathered tensors
        trainer.compute_gradients(1)
        result = _grads_and_params(trainer)  # under FSDP a collective too
        trainer.save_samples(count=2, steps=2)  # the EMA's forward: under FSDP every rank takes part
        again = Trainer.resume(args["out"], device="cpu")  # under FSDP: rank 0 reads, broadcasts, every rank shards
        again.compute_gradients(1)
        for key, value in _grads_and_params(again).items():
            assert torch.equal(value, result[key]) if key.startswith("param.") else torch.allclose(value, result[key])
        trainer.train_step(1)  # the EMA update after sampling (FSDP: every EMA unit is resharded again)
        # A checkpoint only rank 0 can tell is corrupt is an error on every rank, not a hang.
        bad = os.path.join(args["out"], "bad")
        if rank == 0:
            shutil.copytree(os.path.join(args["out"], "checkpoints", "step-0000001"), bad)
            with open(os.path.join(bad, "optimizer.safetensors"), "wb") as f:
                f.write(b"not a safetensors file")
        torch.distributed.barrier()
        with pytest.raises(CheckpointError, match="safetensors|header|optimizer"):
            trainer.checkpoints.load(bad)
        if rank == 0:
            from safetensors.torch import save_file

            save_file(result, result_file)
    finally:
        torch.distributed.destroy_process_group()


def _grads_and_params(trainer):
    """Full parameters and gradients by name (gathered from the shards under FSDP)."""
    from torch.distributed.tensor import DTensor

    def full(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()  # a copy: training goes on

    out = {}
    for name, p in trainer.trained.named_parameters():  # unet.* and text_encoder.*
        out["param." + name] = full(p)
        out["grad." + name] = full(p.grad)
    return out


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, fsdp):
    """Two gloo ranks with half the batch each (DDP, or FSDP2 with the model sharded over them) compute what one
    process computes on the whole batch: the same parameters after a step and the same (averaged, clipped)
    gradients for the next, for the U-Net and the text tower trained with it (DDP wraps each; FSDP shards the
    tower's residual blocks as units). Gate noise is off (it is drawn per rank) and every sample takes the edge loss (its
    mean is per rank). Parameters are compared to 2 lr: Adam's first update is lr * sign(g), so a gradient that is
    0 up to rounding may move either way, and the next gradients (to 2e-3 of each tensor's largest: the ranks' half
    batches sum in another order than one batch) with it. The checkpoint the two ranks wrote after the step resumes on the two
    ranks again and in one process, each time with exactly their parameters and their next gradients."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    lr = 1e-3
    model = {**SMALL_MODEL, "gate_noise": 0.0, "t_cutoff": 1000}
    args = dict(out=str(tmp_path / "two"), steps=2, batch_size=4, lr=lr, warmup_steps=1, multiscale=False,
                dataset_size=64, caption_dropout=0.0, model=model, fsdp=fsdp, train_text_encoder=True)
    ctx = mp.get_context("spawn")
    port = 29500 + os.getpid() % 1000 + (500 if fsdp else 0)
    result_file = str(tmp_path / "rank0.safetensors")
    procs = [ctx.Process(target=_distributed_worker, args=(r, 2, port, args, result_file)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    two = load_file(result_file)
    assert (tmp_path / "two" / "samples" / "step-0000001.png").is_file()
    single = Trainer(TrainConfig(**{**args, "out": str(tmp_path / "single")}), device="cpu")
    single.train_step(0)
    single.compute_gradients(1)
    resumed = Trainer.resume(str(tmp_path / "two"), device="cpu")
    assert resumed.step == 1 and not resumed.sharded
    assert len(resumed.optimizer.state) == len(list(resumed.trained.parameters()))
    resumed.compute_gradients(1)
    moved = 0
    for key, value in _grads_and_params(single).items():
        if key.startswith("grad."):
            scale = value.abs().max().item() + 1e-12
            torch.testing.assert_close(two[key], value, rtol=1e-3, atol=2e-3 * scale, msg=lambda m: f"{key}: {m}")
            torch.testing.assert_close(_tensor(resumed, key), two[key], rtol=1e-3, atol=2e-3 * scale,
                                       msg=lambda m: f"resumed {key}: {m}")
        else:
            torch.testing.assert_close(two[key], value, rtol=0, atol=2.01 * lr, msg=lambda m: f"{key}: {m}")
            assert torch.equal(_tensor(resumed, key), two[key]), f"resumed {key} differs from the checkpoint"
            moved += (two[key] - value).abs().gt(1e-6).sum().item()
    total = sum(p.numel() for p in single.trained.parameters())
    assert moved < 0.01 * total, f"{moved} of {total} parameters differ after one step"


def _tensor(trainer, key):
    """"param.<name>" or "grad.<name>" of a one-process trainer."""
    kind, name = key.split(".", 1)
    param = trainer.trained.get_parameter(name)
    return (param if kind == "param" else param.grad).detach()


def test_sampling_from_a_run_uses_its_text_encoder(tmp_path):
    """A random text tower is drawn from the global RNG: the run's pipeline holds the one it trained with, so the CLI's
    sample/evaluate encode prompts as in training."""
    import argparse

    from raphael_ext import OpenCLIPTextEncoder
    from raphael_ext.__main__ import _pipeline

    trainer = Trainer(config(tmp_path, steps=1), device="cpu")
    trainer.train()
    prompts = ["a red circle", "a blue square above a green triangle"]
    expected = trainer.text_encoder.encode(trainer.tokenizer, prompts)[0]
    fresh = OpenCLIPTextEncoder("tiny").encode(trainer.tokenizer, prompts)[0]
    assert not torch.allclose(fresh, expected)  # why the tower must be kept
    pipe = _pipeline(argparse.Namespace(pipeline=str(tmp_path / "run" / "pipeline"), vae=None, lora=None))
    torch.testing.assert_close(pipe.encode_prompt(prompts, "cpu")[0], expected, rtol=0, atol=0)


def test_cli_train_sample_evaluate(tmp_path, capsys):
    """`python -m raphael_ext train` in a real process (the entry point as users type it); resume, sample and
    evaluate through the same main() in this one, which spares a process start (the diffusers stack's import) each."""
    from raphael_ext.__main__ import main

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-P", "-m", "raphael_ext", "train", "--out", str(out), "--steps", "2",
                    "--batch-size", "2", "--warmup-steps", "1", "--sample-every", "2",
                    "--model", json.dumps(SMALL_MODEL)], check=True, env=env, capture_output=True)
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "samples" / "step-0000002.png").is_file()
    main(["train", "--out", str(out), "--resume", "--steps", "3"])
    assert (out / "checkpoints" / "step-0000003").is_dir()
    main(["sample", "--pipeline", str(out / "pipeline"), "--prompt", "a red circle", "--steps", "2",
          "--out", str(tmp_path / "img.png")])
    assert (tmp_path / "img.png").is_file()
    capsys.readouterr()
    main(["evaluate", "--pipeline", str(out / "pipeline"), "--count", "4", "--steps", "2",
          "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert 0.0 <= metrics["alignment"] <= 1.0 and metrics["judge_accuracy_on_renders"] >= 0.95
    assert 0.0 <= metrics["chance_alignment"] < 0.5
    assert (tmp_path / "eval" / "samples.png").is_file() and "alignment" in capsys.readouterr().out


def test_cli_lora_and_controlnet_runs(tmp_path, base_pipeline):
    """train --lora-rank and --controlnet canny from a pipeline for a few steps, then sample with each (main() in
    this process: test_cli_train_sample_evaluate runs the entry point in a process of its own)."""
    from PIL import Image

    from raphael_ext.__main__ import main
    from raphael_ext.training.data import ShapesDataset

    common = ["--init-from", str(base_pipeline), "--steps", "2", "--batch-size", "2", "--warmup-steps", "1"]
    main(["train", "--out", str(tmp_path / "lora"), "--lora-rank", "4", *common])
    main(["sample", "--pipeline", str(base_pipeline), "--lora", str(tmp_path / "lora" / "lora"), "--lora-scale", "0.5",
          "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "lora.png")])
    main(["train", "--out", str(tmp_path / "cn"), "--controlnet", "canny", *common])
    control = ShapesDataset(1, 16, seed=3)[0]["image"].add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(control).save(tmp_path / "control.png")
    main(["sample", "--pipeline", str(tmp_path / "cn" / "pipeline"), "--control-image", str(tmp_path / "control.png"),
          "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "cn.png")])
    assert (tmp_path / "lora.png").is_file() and (tmp_path / "cn.png").is_file()


def test_every_cli_option_has_a_help_text():
    import argparse

    from raphael_ext.__main__ import main

    parsers = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            main(["demo"])
    finally:
        argparse.ArgumentParser.parse_args = original
    subparsers = [a for a in parsers[0]._actions if isinstance(a, argparse._SubParsersAction)][0]
    helps = {}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        helps[name] = next(a.help for a in subparsers._choices_actions if a.dest == name)
    assert len(set(helps.values())) == len(helps), helps  # no two commands share a description


def test_low_res_steps_start_at_half_size(tmp_path):
    """low_res_steps: the first steps' batches at half the resolution (a multiple of the U-Net's stride), the rest at
    full size; the other draws of each step do not change."""
    trainer = Trainer(config(tmp_path, low_res_steps=2), device="cpu")
    plain = Trainer(config(tmp_path, out=str(tmp_path / "plain")), device="cpu")
    sizes = [tuple(trainer.batch(step)["images"].shape[-2:]) for step in range(4)]
    assert sizes == [(8, 8), (8, 8), (16, 16), (16, 16)]
    assert [trainer.batch(s)["captions"] for s in range(4)] == [plain.batch(s)["captions"] for s in range(4)]
    assert trainer.train_step(0)["loss"] > 0


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedules_warm_up_then_hold_or_decay_to_zero(tmp_path, schedule):
    """lr_schedule: a linear warm-up, then constant (the paper's) or a cosine or linear decay that reaches 0 at the
    end of the run; a resumed run continues the same schedule."""
    trainer = Trainer(config(tmp_path, steps=6, warmup_steps=2, lr_schedule=schedule, checkpoint_every=3,
                             keep_last=5), device="cpu")
    lrs = []
    for step in range(6):
        lrs.append(trainer.lr_schedule.get_last_lr()[0])
        trainer.train_step(step)
        trainer.step = step + 1
        if trainer.step == 3:
            trainer.save_checkpoint()
    progress = [0, 0.25, 0.5, 0.75]  # of the steps after the warm-up, at steps 2..5 (0 would come at step 6)
    decay = {"constant": [1.0] * 4, "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in progress],
             "linear": [1 - p for p in progress]}[schedule]
    expected = [0.5e-3, 1e-3] + [1e-3 * d for d in decay]
    assert lrs == pytest.approx(expected, abs=1e-9)
    resumed = Trainer.resume(str(tmp_path / "run"), device="cpu")
    assert resumed.step == 3 and resumed.lr_schedule.get_last_lr()[0] == pytest.approx(lrs[3], abs=1e-12)


def test_unknown_lr_schedule_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        Trainer(config(tmp_path, lr_schedule="exponential"), device="cpu")


def test_logit_normal_timesteps_train_the_middle_of_the_noise_range(tmp_path):
    """timestep_sampling="logit_normal" (SD3's): about twice as many timesteps in the middle of the range as uniform
    draws, few at either end, all valid; drawn from the step's generator, so a resumed run draws the same."""
    uniform = Trainer(config(tmp_path), device="cpu")
    logit_normal = Trainer(config(tmp_path, timestep_sampling="logit_normal"), device="cpu")
    draws = {name: torch.cat([trainer.sample_timesteps(torch.Generator().manual_seed(i)) for i in range(500)])
             for name, trainer in (("uniform", uniform), ("logit_normal", logit_normal))}
    for t in draws.values():
        assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    middle = {name: ((t >= 300) & (t < 700)).float().mean().item() for name, t in draws.items()}
    assert middle["uniform"] == pytest.approx(0.4, abs=0.03) and middle["logit_normal"] == pytest.approx(0.6, abs=0.03)
    assert (draws["logit_normal"] >= 900).float().mean() < 0.05
    same = logit_normal.sample_timesteps(torch.Generator().manual_seed(7))
    assert torch.equal(same, logit_normal.sample_timesteps(torch.Generator().manual_seed(7)))
    assert logit_normal.train_step(0)["loss"] > 0
    # logit_mean moves the centre: sigmoid(-1.05) * 1000 = 259, the linear schedule's SNR-1 timestep
    shifted = Trainer(config(tmp_path, timestep_sampling="logit_normal", logit_mean=-1.05, batch_size=1000),
                      device="cpu")
    assert shifted.sample_timesteps(torch.Generator().manual_seed(0)).float().median() == pytest.approx(259, abs=25)
    with pytest.raises(ValueError, match="timestep_sampling must be"):
        Trainer(config(tmp_path, timestep_sampling="cosine"), device="cpu")
    with pytest.raises(ValueError, match="logit_std must be positive"):
        Trainer(config(tmp_path, timestep_sampling="logit_normal", logit_std=0.0), device="cpu")
