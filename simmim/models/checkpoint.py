"""Checkpoint formats: Transformers (both key namings, DeiT and ViT), timm DeiT/ViT, and simmim's own names.

simmim's modules use a fused `attention.qkv`; on disk we write Transformers' layout
(`deit.encoder.layer.N.attention.attention.query.weight`, ...) so `transformers.DeiT*.from_pretrained`
loads our exports unchanged. Reading accepts that layout, Transformers 5's in-memory names
(`deit.layers.N.attention.q_proj`), Transformers' ViT heads (`vit.`), timm's (`blocks.N.attn.qkv`, `pos_embed`,
`head_dist`) and ours. An RGB patch embedding is adapted to other channel counts as timm's `adapt_input_conv`.
Only safetensors or `torch.load(weights_only=True)`: nothing is unpickled.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from simmim.models.configuration import CONFIG_NAME, DeiTConfig
from simmim.models.position import NUM_PREFIX_TOKENS, resize_position_embeddings

logger = logging.getLogger("simmim.models")

WEIGHTS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAMES = ("pytorch_model.bin", "model.pth", "model.pt")

# Transformers' per-block names (on disk, v4 and v5 alike) -> ours. q/k/v are fused separately.
_HF_BLOCK_TO_OURS = {
    "attention.output.dense.": "attention.o_proj.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
}
# timm's names -> ours ("head." depends on the target class, see `_timm_to_ours`).
_TIMM_BLOCK_TO_OURS = {
    "norm1.": "layernorm_before.",
    "norm2.": "layernorm_after.",
    "attn.qkv.": "attention.qkv.",
    "attn.proj.": "attention.o_proj.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_OURS_TO_HF_BLOCK = {ours: theirs for theirs, ours in _HF_BLOCK_TO_OURS.items()}
_OURS_TO_TIMM_BLOCK = {ours: theirs for theirs, ours in _TIMM_BLOCK_TO_OURS.items()}
_TIMM_TOP_TO_OURS = {
    "cls_token": "deit.embeddings.cls_token",
    "dist_token": "deit.embeddings.distillation_token",
    "pos_embed": "deit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "deit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "deit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "deit.layernorm.weight",
    "norm.bias": "deit.layernorm.bias",
    "head_dist.weight": "distillation_classifier.weight",
    "head_dist.bias": "distillation_classifier.bias",
}


# ---------------------------------------------------------------------------------------------- reading files
def read_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch file; a broken file raises ValueError naming it."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} does not exist")
    try:
        if file.suffix == ".safetensors":
            sd: Any = load_file(str(file))
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise several types for truncated or foreign files
        # torch's refusal to unpickle runs to a page and suggests weights_only=False, which simmim never uses.
        reason = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, pickle.UnpicklingError):
            reason = "it is not tensors alone, and simmim does not unpickle objects"
        raise ValueError(
            f"could not read checkpoint {file} (expected safetensors or a torch file of tensors): "
            f"{type(e).__name__}: {reason}"
        ) from e
    # Training checkpoints (DeiT's main.py, timm's train.py) wrap the weights.
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {file} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}  # DDP-wrapped saves


def find_weights(path: Path) -> Path:
    """The weights file of a checkpoint directory."""
    for name in (WEIGHTS_NAME, *TORCH_WEIGHTS_NAMES):
        if (path / name).is_file():
            return path / name
    if (path / f"{WEIGHTS_NAME}.index.json").is_file():
        raise ValueError(f"{path} holds a sharded checkpoint; simmim reads single-file checkpoints only")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {TORCH_WEIGHTS_NAMES[0]} in {path}")


# ---------------------------------------------------------------------------------------------- key layouts
def _rename_prefix(name: str, renames: dict[str, str]) -> str:
    """`name` with the first of `renames`' keys it starts with replaced by its value; unchanged if none."""
    for old, new in renames.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """'timm', 'transformers' (either naming) or 'simmim'."""
    keys = list(sd)
    if any(k.startswith(("blocks.", "patch_embed.")) or k in ("pos_embed", "cls_token") for k in keys):
        return "timm"
    if any(".attention.qkv." in k for k in keys):
        return "simmim"
    return "transformers"


def _fuse_qkv(
    parts: dict[str, dict[str, torch.Tensor]], prefix_of: dict[str, str]
) -> dict[str, torch.Tensor]:
    out = {}
    for key, qkv in parts.items():
        missing = {"q", "k", "v"} - set(qkv)
        if missing:
            raise ValueError(
                f"checkpoint has an incomplete attention projection at {key}: missing {sorted(missing)}"
            )
        out[prefix_of[key]] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)  # (3D, D) or (3D,)
    return out


def _transformers_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformers' names (v4 on-disk `encoder.layer.N...query` or v5 `layers.N...q_proj`) -> ours."""
    block = re.compile(r"^(.*?)(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
    qkv_names = {
        "attention.attention.query.": "q",
        "attention.attention.key.": "k",
        "attention.attention.value.": "v",
        "attention.q_proj.": "q",
        "attention.k_proj.": "k",
        "attention.v_proj.": "v",
    }
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    prefix_of: dict[str, str] = {}
    for key, value in sd.items():
        m = block.match(key)
        if not m:
            out[key] = value
            continue
        head, index, rest = m.groups()
        base = f"{head}layers.{index}."
        for name, letter in qkv_names.items():
            if rest.startswith(name):
                param = rest[len(name) :]  # "weight" or "bias"
                parts.setdefault(base + param, {})[letter] = value
                prefix_of[base + param] = f"{base}attention.qkv.{param}"
                break
        else:
            out[base + _rename_prefix(rest, _HF_BLOCK_TO_OURS)] = value
    out.update(_fuse_qkv(parts, prefix_of))
    return out


def _timm_to_ours(sd: dict[str, torch.Tensor], head_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if m:
            index, rest = m.groups()
            out[f"deit.layers.{index}.{_rename_prefix(rest, _TIMM_BLOCK_TO_OURS)}"] = value
        elif key in _TIMM_TOP_TO_OURS:
            out[_TIMM_TOP_TO_OURS[key]] = value
        elif key.startswith("head."):
            out[head_name + key[len("head") :]] = value
        else:
            out[key] = value  # reported as unexpected
    return out


def to_transformers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our module names -> Transformers' on-disk layout (q, k, v split out of the fused projection)."""
    block = re.compile(r"^(.*?)layers\.(\d+)\.(.+)$")
    out = {}
    for key, value in sd.items():
        m = block.match(key)
        if not m:
            out[key] = value.contiguous()
            continue
        head, index, rest = m.groups()
        base = f"{head}encoder.layer.{index}."
        if rest.startswith("attention.qkv."):
            param = rest[len("attention.qkv.") :]
            for name, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{base}attention.attention.{name}.{param}"] = chunk.contiguous()
            continue
        out[base + _rename_prefix(rest, _OURS_TO_HF_BLOCK)] = value.contiguous()
    return out


def to_timm_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A distilled classifier's weights in timm's DeiT layout (`deit_*_distilled_patch16_*`).

    timm builds DeiT with layer_norm_eps=1e-6: outputs agree when the config uses the same epsilon.
    """
    if not hasattr(model, "cls_classifier"):
        # timm's VisionTransformerDistilled needs head_dist, and its VisionTransformer has no dist_token.
        raise ValueError(
            f"{type(model).__name__} has no timm equivalent: export a DeiTForImageClassificationWithTeacher "
            "(timm's distilled DeiT)"
        )
    ours_to_timm = {v: k for k, v in _TIMM_TOP_TO_OURS.items()}
    head = "cls_classifier."
    out = {}
    for key, value in model.state_dict().items():
        m = re.match(r"^deit\.layers\.(\d+)\.(.+)$", key)
        if m:
            index, rest = m.groups()
            out[f"blocks.{index}.{_rename_prefix(rest, _OURS_TO_TIMM_BLOCK)}"] = value
        elif key in ours_to_timm:
            out[ours_to_timm[key]] = value
        elif key.startswith(head):
            out["head." + key[len(head) :]] = value
        elif key.startswith("deit.embeddings.mask_token") or key.startswith("decoder."):
            continue  # timm's DeiT has no SimMIM parts
        else:
            raise ValueError(f"{key} has no timm equivalent")
    return out


def to_our_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Any supported layout -> the target model's own key names (prefix and head names included)."""
    fmt = detect_format(sd)
    target_keys = set(model.state_dict())
    head_name = "cls_classifier" if "cls_classifier.weight" in target_keys else "classifier"
    if fmt == "timm":
        sd = _timm_to_ours(sd, head_name)
    elif fmt == "transformers":
        sd = _transformers_to_ours(sd)
    # Transformers' ViT heads (ViTForMaskedImageModeling, ViTForImageClassification) hold their encoder in `vit.`.
    if not any(k.startswith("deit.") for k in sd):
        sd = {"deit." + k.removeprefix("vit.") if k.startswith("vit.") else k: v for k, v in sd.items()}
    # A bare DeiTModel has no "deit." prefix; a head class needs it. Convert whichever way the target wants.
    target_prefixed = any(k.startswith("deit.") for k in target_keys)
    source_prefixed = any(k.startswith("deit.") for k in sd)
    if target_prefixed and not source_prefixed:
        sd = {f"deit.{k}": v for k, v in sd.items()}
    elif source_prefixed and not target_prefixed:
        sd = {k.removeprefix("deit."): v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------------------------------------- adapting tensors
def _source_grid(num_patches: int, src_config: DeiTConfig | None, key: str, file: Path) -> tuple[int, int]:
    if src_config is not None and math.prod(src_config.grid_size) == num_patches:
        return src_config.grid_size
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{file}: cannot infer the patch grid of {key} with {num_patches} patches (not square)"
        )
    return side, side


def adapt_embeddings(
    sd: dict[str, torch.Tensor],
    model: torch.nn.Module,
    src_config: DeiTConfig | None,
    file: Path,
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Create the distillation token when the source has none and resize position embeddings.

    Returns the state dict, the keys created (reported as missing) and the keys resized.
    """
    prefix = "deit." if any(k.startswith("deit.") for k in model.state_dict()) else ""
    pos_key, cls_key = f"{prefix}embeddings.position_embeddings", f"{prefix}embeddings.cls_token"
    dist_key = f"{prefix}embeddings.distillation_token"
    created, resized = [], []
    if pos_key not in sd:
        return sd, created, resized
    pos = sd[pos_key]
    if dist_key not in sd and cls_key in sd:
        # A ViT/DeiT without distillation token (timm's non-distilled DeiT): start it as a copy of the class
        # token, position included, so both heads begin from the same representation.
        sd[dist_key] = sd[cls_key].clone()
        pos = torch.cat((pos[:, :1], pos[:, :1], pos[:, 1:]), dim=1)
        created.append(dist_key)
    target = model.state_dict()[pos_key]
    if pos.shape[1] != target.shape[1]:
        n = NUM_PREFIX_TOKENS
        src_grid = _source_grid(pos.shape[1] - n, src_config, pos_key, file)
        dst_grid = model.config.grid_size
        pos = resize_position_embeddings(pos, n, src_grid, dst_grid)
        resized.append(pos_key)
        logger.info("resized %s from grid %s to %s", pos_key, src_grid, dst_grid)
    sd[pos_key] = pos
    return sd, created, resized


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB patch embedding (D, 3, p, p) -> (D, channels, p, p), as timm's `adapt_input_conv`: one channel
    gets the sum of the RGB kernels (a grey image's response equals the RGB model's on its three copies);
    more get the RGB kernels repeated and cut to `channels`, scaled by 3 / channels so that the response to
    a constant image keeps its size."""
    dtype, weight = weight.dtype, weight.float()
    if channels == 1:
        adapted = weight.sum(dim=1, keepdim=True)  # (D, 1, p, p)
    else:
        repeats = math.ceil(channels / 3)
        adapted = weight.repeat(1, repeats, 1, 1)[:, :channels] * (3 / channels)  # (D, channels, p, p)
    return adapted.to(dtype)


def adapt_channels(
    sd: dict[str, torch.Tensor], model: torch.nn.Module, file: Path
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Fit a checkpoint of another channel count to `model.config.num_channels`: its RGB patch embedding
    adapted (`adapt_input_channels`), a SimMIM decoder's output conv (encoder_stride**2 * channels outputs)
    dropped to be newly initialised. Returns the state dict, the keys adapted and the keys dropped."""
    prefix = "deit." if any(k.startswith("deit.") for k in model.state_dict()) else ""
    key, channels = f"{prefix}embeddings.patch_embeddings.projection.weight", model.config.num_channels
    if key not in sd or sd[key].shape[1] == channels:
        return sd, [], []
    source = sd[key].shape[1]
    if source != 3:
        raise ValueError(
            f"{file}: its patch embedding takes {source} channels and the model {channels}; only an RGB "
            "(3-channel) patch embedding can be adapted to another channel count"
        )
    sd[key] = adapt_input_channels(sd[key], channels)
    expected = model.state_dict()
    dropped = [k for k in ("decoder.0.weight", "decoder.0.bias") if k in sd and k in expected]
    dropped = [k for k in dropped if sd[k].shape != expected[k].shape]
    for k in dropped:
        del sd[k]
    logger.info("adapted %s from %d to %d channels", key, source, channels)
    return sd, [key], dropped


# ---------------------------------------------------------------------------------------------- public API
def save_pretrained(model: torch.nn.Module, save_directory: str | Path) -> None:
    """`config.json` (with `architectures`) + `model.safetensors` in Transformers' layout, written atomically."""
    path = Path(save_directory)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.copy(architectures=[type(model).__name__])
    config.save_pretrained(path)
    tensors = {k: v.detach().cpu() for k, v in to_transformers_state_dict(model.state_dict()).items()}
    tmp = path / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS_NAME)


def from_pretrained(
    cls,
    path: str | Path,
    config: DeiTConfig | None = None,
    ignore_mismatched_sizes: bool = False,
    **overrides: Any,
):
    """Build `cls` and load any supported checkpoint into it. Returns (model, loading info).

    With `ignore_mismatched_sizes`, tensors whose shape differs from the model's (a 1000-class head loaded
    for 10 classes) stay newly initialised and are listed in `mismatched_keys`; otherwise they raise. An
    RGB checkpoint loaded for other `num_channels` has its patch embedding adapted (`adapted_keys`) and a
    SimMIM decoder's output conv left new (`mismatched_keys`), see `adapt_channels`.
    """
    path = Path(path)
    if path.is_dir():
        file = find_weights(path)
        config_file = path / CONFIG_NAME
    elif path.is_file():
        file = path
        config_file = path.parent / CONFIG_NAME
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    src_config = DeiTConfig.from_pretrained(config_file) if config_file.is_file() else None
    if config is None:
        if src_config is None:
            raise ValueError(
                f"{path} has no {CONFIG_NAME}: pass config=DeiTConfig(...) describing the weights "
                "(a bare timm state dict needs one)"
            )
        config = src_config.copy(**overrides)
    elif overrides:
        config = config.copy(**overrides)

    model = cls(config)
    sd = to_our_state_dict(read_state_dict(file), model)
    sd, created, resized = adapt_embeddings(sd, model, src_config, file)
    sd, adapted, mismatched = adapt_channels(sd, model, file)
    expected = model.state_dict()
    for key, value in list(sd.items()):
        if key in expected and value.shape != expected[key].shape:
            if ignore_mismatched_sizes:
                mismatched.append(key)
                del sd[key]
                continue
            raise ValueError(
                f"{file}: tensor {key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)} (config: {config.hidden_size=}, {config.num_labels=})"
            )
    result = model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    info = {
        "missing_keys": sorted((set(result.missing_keys) | set(created)) - set(mismatched)),
        "mismatched_keys": sorted(mismatched),
        "unexpected_keys": sorted(k for k in sd if k not in expected),
        "resized_keys": resized,
        "adapted_keys": adapted,
    }
    if info["missing_keys"]:
        logger.info("%s: newly initialised (not in %s): %s", cls.__name__, file, info["missing_keys"])
    if info["unexpected_keys"]:
        logger.info("%s: unused weights of %s: %s", cls.__name__, file, info["unexpected_keys"])
    return model, info
