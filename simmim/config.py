"""Typed run configs: dataclass defaults, then a recipe YAML that lists only what differs, then
``key.sub=value`` overrides from the command line (big_vision / torchtune style).

Unknown keys, wrong types and impossible values fail with a ValueError naming the key before anything runs.
Configs are frozen: derived values (scaled lr, global batch, steps per epoch) are computed beside them.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

VARIANTS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are batched."""

    path: str = "synthetic"  # image folder, HF dataset name or saved dataset, or "synthetic"
    train_split: str = "train"
    val_split: str = "validation"
    val_fraction: float = 0.05  # carved from train when the source has no validation split
    image_column: str | None = None  # None = detect
    label_column: str | None = None
    streaming: bool = False
    batch_size: int = 64  # per device
    num_workers: int = 4
    pin_memory: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet statistics
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples failed to decode
    synthetic_size: int = 1024
    # fine-tuning: train on a class-balanced subset, this fraction of each class's labelled images, drawn by
    # `seed` (1.0 = all); evaluation keeps the whole validation split
    label_fraction: float = 1.0
    # evaluate on val_fraction of the train split (carved with data.holdout_seed, left out of training) even
    # when the source has a validation split: for choosing settings without ever reading that split
    holdout_from_train: bool = False
    holdout_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """DeiT size and head; architecture fields left at None take the variant's (or DeiTConfig's) value."""

    variant: Literal["tiny", "small", "base"] = "tiny"
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    hidden_act: str | None = None
    hidden_dropout_prob: float | None = None
    attention_probs_dropout_prob: float | None = None
    initializer_range: float | None = None
    # timm's DeiT uses 1e-6, Transformers' DeiTConfig 1e-12; the variants keep DeiTConfig's unless set here.
    layer_norm_eps: float | None = None
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    encoder_stride: int | None = None  # None = patch_size
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    drop_path_rate: float = 0.0
    init: str = "scratch"  # finetune only: SimMIM export/run dir, Transformers dir, timm file, or "scratch"
    # a model built from scratch: position embeddings random (Transformers' and timm's init) or MAE's 2-D
    # sine-cosine table (trainable), which lets short runs use where patches are; a checkpoint's own are
    # used when model.init loads one (so a study can share the setting between scratch and SimMIM arms)
    position_embedding_init: Literal["random", "sincos"] = "random"
    head: Literal["mim", "cls", "distill", "cnn"] = "mim"
    arch: str | None = None  # head == "cnn": a torchvision classification model name, e.g. "resnet18"


@dataclass(frozen=True)
class MaskConfig:
    """SimMIM's block-wise random mask: square blocks of mask patch_size pixels, ratio of them masked."""

    patch_size: int = 32
    ratio: float = 0.6


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup from 0 and cosine decay; base_lr and min_lr are for a global batch of 512."""

    base_lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 10.0
    clip_grad: float | None = 5.0  # max global grad norm; None = no clipping
    layer_decay: float = 1.0  # BEiT-style layer-wise lr decay; 1.0 = off
    grad_accum_steps: int = 1


@dataclass(frozen=True)
class TrainConfig:
    """Duration, checkpointing, logging and evaluation cadence (in optimizer steps)."""

    epochs: int = 100
    max_steps: int | None = None  # stop early after this many optimizer steps (the schedule keeps epochs)
    save_every_steps: int = 1000
    keep_last: int = 2
    log_every_steps: int = 50
    eval_every_steps: int = 1000  # pretraining's cadence
    eval_every_epochs: int = 1  # fine-tuning's cadence (and always after the last step)
    compile: bool = False
    ema: float | None = None  # EMA decay of the weights; None = no EMA
    eval_batches: int | None = 8  # held-out batches per periodic evaluation; None = all
    # autocast dtype of the forward pass; "launcher" = accelerate launch's --mixed_precision (fp32 without)
    precision: Literal["launcher", "fp32", "bf16", "fp16"] = "launcher"
    # pretraining: also export the model after these epochs to output_dir/snapshots/epoch_<N> (kept)
    snapshot_epochs: tuple[int, ...] = ()
    # pretraining: a kNN probe of the encoder every this many steps (and at the end), see ProbeConfig
    probe_every_steps: int | None = None


@dataclass(frozen=True)
class ProbeConfig:
    """Pretraining's online kNN probe (train.probe_every_steps): labels SimMIM never trains on."""

    data: str | None = None  # a labelled dataset; None = data.path
    bank_images: int = 2000  # labelled features to vote: a seeded subset of its train split
    query_images: int = 1000  # images classified: a seeded subset of its validation split
    layer: int | None = None  # the encoder block probed (1-based); None = the last


@dataclass(frozen=True)
class DistillConfig:
    """DeiT distillation through the distillation token."""

    kind: Literal["hard", "soft"] = "hard"
    alpha: float = 0.5  # weight of the distillation term
    tau: float = 1.0  # soft distillation temperature


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher for head == "distill"."""

    arch: str | None = None  # a torchvision classification model name, or "deit"
    path: str | None = None  # its weights


@dataclass(frozen=True)
class AugConfig:
    """DeiT fine-tuning augmentation."""

    rand_augment: bool = True
    random_erasing: float = 0.25
    mixup: float = 0.8  # Beta(alpha, alpha); 0 = off
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range; DeiT's default


@dataclass(frozen=True)
class PretrainConfig:
    """SimMIM pretraining of a DeiT encoder."""

    output_dir: str
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass(frozen=True)
class FinetuneConfig:
    """DeiT fine-tuning with a classification or distillation head (or a torchvision CNN baseline)."""

    output_dir: str
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(head="cls"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    aug: AugConfig = field(default_factory=AugConfig)


# ModelConfig fields that are not DeiTConfig arguments.
_NOT_DEIT = ("variant", "init", "head", "arch", "position_embedding_init")


def deit_config_kwargs(model: ModelConfig) -> dict[str, Any]:
    """Variant defaults merged with the fields set in ``model``: keyword arguments for DeiTConfig."""
    kwargs: dict[str, Any] = dict(VARIANTS[model.variant])
    for f in dataclasses.fields(model):
        value = getattr(model, f.name)
        if f.name not in _NOT_DEIT and (value is not None or f.name == "pooler_output_size"):
            kwargs[f.name] = value
    if model.encoder_stride is None:
        kwargs["encoder_stride"] = model.patch_size
    return kwargs


# ---------------------------------------------------------------------------------------------- typing


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"tuple[{', '.join('...' if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


# PyYAML follows YAML 1.1, which reads "1e-4" (no dot) as a string; float fields accept such numbers.
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# Strict scalars: a bool is not an int, an int is a fine float.
_SCALARS: dict[type, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: (
        (isinstance(v, (int, float)) and not isinstance(v, bool))
        or (isinstance(v, str) and _FLOAT_RE.fullmatch(v) is not None)
    ),
    str: lambda v: isinstance(v, str),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (int -> float, list -> tuple); ValueError otherwise."""
    fail = ValueError(f"{key}={value!r}: expected {_type_name(tp)}")
    if _is_union(tp):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ValueError:
                pass
        raise fail
    if typing.get_origin(tp) is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise fail
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp in _SCALARS:
        if _SCALARS[tp](value):
            return tp(value)
        raise fail
    if tp is type(None):
        raise fail
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _unknown_key(name: str, valid: Sequence[str], prefix: str) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    return ValueError(
        f"unknown key {prefix + name!r}{hint}; valid keys: {', '.join(prefix + v for v in valid)}"
    )


def _accepts_str(cls: type, key: str) -> bool:
    """Whether the dotted ``key`` of ``cls`` is a string field (False for unknown keys: _build reports them)."""
    tp: Any = cls
    for name in key.split("."):
        tp = typing.get_type_hints(tp).get(name) if dataclasses.is_dataclass(tp) else None
    return tp is str or (_is_union(tp) and str in typing.get_args(tp))


# ----------------------------------------------------------------------------------- building configs


def _build(cls: type[T], values: Any, prefix: str, base: Any = None) -> T:
    """``cls`` from a nested dict; fields not in ``values`` come from ``base`` (or the defaults)."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix[:-1] or 'config'}={values!r}: expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise _unknown_key(str(name), list(fields), prefix)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            # A section's defaults are its parent's default_factory (FinetuneConfig's model head is "cls").
            sub_base = getattr(base, name) if base is not None else fields[name].default_factory()
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", sub_base)
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    for f in fields.values():
        if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{prefix}{f.name} is required: set it in the recipe or as {prefix}{f.name}=...")
    return cls(**kwargs)


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
    accepts_str = _accepts_str(cls, key)
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
    cfg = _build(cls, d, "")
    validate(cfg)
    return cfg


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, then the recipe YAML, then ``key.sub=value`` overrides; validated."""
    tree: dict = {}
    if recipe is not None:
        tree = yaml.safe_load(Path(recipe).read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"recipe {str(recipe)!r}: expected a mapping of keys to values")
    for item in overrides:
        _set_dotted(tree, *_parse_override(cls, item))
    return config_from_dict(cls, tree)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested dict of plain JSON/YAML values (tuples become lists)."""
    return _plain(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML; ``load_config(type(cfg), path)`` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _field_comments(cls: type) -> dict[str, str]:
    """The ``name: type = default  # comment`` comments in a dataclass's source: the help of its fields."""
    try:
        return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.MULTILINE))
    except (OSError, TypeError):
        return {}


def config_help(cls: type, prefix: str = "", base: Any = None) -> str:
    """Every key of ``cls`` with its type, default and comment, sections headed by their docstring."""
    lines = []
    hints, comments = typing.get_type_hints(cls), _field_comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += ["", f"{prefix}{f.name}: {(tp.__doc__ or '').strip()}"]
            lines.append(config_help(tp, f"{prefix}{f.name}.", f.default_factory()))
            continue
        value = getattr(base, f.name) if base is not None else f.default
        default = "(required)" if value is MISSING else f"= {json.dumps(_plain(value))}"
        comment = f"  # {comments[f.name]}" if f.name in comments else ""
        lines.append(f"  {prefix}{f.name}: {_type_name(tp)} {default}{comment}")
    return "\n".join(lines)


def parse_cli(cls: type[T], argv: list[str]) -> T:
    """``[--recipe PATH] key.sub=value ...`` -> validated config; ``--help`` prints every key and exits 0."""
    recipe, overrides = None, []
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            print(f"usage: [--recipe PATH] key.sub=value ...\n\n{cls.__doc__.strip()}\n{config_help(cls)}")
            sys.exit(0)
        elif arg == "--recipe":
            recipe = next(args, None)
            if recipe is None:
                raise ValueError("--recipe: expected a path")
        elif arg.startswith("--recipe="):
            recipe = arg.partition("=")[2]
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg!r}: usage is [--recipe PATH] key.sub=value ...")
        else:
            overrides.append(arg)
    return load_config(cls, recipe, overrides)


# ------------------------------------------------------------------------------------------ validation

# Ranges by key; None (an off switch or "the variant's value") always passes, tuples are checked elementwise,
# and keys of sections a config does not have (mask in fine-tuning) are skipped.
_RANGES: dict[str, tuple[Callable[[float], bool], tuple[str, ...]]] = {
    "be > 0": (lambda v: v > 0, (
        "data.batch_size", "data.synthetic_size", "data.std", "model.hidden_size", "model.num_hidden_layers",
        "model.num_attention_heads", "model.intermediate_size", "model.image_size", "model.patch_size",
        "model.num_channels", "model.encoder_stride", "model.pooler_output_size", "mask.patch_size",
        "optim.base_lr", "optim.eps", "optim.clip_grad", "optim.grad_accum_steps", "train.epochs",
        "train.max_steps", "train.save_every_steps", "train.keep_last", "train.log_every_steps",
        "train.eval_every_steps", "train.eval_every_epochs", "train.eval_batches", "train.snapshot_epochs", "train.probe_every_steps", "probe.bank_images",
        "probe.query_images", "probe.layer", "distill.tau")),
    "be >= 0": (lambda v: v >= 0, (
        "data.num_workers", "optim.min_lr", "optim.weight_decay", "optim.warmup_epochs", "aug.mixup",
        "aug.cutmix")),
    "be in [0, 1)": (lambda v: 0 <= v < 1, (
        "data.val_fraction", "data.max_bad_fraction", "model.hidden_dropout_prob",
        "model.attention_probs_dropout_prob", "model.drop_path_rate", "optim.betas", "aug.label_smoothing")),
    "be in [0, 1]": (lambda v: 0 <= v <= 1, ("distill.alpha", "aug.random_erasing")),
    "be in (0, 1)": (lambda v: 0 < v < 1, ("mask.ratio", "train.ema")),
    "be in (0, 1]": (lambda v: 0 < v <= 1, ("optim.layer_decay", "aug.crop_scale", "data.label_fraction")),
}  # fmt: skip


def _check(ok: bool, key: str, value: Any, must: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: must {must}")


def validate(cfg: PretrainConfig | FinetuneConfig) -> None:
    """Constraints the types cannot express; ValueError naming the first key that breaks one."""
    for must, (ok, keys) in _RANGES.items():
        for key in keys:
            section, name = key.split(".")
            if hasattr(cfg, section):
                value = getattr(getattr(cfg, section), name)
                values = value if isinstance(value, tuple) else (value,)
                _check(all(v is None or ok(v) for v in values), key, value, must)

    m, o, size, p = cfg.model, cfg.optim, cfg.model.image_size, cfg.model.patch_size
    arch = deit_config_kwargs(m)
    heads, width = arch["num_attention_heads"], arch["hidden_size"]
    _check(width % heads == 0, "model.num_attention_heads", heads, f"divide hidden_size={width}")
    pe = m.position_embedding_init
    _check(pe != "sincos" or width % 4 == 0, "model.position_embedding_init", pe,
           f"be 'random' for hidden_size={width}: a 2-D sine-cosine table needs a multiple of 4")  # fmt: skip
    _check(size % p == 0, "model.patch_size", p, f"divide model.image_size={size}")
    _check(o.min_lr <= o.base_lr, "optim.min_lr", o.min_lr, f"be <= optim.base_lr={o.base_lr}")
    t = cfg.train
    _check(
        all(e <= t.epochs for e in t.snapshot_epochs), "train.snapshot_epochs", t.snapshot_epochs,
        f"be epochs of the run (<= train.epochs={t.epochs})",
    )  # fmt: skip
    d = cfg.data
    _check(
        not d.holdout_from_train or 0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction,
        "be in (0, 1) with data.holdout_from_train=true (the share of train held out)",
    )  # fmt: skip
    if isinstance(cfg, PretrainConfig):
        _check(
            d.label_fraction == 1.0,
            "data.label_fraction",
            d.label_fraction,
            "be 1.0: pretraining uses no labels",
        )
        _check(m.head == "mim", "model.head", m.head, 'be "mim" for pretraining')
        _check(m.init == "scratch", "model.init", m.init, 'be "scratch": pretraining starts from scratch')
        # SimMIM's mask generator works on a grid of mask patches, each a whole number of model patches.
        mp = cfg.mask.patch_size
        _check(mp % p == 0, "mask.patch_size", mp, f"be a multiple of model.patch_size={p}")
        _check(size % mp == 0, "mask.patch_size", mp, f"divide model.image_size={size}")
        depth = arch["num_hidden_layers"]
        layer = cfg.probe.layer
        _check(
            layer is None or layer <= depth, "probe.layer", layer, f"be a block of the encoder (1..{depth})"
        )
        return
    _check(m.head != "mim", "model.head", m.head, 'be "cls", "distill" or "cnn" for fine-tuning')
    _check(
        not t.snapshot_epochs,
        "train.snapshot_epochs",
        t.snapshot_epochs,
        "be empty: snapshots are for pretraining",
    )
    _check(
        t.probe_every_steps is None,
        "train.probe_every_steps",
        t.probe_every_steps,
        "be unset: the online probe is for pretraining",
    )
    lo, hi = cfg.aug.crop_scale
    _check(lo <= hi, "aug.crop_scale", cfg.aug.crop_scale, "be (min, max) with min <= max")
    _check(m.head != "cnn" or bool(m.arch), "model.arch", m.arch, 'be set when model.head is "cnn"')
    for key in ("arch", "path"):
        value = getattr(cfg.teacher, key)
        _check(m.head != "distill" or bool(value), f"teacher.{key}", value, 'be set for model.head "distill"')
