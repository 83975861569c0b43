"""The DeiT encoder (Touvron et al., 2021) and its heads: SimMIM masked-image modeling (Xie et al., 2022),
classification on the class token, and DeiT's class + distillation heads.

Read top to bottom: embeddings -> attention -> block -> encoder -> heads. Module and output names follow
Hugging Face Transformers so that checkpoints translate one-to-one (see `checkpoint.py`); the attention
uses one fused qkv projection and `scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import simmim.models.checkpoint as checkpoint_format
from simmim.models.configuration import DeiTConfig
from simmim.models.losses import classification_loss, distillation_loss, masked_l1, patch_mask_to_pixels
from simmim.models.position import NUM_PREFIX_TOKENS, resize_position_embeddings


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# Constructors for `configuration.ACTIVATIONS` (Transformers' ACT2FN names): each layer gets its own module.
ACTIVATION_MODULES = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": _QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def activation(name: str) -> nn.Module:
    return ACTIVATION_MODULES[name]()


# ---------------------------------------------------------------------------------------------- outputs
class ModelOutput:
    """Dataclass outputs that also index like Transformers' (`out[0]`, `out["logits"]`), skipping None."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key: int | str) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # (B, T, D), T = prefix tokens + patches
    pooler_output: torch.Tensor | None = None  # (B, pooler_output_size)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + each block, (B, T, D) each
    attentions: tuple[torch.Tensor, ...] | None = None  # (B, nh, T, T) per block


@dataclass
class MaskedImageModelingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None  # (B, C, H, W), in the input's normalised space
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class ImageClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, num_labels)
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class DeiTForImageClassificationWithTeacherOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (cls_logits + distillation_logits) / 2
    cls_logits: torch.Tensor | None = None  # head on the class token
    distillation_logits: torch.Tensor | None = None  # head on the distillation token
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------------- encoder
class DeiTPatchEmbeddings(nn.Module):
    """(B, C, H, W) -> (B, h*w, D) with a stride-p convolution; h, w = H/p, W/p in row-major order."""

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}"
            )
        _, _, height, width = pixel_values.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input size {height}x{width} is not divisible by patch_size={self.patch_size}")
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class DeiTEmbeddings(nn.Module):
    """[CLS, DIST, patches] + position embeddings; masked patches are replaced by the mask token first."""

    num_prefix_tokens = NUM_PREFIX_TOKENS  # class token and distillation token

    def __init__(self, config: DeiTConfig, use_mask_token: bool = False) -> None:
        super().__init__()
        d = config.hidden_size
        self.grid_size = config.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d)) if use_mask_token else None
        self.patch_embeddings = DeiTPatchEmbeddings(config)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, d))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    @torch.no_grad()
    def init_sincos_position_embeddings(self) -> None:
        """Fill the position embeddings with MAE's 2-D sine-cosine table (He et al., 2022,
        `get_2d_sincos_pos_embed`): the first D/2 channels encode the column, the last D/2 the row, each as
        [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D/4)), k < D/4; the prefix tokens get zeros. They stay trainable. Neighbouring
        patches start out similar, which a model trained for a few hundred steps cannot learn from random
        embeddings (docs/results.md, the main job)."""
        d = self.position_embeddings.shape[-1]
        if d % 4:
            raise ValueError(f"a 2-D sine-cosine table needs hidden_size divisible by 4, not {d}")
        gh, gw = self.grid_size
        omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))  # (D/4,)

        def encode(pos: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, D/2)
            angles = pos.double()[:, None] * omega[None]
            return torch.cat([angles.sin(), angles.cos()], dim=1)

        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # (gh, gw)
        table = torch.cat([encode(cols.flatten()), encode(rows.flatten())], dim=1)  # (gh*gw, D), row-major
        self.position_embeddings.zero_()
        self.position_embeddings[0, self.num_prefix_tokens :] = table.to(self.position_embeddings.dtype)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid: bicubic resize of the patch part, prefix kept."""
        p = self.patch_embeddings.patch_size
        grid = (height // p, width // p)
        if grid == self.grid_size:
            return self.position_embeddings
        return resize_position_embeddings(
            self.position_embeddings, self.num_prefix_tokens, self.grid_size, grid
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        _, _, height, width = pixel_values.shape
        x = self.patch_embeddings(pixel_values)  # (B, N, D)
        batch_size, num_patches, _ = x.shape
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos was given, but this model was built without a mask token")
            if bool_masked_pos.shape != (batch_size, num_patches):
                raise ValueError(
                    f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)}, expected ({batch_size}, "
                    f"{num_patches}) for a {height}x{width} input with patch_size "
                    f"{self.patch_embeddings.patch_size}"
                )
            x = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        prefix = torch.cat((self.cls_token, self.distillation_token), dim=1).expand(batch_size, -1, -1)
        x = torch.cat((prefix.to(x.dtype), x), dim=1)  # (B, 2 + N, D)
        if interpolate_pos_encoding:
            x = x + self.interpolate_pos_encoding(height, width)
        else:
            p = self.patch_embeddings.patch_size
            if (height // p, width // p) != self.grid_size:
                gh, gw = self.grid_size
                raise ValueError(
                    f"Input image size ({height}*{width}) doesn't match model ({gh * p}*{gw * p}); "
                    "pass interpolate_pos_encoding=True to run at another size"
                )
            x = x + self.position_embeddings
        return self.dropout(x)


class DeiTAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        qkv = (
            self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # (3, B, nh, T, hs)
        q, k, v = qkv.unbind(0)
        dropout = self.dropout if self.training else 0.0
        # The fused kernel does not return the probabilities, and PyTorch's CPU flash kernel is about 2x slower
        # than explicit matmuls in bf16/fp16 at DeiT's lengths (198 tokens: 15 vs 7 ms per DeiT-Ti layer,
        # forward + backward, 2 cores); there, compute softmax(q k^T / sqrt(hs)) v explicitly (fp32 softmax).
        explicit = output_attentions or (
            x.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        )
        if explicit:
            weights = torch.softmax(
                (q @ k.transpose(-2, -1)) * self.head_dim**-0.5, dim=-1, dtype=torch.float32
            ).to(q.dtype)  # (B, nh, T, T)
            y = F.dropout(weights, dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.o_proj(y), weights if output_attentions else None


class DeiTMLP(nn.Module):
    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., 2016): drop the whole residual branch per sample, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DeiTLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: DeiTConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DeiTAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DeiTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path_rate = drop_path_rate

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attention(self.layernorm_before(x), output_attentions)
        x = x + drop_path(self.dropout(y), self.drop_path_rate, self.training)
        y = self.mlp(self.layernorm_after(x))
        x = x + drop_path(self.dropout(y), self.drop_path_rate, self.training)
        return x, weights


class DeiTPooler(nn.Module):
    """Dense + activation on the class token (Transformers' pooler; unused by the heads)."""

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.activation = activation(config.pooler_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


# ---------------------------------------------------------------------------------------------- base class
class DeiTPreTrainedModel(nn.Module):
    """Weight initialisation and checkpoint I/O shared by every DeiT class.

    `save_pretrained(dir)` writes `config.json` + `model.safetensors` in Transformers' on-disk layout;
    `from_pretrained(path)` reads that layout (either key naming), timm DeiT state dicts and simmim's own.
    """

    base_model_prefix = "deit"
    main_input_name = "pixel_values"

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def num_prefix_tokens(self) -> int:
        return DeiTEmbeddings.num_prefix_tokens

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Activation checkpointing (Transformers' name): in training, each block keeps only its input and
        recomputes the rest in the backward pass, trading about one more forward for activation memory."""
        for module in self.modules():
            if isinstance(module, DeiTModel):
                module.gradient_checkpointing = enable

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm/DeiT initialisation: truncated normal for weights and tokens, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, DeiTEmbeddings):
                for token in (module.cls_token, module.distillation_token, module.position_embeddings):
                    nn.init.trunc_normal_(token, std=std)
                if module.mask_token is not None:
                    nn.init.trunc_normal_(module.mask_token, std=std)

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (Transformers' layout and key names)."""
        checkpoint_format.save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: DeiTConfig | None = None,
        output_loading_info: bool = False,
        ignore_mismatched_sizes: bool = False,
        **config_overrides: Any,
    ):
        """Load weights from a simmim/Transformers directory or a safetensors/torch file (timm included).

        Args:
            path: a directory with `config.json` and `model.safetensors` (or `pytorch_model.bin`), or a
                weights file; a file with no `config.json` beside it (a bare timm state dict) needs `config`.
            config: the configuration to build; default: the checkpoint's, updated by `config_overrides`
                (e.g. `num_labels=10`, `image_size=64`).
            output_loading_info: also return `{"missing_keys", "unexpected_keys", "mismatched_keys",
                "resized_keys", "adapted_keys"}` (adapted: an RGB patch embedding fitted to num_channels).
            ignore_mismatched_sizes: leave tensors of another shape (a head for other labels) newly
                initialised instead of raising.
        """
        model, info = checkpoint_format.from_pretrained(
            cls, path, config=config, ignore_mismatched_sizes=ignore_mismatched_sizes, **config_overrides
        )
        return (model, info) if output_loading_info else model


class DeiTModel(DeiTPreTrainedModel):
    """The bare DeiT encoder.

    Args:
        config: model configuration.
        add_pooling_layer: add the dense + tanh pooler on the class token (`pooler_output`).
        use_mask_token: add the learned mask token that replaces masked patch embeddings (SimMIM).
    """

    def __init__(
        self, config: DeiTConfig, add_pooling_layer: bool = True, use_mask_token: bool = False
    ) -> None:
        super().__init__(config)
        self.embeddings = DeiTEmbeddings(config, use_mask_token=use_mask_token)
        # On the CPU even under `with torch.device("meta")`: the rates are Python floats, not weights.
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList([DeiTLayer(config, rate) for rate in rates])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = DeiTPooler(config) if add_pooling_layer else None
        self.gradient_checkpointing = False
        self.init_weights()

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPooling:
        """Encode images.

        Args:
            pixel_values: (B, C, H, W) normalised images; H, W multiples of patch_size, equal to the config's
                image_size unless `interpolate_pos_encoding`.
            bool_masked_pos: (B, h*w) bool, True where the patch embedding is replaced by the mask token.
            interpolate_pos_encoding: resize the position embeddings to this input's patch grid (any size
                divisible by the patch size, square or not).
            output_hidden_states: also return the embeddings and every block's output.
            output_attentions: also return every block's attention probabilities (computed explicitly).

        Transformers' `head_mask` is not supported: pruning heads at run time is left out.
        """
        x = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding)  # (B, 2 + N, D)
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                # Non-reentrant, and the RNG state kept: the recomputed block draws the same drop-path mask.
                x, weights = checkpoint(layer, x, output_attentions, use_reentrant=False)
            else:
                x, weights = layer(x, output_attentions)
            if output_hidden_states:
                hidden_states.append(x)
            if output_attentions:
                attentions.append(weights)
        x = self.layernorm(x)
        return BaseModelOutputWithPooling(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


class DeiTForMaskedImageModeling(DeiTPreTrainedModel):
    """SimMIM: the encoder with a mask token, a 1x1 conv + PixelShuffle decoder and an L1 loss on masked pixels."""

    def __init__(self, config: DeiTConfig) -> None:
        config.validate_for_masked_image_modeling()
        super().__init__(config)
        self.deit = DeiTModel(config, add_pooling_layer=False, use_mask_token=True)
        stride = config.encoder_stride
        self.decoder = nn.Sequential(
            nn.Conv2d(config.hidden_size, stride**2 * config.num_channels, kernel_size=1),
            nn.PixelShuffle(stride),  # (B, s*s*C, h, w) -> (B, C, h*s, w*s)
        )
        self.init_weights()

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> MaskedImageModelingOutput:
        """Reconstruct `pixel_values`; with `bool_masked_pos` (B, h*w), also the SimMIM loss.

        loss = sum(|x - x_hat| * m) / (sum(m) + 1e-5) / C over the pixel mask m of the masked patches, as
        microsoft/SimMIM and Transformers compute it (`losses.masked_l1`). The mask follows the input's
        actual patch grid.
        """
        out = self.deit(
            pixel_values, bool_masked_pos, interpolate_pos_encoding, output_hidden_states, output_attentions
        )
        p = self.config.patch_size
        B, _, H, W = pixel_values.shape
        h, w = H // p, W // p
        patches = out.last_hidden_state[:, self.num_prefix_tokens :]  # (B, h*w, D)
        patches = patches.transpose(1, 2).reshape(B, -1, h, w)  # (B, D, h, w)
        reconstruction = self.decoder(patches)  # (B, C, H, W)

        loss = None
        if bool_masked_pos is not None:
            mask = patch_mask_to_pixels(bool_masked_pos, p, H, W)  # (B, 1, H, W)
            loss = masked_l1(pixel_values, reconstruction, mask, over_batch=True)
        return MaskedImageModelingOutput(loss, reconstruction, out.hidden_states, out.attentions)


class DeiTForImageClassification(DeiTPreTrainedModel):
    """A linear head on the final class token."""

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__(config)
        self.deit = DeiTModel(config, add_pooling_layer=False)
        n = config.num_labels
        self.classifier = nn.Linear(config.hidden_size, n) if n > 0 else nn.Identity()
        self.init_weights()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ImageClassifierOutput:
        """Classify; `labels` (B,) int, (B, num_labels) probabilities (MixUp/CutMix), or (B,) float when
        num_labels == 1 give cross-entropy, soft-target cross-entropy or MSE."""
        out = self.deit(pixel_values, None, interpolate_pos_encoding, output_hidden_states, output_attentions)
        logits = self.classifier(out.last_hidden_state[:, 0])  # class token
        loss = classification_loss(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss, logits, out.hidden_states, out.attentions)


class DeiTForImageClassificationWithTeacher(DeiTPreTrainedModel):
    """DeiT's distilled classifier: a head on the class token and one on the distillation token.

    `logits` is their mean (DeiT's inference rule). Unlike Transformers' inference-only class, it trains:
    with `labels` and `teacher_logits` the loss is DeiT's
    (1 - alpha) * CE(cls_logits, labels) + alpha * D(distillation_logits, teacher), see `losses.py`;
    with `labels` alone both heads learn the labels: (CE(cls) + CE(dist)) / 2.
    """

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__(config)
        self.deit = DeiTModel(config, add_pooling_layer=False)
        n = config.num_labels
        self.cls_classifier = nn.Linear(config.hidden_size, n) if n > 0 else nn.Identity()
        self.distillation_classifier = nn.Linear(config.hidden_size, n) if n > 0 else nn.Identity()
        self.init_weights()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        distillation_type: str = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> DeiTForImageClassificationWithTeacherOutput:
        out = self.deit(pixel_values, None, interpolate_pos_encoding, output_hidden_states, output_attentions)
        cls_logits = self.cls_classifier(out.last_hidden_state[:, 0])  # class token
        distillation_logits = self.distillation_classifier(out.last_hidden_state[:, 1])  # distillation token
        loss = None
        if labels is not None and teacher_logits is not None:
            loss = distillation_loss(
                cls_logits,
                distillation_logits,
                labels,
                teacher_logits,
                kind=distillation_type,
                alpha=alpha,
                tau=tau,
            )
        elif labels is not None:
            loss = 0.5 * (
                classification_loss(cls_logits, labels) + classification_loss(distillation_logits, labels)
            )
        elif teacher_logits is not None:
            raise ValueError("teacher_logits were given without labels; the class head needs labels")
        logits = (cls_logits + distillation_logits) / 2
        return DeiTForImageClassificationWithTeacherOutput(
            loss, logits, cls_logits, distillation_logits, out.hidden_states, out.attentions
        )
