"""Images per second of the WebDataset input: raphael_ext's ShardStream (each worker decodes and resizes whole
batches for its steps, the trainer's process only receives tensors) against webdataset's own WebLoader decoding
and resizing the same shards into the same batches, with 0, 1 and 2 data-loader workers, in the steady state of a
training run (workers started, queues filled).

Targets (read from the table, not asserted): ShardStream >= 0.9x WebLoader at each worker count, and workers never
slower than decoding in the trainer's process (within the VM's noise: one worker does the same decoding elsewhere).
"""

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from raphael_ext.training.data import fit_image
from raphael_ext.training.shards import ShardStream

wds = pytest.importorskip("webdataset")

SHARDS, PER_SHARD, BATCH, SIZE = 4, 32, 16, 128


def jpeg(rng: np.random.Generator) -> bytes:
    """A 320x256 photo-like JPEG (smooth gradients plus grain), so that decoding costs what a real image's does."""
    y, x = np.mgrid[0:256, 0:320]
    base = np.stack([x * rng.uniform(0.3, 0.8), y * rng.uniform(0.3, 0.9), (x + y) * rng.uniform(0.1, 0.4)], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        with wds.TarWriter(str(folder / f"shard-{s:02d}.tar")) as sink:
            for i in range(PER_SHARD):
                sink.write({"__key__": f"{s:02d}_{i:03d}", "jpg": jpeg(rng), "txt": f"picture {s} {i}"})
    return f"{folder}/shard-{{00..{SHARDS - 1:02d}}}.tar"


def square(step: int):
    return SIZE, SIZE


def resize(image):
    return fit_image(image, SIZE, SIZE)


def shard_stream_batches(pattern: str, workers: int):
    """Batches of ShardStream for consecutive steps, forever; and what stops its workers."""
    stream = ShardStream(pattern, BATCH, square, workers=workers)
    steps = itertools.count()
    return (stream.batch(next(steps))[0] for _ in itertools.count()), stream.close


def webloader_batches(pattern: str, workers: int):
    """Batches of WebLoader over the same shards, epoch after epoch (each worker repeats its share)."""
    dataset = (wds.WebDataset(pattern, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                              empty_check=False)
               .decode("pil").to_tuple("jpg", "txt").map_tuple(resize, lambda caption: caption)
               .batched(BATCH, partial=False).repeat())
    iterator = iter(wds.WebLoader(dataset, batch_size=None, num_workers=workers))
    return (images for images, _ in iterator), iterator.close


PROVIDERS = {"raphael_ext": shard_stream_batches, "webdataset.WebLoader": webloader_batches}
ROUND = 8  # batches per timed round: 128 images


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_webdataset_loader(run, benchmark, shards, workers, provider):
    """Steady state, as in a training run: the workers are started and have filled their queues (2 batches read
    first); a round then reads ROUND batches."""
    benchmark.group = f"webdataset loader, {workers} workers, jpg 320x256 -> {SIZE}x{SIZE}, batch {BATCH}"
    batches, stop = PROVIDERS[provider](shards, workers)
    try:
        for _ in range(2):
            next(batches)
        shapes = []
        run(lambda: shapes.extend(next(batches).shape for _ in range(ROUND)), "cpu", rounds=5)
    finally:
        stop()
    assert shapes and all(shape == (BATCH, 3, SIZE, SIZE) for shape in shapes)
    benchmark.extra_info.update(group=benchmark.group, provider=provider, device="cpu", workers=workers)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(ROUND * BATCH / benchmark.stats.stats.median, 1)


def test_both_loaders_deliver_the_same_images(shards):
    """The same pixels from both (same decoder, same resize): the comparison times the same work."""
    one_shard = shards.replace(f"{{00..{SHARDS - 1:02d}}}", "00")
    ours = ShardStream(one_shard, BATCH, square).batch(0)[0]
    theirs = next(iter(wds.WebDataset(one_shard, shardshuffle=False, nodesplitter=None, empty_check=False)
                       .decode("pil").to_tuple("jpg", "txt").map_tuple(resize, lambda c: c).batched(BATCH)))[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
