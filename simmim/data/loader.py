"""Batching: dataset wrappers that apply the transform (and SimMIM mask) under a per-sample seed, a seeded
batch sampler that shards global batches across processes and resumes mid-epoch, collates that drop broken
samples, and the DataLoader factory.

Every random draw for a sample comes from a seed fixed by (run seed, epoch, position in the epoch), so a run
sees the same crops, flips and masks with 0, 1 or N workers, and 2 processes x batch B see exactly what
1 process x batch 2B sees.
"""

from __future__ import annotations

import itertools
import logging
import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from simmim.data.class_names import check_label
from simmim.data.sources import ImageSource
from simmim.masking import MaskGenerator

logger = logging.getLogger("simmim.data")

# torchdata 0.11's StatefulDataLoader calls torch.set_vital, which torch >= 2.9 deprecates, on every iter()
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

Item = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# seeds


_MASK64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser (Steele et al., 2014): a bijection on 64-bit ints that spreads every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """`_splitmix64` on a uint64 array."""
    with np.errstate(over="ignore"):  # multiplication modulo 2**64 is the point
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _fold(values: tuple[int, ...]) -> int:
    state = 0
    for value in values:
        state = _splitmix64(state ^ (value & _MASK64))
    return state


def derive_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value and on their order (unlike `seed + epoch`)."""
    return _fold(values) >> 1  # 63 bits: valid for torch.manual_seed and numpy


def derive_seeds(*values: int, positions: np.ndarray) -> np.ndarray:
    """`derive_seed(*values, p)` for every p in `positions`, vectorised: (n,) int64."""
    state = _splitmix64_array(np.uint64(_fold(values)) ^ positions.astype(np.uint64))
    return (state >> np.uint64(1)).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# datasets


class _TransformedImages(Dataset):
    """A source plus a transform run under the sample's own seed. Items are dicts, or None if broken."""

    def __init__(self, source: ImageSource, transform: Callable) -> None:
        self.source = source
        self.transform = transform
        self.decode_size = getattr(transform, "decode_size", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> Item | None:
        """`key` is what `EpochBatchSampler` yields, `(index, sample_seed)`; a bare index uses seed 0."""
        index, sample_seed = key if isinstance(key, tuple) else (key, derive_seed(0, 0, key))
        image, label, name = self.source.load(index, self.decode_size)
        return self.make_item(image, label, name, index, sample_seed)

    def _transformed(self, image: Any, name: str, sample_seed: int) -> torch.Tensor | None:
        if image is None:
            return None
        # the transforms draw from torch's global CPU generator: seed it per sample, and restore it after so
        # that the main process's RNG is untouched when num_workers=0
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)
            try:
                return self.transform(image)
            except Exception as error:  # noqa: BLE001 - an odd image must not stop the run
                logger.warning("skipping %s: transform failed (%s: %s)", name, type(error).__name__, error)
                return None

    def make_item(self, image: Any, label: int, name: str, index: int, sample_seed: int) -> Item | None:
        raise NotImplementedError


class MaskedImageDataset(_TransformedImages):
    """SimMIM pretraining items: {"pixel_values" (3, H, W) float32, "bool_masked_pos" (N,) bool, "index", "name"}."""

    def __init__(self, source: ImageSource, transform: Callable, mask_generator: MaskGenerator) -> None:
        super().__init__(source, transform)
        self.mask_generator = mask_generator

    def make_item(self, image: Any, label: int, name: str, index: int, sample_seed: int) -> Item | None:
        pixel_values = self._transformed(image, name, sample_seed)
        if pixel_values is None:
            return None
        # a seed distinct from the transform's, so the mask is independent of the crop
        mask = self.mask_generator(torch.Generator().manual_seed(derive_seed(sample_seed, 1)))
        return {"pixel_values": pixel_values, "bool_masked_pos": mask, "index": index, "name": name}


class LabeledImageDataset(_TransformedImages):
    """Classification items: {"pixel_values" (3, H, W) float32, "labels" int, "index", "name"}."""

    def __init__(self, source: ImageSource, transform: Callable) -> None:
        if not source.has_labels:
            raise ValueError(f"{source} has no labels (a flat folder or a dataset without a label column)")
        super().__init__(source, transform)
        self.num_classes = len(source.class_names) if source.class_names else None

    def make_item(self, image: Any, label: int, name: str, index: int, sample_seed: int) -> Item | None:
        check_label(label, name, self.num_classes)  # a stream's labels are known only as they are read
        if label < 0:
            logger.warning("skipping %s: it has no label", name)
            return None
        pixel_values = self._transformed(image, name, sample_seed)
        if pixel_values is None:
            return None
        return {"pixel_values": pixel_values, "labels": label, "index": index, "name": name}


class _StreamedItems(IterableDataset):
    """A stream's items for one process, split among its DataLoader workers (see `simmim.data.streams`:
    worker w of process r is reader r*W + w). With `repeat`, each worker reads pass after pass without end
    (training: the step count, not the data, ends the run), else one pass (evaluation).

    Its position is `{"pass", "in_pass", "position"}`: the pass being read, how many of that pass's examples
    (in the shuffled order, decoded or not) are behind, and how many the reader has yielded in all. It
    follows the Stateful protocol (`state_dict`/`load_state_dict`), which torchdata's `StatefulDataLoader`
    calls inside each worker after each batch, so a loader's state is exact at any batch. A resumed reader
    starts at its saved pass and passes over that pass's first `in_pass` examples without decoding them:
    the shuffle buffer is refilled from the same examples in the same order, so it yields what the
    uninterrupted run would have. Seeds come from (seed, reader, position), so unlike map-style sources the
    samples depend on the number of processes and workers."""

    def __init__(
        self,
        dataset: _TransformedImages,
        *,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
        repeat: bool,
        shuffle_buffer: int,
    ) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        self.shuffle_buffer = shuffle_buffer
        self._start = {"pass": 0, "in_pass": 0, "position": 0}
        self._now = dict(self._start)

    def state_dict(self) -> dict[str, int]:
        return dict(self._now)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = {key: int(state[key]) for key in ("pass", "in_pass", "position")}
        self._now = dict(self._start)

    def __iter__(self) -> Iterator[Item | None]:
        source = self.dataset.source
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        reader, readers = self.rank * num_workers + worker_id, self.world_size * num_workers
        start = self._start
        position = start["position"]
        for pass_index in itertools.count(start["pass"]) if self.repeat else (start["pass"],):
            skip = start["in_pass"] if pass_index == start["pass"] else 0
            read = 0
            for raw in source.stream(
                reader=reader,
                readers=readers,
                shuffle=self.shuffle,
                seed=self.seed,
                pass_index=pass_index,
                shuffle_buffer=self.shuffle_buffer,
            ):
                read += 1
                if read <= skip:
                    continue
                # the position after this item: what a snapshot taken once it is batched must say
                self._now = {"pass": pass_index, "in_pass": read, "position": position + 1}
                image, label, name = source.decode(raw, self.dataset.decode_size)
                sample_seed = derive_seed(self.seed, reader, readers, position)
                yield self.dataset.make_item(image, label, name, position, sample_seed)
                position += 1
            if self.repeat and read == 0:
                raise ValueError(
                    f"reader {reader} of {readers} (process {self.rank}, loader worker {worker_id}) got no "
                    f"example in a whole pass over {source}: use fewer processes or loader workers"
                )


# ----------------------------------------------------------------------------------------------------------
# sampling


class EpochBatchSampler(Sampler):
    """Yields this process's batches of one epoch as lists of `(index, sample_seed)`.

    The epoch's order is a permutation seeded by (seed, epoch). Global batch k is positions
    [k*B*W, (k+1)*B*W) of it and rank r takes [k*B*W + r*B, k*B*W + (r+1)*B), so the union over ranks does
    not depend on W for a fixed global batch B*W. A final incomplete global batch is dropped with
    `drop_last`, else split as evenly as possible across ranks (a rank may get an empty list, so that every
    rank runs the same number of steps). Iteration starts at global batch `start_batch`.

    Args:
        num_samples: size of the dataset.
        batch_size: B, per process.
        rank, world_size: r and W.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        epoch: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Move to another epoch (useful with persistent workers: the sampler runs in the main process)."""
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def num_batches(self) -> int:
        """Global batches in a whole epoch."""
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            return self.num_samples // global_batch
        return -(-self.num_samples // global_batch)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def _positions(self, batch: int) -> tuple[int, int]:
        """[start, end) positions of this rank's part of global batch `batch`."""
        global_batch = self.batch_size * self.world_size
        start = batch * global_batch
        size = min(global_batch, self.num_samples - start)
        if size == global_batch:
            return start + self.rank * self.batch_size, start + (self.rank + 1) * self.batch_size
        return start + self.rank * size // self.world_size, start + (self.rank + 1) * size // self.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).numpy()
        else:
            order = np.arange(self.num_samples)
        for batch in range(self.start_batch, self.num_batches):
            start, end = self._positions(batch)
            seeds = derive_seeds(self.seed, self.epoch, positions=np.arange(start, end))
            yield list(zip(order[start:end].tolist(), seeds.tolist()))


# ----------------------------------------------------------------------------------------------------------
# collation


def _collate(items: list[Item | None], keys: tuple[str, ...], empty: dict[str, torch.Tensor]) -> dict:
    kept = [item for item in items if item is not None]
    batch: dict[str, Any] = {"num_skipped": len(items) - len(kept)}
    # which samples these are: (B,) source indices and their names (file paths), for per-image reports
    batch["index"] = torch.tensor([item["index"] for item in kept], dtype=torch.long)
    batch["name"] = [item["name"] for item in kept]
    for key in keys:
        # default_collate stacks straight into shared memory inside a worker, saving a copy
        batch[key] = default_collate([item[key] for item in kept]) if kept else empty[key]
    return batch


def collate_pretrain(items: list[Item | None]) -> dict:
    """{"pixel_values" (B, 3, H, W), "bool_masked_pos" (B, N) bool, "index" (B,), "name", "num_skipped"}; B
    counts the samples that decoded, and is 0 (with empty tensors) when none did."""
    empty = {"pixel_values": torch.empty(0, 3, 0, 0), "bool_masked_pos": torch.empty(0, 0, dtype=torch.bool)}
    return _collate(items, ("pixel_values", "bool_masked_pos"), empty)


def collate_classification(items: list[Item | None]) -> dict:
    """{"pixel_values" (B, 3, H, W), "labels" (B,) int64, "index" (B,), "name", "num_skipped"}; B as in
    `collate_pretrain`."""
    empty = {"pixel_values": torch.empty(0, 3, 0, 0), "labels": torch.empty(0, dtype=torch.long)}
    return _collate(items, ("pixel_values", "labels"), empty)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which saves a checkpoint and then shuts them down;
    a scheduler that signals the whole process group (SLURM preemption, kill -- -PGID) would otherwise kill
    the workers first and the run would die without saving."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(
    dataset: MaskedImageDataset | LabeledImageDataset,
    *,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    num_workers: int,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    collate_fn: Callable[[list], dict],
    repeat: bool = False,
    shuffle_buffer: int = 1000,
    stream_state: dict[str, Any] | None = None,
) -> DataLoader:
    """A DataLoader over this process's share of one epoch, starting at global batch `start_batch`.

    Map-style sources use `EpochBatchSampler` (exact resume, results independent of workers and of the
    world size at a fixed global batch); its `set_epoch` moves a persistent-worker loader to another epoch.
    Streaming sources are wrapped in an IterableDataset read by every process and worker (`_StreamedItems`)
    and loaded by torchdata's `StatefulDataLoader`: their length is unknown, `epoch` and `start_batch` are
    not used, and a run resumes from the loader's `state_dict()` (JSON-safe), given back as `stream_state`.

    Args:
        batch_size: per process.
        drop_last: drop the final incomplete global batch (training).
        repeat: streams only: read pass after pass without end (training), else one pass (evaluation).
        shuffle_buffer: streams only: examples a reader shuffles among (`simmim.data.streams`).
        stream_state: streams only: a `state_dict()` of the same loader (same processes and workers).
    """
    # the DataLoader draws its workers' base seed from this rather than from (and so moving) the global RNG
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, rank))
    if dataset.source.is_streaming:
        if start_batch:
            raise ValueError("a stream resumes from its loader's state_dict (stream_state), not start_batch")
        items = _StreamedItems(
            dataset,
            shuffle=shuffle,
            seed=seed,
            rank=rank,
            world_size=world_size,
            repeat=repeat,
            shuffle_buffer=shuffle_buffer,
        )
        # A snapshot of every worker's position after every batch: the state is exact wherever a run saves.
        loader = StatefulDataLoader(
            items,
            batch_size=batch_size,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=pin_memory,
            collate_fn=collate_fn,
            generator=generator,
            worker_init_fn=_ignore_stop_signals,
            snapshot_every_n_steps=1,
        )
        if stream_state is not None:
            loader.load_state_dict(stream_state)
        return loader
    order = dict(shuffle=shuffle, seed=seed, start_batch=start_batch, rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_sampler=EpochBatchSampler(len(dataset), batch_size, drop_last=drop_last, epoch=epoch, **order),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
        generator=generator,
        worker_init_fn=_ignore_stop_signals,
    )
