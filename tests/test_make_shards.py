"""scripts/make_shards.py: an image folder (one file broken) and the synthetic set become webdataset tar
shards with their labels and an index, which `datasets`' webdataset builder reads back as they were."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from helpers import run_script as run
from PIL import Image


@pytest.fixture
def folder(tmp_path):
    """2 classes x 5 PNG/JPEG images, and one file that is not an image."""
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "pets" / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (tmp_path / "pets" / "dogs" / "broken.jpg").write_bytes(b"not an image")
    return tmp_path / "pets"


def test_a_folder_becomes_shards_with_labels_and_an_index(folder, tmp_path):
    for png in folder.rglob("*.png"):  # one format: the files are copied as they are
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"))
        png.unlink()
    out = tmp_path / "shards"
    result = run("make_shards.py", [str(folder), str(out), "--shard-size", "4"])
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    train = index["splits"]["train"]
    assert [s["count"] for s in train["shards"]] == [4, 4, 2] and train["examples"] == 10
    assert train["skipped"] == 1 and index["classes"] == ["cats", "dogs"]
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "train-00000.tar",
        "train-00001.tar",
        "train-00002.tar",
    ]
    members = {}
    for shard in train["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    images = {k: v for k, v in members.items() if not k.endswith(".cls")}
    assert len(images) == 10 and all(f"{k.split('.')[0]}.cls" in members for k in images)
    # A folder's files are copied byte for byte, under their own extension.
    originals = sorted(p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "broken.jpg")
    assert sorted(images.values()) == originals
    assert sorted(int(v) for k, v in members.items() if k.endswith(".cls")) == [0] * 5 + [1] * 5
    assert all(k.endswith(".jpg") for k in images)

    # The oracle: datasets' own webdataset reader sees the same examples and labels.
    datasets = pytest.importorskip("datasets")
    files = [str(out / s["name"]) for s in train["shards"]]
    read = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    assert len(read) == 10 and sorted(int(x) for x in read["cls"]) == [0] * 5 + [1] * 5


def test_synthetic_train_and_validation_splits_become_png_shards(tmp_path):
    out = tmp_path / "synthetic"
    result = run(
        "make_shards.py",
        ["synthetic", str(out), "--shard-size", "100", "--split", "train", "--split", "validation"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    assert index["splits"]["train"]["examples"] == 1024 and index["splits"]["validation"]["examples"] == 128
    with tarfile.open(out / "validation-00000.tar") as tar:
        names = tar.getnames()
    assert names[0].endswith(".png") and names[1].endswith(".cls") and len(names) == 200


def test_a_folder_of_mixed_formats_is_written_as_png(folder, tmp_path):
    out = tmp_path / "shards"
    result = run("make_shards.py", [str(folder), str(out)])
    assert result.returncode == 0 and "mixes image formats" in result.stderr
    with tarfile.open(out / "train-00000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 20 and {n.split(".")[1] for n in names} == {"png", "cls"}


@pytest.mark.parametrize(
    "args, message",
    [(["--shard-size", "0"], "--shard-size 0"), (["--split", "nosuch"], "nosuch")],
)
def test_bad_input_is_refused_before_any_work(folder, tmp_path, args, message):
    out = tmp_path / "shards"
    result = run("make_shards.py", [str(folder), str(out), *args])
    assert result.returncode == 2 and message in result.stderr
    assert not out.exists()
