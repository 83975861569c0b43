"""Every recipe parses against its config class and carries the documented header."""

from pathlib import Path

import pytest
import yaml

from simmim.config import FinetuneConfig, PretrainConfig, load_config
from simmim.study import load_spec, plan

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_loads_and_has_a_header(recipe, monkeypatch):
    header = recipe.read_text().split("\n")
    for field in ("# Command:", "# Hardware:", "# Expected:", "# Deviates:"):
        assert any(line.startswith(field) for line in header), f"{recipe.name} lacks {field}"
    if recipe.parent.name == "accelerate":  # a launch config: accelerate must read it
        from accelerate.commands.config.config_args import load_config_from_file
        from accelerate.utils import DistributedType

        launch = load_config_from_file(str(recipe))
        if recipe.stem == "fsdp":  # what simmim.launch.follow_launcher needs to read it as train.fsdp
            assert launch.distributed_type == DistributedType.FSDP
            assert launch.fsdp_config["fsdp_version"] == 2
        return
    if "arms" in yaml.safe_load(recipe.read_text()):  # a study file (scripts/study.py)
        monkeypatch.chdir(ROOT)  # its paths are relative to the checkout, as its command runs
        data = yaml.safe_load(recipe.read_text())["data"]
        if data != "synthetic" and not Path(data).exists():
            pytest.skip(f"{data} is absent: the study's stage recipes are checked where it is present")
        stages = plan(load_spec(recipe))  # validates every stage's recipe and overrides
        assert {"pretrain", "reconstruction", "probe"} <= {s.name for s in stages}
        return
    cls = PretrainConfig if "pretrain" in recipe.name or recipe.parent.name == "pretrain" else FinetuneConfig
    cfg = load_config(cls, recipe, ["output_dir=runs/x"])
    assert cfg.output_dir == "runs/x"


def test_there_are_recipes_for_every_stage():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert "smoke/pretrain_synthetic.yaml" in names
    assert {"pretrain/deit_base_imagenet.yaml", "finetune/deit_base_imagenet.yaml"} <= names
