"""Config fields as the user reads them: a pydantic location as the dotted key recipes write, a type as
"int | None", a range as "must be in [0, 1)", a validation error as one line naming the key, the value
and what was expected, and a list given as a file of lines. Used by `simmim.config` (errors) and `simmim.cli` (--help).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic.fields import FieldInfo


def field_at(cls: type, loc: Sequence[str | int]) -> FieldInfo | None:
    """The field of ``cls`` (or tuple element) at a pydantic location such as ("data", "mean", 2)."""
    info = FieldInfo.from_annotation(cls)
    for part in loc:
        tp = _without_none(info.annotation)
        if isinstance(part, str) and dataclasses.is_dataclass(tp) and part in tp.__pydantic_fields__:
            info = tp.__pydantic_fields__[part]
        elif isinstance(part, int) and typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            info = FieldInfo.from_annotation(args[0] if args[-1] is Ellipsis else args[part])
        else:
            return None
    return info


def _without_none(tp: Any) -> Any:
    """`X | None` -> X (and Annotated[X, ...] -> X): what an element or a sub-key of an optional field is."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (Union, types.UnionType):
        kept = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = kept[0] if len(kept) == 1 else tp
    return tp


def type_name(tp: Any) -> str:
    """An annotation as recipes write it: "int | None", '"tiny" | "small"', "tuple[float, float]"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is tuple:
        return f"tuple[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def bounds(info: FieldInfo) -> str:
    """What a field's range asks: "must be > 0", "each must be in [0, 1)" (a tuple's elements), or ""."""
    each = typing.get_origin(info.annotation) is tuple
    if each:
        info = FieldInfo.from_annotation(typing.get_args(info.annotation)[0])
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    b = {k: getattr(m, k) for m in info.metadata for k in ops if getattr(m, k, None) is not None}
    if b.keys() & {"gt", "ge"} and b.keys() & {"lt", "le"}:
        lo = f"({b['gt']}" if "gt" in b else f"[{b['ge']}"
        hi = f"{b['lt']})" if "lt" in b else f"{b['le']}]"
        bounds = f"in {lo}, {hi}"
    else:
        bounds = " and ".join(f"{ops[k]} {v}" for k, v in b.items())
    return f"{'each ' * each}must be {bounds}" if bounds else ""


def dotted(loc: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def unknown_key(name: str, valid: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    return f"unknown key {prefix + name!r}{hint}; valid keys: {', '.join(prefix + v for v in valid)}"


_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")
_OUT_OF_RANGE = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def one_line_error(cls: type, tree: Any, error: dict[str, Any]) -> str:
    """A pydantic error as ``key=value: what was expected``, the key dotted as recipes and overrides write it."""
    kind, loc, value = error["type"], tuple(error["loc"]), error["input"]
    key = dotted(loc)
    if kind == "value_error" and not dataclasses.is_dataclass(field_at(cls, loc).annotation):
        return f"{key}={value!r}: {error['ctx']['error']}"  # a field's own validator
    if kind == "value_error":  # a __post_init__ check, naming keys within its section
        return f"{key}.{error['ctx']['error']}" if key else str(error["ctx"]["error"])
    if kind in _UNKNOWN:
        *section, name = loc
        prefix = dotted(section) + "." if section else ""
        return unknown_key(str(name), list(field_at(cls, section).annotation.__pydantic_fields__), prefix)
    if kind == "missing" and isinstance(loc[-1], str):
        return f"{key} is required: set it in the recipe or as {key}=..."
    if kind == "dataclass_type":
        return f"{key or 'config'}={value!r}: expected a mapping of keys to values"
    if kind in _OUT_OF_RANGE and isinstance(loc[-1], int):  # an element: name the tuple, as recipes write it
        *field, _ = loc
        for part in field:
            tree = tree[part]
        return f"{dotted(field)}={tree!r}: {bounds(field_at(cls, field))}"
    if kind in _OUT_OF_RANGE:
        return f"{key}={value!r}: {bounds(field_at(cls, loc))}"
    if kind == "missing":  # a tuple given too few elements
        loc = loc[:-1]
    return f"{dotted(loc)}={value!r}: expected {type_name(field_at(cls, loc).annotation)}"


def names_or_file(value: Any) -> Any:
    """A list of names (data.class_names) as given, or read from the path of a UTF-8 text file whose line i
    is name i (stripped of surrounding spaces, none blank); the names must be distinct."""
    if isinstance(value, str):
        path = os.path.expanduser(value)
        if not os.path.isfile(path):
            raise ValueError("no such file (give a list of names, or a text file of one name per line)")
        value = [line.strip() for line in Path(path).read_text("utf-8").splitlines()]
    if isinstance(value, list | tuple) and ("" in value or len(set(value)) < len(value)):
        raise ValueError("the names must be distinct and none blank (a file: one name per line)")
    return value
