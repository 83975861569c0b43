"""DeiTConfig: the hyper-parameters of a DeiT encoder and its heads.

Same field names, defaults and `config.json` layout as Hugging Face Transformers' `DeiTConfig`, so a
directory written by either library is read by the other. Invalid values fail at construction time.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# Activations the encoder MLP and the pooler accept (the subset of Transformers' ACT2FN that DeiT uses).
ACTIVATIONS = (
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
)

CONFIG_NAME = "config.json"
# The encoder sizes by name: DeiT-Ti/S/B (Touvron et al. 2021), ViT-L and ViT-H.
VARIANTS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    # ViT-L/16 and ViT-H/14 sizes (Dosovitskiy et al. 2021); ViT-H's patch 14 is the recipe's model.patch_size.
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120),
}


class DeiTConfig:
    """Configuration of a DeiT model (Touvron et al., 2021), as documented by Transformers.

    Args:
        hidden_size: width D of the encoder.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: heads per attention layer; must divide hidden_size.
        intermediate_size: width of the MLP hidden layer.
        hidden_act: MLP activation, one of `ACTIVATIONS`.
        hidden_dropout_prob: dropout on embeddings and on each residual branch.
        attention_probs_dropout_prob: dropout on the attention probabilities.
        initializer_range: std of the truncated-normal weight initialisation.
        layer_norm_eps: LayerNorm epsilon (Transformers' default 1e-12; timm's DeiT uses 1e-6).
        image_size: int or (height, width) the position embeddings are built for.
        patch_size: side of the square patches; must divide image_size.
        num_channels: input channels.
        qkv_bias: bias on the query/key/value projections.
        encoder_stride: upsampling factor of the SimMIM decoder; must equal patch_size for masked-image models.
        pooler_output_size: width of the pooler of `DeiTModel` (None = hidden_size).
        pooler_act: activation of the pooler.
        drop_path_rate: stochastic-depth rate of the last block (linearly increasing from 0), simmim-only.
        num_labels, id2label, label2id: classifier outputs and their names.
        **kwargs: other keys found in a `config.json` (e.g. `architectures`, `problem_type`) are kept and
            written back unchanged.
    """

    model_type = "deit"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        qkv_bias: bool = True,
        encoder_stride: int = 16,
        pooler_output_size: int | None = None,
        pooler_act: str = "tanh",
        drop_path_rate: float = 0.0,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        label2id: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.encoder_stride = encoder_stride
        self.pooler_output_size = pooler_output_size if pooler_output_size is not None else hidden_size
        self.pooler_act = pooler_act
        self.drop_path_rate = drop_path_rate
        # Transformers derives num_labels from id2label (default 2 labels); keep the same precedence.
        if id2label is not None:
            self.id2label = {int(k): str(v) for k, v in id2label.items()}
            if num_labels is not None and num_labels != len(self.id2label):
                raise ValueError(
                    f"num_labels={num_labels} disagrees with id2label, which names {len(self.id2label)} labels"
                )
        else:
            n = 2 if num_labels is None else num_labels
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.label2id = (
            {str(k): int(v) for k, v in label2id.items()}
            if label2id is not None and len(label2id) == len(self.id2label)
            else {v: k for k, v in self.id2label.items()}
        )
        kwargs.pop("num_labels", None)
        kwargs.pop("model_type", None)
        self.extra = kwargs
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) the position embeddings were built for."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (h, w) = image_hw / patch_size."""
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                f"{self.num_attention_heads}"
            )
        if not isinstance(self.patch_size, int) or self.patch_size <= 0:
            raise ValueError(f"patch_size must be a positive integer, got {self.patch_size!r}")
        h, w = self.image_hw
        if h <= 0 or w <= 0 or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be positive and divisible by patch_size={self.patch_size}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("hidden_act", "pooler_act"):
            value = getattr(self, name)
            if value not in ACTIVATIONS:
                raise ValueError(f"{name}={value!r} is not a known activation; expected one of {ACTIVATIONS}")
        if self.encoder_stride <= 0:
            raise ValueError(f"encoder_stride must be positive, got {self.encoder_stride!r}")
        if self.num_channels <= 0:
            raise ValueError(f"num_channels must be positive, got {self.num_channels!r}")

    def validate_for_masked_image_modeling(self) -> None:
        """The SimMIM decoder upsamples each patch token by encoder_stride, so it must equal patch_size."""
        if self.encoder_stride != self.patch_size:
            raise ValueError(
                f"encoder_stride={self.encoder_stride} must equal patch_size={self.patch_size} for "
                "DeiTForMaskedImageModeling: the decoder turns each patch token into encoder_stride**2 pixels"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            model_type=self.model_type,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            initializer_range=self.initializer_range,
            layer_norm_eps=self.layer_norm_eps,
            image_size=list(self.image_size) if isinstance(self.image_size, tuple) else self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            qkv_bias=self.qkv_bias,
            encoder_stride=self.encoder_stride,
            pooler_output_size=self.pooler_output_size,
            pooler_act=self.pooler_act,
            drop_path_rate=self.drop_path_rate,
            # JSON object keys are strings; Transformers writes id2label the same way.
            id2label={str(k): v for k, v in self.id2label.items()},
            label2id=dict(self.label2id),
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> DeiTConfig:
        d = {**d, **overrides}
        if "id2label" in overrides and "num_labels" not in overrides:
            d.pop("num_labels", None)
        if "num_labels" in overrides and "id2label" not in overrides:
            # A new label count replaces the old names (e.g. fine-tuning a checkpoint on another dataset).
            d.pop("id2label", None)
            d.pop("label2id", None)
        return cls(**d)

    def save_pretrained(self, save_directory: str | Path) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> DeiTConfig:
        """Read `config.json` from a directory (or the file itself); keyword arguments override its fields."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
        model_type = d.get("model_type", "deit")
        if model_type not in ("deit", "vit"):
            raise ValueError(f"{file} describes a {model_type!r} model; expected model_type 'deit'")
        return cls.from_dict(d, **overrides)

    def copy(self, **overrides: Any) -> DeiTConfig:
        return DeiTConfig.from_dict(copy.deepcopy(self.to_dict()), **overrides)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeiTConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"DeiTConfig({json.dumps(self.to_dict(), sort_keys=True)})"
