"""End-to-end tests of scripts/finetune.py and scripts/predict.py: classification from a SimMIM export,
distillation with a tiny random teacher, a CNN teacher run, exports read by Transformers, predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_ARCH, TINY_MODEL, tiny_data
from helpers import run_script as run

from simmim.models import DeiTConfig, DeiTForImageClassification, DeiTForMaskedImageModeling

ARCH = {k: v for k, v in TINY_ARCH.items() if k != "image_size"}
TINY = [
    *tiny_data(),
    *TINY_MODEL,
    "optim.base_lr=1e-2",
    "optim.warmup_epochs=0.5",
    "optim.layer_decay=0.75",
    "train.epochs=1",
    "train.save_every_steps=4",
    "train.log_every_steps=2",
    "aug.rand_augment=false",
    "aug.mixup=0.8",
    "aug.cutmix=1.0",
]


@pytest.fixture(scope="module")
def simmim_export(tmp_path_factory) -> Path:
    """A (random) SimMIM export at 48 px, so that fine-tuning at 32 px resizes the position embeddings."""
    out = tmp_path_factory.mktemp("simmim") / "export"
    torch.manual_seed(0)
    DeiTForMaskedImageModeling(DeiTConfig(**ARCH, image_size=48, encoder_stride=8)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, simmim_export) -> Path:
    out = tmp_path_factory.mktemp("cls")
    args = [f"output_dir={out}", *TINY, "model.head=cls", f"model.init={simmim_export}", "train.ema=0.9"]
    result = run("finetune.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_cls_finetune_writes_metrics_and_a_transformers_export(cls_run):
    metrics = json.loads((cls_run / "metrics.json").read_text())
    assert [e["step"] for e in metrics["epochs"]] == [8]  # one evaluation per epoch, 128 / 16 steps
    for key in ("top1", "top5", "loss", "ema_top1", "ema_top5"):
        assert key in metrics["epochs"][0]
    epoch = metrics["epochs"][0]
    assert metrics["best"]["top1"] == max(epoch["top1"], epoch["ema_top1"])
    log = [json.loads(line) for line in (cls_run / "log.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" for r in log) and list((cls_run / "tb").glob("events.out.tfevents*"))

    transformers = pytest.importorskip("transformers")
    export = cls_run / "export"
    theirs, info = transformers.DeiTForImageClassification.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = DeiTForImageClassification.from_pretrained(export).eval()
    assert ours.config.id2label == theirs.config.id2label
    from simmim.data import open_source

    assert list(ours.config.id2label.values()) == open_source("synthetic", "train").class_names
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs.eval()(x).logits, atol=1e-4, rtol=0)
    assert (export / "preprocessor_config.json").is_file()


def test_distill_finetune_with_a_tiny_random_teacher(tmp_path, simmim_export):
    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(1)
    DeiTForImageClassification(DeiTConfig(**ARCH, image_size=32, num_labels=10)).save_pretrained(teacher_dir)
    out = tmp_path / "distill"
    args = [f"output_dir={out}", *TINY, "model.head=distill", f"model.init={simmim_export}"]
    args += ["teacher.arch=deit", f"teacher.path={teacher_dir}", "distill.kind=soft", "distill.tau=2.0"]
    result = run("finetune.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["epochs"]

    transformers = pytest.importorskip("transformers")
    theirs, info = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(
        out / "export", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    from simmim.models import DeiTForImageClassificationWithTeacher

    ours = DeiTForImageClassificationWithTeacher.from_pretrained(out / "export").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ours(x), theirs.eval()(x)
    for name in ("logits", "cls_logits", "distillation_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=0)


def test_cnn_teacher_run_then_distillation_from_it(tmp_path):
    teacher = tmp_path / "cnn"
    cnn = [*TINY, "model.head=cnn", "model.arch=resnet18", "optim.layer_decay=1.0", "train.max_steps=2"]
    result = run("finetune.py", [f"output_dir={teacher}", *cnn])
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((teacher / "export" / "cnn_config.json").read_text())
    assert meta["arch"] == "resnet18" and len(meta["id2label"]) == 10

    out = tmp_path / "student"
    args = [
        f"output_dir={out}",
        *TINY,
        "model.head=distill",
        "teacher.arch=resnet18",
        f"teacher.path={teacher}/export",
    ]
    result = run("finetune.py", [*args, "train.max_steps=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "export" / "config.json").is_file()


def test_finetune_rejects_bad_config_before_running(tmp_path):
    result = run("finetune.py", [f"output_dir={tmp_path}", "model.head=distill"])
    assert result.returncode != 0
    assert "teacher" in result.stderr
    result = run("finetune.py", [f"output_dir={tmp_path}", "optim.base_lr=fast"])
    assert result.returncode != 0 and "optim.base_lr" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_predict_prints_pipeline_style_json(cls_run, tmp_path):
    from PIL import Image

    from simmim.data import open_source

    source = open_source("synthetic", "validation", synthetic_image_size=32)
    files = []
    for i in range(3):
        image, _, _ = source[i]
        files.append(tmp_path / f"img{i}.png")
        image.save(files[-1])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    result = run("predict.py", ["--model", str(cls_run / "export"), "--top-k", "3", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["img0.png", "img1.png", "img2.png"]
    assert "broken.jpg" in result.stderr

    # Independent check: Transformers' model on our processor's pixels gives the same top-3.
    transformers = pytest.importorskip("transformers")
    from simmim.models import DeiTImageProcessor

    model = transformers.DeiTForImageClassification.from_pretrained(cls_run / "export").eval()
    processor = DeiTImageProcessor.from_pretrained(cls_run / "export")
    for line, file in zip(lines, files):
        with torch.no_grad():
            probs = model(**processor(Image.open(file))).logits.softmax(-1)[0]
        scores, indices = probs.topk(3)
        assert [p["label"] for p in line["predictions"]] == [model.config.id2label[int(i)] for i in indices]
        assert [p["score"] for p in line["predictions"]] == pytest.approx(scores.tolist(), abs=1e-5)


def test_finetune_resumes_exactly(tmp_path, simmim_export):
    """A run stopped after 4 steps and started again ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    common = [*TINY, "model.head=cls", f"model.init={simmim_export}", "train.save_every_steps=100"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert run("finetune.py", [f"output_dir={full}", *common]).returncode == 0
    assert run("finetune.py", [f"output_dir={split}", *common, "train.max_steps=4"]).returncode == 0
    result = run("finetune.py", [f"output_dir={split}", *common])
    assert result.returncode == 0 and "resuming from" in result.stdout + result.stderr

    def last(run_dir):
        index = json.loads((run_dir / "checkpoints" / "index.json").read_text())
        return load_file(str(run_dir / "checkpoints" / index["latest"] / "model.safetensors"))

    a, b = last(full), last(split)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_label_fraction_and_a_train_holdout_shape_the_run(tmp_path):
    """10 synthetic classes of 12-13 images: a quarter of each is 30 images, one step of 16 per epoch;
    with a held-out quarter of train (the sweep's carve), training sees 96 images before the fraction."""
    out = tmp_path / "run"
    args = [f"output_dir={out}", *TINY, "model.head=cls", "data.label_fraction=0.25", "train.epochs=4",
            "train.eval_every_epochs=2"]  # fmt: skip
    result = run("finetune.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "30 of 128 labelled images (class-balanced, drawn with seed 0)" in result.stdout
    assert "30 training images" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [round(e["epoch"]) for e in metrics["epochs"]] == [2, 4]  # every 2 epochs, and the last

    out = tmp_path / "holdout"
    args = [
        f"output_dir={out}",
        *TINY,
        "model.head=cls",
        "data.holdout_from_train=true",
        "data.val_fraction=0.25",
    ]
    result = run("finetune.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "96 training images" in result.stdout
