"""Runs on images that are not 8-bit RGB, end to end and in process (tiny): a folder of 6-band 16-bit TIFFs
through pretraining with the dataset's statistics, the reconstruction grid through chosen bands, a
classifier fine-tuned from that export, the probe and predict; 1-channel 16-bit PNGs through the same. Each export carries the statistics it was trained with, and loads in Transformers."""

from __future__ import annotations

import io
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from helpers import ROOT, TINY_MODEL
from PIL import Image

from simmim import finetune, pretrain
from simmim.config import FinetuneConfig, PretrainConfig, load_config
from simmim.data.decoding import decode_image
from simmim.data.normalization import DatasetStatistics
from simmim.data.pixels import to_model_pixels
from simmim.models import DeiTImageProcessor

SHORT = [
    "data.num_workers=0", "data.batch_size=4", "train.max_steps=2", "train.precision=fp32",
    "train.compile=false", "train.report_to=none", "train.eval_batches=1", "train.log_every_steps=1",
    "data.val_fraction=0.25", *TINY_MODEL,
]  # fmt: skip


def band_image(label: int, seed: int, channels: int) -> np.ndarray:
    """(40, 40, channels) uint16: noise, and a bright square whose corner depends on the class."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 20000, (40, 40, channels), dtype=np.uint16)
    corner = slice(0, 20) if label == 0 else slice(20, 40)
    image[corner, corner] += 40000
    return image


def write_folder(root: Path, channels: int, suffix: str, per_class: int = 6) -> Path:
    for label, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = band_image(label, 10 * label + i, channels)
            path = root / name / f"{i}{suffix}"
            if suffix == ".tif":
                path.write_bytes(_tiff(image))
            else:
                Image.fromarray(image[:, :, 0]).save(path)  # 16-bit grey PNG
    return root


def _tiff(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, photometric="minisblack", planarconfig="contig")
    return buffer.getvalue()


def run_script(script: str, args: list[str], monkeypatch, capsys, stderr: list[str] | None = None) -> str:
    """scripts/<script> in this process (its imports are already paid for); returns its stdout, and appends
    its stderr to `stderr` when given."""
    monkeypatch.setattr("sys.argv", [script, *args])
    with pytest.raises(SystemExit) as exit_code:
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    captured = capsys.readouterr()
    assert exit_code.value.code == 0, captured.err[-2000:]
    if stderr is not None:
        stderr.append(captured.err)
    return captured.out


@pytest.fixture(scope="module")
def six_bands(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("six") / "data", 6, ".tif")


@pytest.fixture(scope="module")
def six_band_pretraining(six_bands, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("six_pretrain")
    args = [f"output_dir={out}", f"data.path={six_bands}", "model.num_channels=6", "mask.patch_size=16",
            "data.display_bands=[3,2,1]", *SHORT]  # fmt: skip
    pretrain.run(load_config(PretrainConfig, None, args))
    return out


def test_six_band_pretraining_keeps_its_dataset_statistics_everywhere(
    six_band_pretraining, six_bands, monkeypatch, capsys
):
    out = six_band_pretraining
    stats = DatasetStatistics.read(out / "dataset_stats.json")
    assert stats.num_channels == 6 and stats.images == 9  # the 12 images less the validation quarter
    info = json.loads((out / "run.json").read_text())["normalization"]
    assert info["mode"] == "dataset" and info["mean"] == list(stats.mean)
    processor = json.loads((out / "export" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx(stats.mean) and len(processor["image_std"]) == 6
    run_script("eval_reconstruction.py", ["--checkpoint", str(out), "--data", str(six_bands),
               "--split", "train", "--num-images", "2", "--num-workers", "0", "--display-bands", "3,2,1",
               "--out", str(out / "eval")], monkeypatch, capsys)  # fmt: skip
    assert Image.open(out / "eval" / "reconstructions.png").mode == "RGB"


def test_six_band_classifier_probe_predict_and_transformers(
    six_band_pretraining, six_bands, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "cls"
    args = [f"output_dir={out}", f"data.path={six_bands}", "model.num_channels=6", "model.head=cls",
            f"model.init={six_band_pretraining / 'export'}", "aug.mixup=0", "aug.cutmix=0", *SHORT]  # fmt: skip
    finetune.run(load_config(FinetuneConfig, None, args))
    assert "aug.rand_augment: left out" in capsys.readouterr().out
    export = out / "export"
    transformers = pytest.importorskip("transformers")
    model, info = transformers.DeiTForImageClassification.from_pretrained(export, output_loading_info=True)
    assert model.config.num_channels == 6 and not info["missing_keys"]
    # Transformers' processor cannot infer the channel axis of 6 bands: it is told, and given the pixels
    # scaled to [0, 1] as floats (a uint16 array would wrap where bicubic resizing overshoots 65535)
    hf = transformers.DeiTImageProcessor.from_pretrained(export)
    image = band_image(1, 99, 6)
    ours = DeiTImageProcessor.from_pretrained(export)(to_model_pixels(decode_image(_tiff(image), "x"), 6),
                                                      do_rescale=False)["pixel_values"]  # fmt: skip
    scaled = (image.astype(np.float32) / 65535).transpose(2, 0, 1)
    theirs = hf(scaled, do_rescale=False, input_data_format="channels_first", return_tensors="pt")[
        "pixel_values"
    ]
    assert ours.shape == (1, 6, 32, 32) and torch.equal(ours, theirs)
    # predict reads the TIFF as training did, with the export's statistics
    lines = run_script("predict.py", ["--model", str(export), "--top-k", "2", str(six_bands / "right")],
                       monkeypatch, capsys).splitlines()  # fmt: skip
    assert len(lines) == 6 and {p["label"] for p in json.loads(lines[0])["predictions"]} == {"left", "right"}
    run_script("eval_probe.py", ["--checkpoint", str(export), "--data", str(six_bands), "--holdout", "0.25",
               "--probes", "knn", "--layers", "2", "--no-random-init", "--num-workers", "0",
               "--out", str(tmp_path / "probe")], monkeypatch, capsys)  # fmt: skip
    assert "knn" in json.loads((tmp_path / "probe" / "metrics.json").read_text())["encoder"]


def test_grey_16bit_pretrain_probe_finetune_and_predict(tmp_path, monkeypatch, capsys):
    data = write_folder(tmp_path / "grey", 1, ".png")
    pretrained = tmp_path / "pt"
    args = [
        f"output_dir={pretrained}",
        f"data.path={data}",
        "model.num_channels=1",
        "mask.patch_size=16",
        *SHORT,
    ]
    pretrain.run(load_config(PretrainConfig, None, args))
    run_script("eval_probe.py", ["--checkpoint", str(pretrained), "--data", str(data), "--holdout", "0.25",
               "--probes", "linear", "--linear-epochs", "2", "--layers", "2", "--no-random-init",
               "--num-workers", "0", "--out", str(tmp_path / "probe")], monkeypatch, capsys)  # fmt: skip
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"data.path={data}", "model.num_channels=1", "model.head=cls",
            f"model.init={pretrained}", "aug.mixup=0", "aug.cutmix=0", *SHORT]  # fmt: skip
    finetune.run(load_config(FinetuneConfig, None, args))
    assert "pixels normalised with the dataset's statistics" in capsys.readouterr().out  # the run says what it used
    stats = DatasetStatistics.read(out / "dataset_stats.json")
    processor = json.loads((out / "export" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx(stats.mean) and len(stats.mean) == 1
    lines = run_script("predict.py", ["--model", str(out / "export"), str(data / "left" / "0.png")],
                       monkeypatch, capsys).splitlines()  # fmt: skip
    assert len(lines) == 1 and json.loads(lines[0])["predictions"][0]["label"] in ("left", "right")


def test_rgba_for_a_four_band_classifier_predicts_from_every_band(tmp_path, monkeypatch, capsys):
    """predict.py on RGBA for a 4-band model: the alpha band is data, so a near-transparent image of one
    colour reaches the model as that colour, whatever the resizes (PIL's RGBA resize would premultiply it
    away), and an RGB image is skipped with its reason. Checked against the model on hand-made pixels."""
    from simmim.exports import export_model, new_deit
    from simmim.models import DeiTForImageClassification

    mean, std = [0.4, 0.3, 0.2, 0.5], [0.2, 0.25, 0.3, 0.1]
    cfg = load_config(FinetuneConfig, None, [f"output_dir={tmp_path}", "model.num_channels=4",
                      "model.head=cls", f"data.mean={mean}", f"data.std={std}", *TINY_MODEL])  # fmt: skip
    id2label = {0: "dim", 1: "bright"}
    torch.manual_seed(0)
    model = new_deit(DeiTForImageClassification, cfg.model, id2label=id2label,
                     label2id={v: k for k, v in id2label.items()}).eval()  # fmt: skip
    export_model(model, tmp_path / "export", cfg, id2label)
    colour = (200, 100, 50, 2)  # near-transparent, and not the model's size: resized, then center-cropped
    Image.new("RGBA", (45, 37), colour).save(tmp_path / "a.png")
    Image.new("RGB", (45, 37), colour[:3]).save(tmp_path / "b.png")
    err: list[str] = []
    out = run_script("predict.py", ["--model", str(tmp_path / "export"), "--top-k", "2",
                     str(tmp_path / "a.png"), str(tmp_path / "b.png")], monkeypatch, capsys, err)  # fmt: skip
    lines = [json.loads(line) for line in out.splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["a.png"]
    assert f"skipped {tmp_path / 'b.png'}" in err[0] and "4" in err[0]
    # the model on the colour normalised by hand, everywhere
    pixels = (torch.tensor(colour) / 255 - torch.tensor(mean)) / torch.tensor(std)
    with torch.no_grad():
        probs = model(pixels[None, :, None, None].expand(1, 4, 32, 32)).logits.softmax(-1)[0]
    expected = {id2label[i]: p for i, p in enumerate(probs.tolist())}
    assert {p["label"]: p["score"] for p in lines[0]["predictions"]} == pytest.approx(expected, abs=1e-5)
    # the check can tell colours apart: black under the same alpha (what premultiplying gives) scores otherwise
    black = (torch.tensor([0, 0, 0, 2]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    with torch.no_grad():
        other = model(black[None, :, None, None].expand(1, 4, 32, 32)).logits.softmax(-1)[0]
    assert (other - probs).abs().max() > 1e-4
