"""Checkpoints: Transformers and timm as oracles on random weights (both directions of transfer), the file
formats we read, refused and broken files, cross-class loading and position-embedding resizing."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_ARCH, fill_random, max_diff, tiny_config
from safetensors.torch import load_file, save_file

from simmim.models import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTForMaskedImageModeling,
    DeiTModel,
)
from simmim.models.checkpoint import to_timm_state_dict

transformers = pytest.importorskip("transformers")

TOL = 1e-4
CLASSES = {
    "DeiTModel": DeiTModel,
    "DeiTForMaskedImageModeling": DeiTForMaskedImageModeling,
    "DeiTForImageClassification": DeiTForImageClassification,
    "DeiTForImageClassificationWithTeacher": DeiTForImageClassificationWithTeacher,
}
# Every output Transformers returns for each class, when asked for hidden states and attentions
# (loss too where a label or mask is given).
OUTPUTS = {
    "DeiTModel": {"last_hidden_state", "pooler_output", "hidden_states", "attentions"},
    "DeiTForMaskedImageModeling": {"loss", "reconstruction", "hidden_states", "attentions"},
    "DeiTForImageClassification": {"loss", "logits", "hidden_states", "attentions"},
    "DeiTForImageClassificationWithTeacher": {
        "logits",
        "cls_logits",
        "distillation_logits",
        "hidden_states",
        "attentions",
    },
}
TINY = dict(TINY_ARCH, encoder_stride=8, num_labels=5)


def inputs_for(name: str, batch: int = 3) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    if name == "DeiTForMaskedImageModeling":
        mask = torch.rand(batch, 16, generator=g) < 0.6
        mask[0, 0] = True
        return x, {"bool_masked_pos": mask}
    if name == "DeiTForImageClassification":
        return x, {"labels": torch.tensor([0, 4, 2])[:batch]}
    return x, {}


def assert_same_outputs(name: str, ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Every output of `theirs` (eager attention) equals ours, with and without the explicit attention path."""
    x, kwargs = inputs_for(name)
    with torch.no_grad():
        b = theirs(x, output_hidden_states=True, output_attentions=True, **kwargs)
        a = ours(x, output_hidden_states=True, output_attentions=True, **kwargs)
        fused = ours(x, **kwargs)  # scaled_dot_product_attention
    assert set(b.keys()) == OUTPUTS[name]
    for key in b.keys():
        assert max_diff(getattr(a, key), b[key]) <= TOL, key
        if key not in ("hidden_states", "attentions"):
            assert max_diff(getattr(fused, key), b[key]) <= TOL, key


def assert_clean(info: dict) -> None:
    for key, value in info.items():
        assert not value, f"{key}: {value}"


# ---------------------------------------------------------------------------------------------- Transformers
@pytest.mark.parametrize("name", list(CLASSES))
def test_our_checkpoint_loads_into_transformers(name, tmp_path):
    ours = fill_random(CLASSES[name](tiny_config())).eval()
    ours.save_pretrained(tmp_path)
    theirs, info = getattr(transformers, name).from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert_clean(info)
    assert_same_outputs(name, ours, theirs.eval())


def hf_random(name: str, **overrides):
    config = transformers.DeiTConfig(**{**TINY, **overrides})
    return fill_random(getattr(transformers, name)(config), seed=3).eval()


@pytest.mark.parametrize("name", list(CLASSES))
def test_transformers_checkpoint_loads_into_ours(name, tmp_path):
    theirs = hf_random(name)
    theirs.save_pretrained(tmp_path)
    ours, info = CLASSES[name].from_pretrained(tmp_path, output_loading_info=True)
    assert_clean(info)
    theirs.set_attn_implementation("eager")
    assert_same_outputs(name, ours.eval(), theirs)


@pytest.mark.parametrize("name", list(CLASSES))
def test_transformers_v5_module_names_load_into_ours(name, tmp_path):
    """A state dict straight from a Transformers 5 model (`layers.N.attention.q_proj`, not the on-disk
    `encoder.layer.N.attention.attention.query`), as a training script would save it."""
    theirs = hf_random(name)
    sd = theirs.state_dict()
    assert any(".layers.0.attention.q_proj.weight" in "." + k for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    theirs.config.save_pretrained(tmp_path)
    ours, info = CLASSES[name].from_pretrained(tmp_path, output_loading_info=True)
    assert_clean(info)
    theirs.set_attn_implementation("eager")
    assert_same_outputs(name, ours.eval(), theirs)


def test_regression_loss_matches_transformers(tmp_path):
    ours = fill_random(DeiTForImageClassification(tiny_config(num_labels=1))).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.DeiTForImageClassification.from_pretrained(tmp_path).eval()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        a, b = ours(x, labels=y), theirs(x, labels=y)
    assert max_diff(a.loss, b.loss) <= TOL and max_diff(a.logits, b.logits) <= TOL


def test_config_round_trip_and_transformers_reads_it(tmp_path):
    config = tiny_config(
        id2label={0: "cat", 1: "dog", 2: "bird"},
        layer_norm_eps=1e-6,
        hidden_act="gelu_new",
        image_size=(32, 48),
        qkv_bias=False,
        drop_path_rate=0.1,
        num_labels=None,
    )
    config.save_pretrained(tmp_path / "ours")
    assert DeiTConfig.from_pretrained(tmp_path / "ours") == config

    theirs = transformers.DeiTConfig.from_pretrained(tmp_path / "ours")
    shared = [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "initializer_range",
        "layer_norm_eps",
        "patch_size",
        "num_channels",
        "qkv_bias",
        "encoder_stride",
        "pooler_output_size",
        "pooler_act",
        "num_labels",
    ]
    for field in shared:
        assert getattr(theirs, field) == getattr(config, field), field
    assert tuple(theirs.image_size) == (32, 48)
    assert theirs.id2label == {0: "cat", 1: "dog", 2: "bird"}
    assert theirs.label2id == {"cat": 0, "dog": 1, "bird": 2}

    hf = transformers.DeiTConfig(
        **{**TINY, "id2label": {0: "a", 1: "b"}, "num_labels": 2, "layer_norm_eps": 1e-6}
    )
    hf.save_pretrained(tmp_path / "theirs")
    back = DeiTConfig.from_pretrained(tmp_path / "theirs")
    for field in shared:
        assert getattr(back, field) == getattr(hf, field), field
    assert back.id2label == {0: "a", 1: "b"} and back.label2id == {"a": 0, "b": 1}


def test_config_overrides_change_the_label_count(tmp_path):
    tiny_config(id2label={0: "cat", 1: "dog"}, num_labels=None).save_pretrained(tmp_path)
    config = DeiTConfig.from_pretrained(tmp_path, num_labels=4)
    assert config.num_labels == 4 and config.id2label == {i: f"LABEL_{i}" for i in range(4)}


# ---------------------------------------------------------------------------------------------- timm
TIMM_SIZE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
# timm's DeiT: LayerNorm eps 1e-6 and MLP ratio 4.
TIMM_CONFIG = dict(TINY, layer_norm_eps=1e-6, intermediate_size=128)


def timm_model(name: str, seed: int = 5):
    timm = pytest.importorskip("timm")
    return fill_random(timm.create_model(name, pretrained=False, **TIMM_SIZE), seed=seed).eval()


def assert_same_as_timm(ours, theirs) -> None:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ours.eval()(x)
        assert max_diff(a.logits, theirs.eval()(x)) <= TOL  # eval: (head + head_dist) / 2
        assert max_diff(ours.deit(x).last_hidden_state, theirs.forward_features(x)) <= TOL
        # Train mode with distilled training returns both heads; dropout and drop path are 0.
        theirs.set_distilled_training(True)
        cls_logits, dist_logits = theirs.train()(x)
        theirs.set_distilled_training(False)
    assert max_diff(a.cls_logits, cls_logits) <= TOL
    assert max_diff(a.distillation_logits, dist_logits) <= TOL


@pytest.mark.parametrize("filename", ["deit.safetensors", "deit.pth"])
def test_timm_distilled_state_dict_loads_into_ours(filename, tmp_path):
    theirs = timm_model("deit_tiny_distilled_patch16_224")
    file = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file(theirs.state_dict(), str(file))
    else:
        torch.save({"model": theirs.state_dict(), "epoch": 3}, file)  # DeiT's main.py wraps the weights
    ours, info = DeiTForImageClassificationWithTeacher.from_pretrained(
        file, config=DeiTConfig(**TIMM_CONFIG), output_loading_info=True
    )
    assert_clean(info)
    assert_same_as_timm(ours, theirs)


def test_our_teacher_model_exports_to_timm():
    ours = fill_random(DeiTForImageClassificationWithTeacher(DeiTConfig(**TIMM_CONFIG)))
    theirs = timm_model("deit_tiny_distilled_patch16_224", seed=1)  # weights replaced below
    theirs.load_state_dict(to_timm_state_dict(ours), strict=True)
    assert_same_as_timm(ours, theirs)


def test_timm_model_without_distillation_token_loads_into_our_classifier(tmp_path):
    """A plain ViT/DeiT has only a class token: ours gets a distillation token copied from it (position
    included). The extra token changes attention, so outputs differ; the weights must be carried over."""
    theirs = timm_model("deit_tiny_patch16_224", seed=9)
    assert theirs.num_prefix_tokens == 1
    sd = theirs.state_dict()
    save_file(sd, str(tmp_path / "vit.safetensors"))
    ours, info = DeiTForImageClassification.from_pretrained(
        tmp_path / "vit.safetensors", config=DeiTConfig(**TIMM_CONFIG), output_loading_info=True
    )
    assert info["missing_keys"] == ["deit.embeddings.distillation_token"]
    assert info["unexpected_keys"] == [] and info["resized_keys"] == []
    emb = ours.deit.embeddings
    assert torch.equal(emb.cls_token, sd["cls_token"])
    assert torch.equal(emb.distillation_token, sd["cls_token"])
    pos = emb.position_embeddings
    assert torch.equal(pos[:, 0], sd["pos_embed"][:, 0]) and torch.equal(pos[:, 1], sd["pos_embed"][:, 0])
    assert torch.equal(pos[:, 2:], sd["pos_embed"][:, 1:])
    assert torch.equal(emb.patch_embeddings.projection.weight, sd["patch_embed.proj.weight"])
    assert torch.equal(ours.deit.layers[1].attention.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(ours.deit.layers[1].mlp.fc2.bias, sd["blocks.1.mlp.fc2.bias"])
    assert torch.equal(ours.classifier.weight, sd["head.weight"])
    assert torch.equal(ours.deit.layernorm.weight, sd["norm.weight"])


def test_bare_timm_state_dict_needs_a_config(tmp_path):
    save_file(timm_model("deit_tiny_distilled_patch16_224").state_dict(), str(tmp_path / "deit.safetensors"))
    with pytest.raises(ValueError, match="config"):
        DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "deit.safetensors")


# ---------------------------------------------------------------------------------------------- file formats
def test_pytorch_bin_directory_loads(tmp_path):
    theirs = hf_random("DeiTForImageClassification")
    theirs.config.save_pretrained(tmp_path)
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    ours, info = DeiTForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert_clean(info)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours.eval()(x).logits, theirs(x).logits) <= TOL


def test_truncated_safetensors_raises_naming_the_file(tmp_path):
    DeiTForMaskedImageModeling(tiny_config()).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        DeiTForMaskedImageModeling.from_pretrained(tmp_path)


def test_wrong_shaped_tensor_raises_naming_the_file_and_the_key(tmp_path):
    DeiTForImageClassification(tiny_config()).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    sd = load_file(str(file))
    sd["deit.layernorm.weight"] = torch.ones(31)
    save_file(sd, str(file))
    with pytest.raises(ValueError, match="model.safetensors") as error:
        DeiTForImageClassification.from_pretrained(tmp_path)
    assert "deit.layernorm.weight" in str(error.value)


class Payload:
    """Unpickling this creates `path`: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_torch_files_are_read_without_unpickling_objects(tmp_path):
    marker = tmp_path / "executed"
    file = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": Payload(marker)}, file)
    with pytest.raises(ValueError, match="evil.pth"):
        DeiTForImageClassification.from_pretrained(file, config=tiny_config())
    assert not marker.exists()


def test_file_without_weights_raises(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DeiTModel.from_pretrained(tmp_path)


def test_head_of_another_size_is_reported_when_ignored(tmp_path):
    DeiTForImageClassification(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"classifier\.(weight|bias)"):
        DeiTForImageClassification.from_pretrained(tmp_path, num_labels=10)
    model, info = DeiTForImageClassification.from_pretrained(
        tmp_path, num_labels=10, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert info["mismatched_keys"] == ["classifier.bias", "classifier.weight"]
    assert model.classifier.weight.shape == (10, 32)


# ---------------------------------------------------------------------------------------------- cross-class loading
@pytest.mark.parametrize(
    "cls, new_keys",
    [
        (DeiTForImageClassification, ["classifier.bias", "classifier.weight"]),
        (
            DeiTForImageClassificationWithTeacher,
            [
                "cls_classifier.bias",
                "cls_classifier.weight",
                "distillation_classifier.bias",
                "distillation_classifier.weight",
            ],
        ),
    ],
)
def test_masked_image_checkpoint_loads_into_classifiers(cls, new_keys, tmp_path):
    mim = fill_random(DeiTForMaskedImageModeling(tiny_config()))
    mim.save_pretrained(tmp_path)
    model, info = cls.from_pretrained(tmp_path, num_labels=10, output_loading_info=True)
    assert info["missing_keys"] == new_keys
    assert info["unexpected_keys"] == ["decoder.0.bias", "decoder.0.weight", "deit.embeddings.mask_token"]
    assert info["resized_keys"] == []
    assert model.config.num_labels == 10
    encoder = {k: v for k, v in mim.deit.state_dict().items() if k != "embeddings.mask_token"}
    for key, value in model.deit.state_dict().items():
        assert torch.equal(value, encoder[key]), key


def test_image_size_override_resizes_position_embeddings(tmp_path):
    mim = fill_random(DeiTForMaskedImageModeling(tiny_config()))
    mim.save_pretrained(tmp_path)
    model, info = DeiTForImageClassification.from_pretrained(
        tmp_path, num_labels=10, image_size=64, output_loading_info=True
    )
    assert info["resized_keys"] == ["deit.embeddings.position_embeddings"]
    assert model.config.image_size == 64
    old = mim.deit.embeddings.position_embeddings.detach()  # (1, 2 + 4*4, D)
    new = model.deit.embeddings.position_embeddings.detach()  # (1, 2 + 8*8, D)
    assert new.shape == (1, 2 + 64, 32)
    assert torch.equal(new[:, :2], old[:, :2])  # class and distillation positions are not on the grid
    grid = old[0, 2:].reshape(4, 4, 32).permute(2, 0, 1)[None]  # (1, D, 4, 4), row-major patches
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    assert max_diff(new[0, 2:], expected.reshape(64, 32)) <= 1e-6
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).logits.shape == (1, 10)


def test_loading_at_another_size_equals_running_at_it(tmp_path):
    """The position embeddings resized once at load time are those resized at every call with
    `interpolate_pos_encoding`: the same model either way."""
    model = fill_random(DeiTForImageClassification(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    resized = DeiTForImageClassification.from_pretrained(tmp_path, image_size=48).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(resized(x).logits, model(x, interpolate_pos_encoding=True).logits)


def test_saved_config_names_the_architecture(tmp_path):
    DeiTForMaskedImageModeling(tiny_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["DeiTForMaskedImageModeling"] and saved["model_type"] == "deit"


def test_fine_tuning_starts_from_a_bare_timm_file_with_another_head(tmp_path):
    """model.init = a bare timm DeiT file with a 5-class head (as a 1000-class ImageNet one would be),
    fine-tuned for 7 labels: the encoder is carried over, the heads are new (simmim.exports.open_init)."""
    from simmim.config import ModelConfig
    from simmim.exports import open_init

    theirs = timm_model("deit_tiny_distilled_patch16_224")
    file = tmp_path / "deit.pth"
    torch.save(theirs.state_dict(), file)
    arch = {k: v for k, v in TIMM_CONFIG.items() if k not in ("layer_norm_eps", "num_labels")}
    model_cfg = ModelConfig(init=str(file), head="distill", layer_norm_eps=1e-6, **arch)
    labels = {"id2label": {i: str(i) for i in range(7)}, "label2id": {str(i): i for i in range(7)}}
    opened = open_init(model_cfg, DeiTForImageClassificationWithTeacher, labels)
    assert opened.model.cls_classifier.weight.shape[0] == 7
    assert "cls_classifier.weight" in opened.info["mismatched_keys"]
    torch.testing.assert_close(
        opened.model.deit.embeddings.patch_embeddings.projection.weight, theirs.patch_embed.proj.weight
    )
