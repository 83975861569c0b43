"""The classes a run's labels index: the data's own names (class folders, a ClassLabel feature, the
index.json beside shards), else those the config gives (`data.class_names`, or `data.num_classes` classes
named "0".."N-1"), which must agree with the data's where both exist; and that every label indexes one.

Shards made by other tools (timm's and webdataset's ImageNet among them) hold only `{key}.cls` integers, so
their names can only come from the config. A label outside the classes is refused where it is read: up front
for a map-style source, whose label column is cheap to read, and when its example is read for a stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import zip_longest

import numpy as np

from simmim.data.source_base import ImageSource
from simmim.errors import LabelError


def _preview(names: Sequence[str], shown: int = 5) -> str:
    head = ", ".join(repr(n) for n in names[:shown])
    return f"[{head}{f', ... {len(names) - shown} more' if len(names) > shown else ''}]"


def resolve_class_names(
    found: list[str] | None, num_classes: int | None, class_names: Sequence[str], where: str
) -> list[str] | None:
    """The run's class names: `found` in the data (None: it names none), checked against the config's
    `num_classes` and `class_names` (() when not given), or made from them; None when neither has any.

    Args:
        where: what the data is called in an error, e.g. "data.path='shards/'".
    """
    given = list(class_names) or ([str(i) for i in range(num_classes)] if num_classes else None)
    if found is None:
        return given
    if num_classes is not None and num_classes != len(found):
        raise ValueError(
            f"data.num_classes={num_classes}, but {where} names {len(found)} classes of its own: "
            f"{_preview(found)}; drop data.num_classes or make it {len(found)}"
        )
    if class_names and list(class_names) != found:
        label, (ours, theirs) = next(
            (i, p) for i, p in enumerate(zip_longest(class_names, found)) if p[0] != p[1]
        )
        raise ValueError(
            f"data.class_names={_preview(class_names)} ({len(class_names)} names) are not the {len(found)} "
            f"that {where} names itself, {_preview(found)}: label {label} is {ours!r} against {theirs!r}; "
            "drop data.class_names or give the data's"
        )
    return found


def named_classes(source: ImageSource, where: str) -> list[str]:
    """A labelled source's class names, which fine-tuning needs; a one-line error naming how to give them."""
    if not source.has_labels:
        raise ValueError(f"{where} has no labels: fine-tuning needs class folders or a label column")
    if not source.class_names:
        raise ValueError(
            f'{where} has no class names: give data.num_classes=N (classes named "0".."N-1") or '
            "data.class_names=[...] (or a file of one name per line), or keep them with the data: class "
            "folders, a ClassLabel column, an index.json beside the shards (as scripts/make_shards.py writes)"
        )
    return source.class_names


def label_outside(name: str, label: int, num_classes: int) -> str:
    """What to say of example `name` (its shard or dataset, and its key) whose label indexes no class."""
    return (
        f"{name}: label {label} is outside [0, {num_classes}), the run's {num_classes} classes "
        "(data.num_classes, data.class_names, or the data's own class names)"
    )


def check_label(label: int, name: str, num_classes: int | None) -> None:
    """Refuse an example's label outside [0, num_classes) as it is read (-1: unlabelled, skipped)."""
    if num_classes is not None and not -1 <= label < num_classes:
        raise LabelError(label_outside(name, label, num_classes))


def check_labels(source: ImageSource) -> None:
    """Refuse a map-style source any of whose labels is outside [0, its classes) (-1, unlabelled, is
    skipped when read); reads its label column only, and decodes one image to name the first bad example."""
    if source.is_streaming or not source.has_labels or not source.class_names:
        return
    labels, n = source.labels(), len(source.class_names)
    bad = np.flatnonzero((labels < -1) | (labels >= n))
    if len(bad):
        name = source.load(int(bad[0]))[2]
        raise ValueError(
            f"{label_outside(name, int(labels[bad[0]]), n)}; {len(bad)} of {len(labels)} labels are"
        )
