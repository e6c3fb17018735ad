"""Training on real data: a folder with broken files, WebDataset tar shards (streamed, split by rank and worker,
resumed exactly), and two ranks on shards."""

import io
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from raphael_ext.training.data import FolderDataset
from raphael_ext.training.shards import ShardStream, shards_of
from raphael_ext.training.trainer import TrainConfig, Trainer

SMALL_MODEL = {"channels": [32, 64], "norm_groups": 8, "space_experts": 3, "time_experts": 2, "edge_channels": 8,
               "sample_size": 16}


def png_bytes(size=24, seed=0):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def config(tmp_path, **overrides):
    base = dict(out=str(tmp_path / "run"), steps=3, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1,
                multiscale=False, caption_dropout=0.0, model=dict(SMALL_MODEL))
    return TrainConfig(**{**base, **overrides})


def test_folder_scan_skips_what_cannot_be_used_and_training_survives_later_failures(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        (folder / f"good{i}.png").write_bytes(png_bytes(seed=i))
        (folder / f"good{i}.txt").write_text(f"picture number {i}")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "corrupt.txt").write_text("a corrupt png")
    (folder / "truncated.png").write_bytes(png_bytes(seed=9)[:-200])
    (folder / "truncated.txt").write_text("a truncated png")
    (folder / "nocaption.png").write_bytes(png_bytes(seed=10))
    (folder / "emptycaption.png").write_bytes(png_bytes(seed=11))
    (folder / "emptycaption.txt").write_text("  \n")
    (folder / "tiny.png").write_bytes(png_bytes(size=4, seed=12))
    (folder / "tiny.txt").write_text("too small")
    dataset = FolderDataset(folder, 16)
    assert len(dataset) == 6
    reasons = dict(dataset.skipped)
    assert reasons["corrupt.png"].startswith("unreadable") and reasons["truncated.png"].startswith("unreadable")
    assert reasons["nocaption.png"] == "missing caption (.txt)" and reasons["emptycaption.png"] == "empty caption"
    assert reasons["tiny.png"].startswith("too small")

    trainer = Trainer(config(tmp_path, data=str(folder)), device="cpu")
    out = capsys.readouterr().out
    assert "6 usable image-caption pairs" in out and "5 skipped" in out and "truncated.png" in out
    for i in range(3):  # files that break after the scan: skipped and counted, never a crash
        (folder / f"good{i}.png").write_bytes(b"broken later")
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "data_scan" and records[0]["usable"] == 6 and records[0]["skipped"] == 5
    assert records[-1]["step"] == 3 and records[-1]["data_failures"] > 0


def test_folder_scan_is_shared_not_repeated(tmp_path):
    """A dataset made from another's scan() has the same pairs and skips without decoding the folder again: an image
    broken after the scan is still listed (a second scan would set it aside)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"good{i}.png").write_bytes(png_bytes(seed=i))
        (folder / f"good{i}.txt").write_text(f"picture number {i}")
    (folder / "nocaption.png").write_bytes(png_bytes(seed=5))
    first = FolderDataset(folder, 16)
    scan = first.scan()
    assert json.loads(json.dumps(scan)) == scan  # plain data: broadcast_object_list pickles it
    (folder / "good0.png").write_bytes(b"broken after the scan")
    shared = FolderDataset(folder, 16, scan=scan)
    assert shared.files == first.files and shared.captions == first.captions and shared.skipped == first.skipped
    assert len(FolderDataset(folder, 16)) == 2  # scanning again does see the broken file
    assert shared[1]["caption"] == "picture number 1" and shared[1]["image"].shape == (3, 16, 16)


def write_shards(folder, shards=4, per_shard=5, broken=()):
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"shard-{s:03d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{s:03d}_{i:03d}"
                sample = {"__key__": key, "png": png_bytes(seed=s * 100 + i), "txt": f"sample {key}"}
                if key in broken:
                    sample["png"] = b"not an image"
                sink.write(sample)
    return f"{folder}/shard-{{000..{shards - 1:03d}}}.tar"


def sizes(step):
    """A stand-in for the trainer's bucket schedule: a size that differs from step to step."""
    return (8, 12) if step % 2 else (16, 8)


def captions(stream, steps):
    """Captions of the batches of `steps`, after checking each batch's size and range; and the samples skipped."""
    seen, failures = [], 0
    for step in steps:
        images, batch_captions, skipped = stream.batch(step)
        assert images.shape == (stream.batch_size, 3, *sizes(step)) and images.dtype == torch.float32
        assert images.min() >= -1 and images.max() <= 1
        seen += batch_captions
        failures += skipped
    return seen, failures


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_stream_resumes_exactly(tmp_path, workers):
    """Across an epoch boundary and with data-loader workers (which decode and resize each step's batch to the step's
    size): a stream rebuilt from state() continues with exactly the samples the uninterrupted one reads next; broken
    samples are skipped and counted."""
    pattern = write_shards(tmp_path / "shards", broken={"001_002"})
    whole = ShardStream(pattern, 3, sizes, workers=workers, seed=3)
    first, failures = captions(whole, range(3))  # 3 batches: with 2 workers the next one comes from stream 1
    rest, more = captions(whole, range(3, 9))  # 19 good samples per epoch: this crosses into epoch 1
    assert failures + more >= 1 and "sample 001_002" not in first + rest
    assert len(set(first)) == 9 and set(first) | set(rest) >= {f"sample {s:03d}_{i:03d}" for s in range(4)
                                                                for i in range(5)} - {"sample 001_002"}
    again = ShardStream(pattern, 3, sizes, workers=workers, seed=3)
    assert captions(again, range(3))[0] == first
    resumed = ShardStream(pattern, 3, sizes, workers=workers, seed=3, state=json.loads(json.dumps(again.state())))
    part, _ = captions(resumed, range(3, 5))
    resumed.close()  # the workers stop; the next batch starts them again where the stream stands
    assert part + captions(resumed, range(5, 9))[0] == rest
    with pytest.raises(ValueError, match="consecutive steps"):
        resumed.batch(11)


def test_shard_stream_skips_images_below_the_minimum_size(tmp_path):
    pattern = write_shards(tmp_path / "shards", shards=1, per_shard=4)
    with pytest.raises(ValueError, match="no usable sample"):  # every image is 24 px: an error, not an endless loop
        ShardStream(pattern, 2, sizes, min_size=32).batch(0)
    with wds.TarWriter(str(tmp_path / "empty.tar")):
        pass
    with pytest.raises(ValueError, match="no usable sample"):  # a tar without samples: the same, not a hang
        ShardStream(str(tmp_path / "empty.tar"), 2, sizes, workers=1).batch(0)


def test_shards_are_dealt_to_ranks_and_workers():
    urls = [f"s{i}.tar" for i in range(8)]
    parts = [shards_of(urls, 0, 0, rank, 2, stream, 2) for rank in range(2) for stream in range(2)]
    assert sorted(sum(parts, [])) == sorted(urls) and all(len(p) == 2 for p in parts)
    assert shards_of(urls, 1, 0, 0, 2, 0, 2) != shards_of(urls, 0, 0, 0, 2, 0, 2)  # reshuffled every epoch


def test_training_on_shards_resumes_exactly(tmp_path):
    pattern = write_shards(tmp_path / "shards")
    full = Trainer(config(tmp_path, data=pattern, steps=6, checkpoint_every=3), device="cpu")
    seen = [full.batch(step)["captions"] for step in range(6)]
    full = Trainer(config(tmp_path, data=pattern, steps=6, checkpoint_every=3), device="cpu")
    history = full.train()
    import shutil

    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-0000003", tmp_path / "copy" / "checkpoints" / "step-0000003")
    resumed = Trainer.resume(str(tmp_path / "copy"), device="cpu")
    assert [resumed.batch(step)["captions"] for step in range(3, 6)] == seen[3:]
    resumed = Trainer.resume(str(tmp_path / "copy"), device="cpu")
    assert [r["loss"] for r in resumed.train()] == [r["loss"] for r in history[3:]]


def _shard_worker(rank, world, port, args, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        trainer = Trainer(TrainConfig(**args), device="cpu")
        seen = [c for step in range(3) for c in trainer.batch(step)["captions"]]
        trainer = Trainer(TrainConfig(**args), device="cpu")
        trainer.train()  # DDP over the shards, checkpoint at step 2
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, seen)
        resumed = Trainer.resume(args["out"], steps=3, device="cpu")
        after = resumed.batch(2)["captions"]
        both = [None] * world
        torch.distributed.all_gather_object(both, after)
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump({"seen": gathered, "after_resume": both}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_on_shards(tmp_path):
    """Two gloo ranks read disjoint shards (every sample of an epoch once), and each resumes its own stream."""
    import torch.multiprocessing as mp

    pattern = write_shards(tmp_path / "shards", shards=4, per_shard=3)
    args = dict(out=str(tmp_path / "two"), data=pattern, steps=2, checkpoint_every=2, batch_size=4, lr=1e-3,
                warmup_steps=1, multiscale=False, caption_dropout=0.0, model=dict(SMALL_MODEL))
    result_file = str(tmp_path / "result.json")
    port = 29500 + os.getpid() % 1000 + 250
    procs = [mp.get_context("spawn").Process(target=_shard_worker, args=(r, 2, port, args, result_file))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    result = json.loads(open(result_file).read())
    rank0, rank1 = result["seen"]
    assert not set(rank0) & set(rank1)  # disjoint shards
    assert len(set(rank0[:6] + rank1[:6])) == 12  # the first epoch: every sample once
    assert result["after_resume"] == [rank0[4:6], rank1[4:6]]
