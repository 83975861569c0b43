"""Parameter groups (weight decay membership, layer-wise lr scales), the lr schedule, and the weight EMA."""

import math

import pytest
import torch
from torch import nn

from simmim.optim import ModelEma, lr_at, param_groups, scaled_lr, set_lr


class Embeddings(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 6, d))
        self.patch_embeddings = nn.Conv2d(3, d, 2, 2)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)


class Encoder(nn.Module):
    """Named like simmim's DeiT: deit.embeddings.*, deit.layers.{i}.*, deit.layernorm.*."""

    def __init__(self, d=4, depth=2):
        super().__init__()
        self.embeddings = Embeddings(d)
        self.layers = nn.ModuleList(Block(d) for _ in range(depth))
        self.layernorm = nn.LayerNorm(d)


class Tiny(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.deit = Encoder(depth=depth)
        self.head = nn.Linear(4, 3)


class TimmStyle(nn.Module):
    """timm's names: top-level tokens, patch_embed, blocks.{i}, norm, head."""

    def __init__(self, d=4):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 2, 2)
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)


def group_of(groups, model):
    """parameter name -> its group."""
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def test_no_decay_membership():
    model = Tiny()
    groups = param_groups(model, weight_decay=0.05)
    assert len(groups) == 2 and all(g["lr_scale"] == 1.0 for g in groups)
    no_decay = {n for n, g in group_of(groups, model).items() if g["weight_decay"] == 0.0}
    assert no_decay == {
        "deit.embeddings.cls_token",
        "deit.embeddings.distillation_token",
        "deit.embeddings.mask_token",
        "deit.embeddings.position_embeddings",
        "deit.embeddings.patch_embeddings.bias",
        "deit.layers.0.norm.weight",
        "deit.layers.0.norm.bias",
        "deit.layers.0.fc.bias",
        "deit.layers.1.norm.weight",
        "deit.layers.1.norm.bias",
        "deit.layers.1.fc.bias",
        "deit.layernorm.weight",
        "deit.layernorm.bias",
        "head.bias",
    }
    decay = {n for n, g in group_of(groups, model).items() if g["weight_decay"] == 0.05}
    assert decay == {
        "deit.embeddings.patch_embeddings.weight",
        "deit.layers.0.fc.weight",
        "deit.layers.1.fc.weight",
        "head.weight",
    }


def test_every_trainable_parameter_once_and_frozen_excluded():
    model = Tiny()
    model.deit.embeddings.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("model_cls", [Tiny, TimmStyle])
def test_layer_decay_scales(model_cls):
    # layer_decay 0.5, 2 blocks: scale = 0.5 ** (2 + 1 - layer_id)
    model = model_cls()
    expected = {"embed": 0.125, "0": 0.25, "1": 0.5, "top": 1.0}
    for name, group in group_of(param_groups(model, 0.05, layer_decay=0.5), model).items():
        if "embed" in name or "token" in name:
            where = "embed"
        elif "layers." in name or "blocks." in name:
            where = name.split(".")[-3]
        else:
            where = "top"
        assert group["lr_scale"] == expected[where], name


def test_layer_decay_groups_and_explicit_depth():
    model = Tiny()
    groups = param_groups(model, 0.05, layer_decay=0.5)
    # (layer 0..3) x (decay, no decay)
    assert len(groups) == 8 and len({g["name"] for g in groups}) == 8
    # a model cut to 2 blocks of a 4-block recipe keeps the 4-block scales
    scales = {
        n: g["lr_scale"] for n, g in group_of(param_groups(model, 0.05, 0.5, num_layers=4), model).items()
    }
    assert scales["deit.embeddings.cls_token"] == 0.5**5
    assert scales["deit.layers.1.fc.weight"] == 0.5**3
    assert scales["head.weight"] == 1.0


def test_transformers_names():
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.layer = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    scales = {n: g["lr_scale"] for n, g in group_of(param_groups(model, 0.1, 0.5), model).items()}
    assert scales == {
        "encoder.layer.0.weight": 0.125,
        "encoder.layer.0.bias": 0.125,
        "encoder.layer.1.weight": 0.25,
        "encoder.layer.1.bias": 0.25,
        "encoder.layer.2.weight": 0.5,
        "encoder.layer.2.bias": 0.5,
    }


def test_set_lr_applies_the_scales():
    model = Tiny()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, layer_decay=0.5), lr=0.0)
    set_lr(optimizer, 2.0)
    assert sorted(g["lr"] for g in optimizer.param_groups) == sorted(
        2.0 * s for s in (0.125, 0.125, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0)
    )
    assert all(g["weight_decay"] in (0.0, 0.05) for g in optimizer.param_groups)


def test_scaled_lr():
    assert scaled_lr(1e-4, 512) == pytest.approx(1e-4)
    assert scaled_lr(1e-4, 2048) == pytest.approx(4e-4)
    assert scaled_lr(5e-4, 256) == pytest.approx(2.5e-4)


def test_lr_at_warmup_cosine_and_end():
    lr = dict(peak_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert lr_at(0, **lr) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(4, **lr) == pytest.approx(0.5)
    assert lr_at(9, **lr) == pytest.approx(1.0)
    assert lr_at(10, **lr) == pytest.approx(1.0)  # cosine starts at the peak
    # a quarter of the cosine: 0.1 + 0.45 * (1 + cos(pi / 4)) = 0.1 + 0.45 * 1.7071068
    assert lr_at(35, **lr) == pytest.approx(0.86819805)
    assert lr_at(60, **lr) == pytest.approx(0.55)  # halfway: the mean of peak and min
    assert lr_at(109, **lr) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_at(110, **lr) == 0.1 and lr_at(500, **lr) == 0.1
    assert lr_at(0, peak_lr=2.0, total_steps=10, warmup_steps=0) == 2.0
    assert lr_at(5, peak_lr=2.0, total_steps=10, warmup_steps=0) == pytest.approx(1.0)


def test_ema_update_and_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(0.9, model)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert ema.module[1].num_batches_tracked.item() == 7  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())

    other = ModelEma(0.9, nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module[0].weight, ema.module[0].weight)


def test_ema_is_fp32_and_tied_weights_update_once():
    model = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 4, bias=False)).to(torch.bfloat16)
    model[1].weight = model[0].weight  # tied
    ema = ModelEma(0.5, model)
    assert ema.module[0].weight.dtype == torch.float32
    w0 = ema.module[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, 0.5 * w0 + 0.5 * (w0 + 2.0), atol=1e-2)
    assert ema.module[1].weight is ema.module[0].weight
