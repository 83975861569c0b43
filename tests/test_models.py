"""Behaviour of the DeiT models: invalid configs and inputs, what simmim adds beyond Transformers
(any input size, a trainable teacher class, stochastic depth, bf16), checked against hand computations and,
where Transformers has the feature, against Transformers on the same random weights."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, fill_random, max_diff, script_env, tiny_config

from simmim.models import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTForMaskedImageModeling,
    DeiTModel,
)

TOL = 1e-4
CLASSES = {
    "DeiTModel": DeiTModel,
    "DeiTForMaskedImageModeling": DeiTForMaskedImageModeling,
    "DeiTForImageClassification": DeiTForImageClassification,
    "DeiTForImageClassificationWithTeacher": DeiTForImageClassificationWithTeacher,
}


def simmim_loss_by_loops(x: np.ndarray, rec: np.ndarray, mask: np.ndarray, p: int) -> float:
    """SimMIM's loss written out: sum of |x - rec| over the pixels and channels of the masked patches,
    divided by (number of masked pixels + 1e-5) and by C. x, rec: (B, C, H, W); mask: (B, h*w), row-major."""
    B, C, H, W = x.shape
    w = W // p
    total, pixels = 0.0, 0
    for b in range(B):
        for i in range(mask.shape[1]):
            if not mask[b, i]:
                continue
            r, c = divmod(i, w)
            block = np.abs(
                x[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
                - rec[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
            )
            total += float(block.astype(np.float64).sum())
            pixels += p * p
    return total / (pixels + 1e-5) / C


def transformers_twin(model: torch.nn.Module, tmp_path, **kwargs):
    """The same weights in Transformers' class of the same name (through our save_pretrained)."""
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(tmp_path / "ckpt")
    twin = getattr(transformers, type(model).__name__).from_pretrained(tmp_path / "ckpt", **kwargs)
    return twin.eval()


# ---------------------------------------------------------------------------------------------- bad config
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(image_size=36), "image_size"),
        (dict(image_size=(32, 36)), "image_size"),
        (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob"),
        (dict(hidden_dropout_prob=-0.1), "hidden_dropout_prob"),
        (dict(attention_probs_dropout_prob=1.5), "attention_probs_dropout_prob"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(hidden_act="gelu_fast_typo"), "hidden_act"),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_encoder_stride_must_equal_patch_size_for_masked_image_modeling():
    config = tiny_config(encoder_stride=16)  # a valid config for every other class
    DeiTForImageClassification(config)
    with pytest.raises(ValueError, match="encoder_stride"):
        DeiTForMaskedImageModeling(config)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", list(CLASSES))
def test_other_input_size_without_interpolation_raises(name):
    model = CLASSES[name](tiny_config()).eval()
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(torch.randn(1, 3, 48, 48))


def test_input_not_divisible_by_patch_size_raises():
    model = DeiTModel(tiny_config()).eval()
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 3, 36, 32), interpolate_pos_encoding=True)


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="pixel_values"):
        DeiTModel(tiny_config())(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("shape", [(2, 15), (2, 4, 4), (1, 16), (2, 36)])
def test_wrong_bool_masked_pos_shape_raises(shape):
    model = DeiTForMaskedImageModeling(tiny_config()).eval()
    with pytest.raises(ValueError, match="bool_masked_pos"):
        model(torch.randn(2, 3, 32, 32), bool_masked_pos=torch.zeros(shape, dtype=torch.bool))


def test_bool_masked_pos_without_mask_token_raises():
    with pytest.raises(ValueError, match="mask token"):
        DeiTModel(tiny_config())(
            torch.randn(1, 3, 32, 32), bool_masked_pos=torch.ones(1, 16, dtype=torch.bool)
        )


def test_teacher_logits_without_labels_raises():
    model = DeiTForImageClassificationWithTeacher(tiny_config())
    with pytest.raises(ValueError, match="labels"):
        model(torch.randn(2, 3, 32, 32), teacher_logits=torch.randn(2, 5))


# ---------------------------------------------------------------------------------------------- any input size
@pytest.mark.parametrize(
    "name", ["DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"]
)
@pytest.mark.parametrize("size", [(48, 48), (48, 32), (16, 24)])
def test_interpolate_pos_encoding_matches_transformers(name, size, tmp_path):
    ours = fill_random(CLASSES[name](tiny_config())).eval()
    theirs = transformers_twin(ours, tmp_path)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a = ours(x, interpolate_pos_encoding=True)
        b = theirs(x, interpolate_pos_encoding=True)
    assert set(b.keys()) - {"hidden_states", "attentions"}
    for key in b.keys():
        assert max_diff(getattr(a, key), b[key]) <= TOL, key


@pytest.mark.parametrize("size", [(48, 48), (48, 32), (24, 40)])
def test_masked_image_modeling_at_other_sizes(size, tmp_path):
    """The mask, the decoder and the loss follow the input's patch grid. Transformers' own head reshapes to
    the config's square grid, so the oracle is its encoder followed by its decoder applied by hand."""
    p = 8
    h, w = size[0] // p, size[1] // p
    ours = fill_random(DeiTForMaskedImageModeling(tiny_config())).eval()
    theirs = transformers_twin(ours, tmp_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, *size, generator=g)
    mask = torch.rand(3, h * w, generator=g) < 0.6
    mask[0, 0] = True  # at least one masked patch
    with torch.no_grad():
        out = ours(x, bool_masked_pos=mask, interpolate_pos_encoding=True)
        unmasked = ours(x, interpolate_pos_encoding=True)
        tokens = theirs.deit(x, bool_masked_pos=mask, interpolate_pos_encoding=True).last_hidden_state
        grid = tokens[:, 2:].transpose(1, 2).reshape(3, -1, h, w)  # (B, D, h, w)
        expected = theirs.decoder(grid)
    assert out.reconstruction.shape == (3, 3, *size)
    assert max_diff(out.reconstruction, expected) <= TOL
    expected_loss = simmim_loss_by_loops(x.numpy(), out.reconstruction.numpy(), mask.numpy(), p)
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    assert unmasked.loss is None and unmasked.reconstruction.shape == (3, 3, *size)


def test_masked_image_modeling_loss_at_config_size_matches_hand_computation():
    model = fill_random(DeiTForMaskedImageModeling(tiny_config())).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5, 15]] = True
    mask[1, [3]] = True
    with torch.no_grad():
        out = model(x, bool_masked_pos=mask)
    expected = simmim_loss_by_loops(x.numpy(), out.reconstruction.numpy(), mask.numpy(), 8)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- extra outputs
def test_output_attentions_are_probabilities_and_do_not_change_the_output():
    model = fill_random(DeiTForImageClassificationWithTeacher(tiny_config())).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        out = model(x, output_attentions=True)
    T = 2 + 16  # class + distillation tokens + 4x4 patches
    assert len(out.attentions) == 2
    for a in out.attentions:
        assert a.shape == (2, 4, T, T)
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, T), atol=1e-5, rtol=0)
    # The explicit-softmax path and the fused kernel compute the same attention.
    assert max_diff(out.logits, plain.logits) <= 1e-5


def test_hidden_states_are_embeddings_then_each_block():
    config = tiny_config(num_hidden_layers=3)
    model = fill_random(DeiTModel(config)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        emb = model.embeddings(x)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert max_diff(out.hidden_states[0], emb) == 0
    norm = model.layernorm
    expected_last = F.layer_norm(out.hidden_states[-1], (32,), norm.weight, norm.bias, config.layer_norm_eps)
    assert max_diff(out.last_hidden_state, expected_last) <= 1e-5
    pooler = model.pooler.dense
    expected_pool = torch.tanh(out.last_hidden_state[:, 0] @ pooler.weight.T + pooler.bias)
    assert max_diff(out.pooler_output, expected_pool) <= 1e-5


def test_outputs_index_like_transformers():
    model = DeiTForImageClassification(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]))
    assert out[0] is out.loss and out[1] is out.logits and out["logits"] is out.logits
    assert len(out.to_tuple()) == 2  # hidden_states and attentions were not asked for


# ---------------------------------------------------------------------------------------------- training
def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def cross_entropy(logits: torch.Tensor, labels: np.ndarray) -> float:
    lp = log_softmax(logits.detach().numpy())
    return float(-np.mean([lp[i, labels[i]] for i in range(len(labels))]))


def test_classifier_losses():
    x = torch.randn(4, 3, 32, 32)
    model = fill_random(DeiTForImageClassification(tiny_config())).eval()
    labels = np.array([0, 4, 2, 2])
    out = model(x, labels=torch.from_numpy(labels))
    assert out.loss.item() == pytest.approx(cross_entropy(out.logits, labels), rel=1e-5)
    # MixUp/CutMix targets: soft cross-entropy, -sum_c t_c log p_c averaged over the batch.
    targets = np.random.default_rng(0).dirichlet(np.ones(5), size=4)
    out = model(x, labels=torch.tensor(targets, dtype=torch.float32))
    expected = float(np.mean(-(targets * log_softmax(out.logits.detach().numpy())).sum(-1)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # One output: regression.
    regressor = fill_random(DeiTForImageClassification(tiny_config(num_labels=1))).eval()
    y = np.array([0.5, -1.0, 2.0, 0.0])
    out = regressor(x, labels=torch.tensor(y, dtype=torch.float32))
    expected = float(np.mean((out.logits.detach().numpy()[:, 0] - y) ** 2))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_teacher_class_trains_both_heads_and_the_distillation_token():
    model = fill_random(DeiTForImageClassificationWithTeacher(tiny_config()), std=0.1).train()
    x = torch.randn(4, 3, 32, 32)
    labels = np.array([1, 0, 3, 3])
    teacher = torch.randn(4, 5)
    out = model(
        x, labels=torch.from_numpy(labels), teacher_logits=teacher, distillation_type="hard", alpha=0.3
    )
    # DeiT's hard distillation: (1 - alpha) CE(cls, labels) + alpha CE(dist, argmax teacher).
    expected = 0.7 * cross_entropy(out.cls_logits, labels) + 0.3 * cross_entropy(
        out.distillation_logits, teacher.argmax(-1).numpy()
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert max_diff(out.logits, (out.cls_logits + out.distillation_logits) / 2) <= 1e-6
    out.loss.backward()
    for name in (
        "cls_classifier.weight",
        "distillation_classifier.weight",
        "deit.embeddings.distillation_token",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name

    model.zero_grad()
    out = model(x, labels=torch.from_numpy(labels))  # no teacher: both heads learn the labels
    expected = 0.5 * (cross_entropy(out.cls_logits, labels) + cross_entropy(out.distillation_logits, labels))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    assert model.distillation_classifier.weight.grad.abs().sum() > 0


def test_every_parameter_gets_a_gradient_in_a_masked_image_modeling_step():
    model = DeiTForMaskedImageModeling(tiny_config()).train()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[:, 0] = True
    model(x, bool_masked_pos=mask).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_stochastic_depth_is_random_in_training_only():
    model = fill_random(DeiTForImageClassification(tiny_config(drop_path_rate=0.5)), std=0.1)
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        model.train()
        first, second = model(x).logits, model(x).logits
        model.eval()
        third, fourth = model(x).logits, model(x).logits
    assert max_diff(first, second) > 1e-3
    assert max_diff(third, fourth) == 0
    # Without stochastic depth (and with no dropout) training mode is deterministic too.
    plain = fill_random(DeiTForImageClassification(tiny_config()), std=0.1).train()
    with torch.no_grad():
        assert max_diff(plain(x).logits, plain(x).logits) == 0


def test_drop_path_rates_increase_linearly_to_the_config_rate():
    model = DeiTModel(tiny_config(num_hidden_layers=5, drop_path_rate=0.2))
    rates = [layer.drop_path_rate for layer in model.layers]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_bf16_autocast_on_cpu_trains():
    model = fill_random(DeiTForMaskedImageModeling(tiny_config()), std=0.1).train()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    with torch.no_grad():
        reference = model(x, bool_masked_pos=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, bool_masked_pos=mask)
    assert out.reconstruction.dtype == torch.bfloat16
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: agreement with fp32 to about 1% of the output's scale.
    scale = reference.reconstruction.abs().max().item()
    assert max_diff(out.reconstruction.float(), reference.reconstruction) <= 0.02 * scale
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=0.01)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_parameter_count_matches_deit_tiny():
    """DeiT-Ti distilled has 5.91M parameters (Touvron et al., Table 1 lists 5M for DeiT-Ti; timm reports
    5,910,800 for deit_tiny_distilled_patch16_224): 12 blocks of 12 D^2 + 13 D, embeddings, norm, two heads."""
    config = DeiTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, num_labels=1000
    )
    model = DeiTForImageClassificationWithTeacher(config)
    D = 192
    block = 4 * D * D + 4 * D + 2 * D * 768 + 768 + D + 4 * D  # qkv+proj, mlp, two norms
    embeddings = 3 * 16 * 16 * D + D + 2 * D + (196 + 2) * D
    heads = 2 * (D * 1000 + 1000)
    expected = 12 * block + embeddings + 2 * D + heads
    assert sum(p.numel() for p in model.parameters()) == expected == 5_910_800
    assert math.isclose(expected / 1e6, 5.91, abs_tol=0.01)


def test_every_config_activation_builds():
    from simmim.models.configuration import ACTIVATIONS
    from simmim.models.deit import ACTIVATION_MODULES

    assert set(ACTIVATIONS) == set(ACTIVATION_MODULES)
    x = torch.linspace(-3, 3, 7)
    expected = {"relu": x.clamp(min=0), "quick_gelu": x * torch.sigmoid(1.702 * x), "tanh": torch.tanh(x)}
    for name, value in expected.items():
        torch.testing.assert_close(ACTIVATION_MODULES[name]()(x), value)


def mae_2d_sincos(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed (without the class token), for a grid_h x grid_w grid."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))  # w first
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_sincos_position_embeddings_are_maes_table_and_stay_trainable():
    model = DeiTForMaskedImageModeling(tiny_config(image_size=(32, 48)))  # a 4 x 6 grid: rows != columns
    emb = model.deit.embeddings
    emb.init_sincos_position_embeddings()
    table = emb.position_embeddings.detach()[0].numpy()
    assert np.all(table[: emb.num_prefix_tokens] == 0)
    np.testing.assert_allclose(table[emb.num_prefix_tokens :], mae_2d_sincos(table.shape[1], 4, 6), atol=1e-6)
    assert emb.position_embeddings.requires_grad


# ---------------------------------------------------------------------------------------------- packaging
def test_models_package_imports_nothing_else_from_simmim():
    """simmim.models can be copied into another project: importing it and every module in it loads no
    simmim module outside simmim.models."""
    code = (
        "import importlib, pkgutil, sys, simmim.models\n"
        "for m in pkgutil.iter_modules(simmim.models.__path__):\n"
        "    importlib.import_module(f'simmim.models.{m.name}')\n"
        "print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] == 'simmim')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = result.stdout.split()
    assert "simmim.models.deit" in loaded and "simmim.models.losses" in loaded
    outside = [n for n in loaded if n != "simmim" and n.split(".")[:2] != ["simmim", "models"]]
    assert outside == []


@pytest.mark.parametrize("cls", [DeiTForMaskedImageModeling, DeiTForImageClassificationWithTeacher])
def test_activation_checkpointing_gives_the_same_gradients(cls):
    # Drop path on: the recomputed blocks must draw the same random masks as the first forward did.
    config = tiny_config(drop_path_rate=0.3, hidden_dropout_prob=0.1)
    torch.manual_seed(0)
    plain = fill_random(cls(config), std=0.1).train()
    ckpt = cls(config).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing_enable()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kwargs = {"bool_masked_pos": torch.rand(3, 16) < 0.5} if cls is DeiTForMaskedImageModeling else {}
    losses = []
    for model in (plain, ckpt):
        torch.manual_seed(2)
        out = model(x, **kwargs)
        loss = out.loss if out.loss is not None else out.logits.square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)
    # Evaluation and no-grad forwards do not recompute (nothing to save memory for).
    with torch.no_grad():
        ours, reference = ckpt.eval()(x, **kwargs), plain.eval()(x, **kwargs)
    torch.testing.assert_close(ours[0], reference[0])


@pytest.mark.parametrize(
    "variant, patch, sizes",
    [("large", 16, (1024, 24, 16, 4096)), ("huge", 14, (1280, 32, 16, 5120))],
)
def test_large_and_huge_variants_have_transformers_shapes(variant, patch, sizes):
    """Built on the meta device (no memory, no forward): every tensor name and shape as Transformers'."""
    transformers = pytest.importorskip("transformers")
    from simmim.config import ModelConfig, deit_config_kwargs

    kwargs = {**deit_config_kwargs(ModelConfig(variant=variant, patch_size=patch)), "image_size": 224}
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    assert tuple(kwargs[k] for k in keys) == sizes
    theirs_config = transformers.DeiTConfig(**{k: kwargs[k] for k in (*keys, "patch_size", "encoder_stride")})
    with torch.device("meta"):
        ours = DeiTForMaskedImageModeling(DeiTConfig(**kwargs))
        theirs = transformers.DeiTForMaskedImageModeling(theirs_config)
    # Transformers 5 names its tensors in memory other than on disk (q_proj for query): compare the shapes
    # of our tensors in its on-disk layout with all of its tensors', as multisets, and the total count.
    from simmim.models.checkpoint import to_transformers_state_dict

    ours_shapes = sorted(tuple(v.shape) for v in to_transformers_state_dict(ours.state_dict()).values())
    theirs_shapes = sorted(tuple(v.shape) for v in theirs.state_dict().values())
    assert ours_shapes == theirs_shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
