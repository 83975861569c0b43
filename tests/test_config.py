"""Config loading: defaults < recipe < overrides, strict keys and types, validation, save/read back, --help."""

import dataclasses

import pytest
import yaml

from simmim.cli import parse_cli
from simmim.config import (
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    config_from_dict,
    config_to_dict,
    default_num_workers,
    deit_config_kwargs,
    load_config,
    save_config,
)


def write_recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_need_only_output_dir():
    cfg = load_config(PretrainConfig, overrides=["output_dir=runs/a"])
    assert cfg == PretrainConfig(output_dir="runs/a")
    assert cfg.model.head == "mim" and cfg.mask.ratio == 0.6 and cfg.data.mean == (0.485, 0.456, 0.406)
    assert load_config(FinetuneConfig, overrides=["output_dir=x"]).model.head == "cls"


def test_missing_output_dir_is_an_error():
    with pytest.raises(ValueError, match="output_dir is required"):
        load_config(PretrainConfig)


def test_recipe_then_overrides(tmp_path):
    recipe = write_recipe(
        tmp_path,
        "output_dir: runs/r\nmodel:\n  variant: small\ndata:\n  batch_size: 32\n  path: imagenet\n"
        "optim:\n  base_lr: 1.0e-3\n",
    )
    cfg = load_config(
        FinetuneConfig, recipe, ["data.batch_size=16", "optim.base_lr=5e-4", "output_dir=runs/o"]
    )
    assert cfg.output_dir == "runs/o"
    assert cfg.data.batch_size == 16 and cfg.data.path == "imagenet"
    assert cfg.optim.base_lr == 5e-4  # "5e-4" is a string to YAML 1.1; float fields accept it
    assert cfg.model.variant == "small"
    # a section given in the recipe keeps its other defaults, including FinetuneConfig's head
    assert cfg.model.head == "cls" and cfg.model.patch_size == 16 and cfg.data.num_workers == default_num_workers()


def test_section_override_with_a_mapping_merges():
    cfg = load_config(PretrainConfig, overrides=["output_dir=x", "mask.ratio=0.5", "mask={patch_size: 16}"])
    assert cfg.mask.ratio == 0.5 and cfg.mask.patch_size == 16


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_sise=3", "did you mean 'data.batch_size'"),
        ("dataa.batch_size=3", "did you mean 'data'"),
        ("data.nope=3", "valid keys: data.path, data.train_split"),
    ],
)
def test_unknown_keys_fail_with_suggestions(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(PretrainConfig, overrides=["output_dir=x", override])


def test_unknown_key_in_recipe_fails(tmp_path):
    recipe = write_recipe(tmp_path, "output_dir: x\noptim:\n  lr: 0.1\n")
    with pytest.raises(ValueError, match="unknown key 'optim.lr'"):
        load_config(PretrainConfig, recipe)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_size=abc", "data.batch_size='abc': expected int"),
        ("data.batch_size=3.5", "data.batch_size=3.5: expected int"),
        ("data.batch_size=true", "data.batch_size=True: expected int"),
        ("data.batch_size=null", "data.batch_size=None: expected int"),
        ("data.streaming=1", "data.streaming=1: expected bool"),
        ("optim.base_lr=fast", "optim.base_lr='fast': expected float"),
        ("data.mean=[0.5, yes]", r"data.mean\[1\]=True: expected float"),
        ("data.mean=[0.5, 0.5, x]", r"data.mean\[2\]='x': expected float"),
        (
            "model.variant=giant",
            'model.variant=\'giant\': expected "tiny" | "small" | "base" | "large" | "huge"',
        ),
        ("train.max_steps=2.5", r"train.max_steps=2.5: expected int \| None"),
        ("data=3", "data=3: expected a mapping"),
    ],
)
def test_wrong_types_fail_naming_key_value_and_type(override, expected):
    with pytest.raises(ValueError, match=expected):
        load_config(PretrainConfig, overrides=["output_dir=x", override])


def test_values_are_coerced_to_the_annotation():
    cfg = load_config(
        FinetuneConfig,
        overrides=[
            "output_dir=x",
            "optim.base_lr=1",  # int -> float
            "optim.betas=[0.9, 0.95]",  # list -> tuple
            "train.max_steps=null",
            "train.ema=0.999",
            "data.path=2024",  # a string field keeps the text as typed
            "data.image_column=img",
            "distill.kind=soft",
        ],
    )
    assert cfg.optim.base_lr == 1.0 and isinstance(cfg.optim.base_lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.max_steps is None and cfg.train.ema == 0.999
    assert cfg.data.path == "2024" and cfg.data.image_column == "img"
    assert cfg.distill.kind == "soft"


@pytest.mark.parametrize(
    "cls, overrides, key",
    [
        (PretrainConfig, ["mask.ratio=1.0"], "mask.ratio"),
        (PretrainConfig, ["mask.patch_size=24"], "mask.patch_size"),  # not a multiple of 16
        (PretrainConfig, ["model.head=cls"], "model.head"),
        (PretrainConfig, ["data.batch_size=0"], "data.batch_size"),
        (PretrainConfig, ["data.std=[0.2, 0.0, 0.2]"], "data.std"),
        (PretrainConfig, ["model.num_attention_heads=5"], "model.num_attention_heads"),  # 192 % 5
        (PretrainConfig, ["model.patch_size=15"], "model.patch_size"),
        (PretrainConfig, ["optim.min_lr=1.0"], "optim.min_lr"),
        (PretrainConfig, ["optim.layer_decay=0"], "optim.layer_decay"),
        (PretrainConfig, ["train.ema=1.0"], "train.ema"),
        (FinetuneConfig, ["model.head=mim"], "model.head"),
        (FinetuneConfig, ["model.head=cnn"], "model.arch"),
        (FinetuneConfig, ["model.head=distill", "teacher.path=t.pt"], "teacher.arch"),
        (FinetuneConfig, ["model.head=distill", "teacher.arch=resnet18"], "teacher.path"),
        (FinetuneConfig, ["distill.alpha=1.5"], "distill.alpha"),
        (FinetuneConfig, ["distill.tau=0"], "distill.tau"),
        (FinetuneConfig, ["aug.crop_scale=[0.0, 1.0]"], "aug.crop_scale"),
        (FinetuneConfig, ["aug.crop_scale=[0.8, 0.5]"], "aug.crop_scale"),
        (FinetuneConfig, ["data.label_fraction=0"], "data.label_fraction"),
        (FinetuneConfig, ["data.label_fraction=1.5"], "data.label_fraction"),
        (PretrainConfig, ["data.label_fraction=0.5"], "data.label_fraction"),
        (FinetuneConfig, ["data.holdout_from_train=true", "data.val_fraction=0"], "data.val_fraction"),
        (PretrainConfig, ["train.epochs=10", "train.snapshot_epochs=[5, 20]"], "train.snapshot_epochs"),
        (FinetuneConfig, ["train.snapshot_epochs=[1]"], "train.snapshot_epochs"),
        (FinetuneConfig, ["train.probe_every_steps=10"], "train.probe_every_steps"),
        (FinetuneConfig, ["train.eval_every_epochs=0"], "train.eval_every_epochs"),
        (PretrainConfig, ["train.probe_every_steps=0"], "train.probe_every_steps"),
        (PretrainConfig, ["model.num_hidden_layers=2", "probe.layer=3"], "probe.layer"),
        (
            PretrainConfig,
            ["model.hidden_size=30", "model.num_attention_heads=3", "model.position_embedding_init=sincos"],
            "model.position_embedding_init",
        ),
    ],
)
def test_validation_names_the_key(cls, overrides, key):
    with pytest.raises(ValueError, match=f"^{key}="):
        load_config(cls, overrides=["output_dir=x", *overrides])


def test_valid_distillation_and_cnn_configs():
    cfg = load_config(
        FinetuneConfig,
        overrides=["output_dir=x", "model.head=distill", "teacher.arch=regnety_160", "teacher.path=t"],
    )
    assert cfg.model.head == "distill"
    assert load_config(FinetuneConfig, overrides=["output_dir=x", "model.head=cnn", "model.arch=resnet18"])


def test_configs_are_frozen():
    cfg = PretrainConfig(output_dir="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.base_lr = 1.0


def test_save_and_read_back(tmp_path):
    cfg = load_config(
        FinetuneConfig, overrides=["output_dir=x", "model.variant=base", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]"]
    )
    d = config_to_dict(cfg)
    assert d["data"]["mean"] == [0.5, 0.5, 0.5] and d["model"]["head"] == "cls"
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == d
    assert load_config(FinetuneConfig, tmp_path / "run" / "config.yaml") == cfg
    assert config_from_dict(FinetuneConfig, d) == cfg
    with pytest.raises(ValueError, match="unknown key 'model.depth'"):
        config_from_dict(FinetuneConfig, {**d, "model": {**d["model"], "depth": 3}})


def test_deit_config_kwargs_merges_variant_and_overrides():
    kwargs = deit_config_kwargs(ModelConfig(variant="small", num_hidden_layers=2, patch_size=8))
    assert kwargs["hidden_size"] == 384 and kwargs["num_attention_heads"] == 6
    assert kwargs["intermediate_size"] == 1536 and kwargs["num_hidden_layers"] == 2
    assert kwargs["patch_size"] == 8 and kwargs["encoder_stride"] == 8  # None = patch_size
    assert "layer_norm_eps" not in kwargs  # DeiTConfig's default unless set
    assert not {"variant", "init", "head", "arch"} & set(kwargs)
    assert deit_config_kwargs(ModelConfig(layer_norm_eps=1e-6, encoder_stride=4))["encoder_stride"] == 4


def test_parse_cli_recipe_and_overrides(tmp_path):
    recipe = write_recipe(tmp_path, "output_dir: runs/r\ntrain:\n  epochs: 3\n")
    cfg = parse_cli(PretrainConfig, ["--recipe", str(recipe), "train.epochs=5", "seed=1"])
    assert cfg.train.epochs == 5 and cfg.seed == 1 and cfg.output_dir == "runs/r"
    assert parse_cli(PretrainConfig, [f"--recipe={recipe}"]).train.epochs == 3
    with pytest.raises(ValueError, match="unknown option '--lr'"):
        parse_cli(PretrainConfig, ["--lr", "3"])
    with pytest.raises(ValueError, match="expected key.sub=value"):
        parse_cli(PretrainConfig, ["output_dir"])


def test_help_lists_every_key_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(FinetuneConfig, ["output_dir=x", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "output_dir: str (required)" in out
    assert "data.batch_size: int = 64  # per device" in out
    assert "optim.clip_grad: float | None = 5.0" in out
    assert 'model.head: "mim" | "cls" | "distill" | "cnn" = "cls"' in out  # FinetuneConfig's default
    for section in ("data", "model", "optim", "train", "distill", "teacher", "aug"):
        for f in dataclasses.fields(getattr(FinetuneConfig(output_dir="x"), section)):
            assert f"  {section}.{f.name}: " in out


def test_a_recipe_whose_anchors_expand_without_bound_is_refused(tmp_path):
    """"Billion laughs": nine anchors of nine aliases each would be 9^9 nodes once walked. Refused by the
    expanded size of its composed graph, before anything is built; a recipe with a few anchors loads."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"recipe .*bomb.yaml.*: its anchors and aliases expand to \d+ YAML nodes"):
        load_config(PretrainConfig, bomb, ["output_dir=x"])
    shared = tmp_path / "shared.yaml"
    shared.write_text("output_dir: x\nmodel: {image_size: &s 32, patch_size: 8}\nmask: {patch_size: *s}\n")
    assert load_config(PretrainConfig, shared).mask.patch_size == 32
