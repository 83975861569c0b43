"""Which columns of a Hugging Face dataset hold the image and the label, and how an example's values become
what the decoder and the loss take: encoded bytes or an array of the stored type, a class index."""

from __future__ import annotations

from typing import Any

import numpy as np

_IMAGE_COLUMNS = ("image", "img", "npy")  # npy: webdataset's `{key}.npy` arrays
_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target", "cls")  # cls: webdataset's `.cls`


def _find_column(
    columns: dict[str, Any], given: str | None, names: tuple[str, ...], kind: type
) -> str | None:
    if given is not None:
        if given not in columns:
            raise ValueError(f"column {given!r} not found; the dataset has {list(columns)}")
        return given
    by_name = [name for name in names if name in columns]
    by_type = [name for name, feature in columns.items() if isinstance(feature, kind)]
    return (by_name + by_type + [None])[0]


def _element_dtype(feature: Any) -> str | None:
    """The numeric element type of a nested list or array feature ("uint16"), or None for an image."""
    import datasets

    nested = False
    while isinstance(feature, list) or (hasattr(feature, "feature") and not isinstance(feature, dict)):
        feature, nested = (feature[0] if isinstance(feature, list) else feature.feature), True
    numeric = isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string", "binary")
    if isinstance(feature, (datasets.Array2D, datasets.Array3D)) or (nested and numeric):
        return feature.dtype
    return None


class HuggingFaceColumns:
    """Which columns hold the image and the label, and how a label value becomes a class index."""

    def __init__(self, features: Any, image_column: str | None, label_column: str | None) -> None:
        import datasets

        if features is None:
            raise ValueError("the dataset's features are unknown; they are needed to find the image column")
        self.image = _find_column(features, image_column, _IMAGE_COLUMNS, datasets.Image)
        if self.image is None:
            raise ValueError(f"no image column found among {list(features)}; pass image_column=")
        # an array column (webdataset's `.npy`, a nested list in parquet) comes back as Python lists: its
        # element type, from the features, keeps the stored precision (uint16 stays uint16, not int64)
        self.array_dtype = _element_dtype(features[self.image])
        self.label = _find_column(features, label_column, _LABEL_COLUMNS, datasets.ClassLabel)
        label_feature = features[self.label] if self.label is not None else None
        # webdataset's `{key}.json` becomes a struct column "json": its label field is the label
        self.label_key: str | None = None
        if self.label is None and label_column is None and isinstance(features.get("json"), dict):
            self.label_key = next((n for n in _LABEL_COLUMNS if n in features["json"]), None)
            if self.label_key is not None:
                self.label, label_feature = "json", features["json"][self.label_key]
        self.class_names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
        self.label_index: dict[str, int] | None = None  # string labels -> class index
        if label_feature is not None and not isinstance(label_feature, datasets.ClassLabel):
            dtype = getattr(label_feature, "dtype", None)
            if dtype in ("string", "large_string"):
                self.label_index = {}  # filled from the data by the caller
            elif not str(dtype).startswith(("int", "uint")):
                raise ValueError(f"label column {self.label!r} has type {label_feature}, not a class index")

    def image_of(self, example: dict) -> Any:
        """The example's image as `decode_image` takes it: encoded bytes or a path, or an array."""
        value = example[self.image]
        if self.array_dtype is not None and value is not None:
            return np.asarray(value, dtype=self.array_dtype)
        return value

    def set_string_classes(self, values: list[str]) -> None:
        self.class_names = sorted(set(values))
        self.label_index = {name: i for i, name in enumerate(self.class_names)}

    def label_of(self, example: dict) -> int:
        if self.label is None:
            return -1
        value = example[self.label]
        if self.label_key is not None and value is not None:
            value = value.get(self.label_key)
        if value is None:
            return -1  # an example without a label (a tar member missing): fine-tuning skips it
        return self.label_index[value] if self.label_index is not None else int(value)

    def prepare(self, dataset: Any) -> Any:
        """Keep the two columns and leave images encoded, so that a broken one is skipped, not raised."""
        import datasets

        # and webdataset's example key and shard, which name the example in warnings
        columns = (self.image, self.label, "__key__", "__url__")
        keep = [c for c in columns if c is not None and c in dataset.features]
        dataset = dataset.select_columns(keep)
        if isinstance(dataset.features[self.image], datasets.Image):
            dataset = dataset.cast_column(self.image, datasets.Image(decode=False))
        return dataset
