"""Image sources behind one interface: ImageFolder trees, flat folders, Hugging Face datasets (map-style or
streaming) and a built-in synthetic dataset. `open_source` picks the right one by inspecting the path.

A source yields `(image, label, name)`: an RGB PIL image or None when it cannot be decoded, the class index
(-1 when unlabelled) and what a warning should call the sample (a file path or `dataset[i]`).
When a source has a single split, the validation split is carved from it reproducibly and removed from train.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from simmim.data.class_names import resolve_class_names
from simmim.data.columns import HuggingFaceColumns
from simmim.data.decoding import IMAGE_EXTENSIONS, decode_image
from simmim.data.remote import RetryPolicy, check_answers, own_the_retries, read_json, retrying
from simmim.data.source_base import ImageSource, Sample, carve_split
from simmim.data.streams import DatasetShards, FolderShards, StreamSource, data_files
from simmim.data.subsets import SubsetSource, balanced_subset, holdout_split, random_subset
from simmim.data.synthetic import SyntheticSource

__all__ = [  # the sources' interface and the subsets, read from here by the rest of simmim
    "ImageSource", "Sample", "SubsetSource", "balanced_subset", "carve_split", "holdout_split", "open_source",
    "open_split", "random_subset",
]  # fmt: skip

logger = logging.getLogger("simmim.data")

# names a requested split may be found under, in order of preference
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "valid", "test")}
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
SHARD_INDEX = "index.json"  # beside shards: class names and shard sizes (scripts/make_shards.py)
_HF_DATA_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".py", ".tar", ".zip")


def _resolve_split(split: str, available: list[str]) -> tuple[str, str | None]:
    """Which available split to read for `split`, and which part of it to carve (None: all of it)."""
    canonical = "validation" if split in _SPLIT_ALIASES["validation"] else split
    if canonical not in _SPLIT_ALIASES:
        if split in available:
            return split, None
        raise ValueError(f"split {split!r} not found; available: {available}")
    has_validation = any(name in available for name in _SPLIT_ALIASES["validation"])
    train_name = "train" if "train" in available else (available[0] if len(available) == 1 else None)
    if canonical == "validation" and has_validation:
        return next(name for name in _SPLIT_ALIASES["validation"] if name in available), None
    if train_name is None:
        raise ValueError(
            f"split {split!r} not found and no single training split to carve it from: {available}"
        )
    # no validation split: both parts are carved from train, so that they never overlap
    return train_name, None if has_validation else canonical


# ----------------------------------------------------------------------------------------------------------
# folders


def _is_image_file(name: str) -> bool:
    # hidden files include macOS "._x.jpg" resource forks, which carry an image extension but no image
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirectories(directory: str) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _has_images(directory: str) -> bool:
    with os.scandir(directory) as entries:
        return any(e.is_file() and _is_image_file(e.name) for e in entries)


def _list_images(directory: str) -> list[str]:
    """Image files under `directory`, recursively, as sorted paths relative to it."""
    found = []
    for parent, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        relative = os.path.relpath(parent, directory)
        found += [os.path.normpath(os.path.join(relative, f)) for f in sorted(filenames) if _is_image_file(f)]
    return found


def _layout(root: str) -> str:
    """What a directory holds: "saved" (datasets.save_to_disk), "split_imagefolder" (train/ val/ of class
    folders), "imagefolder" (class folders), "flat" (images, no labels) or "huggingface" (data files)."""
    with os.scandir(root) as entries:
        files = sorted(e.name for e in entries if e.is_file())
    if any(name in _SAVED_DATASET_FILES for name in files):
        return "saved"
    subdirs = _subdirectories(root)
    split_dirs = [d for d in subdirs if d.lower() in _SPLIT_ALIASES["train"] + _SPLIT_ALIASES["validation"]]
    for split_dir in split_dirs:
        path = os.path.join(root, split_dir)
        if not _has_images(path) and any(_has_images(os.path.join(path, c)) for c in _subdirectories(path)):
            return "split_imagefolder"
    if any(_has_images(os.path.join(root, d)) for d in subdirs):
        return "imagefolder"
    if any(_is_image_file(name) for name in files):
        return "flat"
    for _, _, filenames in itertools.islice(os.walk(root), 64):
        if any(name.endswith(_HF_DATA_SUFFIXES) for name in filenames):
            return "huggingface"
    raise ValueError(f"{root} holds neither images (flat or in class folders) nor Hugging Face data files")


class FolderSource(ImageSource):
    """Images in a directory; labels from class sub-folders (ImageFolder) or none (a flat folder).

    Paths are kept in one numpy byte-string array rather than a list of str: DataLoader workers fork the
    process, and touching millions of Python objects would copy their pages into every worker.
    """

    def __init__(
        self, root: str, files: list[str], labels: list[int], class_names: list[str] | None, split: str
    ) -> None:
        self.root = root
        self.files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)  # (N,) relative paths
        self.labels_array = np.array(labels, dtype=np.int64)  # (N,)
        self.class_names = class_names
        self.has_labels = class_names is not None
        self.split = split

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, decode_size: int | None = None) -> Sample:
        path = os.path.join(self.root, os.fsdecode(self.files[index]))
        return decode_image(path, path, decode_size), int(self.labels_array[index]), path

    def labels(self) -> np.ndarray:
        return self.labels_array

    def subset(self, indices: np.ndarray) -> FolderSource:
        part = FolderSource(self.root, [], [], self.class_names, self.split)
        part.files, part.labels_array = self.files[indices], self.labels_array[indices]
        return part


def _scan_imagefolder(root: str, split: str, class_names: list[str] | None = None) -> FolderSource:
    """An ImageFolder: labels index `class_names` (default: its sorted sub-folders, as torchvision does)."""
    found = _subdirectories(root)
    class_names = class_names or found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(
            f"{root} has class folders {unknown} that the training split lacks; labels would shift"
        )
    files, labels = [], []
    for label, name in enumerate(class_names):
        if name not in found:
            continue
        images = _list_images(os.path.join(root, name))
        if not images:
            logger.warning("class folder %s holds no images", os.path.join(root, name))
        files += [os.path.join(name, f) for f in images]
        labels += [label] * len(images)
    return FolderSource(root, files, labels, list(class_names), split)


def _open_folder(root: str, layout: str, split: str, val_fraction: float, seed: int) -> ImageSource:
    if layout == "split_imagefolder":
        subdirs = _subdirectories(root)
        split_dirs = {d.lower(): d for d in subdirs}
        read, carve = _resolve_split(split, list(split_dirs))
        train_dir = os.path.join(root, split_dirs.get("train", split_dirs[read]))
        class_names = _subdirectories(train_dir)
        source = _scan_imagefolder(os.path.join(root, split_dirs[read]), split, class_names)
    elif layout == "imagefolder":
        read, carve = _resolve_split(split, ["train"])
        source = _scan_imagefolder(root, split)
    else:
        read, carve = _resolve_split(split, ["train"])
        files = sorted(f for f in os.listdir(root) if _is_image_file(f))
        source = FolderSource(root, files, [-1] * len(files), None, split)
    if carve is not None and val_fraction > 0:
        source = source.subset(carve_split(len(source), carve, val_fraction, seed))
    if len(source) == 0:
        raise ValueError(f"no images found for split {split!r} in {root}")
    return source


# ----------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _example_name(base: str, example: dict, image_column: str) -> str:
    """`base` with the example's shard and key (webdataset's columns) or else its image's path, if known."""
    if example.get("__url__") and example.get("__key__") is not None:
        return f"{base} ({os.path.basename(example['__url__'])}:{example['__key__']})"
    path = example[image_column].get("path") if isinstance(example[image_column], dict) else None
    return f"{base} ({path})" if path else base


class _HuggingFaceImages(ImageSource):
    def __init__(self, dataset: Any, columns: HuggingFaceColumns, name: str, split: str) -> None:
        self.dataset = columns.prepare(dataset)
        self.columns = columns
        self.name = name
        self.split = split
        self.class_names = columns.class_names
        self.has_labels = columns.label is not None


class HuggingFaceSource(_HuggingFaceImages):
    """A map-style `datasets.Dataset`, optionally restricted to `rows` (a carved split)."""

    def __init__(
        self, dataset: Any, columns: HuggingFaceColumns, name: str, split: str, rows: np.ndarray | None
    ) -> None:
        super().__init__(dataset, columns, name, split)
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.dataset)

    def labels(self) -> np.ndarray:
        if self.columns.label is None:
            return np.full(len(self), -1, dtype=np.int64)
        column = self.dataset[self.columns.label]  # the label column only: no image is read
        values = np.array([self.columns.label_of({self.columns.label: v}) for v in column], dtype=np.int64)
        return values[self.rows] if self.rows is not None else values

    def load(self, index: int, decode_size: int | None = None) -> Sample:
        row = int(self.rows[index]) if self.rows is not None else index
        example = self.dataset[row]
        name = _example_name(f"{self.name}[{row}]", example, self.columns.image)
        return (
            decode_image(self.columns.image_of(example), name, decode_size),
            self.columns.label_of(example),
            name,
        )


def _stream_source(
    dataset: Any,
    columns: HuggingFaceColumns,
    name: str,
    split: str,
    carve: str | None,
    val_fraction: float,
    seed: int,
    retry: RetryPolicy | None = None,
    index: dict[str, Any] | None = None,
) -> StreamSource:
    """A streaming `datasets.IterableDataset` as a `StreamSource`, its validation part carved by a hash of
    each image (about, not exactly, `val_fraction` of it) when it has no validation split; the
    `index.json` beside its files (or `index`) gives the class names of integer labels and each shard's
    size; `retry`: how its network errors are retried."""
    if columns.label_index is not None:
        raise ValueError(
            f"string label column {columns.label!r} needs a ClassLabel feature when streaming (the classes "
            "cannot be listed without reading the whole stream)"
        )
    files = data_files(dataset)
    if index is None:
        index = _shard_index(os.path.dirname(files[0])) if files else {}
    counts = {
        shard["name"]: shard["count"]
        for entry in index.get("splits", {}).values()
        for shard in entry.get("shards", [])
    }
    shards = DatasetShards(columns.prepare(dataset), columns, name, files, counts)
    classes = [str(c) for c in index["classes"]] if isinstance(index.get("classes"), list) else None
    return StreamSource(
        shards,
        name=name,
        split=split,
        class_names=columns.class_names or classes,
        has_labels=columns.label is not None,
        carve=carve if val_fraction > 0 else None,
        val_fraction=val_fraction,
        seed=seed,
        retry=retry,
    )


def _shard_index(directory: str) -> dict[str, Any]:
    """The `index.json` that `scripts/make_shards.py` writes beside its shards (class names, examples per
    shard), or {} when there is none or it cannot be read."""
    index = os.path.join(directory, SHARD_INDEX)
    try:
        content = json.loads(Path(index).read_text()) if os.path.isfile(index) else {}
    except (OSError, ValueError):
        logger.warning("%s cannot be read as JSON: its class names and shard sizes are not used", index)
        return {}
    return content if isinstance(content, dict) else {}


def _index_classes(directory: str) -> list[str] | None:
    classes = _shard_index(directory).get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else None


# The formats a folder or glob of shards may hold, by file suffix, and the datasets builder that reads each.
SHARD_FORMATS = {".tar": "webdataset", ".parquet": "parquet"}


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def shard_files(pattern: str) -> list[str]:
    """The files a glob of shards matches, sorted; a clear error when none, or not one known format."""
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not files:
        raise ValueError(f"data.path={pattern!r} matches no files")
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    if len(suffixes) > 1 or suffixes[0] not in SHARD_FORMATS:
        raise ValueError(
            f"data.path={pattern!r} matches files of {suffixes}; shards must all be one of "
            f"{sorted(SHARD_FORMATS)} (webdataset tar or parquet)"
        )
    return files


def _open_shard_glob(
    pattern: str, split: str, *, image_column, label_column, streaming, val_fraction, seed, retry=None
) -> ImageSource:
    """A glob of tar or parquet shards: all of them are the training split, and the validation split is
    carved from it (a separate glob is a separate data.path)."""
    import datasets

    files = shard_files(pattern)
    builder = SHARD_FORMATS[Path(files[0]).suffix.lower()]
    dataset = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=streaming)
    read, carve = _resolve_split(split, ["train"])
    columns = HuggingFaceColumns(dataset.features, image_column, label_column)
    name = pattern
    if streaming:
        return _stream_source(dataset, columns, name, split, carve, val_fraction, seed, retry)
    if columns.class_names is None and columns.label is not None and columns.label_index is None:
        columns.class_names = _index_classes(os.path.dirname(files[0]))
    rows = carve_split(len(dataset), carve, val_fraction, seed) if carve and val_fraction > 0 else None
    return HuggingFaceSource(dataset, columns, name, split, rows)


def _open_huggingface(
    path: str,
    split: str,
    *,
    saved: bool,
    image_column: str | None,
    label_column: str | None,
    streaming: bool,
    val_fraction: float,
    seed: int,
    retry: RetryPolicy | None = None,
) -> ImageSource:
    import datasets

    if saved:
        loaded = datasets.load_from_disk(path)
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        if streaming:
            splits = {k: v.to_iterable_dataset(num_shards=min(64, len(v))) for k, v in splits.items()}
    else:
        splits = dict(datasets.load_dataset(path, streaming=streaming))
    read, carve = _resolve_split(split, list(splits))
    dataset = splits[read]
    columns = HuggingFaceColumns(dataset.features, image_column, label_column)
    name = f"{Path(path).name or path}:{read}"
    if streaming:
        return _stream_source(dataset, columns, name, split, carve, val_fraction, seed, retry)
    if columns.class_names is None and columns.label is not None and columns.label_index is None:
        columns.class_names = _index_classes(path) if saved or os.path.isdir(path) else None
    if columns.label_index is not None:
        # class indices from all splits together, so that a split missing a class cannot shift the others
        columns.set_string_classes([v for part in splits.values() for v in part.unique(columns.label)])
    rows = (
        carve_split(len(dataset), carve, val_fraction, seed)
        if carve is not None and val_fraction > 0
        else None
    )
    return HuggingFaceSource(dataset, columns, name, split, rows)


def _open_url(url: str, split: str, *, image_column, label_column, streaming, val_fraction, seed, retry):
    """A folder of tar or parquet shards served over HTTP(S), read as a stream: `url` is the folder, and its
    index.json (as scripts/make_shards.py writes it) names each split's shards; a split it lacks is carved
    from train. Network errors, here and in every read, are retried as `retry` says."""
    import datasets

    if not streaming:
        raise ValueError(f"data.path={url!r}: shards over HTTP are read as a stream; set data.streaming=true")
    base, retry = url.rstrip("/"), retry or RetryPolicy()
    index = retrying(lambda: read_json(f"{base}/{SHARD_INDEX}"), f"{base}/{SHARD_INDEX}", retry)
    splits = {k: v.get("shards", []) for k, v in index.get("splits", {}).items() if isinstance(v, dict)}
    read, carve = _resolve_split(split, [k for k, shards in splits.items() if shards])
    files = [f"{base}/{shard['name']}" for shard in splits[read]]
    builder = SHARD_FORMATS.get(Path(files[0]).suffix.lower())
    if builder is None:
        raise ValueError(f"data.path={url!r}: {files[0]} is not one of {sorted(SHARD_FORMATS)}")
    own_the_retries()
    retrying(lambda: check_answers(files[0]), files[0], retry)
    dataset = retrying(
        lambda: datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=True),
        f"{base} ({read} split)",
        retry,
    )
    columns = HuggingFaceColumns(dataset.features, image_column, label_column)
    return _stream_source(dataset, columns, url, split, carve, val_fraction, seed, retry, index)


# ----------------------------------------------------------------------------------------------------------


def open_source(
    path: str,
    split: str = "train",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
    val_fraction: float = 0.05,
    seed: int = 0,
    synthetic_size: int = 1024,
    synthetic_image_size: int = 64,
    retry: RetryPolicy | None = None,
) -> ImageSource:
    """Open one split of a dataset.

    Args:
        path: "synthetic"; a directory (ImageFolder, optionally with train/ and val/ split folders; a flat
            folder of images; Hugging Face data files, e.g. `train-*.parquet` or webdataset `train-*.tar`
            shards; a dataset script; a `save_to_disk` dataset); a glob of tar or parquet shards (the
            training split; validation is carved from it); a Hugging Face Hub name; or, streaming, the
            http(s) URL of a folder of shards with an index.json naming them (scripts/make_shards.py's).
        split: "train" or "validation" ("val", "test" are looked for as validation); any other split name
            is read as is. Without a validation split, `val_fraction` of train is carved out with `seed`,
            and excluded from "train"; with `val_fraction=0` nothing is carved and "validation" reads all of
            the training data (what a reconstruction evaluation of a one-split source wants).
        image_column, label_column: Hugging Face columns; detected by name or feature type when None.
        streaming: read the data as a stream (`simmim.data.streams`): a dataset, shards or an image folder
            (synthetic data is always indexed).
        synthetic_size, synthetic_image_size: the synthetic train split's size and image side; its
            validation split has max(64, synthetic_size // 8) images.
        retry: how a stream's network errors are retried (`simmim.data.remote`).
    """
    if path == "synthetic":
        if split not in _SPLIT_ALIASES["train"] + _SPLIT_ALIASES["validation"]:
            raise ValueError(f"the synthetic dataset has splits 'train' and 'validation', not {split!r}")
        size = synthetic_size if split == "train" else max(64, synthetic_size // 8)
        return SyntheticSource(size, synthetic_image_size, seed, split)
    columns = dict(image_column=image_column, label_column=label_column)
    root = os.path.expanduser(path)
    if path.startswith(("http://", "https://")):
        return _open_url(path, split, **columns, streaming=streaming, val_fraction=val_fraction, seed=seed,
                         retry=retry)  # fmt: skip
    if _is_glob(path):
        return _open_shard_glob(
            path, split, **columns, streaming=streaming, val_fraction=val_fraction, seed=seed, retry=retry
        )
    if os.path.isdir(root):
        layout = _layout(root)
        if layout in ("split_imagefolder", "imagefolder", "flat"):
            folder = _open_folder(root, layout, split, val_fraction, seed)
            if not streaming:
                return folder
            return StreamSource(
                FolderShards(folder),
                name=root,
                split=split,
                class_names=folder.class_names,
                has_labels=folder.has_labels,
            )
        saved = layout == "saved"
    elif os.path.exists(root):
        raise ValueError(f"data.path={path!r} is a file; give a folder, a glob of shards or a dataset name")
    elif _looks_local(path):
        raise ValueError(f"data.path={path!r}: no such file or directory")
    else:
        saved = False  # a Hub name: datasets.load_dataset resolves it
    return _open_huggingface(
        root if os.path.isdir(root) else path,
        split,
        saved=saved,
        **columns,
        streaming=streaming,
        val_fraction=val_fraction,
        seed=seed,
        retry=retry,
    )


def _looks_local(path: str) -> bool:
    """Whether a path that does not exist was meant as a local one rather than a Hub name ("org/name")."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def open_split(cfg: Any, split: str) -> ImageSource:
    """The run's `split` (its train or validation split) from a run config's `data` section, its class
    names the data's own or the config's (`simmim.data.class_names`).

    With `data.holdout_from_train`, both come from the train split: `val_fraction` of it, carved with
    `data.holdout_seed`, is the validation split (for choosing settings without reading the real one)."""
    d = cfg.data
    holdout = d.holdout_from_train and split in (d.train_split, d.val_split)
    source = open_source(
        d.path,
        d.train_split if holdout else split,
        image_column=d.image_column,
        label_column=d.label_column,
        streaming=d.streaming,
        val_fraction=d.val_fraction,
        seed=cfg.seed,
        synthetic_size=d.synthetic_size,
        synthetic_image_size=max(cfg.model.image_size, 32),
        retry=RetryPolicy(d.remote_retries, d.remote_backoff_s),
    )
    if source.has_labels:
        found, where = source.class_names, f"data.path={d.path!r}"
        source.class_names = resolve_class_names(found, d.num_classes, d.class_names, where)
    if not holdout:
        return source
    return holdout_split(
        source, "train" if split == d.train_split else "validation", d.val_fraction, d.holdout_seed
    )
