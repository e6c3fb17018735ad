"""Training data from WebDataset tar shards (the format large text-image sets come in, e.g. img2dataset's output):
`--data "data/shard-{000000..000099}.tar"`. Each sample is an image (jpg, png or webp) with a same-key txt caption.

The shards are streamed, never listed whole: every epoch they are shuffled (seeded) and dealt out to the ranks, and
each rank's share to its data-loader workers (`workers` processes decode in parallel; 0 decodes in the trainer's own
process). The trainer draws `n` samples per step with take(n) and resizes them to the step's bucket, so buckets work
as for a folder. Samples that fail to decode or lack a caption are skipped and counted.

Resume is exact: the stream's position (per worker: epoch, shard, samples read in it; and which worker comes next)
is part of every checkpoint, so a resumed run reads the very samples the uninterrupted one would have, as long as the
number of ranks and workers is the same. With other numbers it restarts at the start of the epoch it was in (shard
granularity at the epoch's boundary), and says so.
"""

import io
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .._optional import missing_extra
from .data import check_image

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
    """Yields (image bytes, caption, key, stream, position after this sample, failures skipped before it) forever.
    Worker w of the DataLoader reads logical stream (w + rotation) % streams, so that after a resume the DataLoader's
    round-robin (which starts at worker 0) continues with the stream that was next."""

    def __init__(self, urls, seed, rank, world, streams, positions: List[StreamPosition], rotation: int, min_size: int):
        self.urls, self.seed, self.rank, self.world = urls, seed, rank, world
        self.streams, self.positions, self.rotation, self.min_size = streams, positions, rotation, min_size

    def __iter__(self):
        import webdataset as wds

        info = get_worker_info()
        stream = ((info.id if info is not None else 0) + self.rotation) % self.streams
        position = StreamPosition(**asdict(self.positions[stream]))
        failures = 0
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
                    if image is None or not caption or check_image(image, self.min_size) is not None:
                        failures += 1
                        continue
                    yield image, caption, sample["__key__"], stream, StreamPosition(**asdict(position)), failures
                    failures = 0
                position.shard += 1
                position.offset = 0
            position = StreamPosition(epoch=position.epoch + 1)


class ShardStream:
    """take(n) -> (list of (PIL image, caption), failures skipped) from this rank's share of the shards; state() /
    the `state` argument carry the position through checkpoints (see the module docstring)."""

    def __init__(self, pattern: str, rank: int = 0, world: int = 1, workers: int = 0, seed: int = 0,
                 min_size: int = 0, state: Optional[dict] = None):
        self.urls = expand_shards(pattern)
        missing = [u for u in self.urls if "://" not in u and not _exists(u)]
        if missing:
            raise FileNotFoundError(f"shards: {len(missing)} of {len(self.urls)} shards do not exist, "
                                    f"e.g. {missing[0]}")
        self.rank, self.world, self.workers, self.seed, self.min_size = rank, world, workers, seed, min_size
        self.streams = max(1, workers)
        self.positions = [StreamPosition() for _ in range(self.streams)]
        self.next_stream = 0  # the logical stream the next sample comes from
        if state is not None:
            self._restore(state)
        self._iterator = None

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

    def _samples(self) -> Iterator:
        if self._iterator is None:
            dataset = _StreamDataset(self.urls, self.seed, self.rank, self.world, self.streams, self.positions,
                                     self.next_stream, self.min_size)
            if self.workers > 0:
                loader = DataLoader(dataset, batch_size=None, num_workers=self.workers, persistent_workers=True)
                self._iterator = iter(loader)
            else:
                self._iterator = iter(dataset)
        return self._iterator

    def take(self, n: int) -> Tuple[List[Tuple[Image.Image, str]], int]:
        samples, failures = [], 0
        iterator = self._samples()
        for _ in range(n):
            data, caption, _, stream, position, skipped = next(iterator)
            assert stream == self.next_stream, "shards: the data loader left its round-robin order"
            self.positions[stream] = position
            self.next_stream = (stream + 1) % self.streams
            failures += int(skipped)
            samples.append((Image.open(io.BytesIO(data)), caption))
        return samples, failures


def _exists(path: str) -> bool:
    return Path(path.removeprefix("file:")).is_file()


__all__ = ["ShardStream", "StreamPosition", "expand_shards", "is_shard_pattern", "shards_of"]
