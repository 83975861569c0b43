"""End-to-end tests of scripts/eval_reconstruction.py on a model trained for a few steps."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from helpers import TINY_MODEL, tiny_config, tiny_data
from helpers import run_script as run
from PIL import Image

from simmim.models import DeiTConfig, DeiTForImageClassification

PRETRAIN = [
    *tiny_data(),
    *TINY_MODEL,
    "mask.patch_size=16",
    "train.max_steps=4",
    "train.save_every_steps=4",
    "train.log_every_steps=2",
    "train.eval_every_steps=4",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    result = run("pretrain.py", [f"output_dir={out}", *PRETRAIN])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def evaluate(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--checkpoint", str(checkpoint), "--data", "synthetic", "--num-images", "5", "--batch-size", "16"]
    return run("eval_reconstruction.py", [*args, "--num-workers", "0", "--out", str(out), *extra])


def test_writes_metrics_rows_and_grid(trained_run, tmp_path):
    result = evaluate(trained_run, tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # The synthetic source's validation split: max(64, 128 // 8) images.
    assert metrics["num_images"] == 64
    for key in ("masked_l1", "masked_mse", "masked_psnr", "visible_l1", "visible_psnr"):
        assert isinstance(metrics[key], float), key
    for baseline in ("mean_fill", "random_init"):
        assert set(metrics["baselines"][baseline]) == {"masked_l1", "masked_mse", "masked_psnr"}
    assert metrics["mask_patch_size"] == 16 and metrics["mask_ratio"] == 0.6  # the run's, by default

    with (tmp_path / "eval" / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 64
    assert {"image", "masked_l1", "masked_psnr", "visible_psnr"} <= set(rows[0])
    mean_l1 = sum(float(r["masked_l1"]) for r in rows) / len(rows)
    assert mean_l1 == pytest.approx(metrics["masked_l1"], rel=1e-6)

    # 5 rows of 4 panels of 32 px, with make_grid's 2 px padding.
    grid = Image.open(tmp_path / "eval" / "reconstructions.png")
    assert grid.size == (4 * (32 + 2) + 2, 5 * (32 + 2) + 2)
    # The run directory holds TensorBoard events, so the grid went there too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(trained_run / "tb"), size_guidance={"images": 0})
    tb.Reload()
    assert "eval_reconstruction/grid" in tb.Tags()["images"]


def test_two_runs_give_identical_numbers_and_the_export_matches_the_run(trained_run, tmp_path):
    assert evaluate(trained_run, tmp_path / "a").returncode == 0
    assert evaluate(trained_run / "export", tmp_path / "b").returncode == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for key in ("masked_l1", "masked_psnr", "visible_l1"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6)
    for baseline in ("mean_fill", "random_init"):
        assert a["baselines"][baseline] == pytest.approx(b["baselines"][baseline])


def test_other_mask_ratio_and_image_size(trained_run, tmp_path):
    result = evaluate(trained_run, tmp_path / "e", "--mask-ratio", "0.3", "--image-size", "48")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["image_size"] == 48 and metrics["mask_ratio"] == 0.3
    assert Image.open(tmp_path / "e" / "reconstructions.png").size == (4 * 50 + 2, 5 * 50 + 2)


def test_a_classifier_checkpoint_is_refused_with_exit_code_2(tmp_path):
    classifier = tmp_path / "classifier"
    DeiTForImageClassification(
        DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
    ).save_pretrained(classifier)
    result = evaluate(classifier, tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "DeiTForImageClassification" in lines[0] and "masked-image" in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_grid_shows_a_seeded_sample_spread_over_the_split():
    from simmim.evaluation.reconstruction import grid_indices

    chosen = grid_indices(3925, 8, seed=0)
    assert chosen.tolist() == sorted(chosen.tolist()) and len(set(chosen.tolist())) == 8
    assert chosen.max() - chosen.min() > 3925 // 2  # not the first images (Imagenette's: all one class)
    assert chosen.tolist() == grid_indices(3925, 8, seed=0).tolist() != grid_indices(3925, 8, seed=1).tolist()
    assert grid_indices(5, 8, seed=0).tolist() == [0, 1, 2, 3, 4]


def test_reconstruction_evaluation_builds_no_autograd_graph_and_grids_the_seeded_sample():
    import torch
    from accelerate import Accelerator

    from simmim.data import MaskedImageDataset, eval_transform, open_source
    from simmim.evaluation.reconstruction import evaluate_reconstruction, grid_indices
    from simmim.masking import MaskGenerator
    from simmim.models import DeiTForMaskedImageModeling

    config = tiny_config(num_hidden_layers=1)
    source = open_source("synthetic", "validation", synthetic_image_size=32)  # 128 images
    dataset = MaskedImageDataset(source, eval_transform(32), MaskGenerator(32, 16, 8, 0.6))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    kwargs = dict(
        accelerator=Accelerator(cpu=True), mean=mean, std=std, batch_size=16, seed=3, num_grid_images=4
    )
    _, rows, grid = evaluate_reconstruction(DeiTForMaskedImageModeling(config), dataset, **kwargs)
    assert not grid.requires_grad and len(rows) == 128
    # The grid's first column is the originals of the seeded sample, in split order.
    chosen = grid_indices(128, 4, seed=3).tolist()
    column = torch.stack([dataset[i]["pixel_values"] for i in chosen])
    originals = (column * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(
        0, 1
    )
    for row, image in enumerate(originals):  # make_grid's layout: 2 px padding around 32 px cells
        top = 2 + row * 34
        torch.testing.assert_close(grid[:, top : top + 32, 2:34], image, atol=1e-5, rtol=0)


def test_the_window_mean_baseline_is_a_zero_prediction_of_the_normalised_target():
    """A normalised-target model whose decoder predicts 0 everywhere reconstructs each pixel as its window's
    mean: its scores must be the window_mean baseline's, and differ from the mean-colour fill's."""
    import torch
    from accelerate import Accelerator

    from simmim.data import MaskedImageDataset, eval_transform, open_source
    from simmim.evaluation.reconstruction import evaluate_reconstruction
    from simmim.masking import MaskGenerator
    from simmim.models import DeiTForMaskedImageModeling

    model = DeiTForMaskedImageModeling(tiny_config(num_hidden_layers=1))
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.zero_()
    source = open_source("synthetic", "validation", synthetic_image_size=32)
    dataset = MaskedImageDataset(source, eval_transform(32), MaskGenerator(32, 16, 8, 0.6))
    summary, rows, _ = evaluate_reconstruction(
        model, dataset, accelerator=Accelerator(cpu=True), mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=32,
        seed=0, num_grid_images=0, norm_target_window=7,
    )  # fmt: skip
    for key in ("masked_l1", "masked_mse"):
        assert summary[key] == pytest.approx(summary["baselines"]["window_mean"][key], rel=1e-6)
        assert all(r[key] == pytest.approx(r[f"window_mean_{key}"], rel=1e-6) for r in rows)
    assert abs(summary["masked_l1"] - summary["baselines"]["mean_fill"]["masked_l1"]) > 1e-3
    assert "window_mean baseline" in summary["reconstruction_space"]
