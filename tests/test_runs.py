"""The run directory (simmim.rundir) and the command line's errors: which kind of run a directory holds,
exports that need neither the data nor the init checkpoint, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_ARCH, TINY_MODEL, script_env, tiny_data
from helpers import run_script as run
from PIL import Image
from safetensors.torch import load_file

from simmim.config import FinetuneConfig, PretrainConfig
from simmim.models import DeiTConfig, DeiTForMaskedImageModeling
from simmim.rundir import RUN_INFO, read_run

SHORT = [
    "train.max_steps=2",
    "train.save_every_steps=2",
    "train.log_every_steps=1",
    "train.eval_every_steps=2",
]


def image_folder(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A pretraining run, and a cls fine-tuning run from its export on an image folder."""
    tmp = tmp_path_factory.mktemp("runs")
    pretrain = tmp / "pretrain"
    result = run(
        "pretrain.py", [f"output_dir={pretrain}", *tiny_data(), *TINY_MODEL, "mask.patch_size=16", *SHORT]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = image_folder(tmp / "pets")
    finetune = tmp / "finetune"
    args = [f"output_dir={finetune}", f"data.path={data}", "data.batch_size=8", "data.num_workers=0"]
    args += ["data.val_fraction=0.25", *TINY_MODEL, f"model.init={pretrain}", "train.epochs=1"]
    result = run("finetune.py", [*args, "aug.rand_augment=false", "aug.mixup=0", "aug.cutmix=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    return {"pretrain": pretrain, "finetune": finetune, "data": data}


def test_read_run_names_the_kind_and_the_config(runs):
    pretrain, finetune = read_run(runs["pretrain"]), read_run(runs["finetune"])
    assert (pretrain.kind, type(pretrain.config)) == ("pretrain", PretrainConfig)
    assert (finetune.kind, type(finetune.config)) == ("finetune", FinetuneConfig)
    assert finetune.id2label == {0: "cats", 1: "dogs"}
    assert DeiTConfig.from_dict(finetune.info["model_config"]).hidden_size == TINY_ARCH["hidden_size"]
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        read_run(runs["data"])


def test_export_of_a_finetuning_run_needs_neither_its_data_nor_its_init(runs, tmp_path):
    # Move the dataset and the pretraining run (the init) away: run.json holds what the export needs.
    moved = {k: runs[k].rename(runs[k].with_name(runs[k].name + "_moved")) for k in ("data", "pretrain")}
    try:
        out = tmp_path / "export"
        result = run("export.py", [str(runs["finetune"]), "--out", str(out)])
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        for k, path in moved.items():
            path.rename(runs[k])
    # One evaluation, at the end: the run's own export holds the final weights, as the checkpoint does.
    own = load_file(str(runs["finetune"] / "export" / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == own.keys()
    assert all(torch.equal(exported[k], own[k]) for k in own)
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "cats", "1": "dogs"}


def test_a_run_written_before_run_json_still_exports(runs, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(runs["pretrain"], legacy)
    (legacy / RUN_INFO).unlink()
    assert read_run(legacy).kind == "pretrain"  # from the config's sections
    out = tmp_path / "export"
    assert run("export.py", [str(legacy), "--out", str(out)]).returncode == 0
    model = DeiTForMaskedImageModeling.from_pretrained(out)
    assert model.config.hidden_size == TINY_ARCH["hidden_size"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.base_lr=-1"], "optim.base_lr=-1"),
        (["data.pathh=x"], "error: unknown key 'data.pathh' (did you mean 'data.path'?)"),
        (["--recipe", "no/such/recipe.yaml"], "no/such/recipe.yaml"),
        (["model.init=no/such/run"], "error: model.init='no/such/run' does not exist"),
    ],
)
def test_a_bad_command_line_prints_one_line_and_exits_2(args, message, tmp_path):
    script = "finetune.py" if args[0].startswith("model.init") else "pretrain.py"
    result = run(script, [f"output_dir={tmp_path / 'out'}", *tiny_data(), *args])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()  # raised before any work


def test_simmim_debug_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "optim.base_lr=-1", f"output_dir={tmp_path}"],
        env={**script_env(), "SIMMIM_DEBUG": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "optim.base_lr" in result.stderr


def test_too_many_unreadable_images_stop_with_one_line(tmp_path):
    data = image_folder(tmp_path / "pets", per_class=20)
    for broken in sorted(data.rglob("*.png"))[::4] + sorted(data.rglob("*.png"))[1::4]:
        broken.write_bytes(b"not an image")  # half of the images
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"data.path={data}", "data.batch_size=8", "data.num_workers=0"]
    args += [*TINY_MODEL, "mask.patch_size=16", "train.epochs=4", "train.log_every_steps=1"]
    result = run("pretrain.py", [*args, "data.max_bad_fraction=0.01"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "could not be decoded" in last, last
    assert "no checkpoint had been saved yet" in last
