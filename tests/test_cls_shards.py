"""Labels as shards carry them: tar shards of `{key}.png` + `{key}.cls` with no class names (no index.json,
no ClassLabel), and parquet shards of plain integer labels, named by `data.num_classes` or `data.class_names`
(a list or a file), checked against the data's own names, with every label inside the classes."""

from __future__ import annotations

import json

import pytest
from helpers import TINY_MODEL, run_script
from test_streams import synthetic_examples, write_tar_shards

from simmim.config import FinetuneConfig, load_config
from simmim.data import LabeledImageDataset, build_loader, collate_classification, eval_transform
from simmim.data.class_names import check_labels, named_classes
from simmim.data.sources import open_split
from simmim.data.synthetic import SYNTHETIC_CLASSES
from simmim.errors import LabelError
from simmim.exports import open_classifier

N = 3  # the shards' classes
PETS = ["tench", "goldfish", "great white shark"]


@pytest.fixture(autouse=True)
def no_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s after a streaming epoch over parquet (apache/arrow#45214): not in tests."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def examples() -> list[tuple[bytes, int]]:
    """24 PNG images of 32 px, labelled 0, 1, 2, 0, 1, ..."""
    return [(png, i % N) for i, (png, _) in enumerate(synthetic_examples(24))]


@pytest.fixture(scope="module")
def cls_shards(tmp_path_factory, examples):
    """3 training shards of 8 examples and 1 validation shard of 8, `.cls` only, nothing naming a class."""
    root = tmp_path_factory.mktemp("cls")
    write_tar_shards(root, examples, 8, index=False)
    write_tar_shards(root, examples[:8], 8, split="validation", index=False)
    assert not (root / "index.json").exists()
    return root


@pytest.fixture(scope="module")
def names_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("names") / "names.txt"
    path.write_text("".join(f"  {name}\n" for name in PETS))  # surrounding spaces are not part of a name
    return path


def data_config(path, *overrides: str, streaming: bool = False) -> FinetuneConfig:
    stream = ["data.streaming=true", "train.max_steps=2", "train.eval_every_epochs=null"] if streaming else []
    return load_config(FinetuneConfig, overrides=["output_dir=x", f"data.path={path}", *stream, *overrides])


# ------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.num_classes=0"], "data.num_classes=0: must be > 0"),
        (["data.class_names=no/such/names.txt"], "data.class_names='no/such/names.txt': no such file"),
        (["data.class_names=[a, b, a]"], "data.class_names=['a', 'b', 'a']: the names must be distinct"),
        (["data.class_names=[1, 2]"], "data.class_names[0]=1: expected str"),
        (["data.num_classes=2", "data.class_names=[a, b, c]"],
         "data.class_names=['a', 'b', 'c']: must name data.num_classes=2 classes"),
    ],
)  # fmt: skip
def test_bad_class_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError) as caught:
        load_config(FinetuneConfig, overrides=["output_dir=x", *overrides])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_file_of_names_is_read_once_into_the_config(names_file, tmp_path):
    cfg = load_config(FinetuneConfig, overrides=["output_dir=x", f"data.class_names={names_file}"])
    assert cfg.data.class_names == tuple(PETS)  # the saved config lists the names, not the path
    assert load_config(FinetuneConfig, overrides=["output_dir=x"]).data.class_names == ()
    blank = tmp_path / "blank.txt"
    blank.write_text("tench\n\ngoldfish\n")  # a blank line would shift every label after it
    with pytest.raises(ValueError, match="none blank"):
        load_config(FinetuneConfig, overrides=["output_dir=x", f"data.class_names={blank}"])


# ------------------------------------------------------------------------------------------- the sources


@pytest.mark.parametrize("streaming", [False, True])
def test_the_config_names_cls_only_shards(cls_shards, names_file, examples, streaming):
    for given, names in [
        (["data.num_classes=3"], ["0", "1", "2"]),  # as the issue asks (Transformers would say LABEL_0)
        (["data.class_names=[a, b, c]"], ["a", "b", "c"]),
        ([f"data.class_names={names_file}"], PETS),
    ]:
        source = open_split(data_config(cls_shards, *given, streaming=streaming), "train")
        assert source.class_names == names
    read = [label for _, label, _ in source] if streaming else list(source.labels())
    assert read == [c for _, c in examples]  # the validation shard is the validation split: nothing carved

    unnamed = open_split(data_config(cls_shards, streaming=streaming), "train")
    with pytest.raises(ValueError) as caught:
        named_classes(unnamed, "data.path='cls'")
    message = str(caught.value)
    assert "has no class names" in message and "data.num_classes=N" in message
    assert "data.class_names=[...]" in message and "\n" not in message


def test_the_datas_own_names_must_agree_with_the_configs(tmp_path, examples):
    named = tmp_path / "named"
    write_tar_shards(named, examples[:8], 8)  # an index.json naming the synthetic set's classes
    own = list(SYNTHETIC_CLASSES)
    assert open_split(data_config(named, f"data.num_classes={len(own)}"), "train").class_names == own
    assert open_split(data_config(named, f"data.class_names={own}"), "train").class_names == own
    with pytest.raises(ValueError, match=rf"data.num_classes=3, but data.path=.* names {len(own)} classes"):
        open_split(data_config(named, "data.num_classes=3"), "train")
    renamed = [own[0], "sphere", *own[2:]]
    with pytest.raises(ValueError, match=r"label 1 is 'sphere' against 'square'") as caught:
        open_split(data_config(named, f"data.class_names={renamed}", streaming=True), "train")
    assert "data.class_names=['disc', 'sphere'," in str(caught.value)

    folders = tmp_path / "folders"  # class folders name their classes too
    for i, (data, label) in enumerate(examples[:6]):
        (folders / f"class_{label}").mkdir(parents=True, exist_ok=True)
        (folders / f"class_{label}" / f"{i}.png").write_bytes(data)
    with pytest.raises(ValueError, match=r"data.class_names=\['a', 'b'\] \(2 names\) are not the 3"):
        open_split(data_config(folders, "data.class_names=[a, b]"), "train")


def test_a_label_outside_the_classes_names_its_shard_and_key(tmp_path, examples):
    shards = tmp_path / "shards"
    bad = [(data, 7 if i == 13 else label) for i, (data, label) in enumerate(examples)]
    write_tar_shards(shards, bad, 8, index=False)

    # map-style: refused up front, from the label column
    source = open_split(data_config(shards, "data.num_classes=3", "data.val_fraction=0"), "train")
    with pytest.raises(ValueError) as caught:
        check_labels(source)
    assert "(train-00001.tar:train000013): label 7 is outside [0, 3)" in str(caught.value)
    assert "1 of 24 labels" in str(caught.value)

    # a stream: refused when the example is read
    cfg = data_config(shards, "data.num_classes=3", "data.val_fraction=0", streaming=True)
    stream = LabeledImageDataset(open_split(cfg, "train"), eval_transform(32))
    loader = build_loader(stream, batch_size=4, shuffle=False, drop_last=False, num_workers=0, seed=0,
                          collate_fn=collate_classification)  # fmt: skip
    with pytest.raises(LabelError) as caught:
        list(loader)
    message = (
        "train/train-00001.tar:train000013: label 7 is outside [0, 3), the run's 3 classes (data.num_classes, "
        "data.class_names, or the data's own class names)"
    )
    assert str(caught.value).endswith(message)


def test_parquet_shards_of_plain_integer_labels(tmp_path, examples):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    for s in range(2):
        part = examples[s * 12 : (s + 1) * 12]
        rows = {"image": [{"bytes": d, "path": None} for d, _ in part], "label": [c for _, c in part]}
        rows["label"][5] = 3 if s == 1 else rows["label"][5]  # row 17: a fourth class
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"train-{s}.parquet"))
    pattern = str(tmp_path / "*.parquet")
    for streaming in (False, True):
        source = open_split(data_config(pattern, "data.num_classes=4", streaming=streaming), "train")
        assert source.class_names == ["0", "1", "2", "3"]
    source = open_split(data_config(pattern, "data.num_classes=3", "data.val_fraction=0"), "train")
    with pytest.raises(ValueError, match=r"\*.parquet\[17\]: label 3 is outside \[0, 3\)"):
        check_labels(source)


# ------------------------------------------------------------------------------------------- the runs

RUN = [*TINY_MODEL, "data.batch_size=8", "data.num_workers=0", "train.precision=fp32", "aug.rand_augment=false",
       "train.log_every_steps=1", "train.eval_batches=1", "train.max_steps=2", "train.report_to=none"]  # fmt: skip


def test_finetuning_cls_only_shards_exports_the_names(tmp_path, cls_shards, names_file):
    out = tmp_path / "named"
    args = [f"output_dir={out}", f"data.path={cls_shards}", f"data.class_names={names_file}", *RUN]
    result = run_script("finetune.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(PETS)}
    assert config["label2id"] == {name: i for i, name in enumerate(PETS)}
    assert open_classifier(out / "export").id2label == dict(enumerate(PETS))  # what scripts/predict.py prints

    out = tmp_path / "numbered"  # a stream, named by their count
    stream = ["data.streaming=true", "data.num_classes=3", "train.eval_every_steps=2", "optim.warmup_steps=1"]
    result = run_script("finetune.py", [f"output_dir={out}", f"data.path={cls_shards}", *RUN, *stream])
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1", "2": "2"}


def test_a_label_outside_the_classes_stops_a_streaming_run_in_one_line(tmp_path, examples):
    shards = tmp_path / "shards"
    bad = [(data, 7 if i == 13 else label) for i, (data, label) in enumerate(examples)]
    write_tar_shards(shards, bad, 8, index=False)
    write_tar_shards(shards, examples[:8], 8, split="validation", index=False)
    # read by a loader worker, whose error torch raises again in the main process with its traceback
    stream = ["data.streaming=true", "data.num_classes=3", "data.num_workers=1", "data.shuffle_buffer=0"]
    args = [f"output_dir={tmp_path / 'run'}", f"data.path={shards}", *RUN, *stream, "train.max_steps=4"]
    result = run_script(
        "finetune.py", [*args, "train.eval_every_steps=4", "optim.warmup_steps=1"], timeout=120
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"error: {shards.name}:train/train-00001.tar:train000013: label 7 is outside [0, 3), the run's 3 "
        "classes (data.num_classes, data.class_names, or the data's own class names)"
    )
