"""Tests for simmim.data: sources, robust decoding, transforms, seeded batching and collation."""

import io
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    EpochBatchSampler,
    LabeledImageDataset,
    MaskedImageDataset,
    MixUpCutMix,
    NoisyRandAugment,
    build_loader,
    check_bad_fraction,
    collate_classification,
    collate_pretrain,
    decode_image,
    eval_transform,
    finetune_transform,
    open_source,
    pretrain_transform,
)
from simmim.data.loader import derive_seed, derive_seeds
from simmim.data.pixels import to_model_pixels
from simmim.data.synthetic import SYNTHETIC_CLASSES
from simmim.masking import MaskGenerator

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGENETTE = SHARED / "imagenette"
CIFAR10 = SHARED / "cifar10" / "plain_text"
needs_imagenette = pytest.mark.skipif(not IMAGENETTE.is_dir(), reason=f"{IMAGENETTE} is absent")
needs_cifar10 = pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"{CIFAR10} is absent")


def _jpeg_bytes(size=(40, 30), color=(200, 30, 60), **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", **save_kwargs)
    return buffer.getvalue()


def _loader(dataset, **kwargs):
    options = dict(
        batch_size=4, shuffle=True, drop_last=True, num_workers=0, seed=11, collate_fn=collate_pretrain
    )
    return build_loader(dataset, **{**options, **kwargs})


def _collect(loader) -> list[dict]:
    return [batch for batch in loader]


# ----------------------------------------------------------------------------------------------------------
# decoding and bad input


def _write_broken_files(directory: Path) -> dict[str, Path]:
    """One file of each broken kind; returns kind -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    jpeg = _jpeg_bytes((64, 64))
    paths["truncated"] = directory / "truncated.jpg"
    paths["truncated"].write_bytes(jpeg[: len(jpeg) // 2])
    paths["empty"] = directory / "empty.jpg"
    paths["empty"].write_bytes(b"")
    paths["not_an_image"] = directory / "notes.png"
    paths["not_an_image"].write_text("this is a text file, not a PNG\n" * 10)
    # a BMP that PIL recognises but whose compression (4 = embedded JPEG) it cannot decode
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="BMP")
    bmp = bytearray(buffer.getvalue())
    bmp[30:34] = (4).to_bytes(4, "little")
    paths["unsupported"] = directory / "unsupported.bmp"
    paths["unsupported"].write_bytes(bytes(bmp))
    return paths


@pytest.mark.parametrize("kind", ["truncated", "empty", "not_an_image", "unsupported"])
def test_broken_file_is_skipped_with_a_warning_naming_it(tmp_path, caplog, kind):
    path = _write_broken_files(tmp_path)[kind]
    with caplog.at_level(logging.WARNING, logger="simmim.data"):
        assert decode_image(path, str(path)) is None
        assert decode_image(path.read_bytes(), "row[3]") is None
    assert str(path) in caplog.text and "row[3]" in caplog.text


def test_a_decompression_bomb_is_skipped_before_it_is_decoded(tmp_path, caplog, monkeypatch):
    """An image past PIL's pixel limit (a small file that decodes huge) is skipped with a warning, also
    between the limit and twice it, where PIL itself would only warn and decode it."""
    path = tmp_path / "bomb.png"
    Image.new("L", (60, 50)).save(path)  # 3,000 pixels, all zero: a tiny file
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3,000 is past the limit and below twice it
    with caplog.at_level(logging.WARNING, logger="simmim.data"):
        assert decode_image(path, str(path)) is None
        assert decode_image(path.read_bytes(), "row[7]") is None
    assert "60x50 pixels, past PIL's limit of 2000" in caplog.text and "row[7]" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    assert decode_image(path, str(path)).size == (60, 50)  # at the limit: decoded


def _palette_image() -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30])
    return image


def test_modes_become_rgb_keeping_their_meaning(tmp_path):
    """What a 3-channel model takes from each PIL mode: 8-bit ones as RGB images, as before."""
    cases = {
        "L": (Image.new("L", (4, 4), 100), (100, 100, 100)),
        "P": (_palette_image(), (10, 20, 30)),
        # fully transparent pixels are composited onto white, not shown as their hidden (black) colour
        "RGBA": (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        "LA": (Image.new("LA", (4, 4), (0, 255)), (0, 0, 0)),
        "CMYK": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
    }
    for mode, (image, expected) in cases.items():
        suffix = ".tiff" if mode == "CMYK" else ".png"
        path = tmp_path / f"{mode}{suffix}"
        image.save(path)
        decoded = to_model_pixels(decode_image(path, str(path)), 3)
        assert decoded.mode == "RGB", mode
        assert decoded.getpixel((0, 0)) == expected, mode
    # 16-bit grey keeps its 16 bits (where PIL's convert would clip it to white): 40000 / 65535, as grey RGB
    path = tmp_path / "I_16.tiff"
    Image.new("I;16", (4, 4), 40000).save(path)
    pixels = to_model_pixels(decode_image(path, str(path)), 3)
    assert pixels.shape == (3, 4, 4) and torch.allclose(pixels, torch.full((3, 4, 4), 40000 / 65535))


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    decoded = decode_image(path, str(path))
    assert decoded.size == (10, 20)
    red, blue = decoded.getpixel((5, 2)), decoded.getpixel((5, 17))  # left became top
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]


def test_jpeg_draft_decodes_at_reduced_size():
    data = _jpeg_bytes((512, 384))
    assert decode_image(data, "x").size == (512, 384)
    assert decode_image(data, "x", decode_size=96).size == (128, 96)  # 1/4: both sides stay >= 96
    assert decode_image(data, "x", decode_size=180).size == (256, 192)  # 1/4 would be too small
    assert decode_image(data, "x", decode_size=200).size == (512, 384)  # 1/2 would be too small


def test_check_bad_fraction():
    check_bad_fraction(5, 1000, 0.01)
    check_bad_fraction(1, 8, 0.01)  # one bad file in the first batch is within max_fraction * min_seen
    with pytest.raises(BadImageError, match=r"20 of 1000 .* 1\.00%"):
        check_bad_fraction(20, 1000, 0.01)
    with pytest.raises(BadImageError):
        check_bad_fraction(11, 11, 0.01)  # everything broken: stops once above 0.01 * 1000
    with pytest.raises(BadImageError):
        check_bad_fraction(1, 1, 0.0)


def test_broken_images_in_a_folder_are_skipped_and_counted(tmp_path, caplog):
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (100 * label, 0, 0)).save(tmp_path / "train" / name / f"{i}.png")
    broken = _write_broken_files(tmp_path / "train" / "dog")
    (tmp_path / "train" / "dog" / "README.txt").write_text("not listed: not an image extension")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "val" / "cat" / "0.png")

    source = open_source(str(tmp_path), "train")
    assert len(source) == 3 + 3 + len(broken)
    dataset = LabeledImageDataset(source, eval_transform(16, crop_pct=1.0))
    with caplog.at_level(logging.WARNING, logger="simmim.data"):
        items = [dataset[i] for i in range(len(source))]
    assert sum(item is None for item in items) == len(broken)
    for path in broken.values():
        assert str(path) in caplog.text
    for i, item in enumerate(items):  # a good image keeps its own label: nothing shifts
        if item is not None:
            assert item["labels"] == (0 if "/cat/" in source[i][2] else 1)

    # with workers: no crash, no deadlock, and every sample accounted for
    loader = _loader(dataset, drop_last=False, num_workers=2, collate_fn=collate_classification)
    batches = _collect(loader)
    assert sum(b["num_skipped"] for b in batches) == len(broken)
    assert sum(len(b["labels"]) for b in batches) == 6


def test_a_failing_transform_skips_the_sample(caplog):
    source = open_source("synthetic", synthetic_size=4, synthetic_image_size=16)

    def explode(image):
        raise RuntimeError("boom")

    with caplog.at_level(logging.WARNING, logger="simmim.data"):
        assert MaskedImageDataset(source, explode, MaskGenerator(16, 8, 4))[0] is None
    assert "synthetic:train[0]" in caplog.text and "boom" in caplog.text


# ----------------------------------------------------------------------------------------------------------
# sources


def _copy_imagenette(tmp_path: Path, classes: int = 3, train: int = 4, val: int = 2) -> Path:
    root = tmp_path / "imagenette"
    for split, count in (("train", train), ("val", val)):
        for class_dir in sorted((IMAGENETTE / split).iterdir())[:classes]:
            (root / split / class_dir.name).mkdir(parents=True)
            for f in sorted(class_dir.iterdir())[:count]:
                shutil.copy(f, root / split / class_dir.name / f.name)
    return root


@needs_imagenette
def test_imagefolder_with_split_folders(tmp_path):
    root = _copy_imagenette(tmp_path)
    train = open_source(str(root), "train")
    val = open_source(str(root), "validation")
    assert (len(train), len(val)) == (12, 6)
    assert train.class_names == val.class_names == sorted(p.name for p in (root / "train").iterdir())
    assert train.split == "train" and not train.is_streaming and train.has_labels
    for source in (train, val):
        for i in range(len(source)):
            image, label, name = source[i]
            assert image.mode == "RGB" and image.size == (224, 224)
            assert Path(name).parent.name == source.class_names[label]


@needs_imagenette
def test_full_imagenette_is_indexed_quickly():
    val = open_source(str(IMAGENETTE), "validation")
    assert len(val) == 3925 and len(val.class_names) == 10
    assert "/val/" in val[0][2]


@needs_imagenette
def test_imagefolder_without_validation_is_carved_reproducibly(tmp_path):
    root = _copy_imagenette(tmp_path, classes=2, train=10, val=0) / "train"
    train = open_source(str(root), "train", val_fraction=0.2, seed=1)
    val = open_source(str(root), "validation", val_fraction=0.2, seed=1)
    train_names = {train[i][2] for i in range(len(train))}
    val_names = {val[i][2] for i in range(len(val))}
    assert len(val_names) == 4 and len(train_names) == 16
    assert not train_names & val_names  # validation images never leak into training
    assert val_names == {
        open_source(str(root), "validation", val_fraction=0.2, seed=1)[i][2] for i in range(4)
    }
    other = open_source(str(root), "validation", val_fraction=0.2, seed=2)
    assert {other[i][2] for i in range(4)} != val_names


def test_validation_classes_unknown_to_train_raise(tmp_path):
    for split, classes in (("train", ["a", "c"]), ("val", ["a", "b"])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    assert open_source(str(tmp_path), "train").class_names == ["a", "c"]
    with pytest.raises(ValueError, match="'b'"):
        open_source(str(tmp_path), "validation")


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(5):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.jpg")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    source = open_source(str(tmp_path), "validation", val_fraction=0.2)
    assert len(source) == 1 and source.class_names is None and not source.has_labels
    assert len(open_source(str(tmp_path), "train", val_fraction=0.2)) == 4
    image, label, name = source[0]
    assert label == -1 and name.endswith(".jpg") and image.size == (8, 8)
    with pytest.raises(ValueError, match="no labels"):
        LabeledImageDataset(source, eval_transform(8))


@pytest.fixture(scope="module")
def cifar_slice(tmp_path_factory) -> Path:
    """64 training and 32 test rows of CIFAR-10 in the Hub's parquet layout."""
    if not CIFAR10.is_dir():
        pytest.skip(f"{CIFAR10} is absent")
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("cifar10")
    (root / "plain_text").mkdir()
    for split, rows in (("train", 64), ("test", 32)):
        name = f"{split}-00000-of-00001.parquet"
        pq.write_table(pq.read_table(CIFAR10 / name).slice(0, rows), root / "plain_text" / name)
    return root


@pytest.fixture
def no_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s after a shuffled streaming epoch over parquet (apache/arrow#45214): not in tests."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _parquet_labels(path: Path) -> list[int]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["label"]).column("label").to_pylist()


def test_huggingface_dataset_from_a_local_path(cifar_slice):
    train = open_source(str(cifar_slice), "train")
    val = open_source(str(cifar_slice), "validation")  # found as "test"
    assert (len(train), len(val)) == (64, 32)
    assert train.class_names[:3] == ["airplane", "automobile", "bird"]
    labels = _parquet_labels(cifar_slice / "plain_text" / "train-00000-of-00001.parquet")
    assert [train[i][1] for i in range(64)] == labels
    image, _, name = val[5]
    assert image.mode == "RGB" and image.size == (32, 32) and "[5]" in name
    dataset = LabeledImageDataset(train, eval_transform(32, crop_pct=1.0))
    loader = _loader(
        dataset, shuffle=False, drop_last=False, num_workers=2, collate_fn=collate_classification
    )
    assert torch.cat([b["labels"] for b in loader]).tolist() == labels


def test_huggingface_single_split_is_carved(tmp_path, cifar_slice):
    (tmp_path / "data").mkdir()
    shutil.copy(
        cifar_slice / "plain_text" / "train-00000-of-00001.parquet", tmp_path / "data" / "train.parquet"
    )
    train = open_source(str(tmp_path), "train", val_fraction=0.25)
    val = open_source(str(tmp_path), "validation", val_fraction=0.25)
    assert (len(train), len(val)) == (48, 16)
    assert not set(train.rows) & set(val.rows)


def test_huggingface_saved_dataset_and_column_detection(tmp_path, cifar_slice):
    import datasets

    dataset = datasets.load_dataset(str(cifar_slice), split="test")
    dataset = dataset.rename_columns({"image": "img", "label": "fine_label"})
    dataset.save_to_disk(str(tmp_path / "saved"))
    source = open_source(str(tmp_path / "saved"), "train", val_fraction=0.5)
    assert len(source) == 16 and source.class_names[0] == "airplane"
    assert source.columns.image == "img" and source.columns.label == "fine_label"
    with pytest.raises(ValueError, match="'nope'"):
        open_source(str(tmp_path / "saved"), image_column="nope")


def test_huggingface_broken_row_is_skipped(tmp_path, caplog):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {
        "image": [{"bytes": _jpeg_bytes(), "path": None}, {"bytes": b"\xff\xd8garbage", "path": "bad.jpg"}],
        "label": [0, 1],
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    source = open_source(str(tmp_path), "train", val_fraction=0.5)  # no validation split: one row is carved
    val = open_source(str(tmp_path), "validation", val_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="simmim.data"):
        samples = [source[0], val[0]]
    broken = [s for s in samples if s[0] is None]
    assert len(broken) == 1 and broken[0][1] == 1 and "bad.jpg" in caplog.text


def test_streaming_huggingface_dataset(cifar_slice, no_shutdown_sleep):
    source = open_source(str(cifar_slice), "train", streaming=True)
    assert source.is_streaming and source.class_names[0] == "airplane"
    with pytest.raises(TypeError):
        len(source)
    labels = _parquet_labels(cifar_slice / "plain_text" / "train-00000-of-00001.parquet")
    assert [label for _, label, _ in source] == labels

    # two readers (one parquet shard: they split its examples) see disjoint halves that cover the split
    parts = [[name for _, _, name in source.stream(reader=r, readers=2)] for r in range(2)]
    assert len(parts[0]) + len(parts[1]) == 64
    assert not set(parts[0]) & set(parts[1])

    dataset = MaskedImageDataset(source, pretrain_transform(32), MaskGenerator(32, 8, 4))
    for num_workers in (0, 2):  # one parquet shard: the two workers split its examples
        loader = build_loader(
            dataset,
            batch_size=8,
            shuffle=True,
            drop_last=False,
            num_workers=num_workers,
            seed=0,
            collate_fn=collate_pretrain,
        )
        batches = _collect(loader)
        assert sum(len(b["pixel_values"]) for b in batches) == 64
        assert batches[0]["bool_masked_pos"].shape == (8, 64)


def test_streaming_resume_from_the_loader_state_gives_the_same_batches(cifar_slice, no_shutdown_sleep):
    dataset = MaskedImageDataset(
        open_source(str(cifar_slice), "train", streaming=True),
        pretrain_transform(32),
        MaskGenerator(32, 8, 4),
    )
    options = dict(
        batch_size=8, shuffle=True, drop_last=False, num_workers=0, seed=0, collate_fn=collate_pretrain
    )
    full = _collect(build_loader(dataset, **options))
    loader = build_loader(dataset, **options)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint keeps it
    resumed = _collect(build_loader(dataset, stream_state=state, **options))
    assert len(full) == 8 and len(resumed) == 3
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["bool_masked_pos"], b["bool_masked_pos"])


def test_streaming_carved_validation_split(tmp_path, cifar_slice):
    shutil.copy(cifar_slice / "plain_text" / "train-00000-of-00001.parquet", tmp_path / "train.parquet")
    parts = {
        split: [
            image.tobytes()
            for image, _, _ in open_source(str(tmp_path), split, streaming=True, val_fraction=0.25)
            if image is not None
        ]
        for split in ("train", "validation")
    }
    assert len(parts["train"]) + len(parts["validation"]) == 64
    assert 4 <= len(parts["validation"]) <= 28  # hashed: about a quarter
    assert not set(parts["train"]) & set(parts["validation"])


def test_synthetic_source():
    train = open_source("synthetic", "train", synthetic_size=40, synthetic_image_size=32, seed=3)
    val = open_source("synthetic", "validation", synthetic_size=40, seed=3)
    assert len(train) == 40 and len(val) == 64  # max(64, 40 // 8)
    assert train.class_names == list(SYNTHETIC_CLASSES) and len(train.class_names) == 10
    labels = [train[i][1] for i in range(40)]
    assert sorted(set(labels)) == list(range(10)) and labels.count(0) == 4  # balanced
    image, _, name = train[7]
    assert image.mode == "RGB" and image.size == (32, 32) and name == "synthetic:train[7]"
    pixels = np.asarray(image)
    assert pixels.std() > 10  # structure to reconstruct, not a flat colour
    again = open_source("synthetic", "train", synthetic_size=40, synthetic_image_size=32, seed=3)
    assert np.array_equal(pixels, np.asarray(again[7][0]))
    assert not np.array_equal(np.asarray(train[7][0].resize((64, 64))), np.asarray(val[7][0]))
    assert not np.array_equal(
        pixels, np.asarray(open_source("synthetic", synthetic_image_size=32, seed=4)[7][0])
    )


def test_synthetic_classes_differ_in_shape_not_only_colour():
    # a checkerboard's edges cross the whole image; a disc has one outline (textures repeat 2-3.5 times per
    # side, so that a masked block can be inferred from its neighbours: about twice the disc's edges)
    source = open_source("synthetic", synthetic_size=200, synthetic_image_size=64)
    edge_density = {}
    for i in range(200):
        gray = np.asarray(source[i][0].convert("L"), dtype=np.float32)
        edges = (np.abs(np.diff(gray, axis=0)) > 20).mean() + (np.abs(np.diff(gray, axis=1)) > 20).mean()
        edge_density.setdefault(source[i][1], []).append(edges)
    means = {label: np.mean(v) for label, v in edge_density.items()}
    assert means[SYNTHETIC_CLASSES.index("checkerboard")] > 1.6 * means[SYNTHETIC_CLASSES.index("disc")]
    assert (
        means[SYNTHETIC_CLASSES.index("horizontal_stripes")] > 1.6 * means[SYNTHETIC_CLASSES.index("square")]
    )


def test_unknown_split_raises(tmp_path):
    with pytest.raises(ValueError, match="'extra'"):
        open_source("synthetic", "extra")
    with pytest.raises(ValueError, match="neither images"):
        open_source(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# transforms


def test_pretrain_transform_shape_dtype_and_normalisation():
    transform = pretrain_transform(48)
    image = Image.new("RGB", (80, 60), (124, 116, 104))  # about the ImageNet mean colour
    out = transform(image)
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    expected = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert torch.allclose(out.mean((1, 2)), expected, atol=1e-5)
    assert pretrain_transform((48, 32))(image).shape == (3, 48, 32)
    assert transform.decode_size == math.ceil(48 / math.sqrt(0.67))


def test_eval_transform_matches_resize_and_center_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out = eval_transform(224)(image)
    # independent computation: shortest side to 256 with PIL bicubic, then the central 224 x 224
    resized = np.asarray(image.resize((341, 256), Image.BICUBIC), dtype=np.float32) / 255
    top, left = (256 - 224) // 2, round((341 - 224) / 2)
    crop = resized[top : top + 224, left : left + 224]
    expected = (crop - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-4)
    assert eval_transform(192).decode_size == 219  # int(192 * 256 / 224)


def test_finetune_transform_switches_and_reproducibility():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    transform = finetune_transform(32)
    names = [type(t).__name__ for t in transform.transforms]
    assert "NoisyRandAugment" in names and "RandomErasing" in names
    plain = finetune_transform(32, rand_augment=False, random_erasing=0.0)
    assert not {"NoisyRandAugment", "RandomErasing"} & {type(t).__name__ for t in plain.transforms}
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(0)
    b = transform(image)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)


def test_noisy_rand_augment_samples_its_magnitude():
    augment = NoisyRandAugment(num_ops=1)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    torch.manual_seed(0)
    magnitudes = []
    for _ in range(400):
        augment(image)
        magnitudes.append(augment.magnitude / 10)  # bins are 0.1 apart on timm's 0..10 scale
    magnitudes = np.array(magnitudes)
    assert abs(magnitudes.mean() - 9.0) < 0.1 and 0.4 < magnitudes.std() < 0.6
    assert magnitudes.max() <= 10.0
    assert augment(image).dtype == torch.uint8


def test_mixup_cutmix_targets():
    num_classes, smoothing = 4, 0.1
    labels = torch.tensor([0, 1, 2, 3])
    images = labels.float().view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()  # image value = its label

    only_smoothing = MixUpCutMix(num_classes, mixup_alpha=0, cutmix_alpha=0, label_smoothing=smoothing)
    same, targets = only_smoothing(images, labels)
    assert torch.equal(same, images)
    expected = torch.full((4, 4), 0.1 / 4) + 0.9 * torch.eye(4)
    assert torch.allclose(targets, expected)

    torch.manual_seed(0)
    mixed, targets = MixUpCutMix(num_classes, cutmix_alpha=0, label_smoothing=smoothing)(images, labels)
    # mixup: x = lam * x_i + (1 - lam) * x_j, so the target weight of label i must be lam, smoothed
    for i in range(4):
        value = mixed[i, 0, 0, 0]
        j = int(labels.roll(1)[i])
        lam = (value - j) / (i - j)
        assert torch.isclose(targets[i, i], 0.9 * lam + 0.1 / 4, atol=1e-5)
    assert torch.allclose(targets.sum(1), torch.ones(4))

    torch.manual_seed(0)
    mixed, targets = MixUpCutMix(num_classes, mixup_alpha=0, label_smoothing=0.0)(images, labels)
    for i in range(4):  # cutmix: the target weight of label i is the fraction of pixels still from image i
        assert torch.isclose(targets[i, i], (mixed[i] == i).float().mean(), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# batching


def _pretrain_dataset(size: int = 24) -> MaskedImageDataset:
    source = open_source("synthetic", synthetic_size=size, synthetic_image_size=32)
    return MaskedImageDataset(source, pretrain_transform(32), MaskGenerator(32, 8, 4, 0.5))


def test_same_batches_with_0_1_and_2_workers():
    dataset = _pretrain_dataset()
    runs = [_collect(_loader(dataset, num_workers=n)) for n in (0, 1, 2)]
    assert len(runs[0]) == 6
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            assert torch.equal(a["bool_masked_pos"], b["bool_masked_pos"])
    masks = torch.cat([b["bool_masked_pos"] for b in runs[0]])
    assert torch.all(masks.sum(1) == 8 * 4)  # ceil(0.5 * 16) blocks of 2 x 2 patches
    assert len({tuple(m.tolist()) for m in masks}) > 1


def test_two_processes_see_what_one_process_with_twice_the_batch_sees():
    dataset = _pretrain_dataset(22)
    single = _collect(_loader(dataset, batch_size=4, drop_last=False))
    ranks = [
        _collect(_loader(dataset, batch_size=2, rank=r, world_size=2, drop_last=False)) for r in range(2)
    ]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 6  # the last global batch holds 2: 1 per rank
    for k, batch in enumerate(single):
        joined = torch.cat([ranks[0][k]["pixel_values"], ranks[1][k]["pixel_values"]])
        assert torch.equal(batch["pixel_values"], joined)


def test_resume_mid_epoch_and_epochs_differ():
    dataset = _pretrain_dataset()
    full = _collect(_loader(dataset))
    resumed = _collect(_loader(dataset, start_batch=4))
    assert len(resumed) == len(_loader(dataset, start_batch=4)) == 2
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a["bool_masked_pos"], b["bool_masked_pos"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    next_epoch = _collect(_loader(dataset, epoch=1))
    assert not torch.equal(full[0]["pixel_values"], next_epoch[0]["pixel_values"])


def test_loading_does_not_touch_the_global_rng():
    dataset = _pretrain_dataset(8)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _collect(_loader(dataset))
    assert torch.equal(torch.rand(3), expected)


def test_sample_seeds_depend_on_every_value():
    seeds = derive_seeds(3, 1, positions=np.arange(4))
    assert seeds.tolist() == [derive_seed(3, 1, p) for p in range(4)]
    assert derive_seed(0, 1) != derive_seed(1, 0)  # seed + epoch would collide
    assert len(set(seeds.tolist()) | {derive_seed(3, 2, 0)}) == 5 and all(0 <= s < 2**63 for s in seeds)


def test_sampler_partitions_the_epoch():
    # drop_last drops the incomplete global batch: 10 samples, global batch 2 x 2 -> 2 batches
    samplers = [
        EpochBatchSampler(10, 2, shuffle=True, drop_last=True, seed=0, rank=r, world_size=2) for r in range(2)
    ]
    assert [len(s) for s in samplers] == [2, 2]
    kept = [index for s in samplers for batch in s for index, _ in batch]
    assert len(kept) == len(set(kept)) == 8
    # without drop_last every sample is seen once; the final partial batch is split across ranks
    samplers = [
        EpochBatchSampler(10, 2, shuffle=True, drop_last=False, seed=0, rank=r, world_size=2)
        for r in range(2)
    ]
    batches = [list(s) for s in samplers]
    assert [len(b[-1]) for b in batches] == [1, 1]
    assert sorted(i for b in batches for batch in b for i, _ in batch) == list(range(10))
    # a process left with nothing in the last batch still gets it (empty), so all ranks run the same steps
    last = [
        list(EpochBatchSampler(5, 2, shuffle=False, drop_last=False, seed=0, rank=r, world_size=2))[-1]
        for r in range(2)
    ]
    assert [len(b) for b in last] == [0, 1]
    assert collate_pretrain([])["pixel_values"].shape[0] == 0


def test_collate_keys_and_skipped_count():
    dataset = _pretrain_dataset(4)
    items = [dataset[(0, 1)], None, dataset[(1, 2)]]
    batch = collate_pretrain(items)
    assert set(batch) == {"pixel_values", "bool_masked_pos", "index", "name", "num_skipped"}
    assert batch["index"].tolist() == [0, 1] and len(batch["name"]) == 2
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["bool_masked_pos"].dtype == torch.bool
    assert batch["bool_masked_pos"].shape == (2, 64) and batch["num_skipped"] == 1

    labeled = LabeledImageDataset(dataset.source, eval_transform(32))
    batch = collate_classification([labeled[(3, 0)], None, None])
    assert set(batch) == {"pixel_values", "labels", "index", "name", "num_skipped"}
    assert (
        batch["labels"].tolist() == [3] and batch["labels"].dtype == torch.long and batch["num_skipped"] == 2
    )
    empty = collate_classification([None])
    assert empty["labels"].shape == (0,) and empty["num_skipped"] == 1


def test_holdout_from_train_carves_both_splits_from_train_without_overlap(tmp_path):
    from simmim.config import FinetuneConfig, load_config
    from simmim.data.sources import open_split

    for c in range(2):  # train/ and val/ class folders: the carve must ignore val/
        for split, count in (("train", 10), ("val", 3)):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i, c * 100, 0)).save(folder / f"{i}.png")
    args = ["output_dir=x", f"data.path={tmp_path}", "data.holdout_from_train=true", "data.val_fraction=0.25"]
    cfg = load_config(FinetuneConfig, overrides=args)
    train, held_out = open_split(cfg, "train"), open_split(cfg, "validation")
    names = [
        {train.load(i)[2] for i in range(len(train))},
        {held_out.load(i)[2] for i in range(len(held_out))},
    ]
    assert len(names[0]) == 15 and len(names[1]) == 5 and not names[0] & names[1]
    assert all("/train/" in n for n in names[0] | names[1])  # the validation folder is never read
    other = load_config(FinetuneConfig, overrides=[*args, "data.holdout_seed=1"])
    assert {open_split(other, "validation").load(i)[2] for i in range(5)} != names[1]
