"""Continued pretraining (`model.init` in SimMIM pretraining): what is kept from a Transformers DeiT/ViT
directory, a timm file and a simmim run (Transformers and timm as oracles), the channel adaptation against
timm's `adapt_input_conv`, short runs and their resume, and the one-line errors for what cannot be continued."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch
from helpers import ROOT, TINY_ARCH, TINY_MODEL, fill_random, tiny_data

from simmim.config import PretrainConfig, load_config
from simmim.exports import open_init
from simmim.models import DeiTForImageClassification
from simmim.models.cnn import build_cnn, save_cnn
from simmim.pretrain import build_model, run

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

RECIPE = ROOT / "recipes" / "pretrain" / "continue_domain.yaml"
# A run of one or two optimizer steps on 32 synthetic images, evaluated on one batch, nothing compiled.
SHORT = [
    *tiny_data(synthetic_size=32, batch_size=8),
    "mask.patch_size=16",
    "train.precision=fp32",
    "train.compile=false",
    "train.report_to=none",
    "train.eval_batches=1",
    "train.log_every_steps=1",
    "train.save_every_steps=1",
]


def config(out: pathlib.Path, init, *overrides: str, recipe=None) -> PretrainConfig:
    args = [f"output_dir={out}", f"model.init={init}", *TINY_MODEL, *SHORT, "train.max_steps=1", *overrides]
    return load_config(PretrainConfig, recipe, args)


def hf_saved(cls_name: str, directory: pathlib.Path, seed: int = 0, **config) -> torch.nn.Module:
    """A Transformers model of the tiny size with random weights (tokens included), saved to `directory`."""
    family = "ViT" if cls_name.startswith("ViT") else "DeiT"
    hf_config = getattr(transformers, f"{family}Config")(**{**TINY_ARCH, "encoder_stride": 8, **config})
    model = fill_random(getattr(transformers, cls_name)(hf_config), seed=seed).eval()
    model.save_pretrained(directory)
    return model


def timm_saved(file: pathlib.Path, seed: int = 3) -> torch.nn.Module:
    """A tiny timm DeiT (one class token, as timm's non-distilled DeiT and ViT) as a bare safetensors file."""
    from safetensors.torch import save_file

    size = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    model = fill_random(timm.create_model("deit_tiny_patch16_224", pretrained=False, **size), seed=seed)
    save_file(model.state_dict(), str(file))
    return model.eval()


def hf_encoder(model: torch.nn.Module) -> torch.nn.Module:
    return model.vit if hasattr(model, "vit") else getattr(model, "deit", model)


def assert_encoder_kept(ours, theirs) -> None:
    """Every encoder tensor of a Transformers DeiT/ViT in ours (q, k, v fused; a ViT's class token twice)."""
    e, t = ours.deit, hf_encoder(theirs)
    assert torch.equal(e.embeddings.cls_token, t.embeddings.cls_token)
    assert torch.equal(
        e.embeddings.patch_embeddings.projection.weight, t.embeddings.patch_embeddings.projection.weight
    )
    pos, prefix = t.embeddings.position_embeddings, 1 + hasattr(t.embeddings, "distillation_token")
    assert torch.equal(e.embeddings.position_embeddings[:, 2:], pos[:, prefix:])
    for ours_block, block in zip(e.layers, t.layers, strict=True):  # Transformers 5's module names
        a = block.attention
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])  # (3D, D)
        assert torch.equal(ours_block.attention.qkv.weight, qkv)
        assert torch.equal(ours_block.attention.o_proj.weight, a.o_proj.weight)
        assert torch.equal(ours_block.mlp.fc1.weight, block.mlp.fc1.weight)
        assert torch.equal(ours_block.layernorm_after.bias, block.layernorm_after.bias)
    assert torch.equal(e.layernorm.weight, t.layernorm.weight)


# ---------------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("cls_name", ["DeiTForMaskedImageModeling", "ViTForMaskedImageModeling"])
def test_a_transformers_simmim_model_keeps_encoder_decoder_and_mask_token(cls_name, tmp_path):
    theirs = hf_saved(cls_name, tmp_path / "src")
    model, report = build_model(config(tmp_path / "run", tmp_path / "src"))
    assert_encoder_kept(model, theirs)
    assert torch.equal(model.deit.embeddings.mask_token, hf_encoder(theirs).embeddings.mask_token)
    assert torch.equal(model.decoder[0].weight, theirs.decoder[0].weight)
    assert "kept:    the decoder" in report and "kept:    the mask token" in report
    assert ("copy of the class token" in report) == cls_name.startswith("ViT")
    if cls_name.startswith("ViT"):  # DeiT's distillation token, made from the ViT's class token
        assert torch.equal(model.deit.embeddings.distillation_token, theirs.vit.embeddings.cls_token)


@pytest.mark.parametrize("cls_name", ["DeiTModel", "ViTModel", "DeiTForImageClassificationWithTeacher"])
def test_an_encoder_or_classifier_gets_a_new_decoder_and_mask_token(cls_name, tmp_path):
    theirs = hf_saved(cls_name, tmp_path / "src", encoder_stride=16)  # Transformers' default, not patch 8
    new = torch.nn.Conv2d(32, 64 * 3, 1)  # what a fresh decoder conv of the tiny size looks like
    model, report = build_model(config(tmp_path / "run", tmp_path / "src"))
    assert_encoder_kept(model, theirs)
    assert model.decoder[0].weight.shape == new.weight.shape
    assert model.decoder[0].weight.std() < 0.05  # trunc_normal(0.02), not fill_random's 0.3
    assert "new:     the decoder (the checkpoint has none)" in report
    assert "new:     the mask token (the checkpoint has none)" in report
    if "Teacher" in cls_name:
        assert "unused:  cls_classifier.bias" in report


def test_a_timm_file_at_another_image_size(tmp_path):
    """A bare timm DeiT: architecture from its shapes (heads from model.num_attention_heads), position
    embeddings resized to 48 px as timm's resample_abs_pos_embed does."""
    theirs = timm_saved(tmp_path / "deit.safetensors")
    cfg = config(
        tmp_path / "run", tmp_path / "deit.safetensors", "model.image_size=48", "model.intermediate_size=128"
    )
    model, report = build_model(cfg)
    e = model.deit
    assert torch.equal(e.embeddings.patch_embeddings.projection.weight, theirs.patch_embed.proj.weight)
    assert torch.equal(e.layers[1].attention.qkv.weight, theirs.blocks[1].attn.qkv.weight)
    assert torch.equal(e.layers[0].mlp.fc2.bias, theirs.blocks[0].mlp.fc2.bias)
    assert e.layers[0].layernorm_before.eps == 1e-6  # timm's
    from timm.layers import resample_abs_pos_embed

    # simmim.models.position resizes as timm does without antialiasing (timm antialiases by default).
    expected = resample_abs_pos_embed(theirs.pos_embed, new_size=(6, 6), num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(e.embeddings.position_embeddings[:, 2:], expected[:, 1:], atol=1e-6, rtol=0)
    assert "resized: the position embeddings, to the 6x6 patch grid of 48 px" in report
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert model.deit(x).last_hidden_state.shape == (2, 2 + 36, 32)  # class, distillation, 6 x 6 patches


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def simmim_run(tmp_path_factory) -> pathlib.Path:
    """A simmim pretraining run of one step from scratch: the run directory continued from below."""
    out = tmp_path_factory.mktemp("scratch")
    run(load_config(PretrainConfig, None, [f"output_dir={out}", *TINY_MODEL, *SHORT, "train.max_steps=1"]))
    return out


def test_the_recipe_continues_a_transformers_model_for_two_steps(tmp_path, capsys):
    hf_saved("DeiTModel", tmp_path / "src", encoder_stride=16)
    summary = run(config(tmp_path / "run", tmp_path / "src", "train.max_steps=2", recipe=RECIPE))
    assert summary["step"] == 2
    out = capsys.readouterr().out
    assert "continued pretraining from model.init=" in out and "from 0:" in out
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


def test_a_simmim_run_continues_and_resumes_from_its_own_checkpoint(simmim_run, tmp_path, capsys):
    theirs = transformers.DeiTForMaskedImageModeling.from_pretrained(simmim_run / "export")
    model, report = build_model(config(tmp_path / "run", simmim_run))
    assert_encoder_kept(model, theirs)
    assert torch.equal(model.decoder[0].weight, theirs.decoder[0].weight)
    assert torch.equal(model.deit.embeddings.mask_token, theirs.deit.embeddings.mask_token)
    assert "kept:    the decoder" in report and "unused" not in report

    source = tmp_path / "source"
    shutil.copytree(simmim_run, source)
    out = tmp_path / "continued"
    run(config(out, source))
    capsys.readouterr()
    shutil.rmtree(source)  # a resume must not read model.init again
    run(config(out, source, "train.max_steps=2"))
    printed = capsys.readouterr().out
    assert "resuming" in printed and "at step 1/" in printed
    assert "continued pretraining from" not in printed


# ---------------------------------------------------------------------------------------------- channels
@pytest.mark.parametrize("channels", [1, 2, 4, 6])
def test_an_rgb_checkpoint_is_adapted_to_other_channels_as_timm_does(channels, tmp_path):
    from timm.models._manipulate import adapt_input_conv

    theirs = hf_saved("DeiTForMaskedImageModeling", tmp_path / "src")
    rgb = theirs.deit.embeddings.patch_embeddings.projection.weight.detach()
    model, report = build_model(config(tmp_path / "run", tmp_path / "src", f"model.num_channels={channels}"))
    adapted = model.deit.embeddings.patch_embeddings.projection.weight
    torch.testing.assert_close(adapted, adapt_input_conv(channels, rgb.clone()), atol=0, rtol=0)
    assert model.decoder[0].weight.shape == (64 * channels, 32, 1, 1)  # encoder_stride**2 * channels
    assert f"adapted: the patch embedding, from 3 channels to {channels}" in report
    assert "new:     the decoder (the checkpoint's is for other channels)" in report
    assert "kept:    the mask token" in report
    x, mask = torch.randn(2, channels, 32, 32), torch.rand(2, 16) < 0.5
    assert model(x, bool_masked_pos=mask).reconstruction.shape == x.shape


def test_fine_tuning_adapts_channels_the_same_way(tmp_path):
    from timm.models._manipulate import adapt_input_conv

    theirs = hf_saved("DeiTForMaskedImageModeling", tmp_path / "src")
    model_cfg = load_config(
        PretrainConfig,
        None,
        ["output_dir=x", f"model.init={tmp_path / 'src'}", *TINY_MODEL, "model.num_channels=1"],
    ).model
    labels = {"id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}}
    opened = open_init(model_cfg, DeiTForImageClassification, labels)
    rgb = theirs.deit.embeddings.patch_embeddings.projection.weight.detach()
    adapted = opened.model.deit.embeddings.patch_embeddings.projection.weight
    torch.testing.assert_close(adapted, adapt_input_conv(1, rgb.clone()), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- errors
class Payload:
    """Unpickling this creates `path`: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def bad_inits(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """{case: (model.init, words the error must hold)}."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    hf_saved("DeiTForMaskedImageModeling", tmp_path / "patch4", patch_size=4, encoder_stride=4)
    headless = tmp_path / "headless"  # a classifier whose weights are not under a DeiT/ViT encoder's names
    classifier = hf_saved("DeiTForImageClassification", headless)
    from safetensors.torch import save_file

    weights = {f"backbone.{k}": v.contiguous() for k, v in classifier.state_dict().items()}
    save_file(weights, str(headless / "model.safetensors"))
    save_cnn(
        build_cnn("resnet18", 2), tmp_path / "cnn", {"arch": "resnet18", "id2label": {"0": "a", "1": "b"}}
    )
    torch.save(
        {"model": {"w": torch.zeros(1)}, "payload": Payload(tmp_path / "executed")}, tmp_path / "evil.pth"
    )
    return {
        "not a model": (notes, "expected safetensors or a torch file of tensors"),
        "another patch size": (tmp_path / "patch4", "patch_size=4, expected patch_size=8"),
        "no encoder": (headless, "holds no complete DeiT/ViT encoder"),
        "a CNN classifier": (tmp_path / "cnn", "expected a DeiT checkpoint"),
        "a pickle": (tmp_path / "evil.pth", "simmim does not unpickle objects"),
    }


def test_what_cannot_be_continued_gets_one_line_naming_the_path_before_any_work(tmp_path):
    for case, (init, expected) in bad_inits(tmp_path).items():
        out = tmp_path / f"run_{case.replace(' ', '_')}"
        with pytest.raises(ValueError) as error:
            run(config(out, init))
        message = str(error.value)
        assert str(init) in message and expected in message, (case, message)
        assert "\n" not in message, case
        assert not (out / "config.yaml").exists(), case  # nothing written: refused before the run began
    assert not (tmp_path / "executed").exists()  # nothing was unpickled
