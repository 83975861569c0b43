"""Reading and writing run configs: a config class's defaults, then a recipe YAML, then ``key.sub=value``
overrides, validated by pydantic with one-line errors (`simmim.config_fields`); and the resolved config back
to YAML. Generic over the config classes of `simmim.config`, which re-exports these functions."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from simmim.bounded_yaml import read_yaml
from simmim.config_fields import field_at, one_line_error, type_name

T = TypeVar("T")


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for name in parents:
        node = tree.setdefault(name, {})
        if not isinstance(node, dict):
            raise ValueError(f"{name}={node!r}: expected a mapping of keys to values")
        tree = node
    if isinstance(value, dict) and isinstance(tree.get(leaf), dict):
        for k, v in value.items():
            _set_dotted(tree[leaf], str(k), v)
    else:
        tree[leaf] = value


def _parse_override(cls: type, item: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key, value) with the value read by ``yaml.safe_load``."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r}: expected key.sub=value")
    info = field_at(cls, key.split("."))  # None for unknown keys: validation reports them
    accepts_str = info is not None and "str" in type_name(info.annotation).split(" | ")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        if not accepts_str:
            raise ValueError(f"{key}={text!r}: not valid YAML") from None
        value = text
    # A string field keeps the text as typed: data.path=2024 is a folder, not the number 2024.
    if accepts_str and value is not None and not isinstance(value, str):
        value = text
    return key, value


def config_from_dict(cls: type[T], d: dict) -> T:
    """Strictly build and validate ``cls`` from a nested dict (e.g. a saved config.yaml)."""
    if isinstance(d, dict):
        # A section given in part keeps the rest of its parent's default (FinetuneConfig's model.head="cls").
        d = dict(d)
        for name, info in cls.__pydantic_fields__.items():
            if dataclasses.is_dataclass(info.annotation) and isinstance(d.get(name), dict):
                d[name] = {**config_to_dict(info.get_default(call_default_factory=True)), **d[name]}
    try:
        return TypeAdapter(cls).validate_python(d)
    except ValidationError as e:
        raise ValueError(one_line_error(cls, d, e.errors()[0])) from None


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, then the recipe YAML, then ``key.sub=value`` overrides; validated."""
    tree: dict = {}
    if recipe is not None:
        if not Path(recipe).is_file():
            raise FileNotFoundError(f"--recipe {str(recipe)!r}: no such file")
        try:
            tree = read_yaml(Path(recipe).read_text(), f"recipe {str(recipe)!r}") or {}
        except yaml.YAMLError as e:
            raise ValueError(f"recipe {str(recipe)!r} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(tree, dict):
            raise ValueError(f"recipe {str(recipe)!r}: expected a mapping of keys to values")
    for item in overrides:
        _set_dotted(tree, *_parse_override(cls, item))
    return config_from_dict(cls, tree)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested dict of plain JSON/YAML values (tuples become lists)."""
    return TypeAdapter(type(cfg)).dump_python(cfg, mode="json")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML; ``load_config(type(cfg), path)`` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
