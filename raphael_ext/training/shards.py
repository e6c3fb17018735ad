"""Training data from WebDataset tar shards (the format large text-image sets come in, e.g. img2dataset's output):
`--data "data/shard-{000000..000099}.tar"`. Each sample is an image (jpg, png or webp) with a same-key txt caption.

The shards are streamed, never listed whole: every epoch they are shuffled (seeded) and dealt out to the ranks, and
each rank's share to its data-loader workers. A worker delivers whole batches: it reads the next `batch_size` usable
samples of its share, decodes each image once and resizes it to the size of the step the batch is for (`sizes`,
the trainer's bucket of each step), so the trainer's process only receives tensors. With `workers` processes, worker w
prepares the batches of steps s + w, s + w + workers, s + w + 2 workers, ... (s: the first step read), ahead of the
steps that need them; 0 workers decode in the trainer's own process. Samples that fail to decode, are too small or
lack a caption are skipped and counted.

Resume is exact: the stream's position (per worker: epoch, shard, samples read in it; and which worker comes next)
is part of every checkpoint, so a resumed run reads the very samples the uninterrupted one would have, as long as the
number of ranks and workers is the same. With other numbers it restarts at the start of the epoch it was in (shard
granularity at the epoch's boundary), and says so.
"""

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .._optional import missing_extra
from .data import fit_pixels, load_image, pixels_to_unit_range

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str) -> List[str]:
    """Shard paths of a brace pattern ("shard-{000..009}.tar"; several patterns joined by "::")."""
    try:
        from webdataset.shardlists import expand_urls
    except ImportError as error:
        raise missing_extra("webdataset", "train") from error

    return list(expand_urls(pattern))


def is_shard_pattern(data: str) -> bool:
    return ".tar" in data


@dataclass
class StreamPosition:
    """Where one logical stream (a worker's share of a rank's shards) stands: samples already read of shard `shard`
    (an index into the stream's shard list) of epoch `epoch`."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0


def shards_of(urls: List[str], epoch: int, seed: int, rank: int, world: int, stream: int, streams: int) -> List[str]:
    """The shards logical stream `stream` of rank `rank` reads in `epoch`: all shards shuffled by (seed, epoch), dealt
    to the ranks, then to the streams."""
    order = list(urls)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world][stream::streams]


class _StreamDataset(IterableDataset):
    """Yields the batches of steps first_step + j * streams + w, where w is the DataLoader worker's id (0 without
    workers), forever: (step, uint8 pixels [n, 3, H, W], captions, keys, stream, position after the batch,
    samples skipped in it). Worker w reads logical stream (w + rotation) % streams, so that after a resume the
    DataLoader's round-robin (which starts at worker 0) continues with the stream that was next."""

    def __init__(self, urls, seed, rank, world, streams, positions: List[StreamPosition], rotation: int, min_size: int,
                 batch_size: int, sizes: Callable[[int], Tuple[int, int]], first_step: int):
        self.urls, self.seed, self.rank, self.world = urls, seed, rank, world
        self.streams, self.positions, self.rotation, self.min_size = streams, positions, rotation, min_size
        self.batch_size, self.sizes, self.first_step = batch_size, sizes, first_step

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = (worker + self.rotation) % self.streams
        position = StreamPosition(**asdict(self.positions[stream]))
        samples = self._samples(stream, position)
        step = self.first_step + worker
        # Epoch ends since the last usable sample. A stream whose share is one unusable shard moves on to other
        # shards in later epochs; about world x streams epochs let it meet every shard, twice that many without a
        # usable sample (or without any sample: empty or unreadable tars) means the data cannot train.
        barren_epochs, most_barren = 0, 2 * self.world * self.streams
        while True:
            height, width = self.sizes(step)
            images, captions, keys, failures = [], [], [], 0
            while len(images) < self.batch_size:
                sample = next(samples)
                if sample is None:  # the end of an epoch
                    barren_epochs += 1
                    if barren_epochs > most_barren:
                        raise ValueError(f"shards: rank {self.rank}'s stream {stream} found no usable sample (an image "
                                         f"of at least {self.min_size} px with a caption) in {most_barren} epochs")
                    continue
                data, caption, key = sample
                image, _ = load_image(data, self.min_size) if data is not None and caption else (None, None)
                if image is None:
                    failures += 1
                    continue
                barren_epochs = 0
                with image:
                    images.append(fit_pixels(image, height, width))
                captions.append(caption)
                keys.append(key)
            yield step, torch.stack(images), captions, keys, stream, StreamPosition(**asdict(position)), failures
            step += self.streams

    def _samples(self, stream: int, position: StreamPosition) -> Iterator[Optional[Tuple[Optional[bytes], str, str]]]:
        """(image bytes or None, caption, key) of every sample of the stream from `position` on, which it advances;
        None at the end of each epoch."""
        import webdataset as wds

        empty_epochs = 0
        while True:
            shards = shards_of(self.urls, position.epoch, self.seed, self.rank, self.world, stream, self.streams)
            if not shards:
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError(f"shards: {len(self.urls)} shards leave none for rank {self.rank} stream "
                                     f"{stream} of {self.world} ranks x {self.streams} workers; use fewer workers or "
                                     "more shards")
            while position.shard < len(shards):
                source = wds.WebDataset(shards[position.shard], shardshuffle=False, nodesplitter=None,
                                        workersplitter=None, empty_check=False, handler=wds.warn_and_continue)
                for index, sample in enumerate(source):
                    if index < position.offset:
                        continue  # read before the resume
                    position.offset = index + 1
                    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                    caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
                    yield image, caption, sample["__key__"]
                position.shard += 1
                position.offset = 0
            position.epoch, position.shard, position.offset = position.epoch + 1, 0, 0
            yield None


class ShardStream:
    """batch(step) -> (images [batch_size, 3, H, W] in [-1, 1] at sizes(step), captions, samples skipped) from this
    rank's share of the shards, for consecutive steps; state() / the `state` argument carry the position through
    checkpoints (see the module docstring)."""

    def __init__(self, pattern: str, batch_size: int, sizes: Callable[[int], Tuple[int, int]], rank: int = 0,
                 world: int = 1, workers: int = 0, seed: int = 0, min_size: int = 0, state: Optional[dict] = None):
        self.urls = expand_shards(pattern)
        missing = [u for u in self.urls if "://" not in u and not _exists(u)]
        if missing:
            raise FileNotFoundError(f"shards: {len(missing)} of {len(self.urls)} shards do not exist, "
                                    f"e.g. {missing[0]}")
        if batch_size < 1:
            raise ValueError(f"shards: batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.sizes = batch_size, sizes
        self.rank, self.world, self.workers, self.seed, self.min_size = rank, world, workers, seed, min_size
        self.streams = max(1, workers)
        self.positions = [StreamPosition() for _ in range(self.streams)]
        self.next_stream = 0  # the logical stream the next batch comes from
        if state is not None:
            self._restore(state)
        self._iterator = None
        self._next_step: Optional[int] = None

    def _restore(self, state: dict) -> None:
        if state.get("world") == self.world and state.get("streams") == self.streams:
            self.positions = [StreamPosition(**p) for p in state["positions"]]
            self.next_stream = state["next_stream"]
        else:
            epoch = min(p["epoch"] for p in state["positions"])
            logger.warning("shards: the run was saved with %s ranks x %s streams, resumed with %s x %s: restarting at "
                           "the start of epoch %d", state.get("world"), state.get("streams"), self.world, self.streams,
                           epoch)
            print(f"shards: resumed with another number of ranks or workers; restarting at the start of epoch {epoch}")
            self.positions = [StreamPosition(epoch=epoch) for _ in range(self.streams)]
            self.next_stream = 0

    def state(self) -> dict:
        return {"world": self.world, "streams": self.streams, "next_stream": self.next_stream,
                "positions": [asdict(p) for p in self.positions]}

    def _batches(self, first_step: int) -> Iterator:
        if self._iterator is None:
            dataset = _StreamDataset(self.urls, self.seed, self.rank, self.world, self.streams, self.positions,
                                     self.next_stream, self.min_size, self.batch_size, self.sizes, first_step)
            if self.workers > 0:
                loader = DataLoader(dataset, batch_size=None, num_workers=self.workers, persistent_workers=True)
                self._iterator = iter(loader)
            else:
                self._iterator = iter(dataset)
            self._next_step = first_step
        return self._iterator

    def close(self) -> None:
        """Stops the data-loader workers now rather than when the stream is collected; a later batch() starts them
        again at the stream's position."""
        iterator, self._iterator = self._iterator, None
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def batch(self, step: int) -> Tuple[Tensor, List[str], int]:
        if self._next_step is not None and step != self._next_step:
            raise ValueError(f"shards: batches are read for consecutive steps; step {self._next_step} comes next, "
                             f"not {step}")
        produced, pixels, captions, _, stream, position, failures = next(self._batches(step))
        assert produced == step and stream == self.next_stream, "shards: the data loader left its round-robin order"
        self.positions[stream] = position
        self.next_stream = (stream + 1) % self.streams
        self._next_step = step + 1
        return pixels_to_unit_range(pixels), captions, failures


def _exists(path: str) -> bool:
    return Path(path.removeprefix("file:")).is_file()


__all__ = ["ShardStream", "StreamPosition", "expand_shards", "is_shard_pattern", "shards_of"]
