"""Streams: sources read shard by shard, in order, for data too large to index (`data.streaming=true`).

A stream is a list of shards: the tar or parquet files of a folder or glob, the data files of a Hugging
Face dataset, or chunks of an image folder. Each pass over the data hands every shard to exactly one
*reader*: with R processes of W loader workers there are R*W readers, and reader g = rank*W + worker
reads `order[g::R*W]`, where `order` is the pass's permutation of the shards (seeded by (seed, pass)), so no
example is read twice in a pass and each pass reads the shards in a new order. With fewer shards than
readers, every reader reads every shard and keeps every (R*W)-th example (a warning says so).

Within a reader, a shuffle buffer of `shuffle_buffer` examples (seeded by (seed, pass, reader)) mixes the
shards' examples. Everything here is a function of (seed, pass, reader), so a reader's stream can be read
again identically: that is how a run resumes exactly (`simmim.data.loader`: the examples already trained
on are read again and passed over without being decoded).

A shard that breaks off (a truncated download, a damaged tar header) gives up only what follows the
damage: a warning names it, it counts as one unreadable example, and the reader goes on with its next shard.
A network error is no damage: the shard is opened again and read on from where it broke
(`simmim.data.remote`), so the stream is the same as without the error.
"""

from __future__ import annotations

import itertools
import logging
import os
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from simmim.data.decoding import decode_image
from simmim.data.remote import RetryPolicy, own_the_retries, read_resuming

logger = logging.getLogger("simmim.data")

# (the encoded image or a path, or None for a damaged shard; the class index or -1; the example's name)
Raw = tuple[Any, int, str]

# Exceptions a damaged shard raises while it is read: tarfile's, pyarrow's (ArrowInvalid is a ValueError,
# ArrowIOError an OSError), zlib's and a short read's. Network errors are retried before (remote.py).
_DAMAGE = (OSError, EOFError, ValueError, tarfile.TarError, zlib.error)


def stable_fraction(payload: Any, seed: int) -> float:
    """A uniform number in [0, 1) fixed by an image's bytes (or path) and the seed: the held-out carve of a
    stream, the same whatever the sharding, with duplicates on one side."""
    data = payload
    if isinstance(data, dict):
        data = data.get("bytes") or data.get("path") or b""
    if isinstance(data, str):
        data = data.encode()
    crc = zlib.crc32(data, seed & 0xFFFFFFFF)
    # crc32 is not well mixed in its high bits for similar inputs: scramble it (a 32-bit Murmur3 finaliser)
    crc ^= crc >> 16
    crc = (crc * 0x85EBCA6B) & 0xFFFFFFFF
    crc ^= crc >> 13
    crc = (crc * 0xC2B2AE35) & 0xFFFFFFFF
    crc ^= crc >> 16
    return crc / 2**32


class DatasetShards:
    """The shards (data files) of a streaming `datasets.IterableDataset`, read one at a time.

    `IterableDataset.shard(n, i)` keeps data file i, and `.iter()` reads it in any process (plain iteration
    inside a DataLoader worker would split the files among workers again)."""

    def __init__(
        self, dataset: Any, columns: Any, name: str, files: list[str], counts: dict[str, int] | None = None
    ) -> None:
        """`files`: the data files in shard order (`data_files` of the unprepared dataset), or [] if unknown;
        `counts`: examples per file name, when an index lists them (scripts/make_shards.py's index.json)."""
        self.dataset, self.columns, self.name = dataset, columns, name
        self.num_shards = dataset.num_shards
        self.names = [os.path.basename(f) for f in files] if len(files) == self.num_shards else None
        self.counts = counts or {}

    def expected_count(self, i: int) -> int | None:
        """How many examples shard i holds by the index, if one lists it: a tar cut at a member boundary
        reads as a shorter, intact archive, and only the count tells."""
        return self.counts.get(self.names[i]) if self.names else None

    def shard_name(self, i: int) -> str:
        return f"{self.name}/{self.names[i]}" if self.names else f"{self.name} shard {i}/{self.num_shards}"

    def read(self, i: int) -> Iterator[Raw]:
        own_the_retries()  # in this (loader worker) process: simmim retries, not datasets
        shard = self.dataset.shard(num_shards=self.num_shards, index=i, contiguous=True)
        name = self.shard_name(i)
        warned = False
        for row, batch in enumerate(shard.iter(batch_size=1)):
            example = {key: values[0] for key, values in batch.items()}
            key = example.get("__key__", row)
            image = self.columns.image_of(example)
            if image is None and not warned:
                # datasets' webdataset reader takes its columns from the first shard: a `.png` member in a
                # shard of `.jpg` ones has no column, and reads as a missing image
                logger.warning(
                    "%s:%s has no %r member: every shard must hold its images in one format (the first "
                    "shard's); scripts/make_shards.py writes them so",
                    name, key, self.columns.image,
                )  # fmt: skip
                warned = True
            yield image, self.columns.label_of(example), f"{name}:{key}"


def data_files(dataset: Any) -> list[str]:
    """The data files behind a streaming dataset's shards, in shard order, when datasets lists them (its
    examples iterable's arguments: "files" for parquet, "tar_paths" for webdataset)."""
    kwargs = getattr(getattr(dataset, "_ex_iterable", None), "kwargs", None) or {}
    for key in ("files", "tar_paths", "filepaths"):
        value = kwargs.get(key)
        if isinstance(value, list | tuple) and all(isinstance(f, str) for f in value):
            return list(value)
    return []


class FolderShards:
    """An image folder read as a stream: its files in a fixed seeded order, in shards of `files_per_shard`
    (the order mixes the class folders, so that a shard is not one class)."""

    def __init__(self, folder: Any, files_per_shard: int = 256) -> None:
        self.folder = folder
        order = np.random.default_rng(0).permutation(len(folder))
        self.shards = [order[i : i + files_per_shard] for i in range(0, len(order), files_per_shard)]
        self.num_shards = len(self.shards)

    def shard_name(self, i: int) -> str:
        return f"{self.folder.root} files shard {i}/{self.num_shards}"

    def expected_count(self, i: int) -> int | None:
        return None  # each file is read on its own: a missing one fails to decode and is counted

    def read(self, i: int) -> Iterator[Raw]:
        for index in self.shards[i]:
            path = os.path.join(self.folder.root, os.fsdecode(self.folder.files[index]))
            yield path, int(self.folder.labels_array[index]), path


class StreamSource:
    """A source that can only be iterated: `stream()` gives one reader's raw examples of one pass, and
    `decode()` turns one into `(image, label, name)`. See the module docstring for who reads what.

    Attributes (as `ImageSource`): split, class_names, has_labels, is_streaming (True).
    """

    is_streaming = True

    def __init__(
        self,
        shards: DatasetShards | FolderShards,
        *,
        name: str,
        split: str,
        class_names: list[str] | None,
        has_labels: bool,
        carve: str | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
        retry: RetryPolicy | None = None,
    ) -> None:
        """`retry`: how a shard's network errors are retried (data.remote_retries, data.remote_backoff_s)."""
        self.shards, self.name, self.split, self.retry = shards, name, split, retry or RetryPolicy()
        self.class_names, self.has_labels = class_names, has_labels
        self.carve, self.val_fraction, self.carve_seed = carve, val_fraction, seed
        self._warned_readers: set[int] = set()

    @property
    def num_shards(self) -> int:
        return self.shards.num_shards

    def __len__(self) -> int:
        raise TypeError("a streaming source has no length")

    def labels(self) -> np.ndarray:
        raise TypeError("a streaming source has no label array: it is only read in order")

    def load(self, index: int, decode_size: int | None = None):
        raise TypeError("a streaming source cannot be indexed; iterate it with stream()")

    def __iter__(self) -> Iterator[tuple[Any, int, str]]:
        for raw in self.stream():
            yield self.decode(raw)

    def __repr__(self) -> str:
        classes = "unlabelled" if not self.has_labels else f"{len(self.class_names or [])} classes"
        return f"StreamSource({self.name!r}, split={self.split!r}, {self.num_shards} shards, {classes})"

    def decode(self, raw: Raw, decode_size: int | None = None) -> tuple[Any, int, str]:
        payload, label, name = raw
        image = None if payload is None else decode_image(payload, name, decode_size)
        return image, label, name

    def stream(
        self,
        *,
        reader: int = 0,
        readers: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        pass_index: int = 0,
        shuffle_buffer: int = 1000,
    ) -> Iterator[Raw]:
        """Reader `reader`'s (of `readers`) examples of pass `pass_index`, undecoded.

        Args:
            shuffle, seed, pass_index: the shard order and the buffer's draws, seeded by (seed, pass_index).
            shuffle_buffer: examples held to shuffle among (0 or 1: the shards' own order).
        """
        if not 0 <= reader < readers:
            raise ValueError(f"reader {reader} is outside [0, readers={readers})")
        n = self.num_shards
        order = np.arange(n)
        if shuffle:
            order = np.random.default_rng([seed, pass_index, 0x5EED]).permutation(n)
        if n >= readers:
            examples = self._read_all(order[reader::readers])
        else:
            if reader not in self._warned_readers and reader == 0:
                logger.warning(
                    "%s has %d shards for %d readers (processes x loader workers): every reader reads every "
                    "shard and keeps every %d-th example, so each shard is read %d times; make at least %d "
                    "shards to read each once",
                    self.name, n, readers, readers, readers, readers,
                )  # fmt: skip
                self._warned_readers.add(reader)
            examples = itertools.islice(self._read_all(order), reader, None, readers)
        if self.carve is not None:
            examples = (e for e in examples if self._in_carve(e))
        if shuffle and shuffle_buffer > 1:
            rng = np.random.default_rng([seed, pass_index, reader, 0xB0FF])
            examples = _buffer_shuffled(examples, shuffle_buffer, rng)
        return examples

    def _in_carve(self, raw: Raw) -> bool:
        if raw[0] is None:
            return True  # a damaged shard's marker counts on both sides: it is one unreadable example
        held_out = stable_fraction(raw[0], self.carve_seed) < self.val_fraction
        return held_out == (self.carve == "validation")

    def _read_all(self, shard_indices: np.ndarray) -> Iterator[Raw]:
        for i in shard_indices:
            yield from self._read_shard(int(i))

    def _read_shard(self, i: int) -> Iterator[Raw]:
        """Shard i's examples; one damaged-shard marker (payload None) in place of whatever follows damage.
        A network error is retried (opened again, read past what was given); RemoteReadError past retries."""
        read, name = 0, self.shards.shard_name(i)
        try:
            for raw in read_resuming(lambda: self.shards.read(i), name, self.retry):
                yield raw
                read += 1
        except _DAMAGE as error:
            why = f"{type(error).__name__}: {error}"
        else:
            expected = self.shards.expected_count(i)
            if expected is None or read >= expected:
                return
            why = f"the index lists {expected}"
        logger.warning("%s is damaged after %d examples (%s); skipping the rest of it", name, read, why)
        yield None, -1, f"{name} (damaged after {read} examples)"


def _buffer_shuffled(items: Iterator[Raw], size: int, rng: np.random.Generator) -> Iterator[Raw]:
    """A shuffle buffer: hold `size` items, and yield a random one of them for each new item."""
    buffer: list[Raw] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]
