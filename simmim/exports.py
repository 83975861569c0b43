"""Models in and out of simmim: the exports a run writes, and `open_model`, the one way to open a model from
a path, for fine-tuning's init and teacher, the probes, the reconstruction evaluation, predict and export.

A path may be
- a simmim run directory: its `export/`, or (`from_checkpoint=True`) the newest training checkpoint;
- an export or a Transformers DeiT directory (`config.json` + `model.safetensors` or `pytorch_model.bin`),
  or a simmim CNN export (`cnn_config.json`);
- a weights file with a `config.json` beside it, or a bare timm ViT/DeiT state dict, whose architecture is
  read from its tensor shapes.
Transformers' ViT (`ViTModel`, `ViTForMaskedImageModeling`) opens as a DeiT, its distillation token a copy of
the class token. Every error names the path and what was expected, in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simmim.bounded_yaml import read_yaml
from simmim.checkpoints import checkpoint_weights
from simmim.config import (
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    config_from_dict,
    deit_config,
    save_config,
)
from simmim.data import IMAGENET_MEAN, IMAGENET_STD
from simmim.data.sources import open_split
from simmim.models import MODEL_FOR_HEAD, DeiTConfig, DeiTImageProcessor, DeiTModel, DeiTPreTrainedModel
from simmim.models.checkpoint import read_state_dict
from simmim.models.cnn import CNN_CONFIG, build_cnn, load_cnn, read_cnn_config, save_cnn
from simmim.models.configuration import CONFIG_NAME
from simmim.models.image_processor import PROCESSOR_NAME, eval_image_processor
from simmim.rundir import (
    CHECKPOINT_INDEX,
    CHECKPOINTS_DIR,
    EXPORT_CONFIG,
    EXPORT_DIR,
    RUN_CONFIG,
    Run,
    latest_checkpoint,
    read_run,
    run_kind,
)

CLASSIFIERS = (MODEL_FOR_HEAD["cls"], MODEL_FOR_HEAD["distill"])
# Every DeiT class a config.json's `architectures` may name.
DEIT_CLASSES = {c.__name__: c for c in (DeiTModel, *MODEL_FOR_HEAD.values())}


# ------------------------------------------------------------------------------------------ writing models
def new_deit(cls: type, model: ModelConfig, **config_kwargs: Any):
    """A freshly initialised DeiT model class `cls` (a `simmim.models` class) of the `model` section, with
    the position embeddings it asks for (`position_embedding_init`); `config_kwargs` go to DeiTConfig."""
    net = cls(deit_config(model, **config_kwargs))
    if model.position_embedding_init == "sincos":
        net.deit.embeddings.init_sincos_position_embeddings()
    return net


def export_model(model: nn.Module, directory: Path, cfg: Any, id2label: dict[int, str] | None = None) -> None:
    """The model as others load it: a Transformers-format DeiT directory (config.json, model.safetensors),
    or for `model.head=cnn` a CNN export; with preprocessor_config.json and the run config."""
    directory = Path(directory)
    if getattr(cfg.model, "head", None) == "cnn":
        meta = {"arch": cfg.model.arch, "id2label": {str(k): v for k, v in id2label.items()}}
        meta |= {"mean": list(cfg.data.mean), "std": list(cfg.data.std), "image_size": cfg.model.image_size}
        save_cnn(model, directory, meta)
    else:
        model.save_pretrained(directory)
    processor_of(cfg).save_pretrained(directory)
    save_config(cfg, directory / EXPORT_CONFIG)


def processor_of(cfg: Any) -> DeiTImageProcessor:
    """A run's evaluation preprocessing as a Transformers image processor: its size, its statistics (one
    per channel) and its integer scale."""
    d = cfg.data
    return eval_image_processor(cfg.model.image_size, d.mean, d.std, max_value=getattr(d, "max_value", None))


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Export the newest (or a given) training checkpoint of a pretraining or fine-tuning run directory."""
    run = read_run(run_dir)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run.directory)
    if ckpt is None:
        raise FileNotFoundError(f"{run.directory} holds no checkpoint ({CHECKPOINTS_DIR}/{CHECKPOINT_INDEX})")
    model, id2label = _new_model_of(run)
    model.load_state_dict(checkpoint_weights(ckpt))
    export_model(model, Path(out), run.config, id2label)
    return Path(out)


def _new_model_of(run: Run) -> tuple[nn.Module, dict[int, str] | None]:
    """A run's model with fresh weights, and its labels. A fine-tuning run written before run.json gets its
    labels from the dataset and its architecture from its init checkpoint, both of which must still exist."""
    if run.kind != "finetune" or "id2label" in run.info:
        return run.new_model(), run.id2label
    cfg = run.config
    id2label = dict(enumerate(open_split(cfg, cfg.data.train_split).class_names))
    if cfg.model.head == "cnn":
        return build_cnn(cfg.model.arch, len(id2label)), id2label
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if cfg.model.init == "scratch":
        return new_deit(MODEL_FOR_HEAD[cfg.model.head], cfg.model, **labels), id2label
    return open_init(cfg.model, MODEL_FOR_HEAD[cfg.model.head], labels).model, id2label


# ------------------------------------------------------------------------------------------ opening models
@dataclass
class OpenedModel:
    """A model opened from a path, and what came with it."""

    model: nn.Module
    processor: (
        DeiTImageProcessor  # its preprocessing (ImageNet's normalisation at its size if none was saved)
    )
    path: Path  # the directory or file the weights were read from
    run_config: PretrainConfig | FinetuneConfig | None = None  # the simmim run that wrote it, when known
    run_dir: Path | None = None
    id2label: dict[int, str] | None = None
    info: dict[str, list[str]] = field(default_factory=dict)  # missing / unexpected / mismatched keys

    @property
    def mean(self) -> list[float]:
        return list(self.processor.image_mean)

    @property
    def std(self) -> list[float]:
        return list(self.processor.image_std)

    @property
    def num_channels(self) -> int:
        return len(self.processor.image_mean)

    @property
    def max_value(self) -> float | None:
        """What integer pixels were divided by in training: None for their type's range (the processor's
        1/255 rescale), else data.max_value (the processor's rescale_factor is its inverse)."""
        if self.run_config is not None:
            return self.run_config.data.max_value
        rescale = self.processor.rescale_factor
        return None if abs(rescale - 1 / 255) < 1e-12 else 1 / rescale


def export_dir_of(path: str | Path) -> Path:
    """A run directory -> its export/; an export, a Transformers directory or a weights file as it is."""
    path = Path(path)
    exported = any((path / EXPORT_DIR / name).is_file() for name in (CONFIG_NAME, CNN_CONFIG))
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and exported:
        return path / EXPORT_DIR
    return path


def read_export_config(directory: Path) -> dict[str, Any] | None:
    """The run config embedded in an export (as written), or None for exports made elsewhere."""
    file = Path(directory) / EXPORT_CONFIG
    return read_yaml(file.read_text(), str(file)) if file.is_file() else None


def is_run_directory(path: Path) -> bool:
    return path.is_dir() and (path / RUN_CONFIG).is_file() and not (path / CONFIG_NAME).is_file()


def open_model(
    path: str | Path,
    cls: type[nn.Module] | None = None,
    *,
    what: str = "path",
    from_checkpoint: bool = False,
    bare_file_config: DeiTConfig | None = None,
    num_heads: int | None = None,
    ignore_mismatched_sizes: bool = False,
    default_cls: type[nn.Module] = DeiTModel,
    require: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> OpenedModel:
    """Open the model at `path` (see the module's docstring for what it may be).

    Args:
        cls: the DeiT class to build (a head class or DeiTModel, the bare encoder); None = the class the
            checkpoint's config names (`default_cls` when it names none); a CNN export opens as its CNN,
            and only with `cls` None.
        what: how the caller's user named the path, for errors ("model.init", "--checkpoint").
        from_checkpoint: a run directory's newest training checkpoint instead of its export.
        bare_file_config: the architecture of a weights file without config.json (default: read from a timm
            state dict's shapes, with `num_heads` heads, width / 64 by default).
        ignore_mismatched_sizes, config_overrides: as `DeiTPreTrainedModel.from_pretrained` (a head for other
            labels, another image size or channel count).
        require: DeiTConfig fields the checkpoint must have ({"patch_size": 8}), checked before the weights
            are read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{what}={str(path)!r} does not exist (expected a run directory, an export, a Transformers "
            "directory or a weights file)"
        )
    if from_checkpoint and is_run_directory(path):
        return _open_run_checkpoint(path, what)
    path = export_dir_of(path)
    if path.is_dir() and (path / CNN_CONFIG).is_file():
        if cls is not None:
            raise ValueError(
                f"{what}={str(path)!r} holds a {read_cnn_config(path)['arch']} CNN export, expected a DeiT "
                f"checkpoint ({cls.__name__})"
            )
        model, meta = load_cnn(path)
        labels = {int(k): v for k, v in meta["id2label"].items()}
        return OpenedModel(model, DeiTImageProcessor.from_pretrained(path), path, id2label=labels)
    config_dir = path if path.is_dir() else path.parent
    if not (config_dir / CONFIG_NAME).is_file():
        if path.is_dir():
            raise ValueError(
                f"{what}={str(path)!r} holds no config.json and no export/: expected a run directory, an "
                "export, a Transformers DeiT directory or a weights file (scripts/export.py writes an export "
                "from a run's checkpoint)"
            )
        config = bare_file_config or _timm_config(path, what, num_heads)
        _check_required(config, require, path, what)
        model, info = (cls or DeiTModel).from_pretrained(
            path,
            config=config,
            output_loading_info=True,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            **config_overrides,
        )
        processor = eval_image_processor(model.config.image_hw[0], IMAGENET_MEAN, IMAGENET_STD)
        return OpenedModel(model, processor, path, info=info)
    config = DeiTConfig.from_pretrained(config_dir)
    _check_required(config, require, path, what)
    if cls is None:
        arch = (config.extra.get("architectures") or [default_cls.__name__])[0]
        if arch not in DEIT_CLASSES:
            raise ValueError(f"{what}={str(path)!r} holds a {arch}, expected one of {sorted(DEIT_CLASSES)}")
        cls = DEIT_CLASSES[arch]
    model, info = cls.from_pretrained(
        path, output_loading_info=True, ignore_mismatched_sizes=ignore_mismatched_sizes, **config_overrides
    )
    if (config_dir / PROCESSOR_NAME).is_file():
        processor = DeiTImageProcessor.from_pretrained(config_dir)
    else:
        processor = eval_image_processor(model.config.image_hw[0], IMAGENET_MEAN, IMAGENET_STD)
    run_config = None
    if (raw := read_export_config(config_dir)) is not None:
        run_config = config_from_dict(FinetuneConfig if run_kind(raw) == "finetune" else PretrainConfig, raw)
    run_dir = config_dir.parent if (config_dir.parent / RUN_CONFIG).is_file() else None
    labels = (
        model.config.id2label if hasattr(model, "classifier") or hasattr(model, "cls_classifier") else None
    )
    return OpenedModel(model, processor, path, run_config, run_dir, labels, info)


def _open_run_checkpoint(path: Path, what: str) -> OpenedModel:
    """A run directory's newest training checkpoint, in the run's own model class."""
    run = read_run(path)
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{what}={str(path)!r} is a run without any checkpoint yet")
    model, id2label = _new_model_of(run)
    model.load_state_dict(checkpoint_weights(latest))
    cfg = run.config
    return OpenedModel(model, processor_of(cfg), latest, cfg, path, id2label)


def _timm_config(path: Path, what: str, num_heads: int | None) -> DeiTConfig:
    """The architecture of a weights file without config.json: a timm ViT/DeiT's, from its shapes."""
    try:
        sd = read_state_dict(path)
    except ValueError as e:
        raise ValueError(f"{what}={str(path)!r}: {e}") from e
    if "patch_embed.proj.weight" not in sd:
        raise ValueError(
            f"{what}={str(path)!r} is not a timm ViT/DeiT state dict and has no config.json beside it"
        )
    return config_from_timm(sd, num_heads)


def _check_required(config: DeiTConfig, require: dict[str, Any] | None, path: Path, what: str) -> None:
    for name, value in (require or {}).items():
        if getattr(config, name) != value:
            raise ValueError(
                f"{what}={str(path)!r} is a model with {name}={getattr(config, name)}, expected {name}={value}"
            )


def config_from_timm(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DeiTConfig:
    """The DeiTConfig of a bare timm ViT/DeiT state dict, from its tensor shapes. The shapes do not give
    the number of heads: default width / 64, as in every DeiT and ViT size up to ViT-L."""
    missing = [k for k in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight") if k not in sd]
    if missing:
        raise ValueError(f"not a timm ViT/DeiT state dict: it lacks {missing}")
    proj = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    width, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    prefix = 1 + ("dist_token" in sd)
    grid = math.isqrt(sd["pos_embed"].shape[1] - prefix)
    return DeiTConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=num_heads or max(1, width // 64),
        intermediate_size=sd["blocks.0.mlp.fc1.weight"].shape[0],
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        layer_norm_eps=1e-6,  # timm's
    )


def open_classifier(path: str | Path, what: str = "--model") -> OpenedModel:
    """Any exported classifier: DeiT (either head, ours or Transformers') or a simmim CNN export."""
    opened = open_model(path, what=what, default_cls=MODEL_FOR_HEAD["cls"])
    if isinstance(opened.model, DeiTPreTrainedModel) and not isinstance(opened.model, CLASSIFIERS):
        raise ValueError(
            f"{what}={str(path)!r} holds a {type(opened.model).__name__}, not an image classifier "
            f"({', '.join(c.__name__ for c in CLASSIFIERS)} or a CNN export)"
        )
    opened.model.eval()
    if opened.id2label is None:
        opened.id2label = opened.model.config.id2label
    return opened


def logits_of(output: Any) -> torch.Tensor:
    """A classifier's (B, classes) scores: a DeiT head's `.logits`, a CNN's output itself."""
    return output.logits if hasattr(output, "logits") else output


def open_init(model: ModelConfig, cls: type[nn.Module], labels: dict[str, Any] | None = None) -> OpenedModel:
    """`model.init` as a `cls`: fine-tuning's classifier (`labels`: id2label and label2id) or pretraining's
    DeiTForMaskedImageModeling (continued pretraining).

    The architecture (width, depth, heads, MLP, patch size) is the checkpoint's: its config.json's, or a
    bare timm file's shapes with model.num_attention_heads heads (unset: width / 64). This run's image size
    (position embeddings resized), channels (an RGB patch embedding adapted), regularisation and labels
    replace the checkpoint's; a head of another shape is left new. For pretraining, the checkpoint's patch
    size must be model.patch_size: the mask and the decoder are built for it.
    """
    labels = labels or {}
    overrides = {"image_size": model.image_size, "num_channels": model.num_channels, **labels}
    overrides["drop_path_rate"] = model.drop_path_rate
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if getattr(model, name) is not None:
            overrides[name] = getattr(model, name)
    require = None
    if cls is MODEL_FOR_HEAD["mim"]:
        require = {"patch_size": model.patch_size}
        overrides["encoder_stride"] = model.patch_size  # the decoder's upsampling: one patch per token
    return open_model(
        model.init,
        cls,
        what="model.init",
        num_heads=model.num_attention_heads,
        ignore_mismatched_sizes=cls is not MODEL_FOR_HEAD["mim"],
        require=require,
        **overrides,
    )
