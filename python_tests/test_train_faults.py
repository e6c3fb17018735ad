"""Training survives faults, tried on real processes, signals and files: preemption (SIGTERM, SIGUSR1), kill -9 at
random moments and inside a checkpoint write, divergence, a second run in the same folder, ranks that disagree on
which checkpoint they can read, and gradient accumulation under DDP and FSDP2.

The CLI runs in processes forked from a multiprocessing forkserver that has imported torch, diffusers and raphael_ext
once: `python -m raphael_ext train` spends 10 s or more importing them on a small machine."""

import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import threading
import time

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from raphael_ext.training.checkpoints import PAUSE_HOOK, CheckpointError, checkpoint_folders
from raphael_ext.training.trainer import PREEMPTED_EXIT_STATUS, DivergenceError, Preempted, TrainConfig, Trainer
from test_train import SMALL_MODEL, _grads_and_params, config

CLI_RUN = ["--batch-size", "4", "--warmup-steps", "1", "--model", json.dumps(SMALL_MODEL)]


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["raphael_ext.__main__", "raphael_ext.training.trainer"])
    return context


@pytest.fixture
def processes(forkserver):
    """The forkserver's context; processes a failed test leaves running are killed."""
    yield forkserver
    for process in multiprocessing.active_children():
        process.kill()


def _cli(argv, log, env):
    """`python -m raphael_ext train <argv>` in this process, its output into `log`, with `env` added."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    torch.set_num_threads(1)
    from raphael_ext.__main__ import main

    main(["train", *argv])


def _start(processes, out, *argv, **env):
    """A CLI training run into `out` (its output in out.log)."""
    settings = [] if "--resume" in argv else CLI_RUN  # a resumed run keeps its own
    process = processes.Process(target=_cli, args=(["--out", str(out), *settings, *argv], f"{out}.log", env))
    process.start()
    return process


def _wait_for(find, process, timeout=120):
    """Polls find() until it returns something; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        assert process.is_alive(), f"the run ended (status {process.exitcode}) before it was expected to"
        time.sleep(0.02)
    raise AssertionError("timed out")


def _newest_step(out):
    folders = checkpoint_folders(out / "checkpoints")
    return int(folders[0].name[5:]) if folders else 0


def _in_a_checkpoint_write(out):
    """The step whose checkpoint is being written (its temporary folder holds model.safetensors), or None."""
    for model in (out / "checkpoints").glob(".step-*.tmp/model.safetensors"):
        return int(model.parent.name.split(".")[1][5:])
    return None


def _assert_same_pipeline(a, b):
    parts = sorted(p.relative_to(a) for p in (a / "pipeline").rglob("*.safetensors"))
    assert parts == sorted(p.relative_to(b) for p in (b / "pipeline").rglob("*.safetensors")) and parts
    for part in parts:
        left, right = load_file(a / part), load_file(b / part)
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), f"{part} differs"


def test_preemption_checkpoints_the_step_reached_and_resumes_exactly(tmp_path, processes):
    """SIGUSR1 (SLURM's --signal) ends the step in progress and writes its checkpoint; a SIGTERM during that write is
    ignored; the CLI exits with PREEMPTED_EXIT_STATUS; --resume reaches the uninterrupted run's weights bit for bit."""
    out = tmp_path / "run"
    run = _start(processes, out, "--steps", "1000", "--checkpoint-every", "3", **{PAUSE_HOOK: "1"})
    _wait_for(lambda: _newest_step(out) == 3, run)  # training is under way
    started = time.monotonic()
    os.kill(run.pid, signal.SIGUSR1)
    step = _wait_for(lambda: _in_a_checkpoint_write(out), run)
    os.kill(run.pid, signal.SIGTERM)
    run.join(60)
    assert run.exitcode == PREEMPTED_EXIT_STATUS and time.monotonic() - started < 60
    assert f"preempted by SIGUSR1 at step {step}" in (tmp_path / "run.log").read_text()
    assert _newest_step(out) == step > 3 and not list((out / "checkpoints").glob(".*"))
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"event": "preempted", "signal": "SIGUSR1", "step": step} in events
    resumed = _start(processes, out, "--resume", "--steps", str(step + 2), "--checkpoint-every", "3")
    reference = _start(processes, tmp_path / "reference", "--steps", str(step + 2), "--checkpoint-every", "3")
    for process in (resumed, reference):
        process.join(120)
        assert process.exitcode == 0
    _assert_same_pipeline(out, tmp_path / "reference")


def test_kill_9_at_random_moments_loses_only_the_steps_since_the_last_checkpoint(tmp_path, processes):
    """Three kill -9 (two at random moments between checkpoints, one inside a checkpoint write, held there by the test
    hook), each followed by --resume: the run ends with the uninterrupted run's pipeline, bit for bit."""
    steps = ["--steps", "24", "--checkpoint-every", "3"]
    reference = _start(processes, tmp_path / "reference", *steps)
    out = tmp_path / "run"
    rng = random.Random(0)
    run = _start(processes, out, *steps)
    for kill in range(3):
        if kill < 2:  # a random moment between two checkpoints, the interval timed on the one before
            before = _newest_step(out)
            _wait_for(lambda: _newest_step(out) > before, run)
            first, started = _newest_step(out), time.monotonic()
            _wait_for(lambda: _newest_step(out) > first, run)
            time.sleep(rng.uniform(0.0, time.monotonic() - started))
        else:
            writing = _wait_for(lambda: _in_a_checkpoint_write(out), run)
        os.kill(run.pid, signal.SIGKILL)
        run.join()
        assert run.exitcode == -signal.SIGKILL
        if kill == 2:
            assert _newest_step(out) == writing - 3  # the interrupted write left the previous checkpoint newest
        hook = {PAUSE_HOOK: "60"} if kill == 1 else {}  # the next run pauses inside its first checkpoint write
        run = _start(processes, out, "--resume", **hook)
    run.join(120)
    reference.join(120)
    assert run.exitcode == 0 and reference.exitcode == 0
    assert not list((out / "checkpoints").glob(".*"))  # the killed write's temporary folder was removed
    _assert_same_pipeline(out, tmp_path / "reference")


def test_nonfinite_steps_are_skipped_and_a_diverging_run_stops(tmp_path):
    """lr 1e9: a step whose loss or gradients are not finite leaves the weights, EMA and optimizer state as they were
    and is counted in log.jsonl; max_nonfinite_steps in a row stop the run with an error naming the steps and the
    last good checkpoint (the one before them), and no NaN reaches a checkpoint or a pipeline."""
    trainer = Trainer(config(tmp_path, lr=1e9, steps=40, max_nonfinite_steps=3, checkpoint_every=1), device="cpu")
    snapshots = []
    original_step = trainer.train_step

    def observed_step(step):
        before = [t.clone() for t in _training_state(trainer)]
        record = original_step(step)
        snapshots.append((record, before, _training_state(trainer)))
        return record

    trainer.train_step = observed_step
    with pytest.raises(DivergenceError) as error:
        trainer.train()
    first, last, good = map(int, re.search(r"not finite at steps (\d+) to (\d+) .*last good checkpoint: .*step-(\d+)",
                                           str(error.value)).groups())
    assert last - first == 2 and good == first - 1  # the checkpoint before the non-finite steps
    skipped = [(before, after) for record, before, after in snapshots if "nonfinite" in record]
    assert len(skipped) >= 3 and len(snapshots) < 40
    for before, after in skipped:
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["nonfinite_steps"] == len(skipped) and records[-1]["nonfinite"] == 1
    assert not (tmp_path / "run" / "pipeline").exists()
    for folder in checkpoint_folders(tmp_path / "run" / "checkpoints"):
        for name in ("model", "ema", "optimizer"):
            assert all(torch.isfinite(t).all() for t in load_file(folder / f"{name}.safetensors").values())


def _training_state(trainer):
    return [*trainer.trained.parameters(), *trainer.ema.parameters(),
            *(t for state in trainer.optimizer.state.values() for t in state.values())]


def test_cli_run_with_a_huge_learning_rate_stops_with_a_clear_message(tmp_path, processes):
    out = tmp_path / "run"
    run = _start(processes, out, "--lr", "1e9", "--steps", "100", "--checkpoint-every", "1")
    run.join(120)
    log = (tmp_path / "run.log").read_text()
    assert run.exitcode == 1 and "train: training diverged" in log and "last good checkpoint" in log
    assert not (out / "pipeline").exists() and _newest_step(out) < 20


def test_one_run_per_folder(tmp_path):
    """A fresh run into another run's folder is refused (resume it, or overwrite); keep_last >= 1; after resuming from
    an older checkpoint (the newer one unreadable), pruning keeps the checkpoint just written and the one before;
    checkpoints are ordered by step number, not by name."""
    Trainer(config(tmp_path, steps=4, checkpoint_every=2, keep_last=2), device="cpu").train()
    with pytest.raises(FileExistsError, match="another run's checkpoints.*--resume.*--overwrite"):
        Trainer(config(tmp_path, steps=1), device="cpu").train()
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        Trainer(config(tmp_path, keep_last=0), device="cpu")
    root = tmp_path / "run" / "checkpoints"
    model = root / "step-0000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    resumed = Trainer.resume(str(tmp_path / "run"), steps=3, device="cpu")
    assert resumed.step == 2
    resumed.train()
    assert [p.name for p in checkpoint_folders(root)] == ["step-0000004", "step-0000003", "step-0000002"]
    Trainer(config(tmp_path, steps=1, overwrite=True), device="cpu").train()
    assert [p.name for p in checkpoint_folders(root)] == ["step-0000001"]
    for name in ("step-9999999", "step-10000000"):  # past 7 digits, names no longer sort like steps
        (root / name).mkdir()
    assert [p.name for p in checkpoint_folders(root)] == ["step-10000000", "step-9999999", "step-0000001"]


ACCUMULATION = dict(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, multiscale=False, dataset_size=64,
                    caption_dropout=0.0, balance_weight=0.0, model={**SMALL_MODEL, "gate_noise": 0.0, "t_cutoff": 1000})


def _count_allreduces(calls, bucket):
    """A DDP communication hook: the default all-reduce, counted."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls.append(bucket.index())
    return allreduce_hook(None, bucket)


def _two_ranks(rank, port, folders, tmp, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        # Each rank sees its own copy of a run (node-local disks); rank 1's newest checkpoint is truncated.
        steps = [None, None]
        dist.all_gather_object(steps, Trainer.resume(folders[rank], device="cpu").step)
        assert steps == [2, 2], steps
        if rank == 1:
            model = os.path.join(folders[1], "checkpoints", "step-0000002", "model.safetensors")
            with open(model, "r+b") as f:
                f.truncate(100)
        dist.barrier()
        with pytest.raises(CheckpointError, match="no readable checkpoint.*\n.*rank 1"):
            Trainer.resume(folders[rank], device="cpu")
        # Gradient accumulation: 2 ranks x 2 micro-batches of 1, the gradient sync only on the last micro-batch.
        results = {}
        for kind, grad_accum, fsdp in (("ddp1", 1, False), ("ddp", 2, False), ("fsdp", 2, True)):
            trainer = Trainer(TrainConfig(**ACCUMULATION, out=os.path.join(tmp, "accum"), grad_accum=grad_accum,
                                          fsdp=fsdp), device="cpu")
            calls = []
            if not fsdp:
                trainer.forward_models["unet"].register_comm_hook(calls, _count_allreduces)
            trainer.compute_gradients(0)
            results[f"{kind}.allreduces"] = torch.tensor(len(calls))
            results.update({f"{kind}.{k}": v for k, v in _grads_and_params(trainer).items() if k.startswith("grad.")})
        # A signal to rank 1 alone stops both ranks at the same step, with a checkpoint of it (DDP, then FSDP).
        for fsdp in (False, True):
            out = os.path.join(tmp, f"preempted-{fsdp}")
            trainer = Trainer(TrainConfig(**{**ACCUMULATION, "steps": 1000}, out=out, fsdp=fsdp), device="cpu")
            if rank == 1:
                threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            with pytest.raises(Preempted) as stop:
                trainer.train()
            steps = [None, None]
            dist.all_gather_object(steps, stop.value.step)
            assert steps[0] == steps[1] > 0 and stop.value.signal_name == ("SIGTERM" if rank else
                                                                             "a signal to another rank")
            assert Trainer.resume(out, device="cpu", fsdp=fsdp).step == steps[0]
        if rank == 0:
            from safetensors.torch import save_file

            save_file(results, result_file)
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_on_resume_preemption_and_accumulated_gradients(tmp_path, processes):
    """On two gloo ranks: the ranks resume the newest checkpoint every one of them can read, and none readable is an
    error on both; a preemption signal to one rank stops both at the same step, under DDP and FSDP2; gradient
    accumulation (grad_accum=2) gives one process's gradients of the whole batch under DDP and FSDP2, and DDP
    exchanges gradients once per step, not once per micro-batch."""
    Trainer(config(tmp_path, out=str(tmp_path / "rank0"), steps=4, checkpoint_every=2), device="cpu").train()
    shutil.copytree(tmp_path / "rank0", tmp_path / "rank1")
    model = tmp_path / "rank1" / "checkpoints" / "step-0000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = tmp_path / "rank0.safetensors"
    workers = [processes.Process(target=_two_ranks, args=(rank, port, [str(tmp_path / "rank0"),
                                                                       str(tmp_path / "rank1")],
                                                          str(tmp_path), str(result_file)))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(180)
    assert [worker.exitcode for worker in workers] == [0, 0]
    two = load_file(result_file)
    whole = Trainer(TrainConfig(**ACCUMULATION, out=str(tmp_path / "whole")), device="cpu")
    whole.compute_gradients(0)
    halves = Trainer(TrainConfig(**ACCUMULATION, out=str(tmp_path / "halves"), grad_accum=2), device="cpu")
    halves.compute_gradients(0)
    for name, param in whole.trained.named_parameters():
        scale = param.grad.abs().max().item() + 1e-12
        for grad in (halves.trained.get_parameter(name).grad, two[f"ddp.grad.{name}"], two[f"fsdp.grad.{name}"]):
            torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    assert two["ddp.allreduces"].item() == two["ddp1.allreduces"].item() > 0  # per step, not per micro-batch
