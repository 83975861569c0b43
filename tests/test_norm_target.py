"""SimMIM's normalised target (loss.norm_target) against a brute-force computation, and a tiny pretraining
and reconstruction evaluation with it on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TINY_MODEL, tiny_data
from helpers import run_script as run

from simmim.config import LossConfig, PretrainConfig, load_config
from simmim.models.losses import masked_l1, norm_targets, patch_mask_to_pixels, targets_to_pixels
from simmim.pretrain import reconstruction_pixels, simmim_loss


def brute_force_norm_targets(x: torch.Tensor, window: int) -> torch.Tensor:
    """microsoft/SimMIM's norm_targets written out pixel by pixel: the window centred on the pixel, cut by
    the border; mean over the n pixels inside; unbiased variance (n / (n - 1)), clamped at 0; + 1e-6."""
    B, C, H, W = x.shape
    r = window // 2
    out = torch.empty(B, C, H, W, dtype=torch.float64)
    values = x.double().tolist()
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    inside = [
                        values[b][c][u][v]
                        for u in range(max(0, i - r), min(H, i + r + 1))
                        for v in range(max(0, j - r), min(W, j + r + 1))
                    ]
                    n = len(inside)
                    mean = sum(inside) / n
                    mean_sq = sum(v * v for v in inside) / n
                    var = max((mean_sq - mean * mean) * n / (n - 1), 0.0)
                    out[b, c, i, j] = (values[b][c][i][j] - mean) / math.sqrt(var + 1e-6)
    return out


@pytest.mark.parametrize("window", [3, 5, 9])
def test_norm_targets_match_brute_force_borders_included(window):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, generator=g) * 1.7 + 0.3
    x[1, 2] = 0.25  # a constant channel: std sqrt(1e-6), target 0 everywhere (no division by zero)
    ours = norm_targets(x, window)
    expected = brute_force_norm_targets(x, window)
    torch.testing.assert_close(ours.double(), expected, atol=2e-4, rtol=1e-4)
    assert torch.equal(ours[1, 2], torch.zeros(7, 9))
    # A window wider than the image: every pixel's window is the whole image, the border cut on all sides.
    torch.testing.assert_close(norm_targets(x, 21).double(), brute_force_norm_targets(x, 21), atol=2e-4, rtol=1e-4)


def test_targets_to_pixels_undoes_norm_targets():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(targets_to_pixels(norm_targets(x, 5), x, 5), x, atol=1e-5, rtol=1e-5)


def test_an_even_or_too_small_window_is_refused():
    with pytest.raises(ValueError, match=r"norm_target_window=16: must be odd"):
        load_config(PretrainConfig, None, ["output_dir=x", "loss.norm_target_window=16"])
    with pytest.raises(ValueError, match="window=1: expected an odd number"):
        norm_targets(torch.zeros(1, 1, 4, 4), 1)


def test_the_loss_is_the_masked_l1_against_the_normalised_target_and_evaluation_is_in_pixels():
    g = torch.Generator().manual_seed(2)
    x, recon = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    m = torch.rand(2, 16, generator=g) < 0.5  # a 4 x 4 grid of 4-px patches
    on, off = LossConfig(norm_target=True, norm_target_window=5), LossConfig()
    pixel_mask = patch_mask_to_pixels(m, 4, 16, 16)
    target = brute_force_norm_targets(x, 5).float()
    expected = ((target - recon).abs() * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3
    torch.testing.assert_close(simmim_loss(on, x, recon, m, 4), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(simmim_loss(off, x, recon, m, 4), masked_l1(x, recon, pixel_mask, over_batch=True))
    # A perfect normalised-target prediction is a perfect reconstruction in pixels.
    torch.testing.assert_close(reconstruction_pixels(on, x, target), x, atol=1e-4, rtol=1e-4)
    assert reconstruction_pixels(off, x, recon) is recon


def test_pretraining_and_its_evaluation_with_the_normalised_target(tmp_path):
    """4 steps with loss.norm_target=true: the periodic evaluation reports the masked L1 in pixels and in the
    target space, and eval_reconstruction.py maps the predictions back to pixels and says so. (The same run
    checks the log's loader-wait entries and the compile record.)"""
    out = tmp_path / "norm"
    args = [f"output_dir={out}", *tiny_data(synthetic_size=64), *TINY_MODEL, "mask.patch_size=16",
            "train.epochs=1", "train.eval_batches=1", "loss.norm_target=true", "loss.norm_target_window=7"]  # fmt: skip
    result = run("pretrain.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evaluation = [r for r in records if r["kind"] == "eval"][-1]
    # Every log window says how long the loop waited for the loader; the header says why it did not compile.
    for record in (r for r in records if r["kind"] == "train"):
        assert 0 <= record["data_wait_s"] and 0 <= record["data_wait_fraction"] <= 1
    compile_record = next(r for r in records if r["kind"] == "compile")
    assert compile_record["compiled"] is False and "fp32 on a CPU" in compile_record["why"]
    assert evaluation["masked_l1"] > 0 and evaluation["masked_l1_target"] > 0
    assert evaluation["masked_l1"] != evaluation["masked_l1_target"]
    # ... and TensorBoard holds the loader wait and the grid of the predictions mapped back to pixels
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload().Tags()
    assert {"train/data_wait_fraction", "train/data_wait_s"} <= set(tags["scalars"])
    assert "eval/reconstructions" in tags["images"]
    result = run(
        "eval_reconstruction.py",
        ["--checkpoint", str(out / "export"), "--data", "synthetic", "--num-images", "2", "--out", str(out / "eval")],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert "7-px window" in metrics["reconstruction_space"] and "7-px window" in result.stdout
    # the baseline the mapping back gives for free: each masked pixel's window mean, scored as the model is
    assert set(metrics["baselines"]) == {"mean_fill", "random_init", "window_mean"}
    assert "window mean" in result.stdout
    assert (out / "eval" / "reconstructions.png").is_file()
