"""torchvision CNNs as DeiT teachers: building one by name, and its export directory.

A CNN export holds `model.safetensors` (the state dict), `cnn_config.json` (the torchvision arch, the labels
and the input normalisation) and a `preprocessor_config.json` written by the caller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torchvision
from safetensors.torch import save_file
from torch import nn

from simmim.models.checkpoint import WEIGHTS_NAME, read_state_dict

CNN_CONFIG = "cnn_config.json"


def build_cnn(arch: str, num_classes: int) -> nn.Module:
    """A torchvision classification model, randomly initialised (no weights can be downloaded)."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"teacher/model arch {arch!r} is not a torchvision classification model")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def save_cnn(model: nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    """The state dict and `cnn_config.json` (`meta`: arch, id2label, mean, std, image_size)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CNN_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def read_cnn_config(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / CNN_CONFIG).read_text())


def load_cnn(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A CNN export -> (model in eval mode, its cnn_config.json)."""
    meta = read_cnn_config(directory)
    model = build_cnn(meta["arch"], len(meta["id2label"]))
    model.load_state_dict(read_state_dict(Path(directory) / WEIGHTS_NAME))
    return model.eval(), meta
