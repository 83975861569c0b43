"""Every recipe parses against its config class and carries the documented header."""

from pathlib import Path

import pytest

from simmim.config import FinetuneConfig, PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_loads_and_has_a_header(recipe):
    cls = PretrainConfig if "pretrain" in recipe.name or recipe.parent.name == "pretrain" else FinetuneConfig
    cfg = load_config(cls, recipe, ["output_dir=runs/x"])
    assert cfg.output_dir == "runs/x"
    header = recipe.read_text().split("\n")
    for field in ("# Command:", "# Hardware:", "# Expected:", "# Deviates:"):
        assert any(line.startswith(field) for line in header), f"{recipe.name} lacks {field}"


def test_there_are_recipes_for_every_stage():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert "smoke/pretrain_synthetic.yaml" in names
    assert {"pretrain/deit_base_imagenet.yaml", "finetune/deit_base_imagenet.yaml"} <= names
