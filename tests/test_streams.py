"""Streams (`data.streaming=true`): webdataset tar and parquet shards built here, every example read once
per pass by any number of processes and workers, damaged shards survived and counted, an exact resume
after SIGKILL, durations in steps, and pretraining and fine-tuning runs that read them."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_MODEL, run_script, script_env
from safetensors.torch import load_file

from simmim.config import FinetuneConfig, PretrainConfig, load_config
from simmim.data import (
    LabeledImageDataset,
    MaskedImageDataset,
    build_loader,
    collate_classification,
    collate_pretrain,
    eval_transform,
    open_source,
    pretrain_transform,
)
from simmim.data.synthetic import SYNTHETIC_CLASSES
from simmim.masking import MaskGenerator

SIZE = 32


@pytest.fixture(autouse=True)
def no_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s after a streaming epoch over parquet (apache/arrow#45214): not in tests."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def synthetic_examples(count: int, seed: int = 0) -> list[tuple[bytes, int]]:
    """(PNG bytes, label) of the built-in synthetic images."""
    source = open_source("synthetic", "train", synthetic_size=count, synthetic_image_size=SIZE, seed=seed)
    examples = []
    for i in range(count):
        image, label, _ = source[i]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        examples.append((buffer.getvalue(), label))
    return examples


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar_shards(
    directory: Path,
    examples: list[tuple[bytes, int]],
    per_shard: int,
    *,
    split: str = "train",
    label: str = "cls",
    corrupt: tuple[int, ...] = (),
    index: bool = True,
) -> list[str]:
    """Webdataset shards `<split>-NNNNN.tar` of `<key>.png` and `<key>.cls` (or `<key>.json`); the images
    of `corrupt` are garbage; an index.json with the class names as scripts/make_shards.py writes it.
    Returns the keys in order."""
    directory.mkdir(parents=True, exist_ok=True)
    keys, shards = [], []
    for start in range(0, len(examples), per_shard):
        shards.append(
            {"name": f"{split}-{start // per_shard:05d}.tar", "count": min(per_shard, len(examples) - start)}
        )
        with tarfile.open(directory / shards[-1]["name"], "w") as tar:
            for i in range(start, min(start + per_shard, len(examples))):
                data, cls = examples[i]
                key = f"{split}{i:06d}"
                _member(tar, f"{key}.png", b"not a png" if i in corrupt else data)
                if label == "cls":
                    _member(tar, f"{key}.cls", str(cls).encode())
                else:
                    _member(tar, f"{key}.json", json.dumps({"label": cls}).encode())
                keys.append(key)
    if index:
        index_file = directory / "index.json"
        content = json.loads(index_file.read_text()) if index_file.is_file() else {"splits": {}}
        content["splits"][split] = {"shards": shards}
        content["classes"] = list(SYNTHETIC_CLASSES)
        index_file.write_text(json.dumps(content))
    return keys


def write_parquet_shards(directory: Path, examples: list[tuple[bytes, int]], shards: int, split="train"):
    """Parquet shards in the Hub's layout, `data/<split>-0000i-of-0000n.parquet`, with a ClassLabel."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(SYNTHETIC_CLASSES))}
    )
    (directory / "data").mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(examples) // shards)
    for s in range(shards):
        part = examples[s * per_shard : (s + 1) * per_shard]
        rows = {"image": [{"bytes": d, "path": None} for d, _ in part], "label": [c for _, c in part]}
        path = directory / "data" / f"{split}-{s:05d}-of-{shards:05d}.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


@pytest.fixture(scope="module")
def examples() -> list[tuple[bytes, int]]:
    return synthetic_examples(160)


@pytest.fixture(scope="module")
def tar_dir(tmp_path_factory, examples) -> Path:
    """160 training images in 4 tar shards of 40, and 32 validation images in one."""
    root = tmp_path_factory.mktemp("tar")
    write_tar_shards(root, examples, 40)
    write_tar_shards(root, synthetic_examples(32, seed=1), 32, split="validation")
    return root


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory, examples) -> Path:
    root = tmp_path_factory.mktemp("parquet")
    write_parquet_shards(root, examples, 4)
    write_parquet_shards(root, synthetic_examples(32, seed=1), 1, split="validation")
    return root


def key_of(name: str) -> str:
    return name.rsplit(":", 1)[-1]


# ------------------------------------------------------------------------------------------------ sources


def test_tar_shards_keep_their_labels_and_class_names(tmp_path, tar_dir, examples):
    source = open_source(str(tar_dir), "train", streaming=True)
    assert source.is_streaming and source.num_shards == 4
    assert source.class_names == list(SYNTHETIC_CLASSES)  # from index.json
    read = [(key_of(name), label, image.size) for image, label, name in source]
    assert [r[0] for r in read] == [f"train{i:06d}" for i in range(160)]
    assert [r[1] for r in read] == [c for _, c in examples]
    assert {r[2] for r in read} == {(SIZE, SIZE)}
    # names say which shard an example came from
    assert next(iter(source))[2].startswith(f"{tar_dir.name}:train/train-00000.tar:")
    val = open_source(str(tar_dir), "validation", streaming=True)
    assert sum(1 for _ in val) == 32

    # a glob of the same shards is the training split, its validation part carved by a hash
    pattern = str(tar_dir / "train-*.tar")
    train, held_out = (
        open_source(pattern, s, streaming=True, val_fraction=0.25) for s in ("train", "validation")
    )
    train_keys = {key_of(n) for _, _, n in train}
    val_keys = {key_of(n) for _, _, n in held_out}
    assert not train_keys & val_keys and len(train_keys | val_keys) == 160
    assert 20 <= len(val_keys) <= 60

    # labels in `<key>.json` instead of `<key>.cls`
    write_tar_shards(tmp_path / "json", examples[:20], 10, label="json")
    source = open_source(str(tmp_path / "json"), "train", streaming=True, val_fraction=0)
    assert [label for _, label, _ in source] == [c for _, c in examples[:20]]


def test_parquet_shards_in_the_hub_layout_and_as_a_glob(parquet_dir, examples):
    source = open_source(str(parquet_dir), "train", streaming=True)
    assert source.num_shards == 4 and source.class_names == list(SYNTHETIC_CLASSES)
    assert [label for _, label, _ in source] == [c for _, c in examples]
    assert "train-00002-of-00004.parquet" in [n for _, _, n in source][80]
    globbed = open_source(
        str(parquet_dir / "data" / "train-*.parquet"), "train", streaming=True, val_fraction=0
    )
    assert [label for _, label, _ in globbed] == [c for _, c in examples]


def test_an_image_folder_streams_too(tmp_path, examples):
    for i, (data, label) in enumerate(examples[:50]):
        (tmp_path / SYNTHETIC_CLASSES[label]).mkdir(exist_ok=True)
        (tmp_path / SYNTHETIC_CLASSES[label] / f"{i}.png").write_bytes(data)
    folder = open_source(str(tmp_path), "train", val_fraction=0.2)
    stream = open_source(str(tmp_path), "train", streaming=True, val_fraction=0.2)
    held_out = open_source(str(tmp_path), "validation", streaming=True, val_fraction=0.2)
    assert stream.class_names == folder.class_names
    names = [n for _, _, n in stream]
    assert sorted(names) == sorted(folder[i][2] for i in range(len(folder)))  # the same carve
    assert not set(names) & {n for _, _, n in held_out}


def test_bad_paths_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        open_source(str(tmp_path / "missing"), streaming=True)
    with pytest.raises(ValueError, match="matches no files"):
        open_source(str(tmp_path / "*.tar"), streaming=True)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"files of \['.txt'\]; shards must all be one of"):
        open_source(str(tmp_path / "*"), streaming=True)
    (tmp_path / "b.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\['.tar', '.txt'\]"):
        open_source(str(tmp_path / "*"), streaming=True)


@pytest.mark.parametrize(
    ("cls", "overrides", "message"),
    [
        (PretrainConfig, [], "train.max_steps=None: must be set with data.streaming=true"),
        (
            PretrainConfig,
            ["train.max_steps=10", "optim.warmup_epochs=1"],
            "optim.warmup_epochs=1.0: must be unset",
        ),
        (FinetuneConfig, ["train.max_steps=10", "train.eval_every_epochs=1"], "train.eval_every_epochs=1"),
        (FinetuneConfig, ["train.max_steps=10", "data.label_fraction=0.1"], "data.label_fraction=0.1"),
        (PretrainConfig, ["train.max_steps=10", "train.snapshot_epochs=[1]"], "train.snapshot_epochs"),
        (PretrainConfig, ["train.max_steps=10", "train.probe_every_steps=5"], "probe.data=None: must name"),
        (PretrainConfig, ["train.max_steps=10", "data.holdout_from_train=true"], "data.holdout_from_train"),
    ],
)
def test_a_stream_is_measured_in_steps(cls, overrides, message):
    extra = ["model.head=cls"] if cls is FinetuneConfig else []
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(cls, None, ["output_dir=x", "data.streaming=true", *extra, *overrides])


def test_warmup_in_steps_or_epochs_not_both():
    with pytest.raises(
        ValueError, match="optim.warmup_steps=5: must not be set with optim.warmup_epochs=1.0"
    ):
        load_config(PretrainConfig, None, ["output_dir=x", "optim.warmup_epochs=1", "optim.warmup_steps=5"])
    from simmim.optim import Schedule

    for warmup, expected in (([], 10 * 8), (["optim.warmup_epochs=0.5"], 4), (["optim.warmup_steps=3"], 3)):
        cfg = load_config(PretrainConfig, None, ["output_dir=x", "data.batch_size=16", *warmup])
        assert Schedule.build(128, cfg.data, cfg.optim, cfg.train, 1).warmup_steps == expected
    cfg = load_config(
        PretrainConfig,
        None,
        ["output_dir=x", "data.streaming=true", "train.max_steps=50", "optim.warmup_steps=7"],
    )
    schedule = Schedule.build(None, cfg.data, cfg.optim, cfg.train, 2)
    assert (schedule.total_steps, schedule.schedule_steps, schedule.warmup_steps) == (50, 50, 7)
    assert schedule.steps_per_epoch is None and schedule.epoch(10) is None


# ------------------------------------------------------------------------------------------ who reads what


def test_every_example_once_per_pass_in_a_new_order(tar_dir, caplog):
    source = open_source(str(tar_dir), "train", streaming=True)
    everything = {f"train{i:06d}" for i in range(160)}
    for readers in (1, 2, 3, 4, 6):  # 6 readers for 4 shards: each reader keeps every 6th example
        orders = []
        for pass_index in (0, 1):
            with caplog.at_level(logging.WARNING, logger="simmim.data"):
                parts = [
                    [key_of(n) for _, _, n in source.stream(reader=r, readers=readers, shuffle=True, seed=3,
                                                            pass_index=pass_index, shuffle_buffer=16)]
                    for r in range(readers)
                ]  # fmt: skip
            keys = [k for part in parts for k in part]
            assert len(keys) == len(set(keys)) == 160 and set(keys) == everything, readers
            orders.append(keys)
        assert orders[0] != orders[1]  # each pass reads the shards (and the buffer draws) anew
    assert "4 shards for 6 readers" in caplog.text and "make at least 6 shards" in caplog.text
    # the same (seed, pass, reader) reads the same stream: what an exact resume relies on
    again = [key_of(n) for _, _, n in source.stream(reader=1, readers=3, shuffle=True, seed=3, pass_index=1)]
    first = [key_of(n) for _, _, n in source.stream(reader=1, readers=3, shuffle=True, seed=3, pass_index=1)]
    assert again == first


def _gloo_reader(rank: int, init_file: str, tar_dir: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    dataset = MaskedImageDataset(
        open_source(tar_dir, "train", streaming=True), pretrain_transform(SIZE), MaskGenerator(SIZE, 8, 8)
    )
    names = []
    loader = build_loader(
        dataset, batch_size=8, shuffle=True, drop_last=False, num_workers=2, seed=5, rank=rank, world_size=2,
        collate_fn=collate_pretrain,
    )  # fmt: skip
    for batch in loader:
        names += batch["name"]
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, names)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()


def test_two_processes_over_gloo_with_two_workers_read_every_example_once(tmp_path, tar_dir):
    out = tmp_path / "names.json"
    torch.multiprocessing.spawn(
        _gloo_reader, args=(str(tmp_path / "init"), str(tar_dir), str(out)), nprocs=2, join=True
    )
    per_rank = json.loads(out.read_text())
    keys = [key_of(n) for names in per_rank for n in names]
    assert len(keys) == len(set(keys)) == 160
    assert all(len(names) == 80 for names in per_rank)  # 4 readers, one 40-image shard each


# -------------------------------------------------------------------------------------------- bad data


def test_a_corrupt_member_and_a_truncated_shard_are_survived_and_counted(tmp_path, examples, caplog):
    write_tar_shards(tmp_path, examples[:80], 20, corrupt=(3,))
    damaged = tmp_path / "train-00001.tar"
    damaged.write_bytes(damaged.read_bytes()[: 10 * 1024 + 700])  # a partial download, cut mid-member
    # ... and one cut between two members: it reads as a shorter, intact tar, and only index.json tells
    cut = tmp_path / "train-00002.tar"
    with tarfile.open(cut) as tar:
        offset = tar.getmembers()[10].offset  # the 6th example's image
    cut.write_bytes(cut.read_bytes()[:offset])
    dataset = LabeledImageDataset(
        open_source(str(tmp_path), "train", streaming=True, val_fraction=0), eval_transform(SIZE)
    )
    with caplog.at_level(logging.WARNING, logger="simmim.data"):
        loader = build_loader(
            dataset, batch_size=8, shuffle=False, drop_last=False, num_workers=0, seed=0,
            collate_fn=collate_classification,
        )  # fmt: skip
        batches = list(loader)
    keys = [key_of(n) for b in batches for n in b["name"]]
    skipped = sum(b["num_skipped"] for b in batches)
    kept_from_damaged = [k for k in keys if 20 <= int(k[-6:]) < 40]
    assert 0 < len(kept_from_damaged) < 20  # what came before the damage is kept
    assert kept_from_damaged == [f"train{i:06d}" for i in range(20, 20 + len(kept_from_damaged))]
    assert [k for k in keys if 40 <= int(k[-6:]) < 60] == [f"train{i:06d}" for i in range(40, 45)]
    assert [k for k in keys if int(k[-6:]) >= 60] == [f"train{i:06d}" for i in range(60, 80)]  # the rest
    assert "train000003" not in keys and skipped == 3  # the corrupt image, and the two damaged shards
    assert "train-00001.tar is damaged after" in caplog.text and "cannot decode" in caplog.text
    assert "train-00002.tar is damaged after 5 examples (the index lists 20)" in caplog.text


# -------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_gives_the_same_batches_across_passes(tar_dir, num_workers):
    dataset = MaskedImageDataset(
        open_source(str(tar_dir), "train", streaming=True),
        pretrain_transform(SIZE),
        MaskGenerator(SIZE, 8, 8),
    )
    options = dict(
        batch_size=16, shuffle=True, drop_last=True, num_workers=num_workers, seed=0, repeat=True,
        shuffle_buffer=32, collate_fn=collate_pretrain,
    )  # fmt: skip

    def take(batches, n):
        return [next(batches) for _ in range(n)]

    full = take(iter(build_loader(dataset, **options)), 16)  # 160 images: a pass is 10 batches
    names = [n for b in full[:10] for n in b["name"]]
    assert len(set(names)) == 160  # the first pass read every image once
    # stopped in the first pass, and in the second (after every worker's first pass has ended)
    for stop in (3, 12):
        loader = build_loader(dataset, **options)
        take(iter(loader), stop)
        state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint keeps it
        resumed = take(iter(build_loader(dataset, stream_state=state, **options)), 16 - stop)
        for a, b in zip(full[stop:], resumed, strict=True):
            assert a["name"] == b["name"]
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            assert torch.equal(a["bool_masked_pos"], b["bool_masked_pos"])


def test_a_stream_resumes_only_from_its_loader_state(tar_dir):
    dataset = MaskedImageDataset(
        open_source(str(tar_dir), "train", streaming=True),
        pretrain_transform(SIZE),
        MaskGenerator(SIZE, 8, 8),
    )
    options = dict(
        batch_size=4, shuffle=True, drop_last=True, num_workers=0, seed=0, collate_fn=collate_pretrain
    )
    with pytest.raises(ValueError, match="resumes from its loader's state_dict"):
        build_loader(dataset, start_batch=3, **options)


# ------------------------------------------------------------------------------------------------ the runs

STREAM_RUN = [
    "data.streaming=true",
    "data.batch_size=16",
    "data.shuffle_buffer=32",
    *TINY_MODEL,
    "model.drop_path_rate=0.1",
    "train.precision=fp32",
    "optim.base_lr=1e-2",
    "optim.warmup_steps=4",
    "train.log_every_steps=4",
    "train.save_every_steps=4",
    "train.eval_every_steps=12",
    "train.eval_batches=1",
]
PRETRAIN = [*STREAM_RUN, "mask.patch_size=16", "train.max_steps=24"]  # 24 steps: 2.4 passes of the shards


def latest_step(run_dir: Path) -> int:
    try:
        index = json.loads((run_dir / "checkpoints" / "index.json").read_text())
        return json.loads((run_dir / "checkpoints" / index["latest"] / "trainer_state.json").read_text())[
            "step"
        ]
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return -1


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "model.safetensors"))


def test_streaming_pretraining_resumes_exactly_after_sigkill(tmp_path, tar_dir):
    args = [f"data.path={tar_dir}", "data.num_workers=2", *PRETRAIN]
    reference = tmp_path / "reference"
    result = run_script("pretrain.py", [f"output_dir={reference}", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a stream of training images, global batch 16, 24 steps" in result.stdout
    records = [json.loads(line) for line in (reference / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [12, 24]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["images_skipped"] == 0 and "epoch" not in last

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "pretrain.py"), f"output_dir={out}", *args],
        env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while latest_step(out) < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the loader workers die with it (their parent is gone)
    proc.wait()
    killed_at = latest_step(out)
    assert 12 <= killed_at < 24, f"the run was not killed mid-run (latest checkpoint {killed_at})"
    result = run_script("pretrain.py", [f"output_dir={out}", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {out}/checkpoints/step_{killed_at:08d} at step {killed_at}/24" in result.stdout
    mine, theirs = final_weights(out), final_weights(reference)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key

    # the position is the loader's state, one per worker, as JSON: a resume needs the same workers
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    position = json.loads((out / "checkpoints" / index["latest"] / "stream_position_0.json").read_text())
    assert position["num_workers"] == 2 and "loader" in position
    result = run_script("pretrain.py", [f"output_dir={out}", *args, "data.num_workers=1"])
    assert result.returncode == 2
    assert "data.num_workers=1, but" in result.stderr and "resume with data.num_workers=2" in result.stderr


def test_pretraining_from_parquet_shards(tmp_path, parquet_dir):
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"data.path={parquet_dir}", "data.num_workers=1", *PRETRAIN]
    result = run_script("pretrain.py", [*args, "train.max_steps=8", "train.eval_every_steps=8"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert latest_step(out) == 8 and (out / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_finetuning_from_shards_evaluates_every_steps(tmp_path, kind, tar_dir, parquet_dir):
    out = tmp_path / "run"
    path = tar_dir if kind == "tar" else parquet_dir
    args = [f"output_dir={out}", f"data.path={path}", "data.num_workers=0", *STREAM_RUN]
    overrides = ["model.head=cls", "train.max_steps=8", "train.eval_every_steps=4", "aug.rand_augment=false"]
    result = run_script("finetune.py", [*args, *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["epochs"]] == [4, 8]
    assert all(e["epoch"] is None for e in metrics["epochs"])
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["id2label"]["3"] == SYNTHETIC_CLASSES[3]  # the class names of index.json


def test_finetuning_a_stream_of_unnamed_integer_labels_is_refused(tmp_path, examples):
    write_tar_shards(tmp_path / "shards", examples[:40], 20, index=False)
    result = run_script(
        "finetune.py",
        [f"output_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'shards'}", "model.head=cls",
         *STREAM_RUN, "train.max_steps=4"],
    )  # fmt: skip
    assert result.returncode == 2
    assert "has no class names" in result.stderr and "index.json" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_two_process_streaming_pretraining(tmp_path, tar_dir):
    """Under DDP each process reads its own shards, pass after pass, for the same number of steps."""
    out = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29531"]  # fmt: skip
    args = [f"output_dir={out}", f"data.path={tar_dir}", "data.num_workers=1", *PRETRAIN, "data.batch_size=8"]
    result = subprocess.run(
        [*launch, str(ROOT / "scripts" / "pretrain.py"), *args, "train.max_steps=12"],
        env=script_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["num_processes"] == 2 and records[0]["global_batch"] == 16
    assert latest_step(out) == 12 and (out / "export" / "model.safetensors").is_file()
    # 12 steps of 16 images over both processes: 1.2 passes over the 160 images, every one counted
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    state = json.loads((out / "checkpoints" / index["latest"] / "trainer_state.json").read_text())
    assert state["counters"]["images_seen"] == 12 * 16
    for rank in (0, 1):  # each process keeps its own stream position
        assert (out / "checkpoints" / index["latest"] / f"stream_position_{rank}.json").is_file()
    # one process would deal the shards to other readers: its resume is refused
    alone = run_script("pretrain.py", [*args, "train.max_steps=12"])
    assert alone.returncode == 2, alone.stderr[-3000:]
    assert "read by 2 processes, and this run has 1" in alone.stderr


def _batchnorm_rank(rank: int, init_file: str, out: str) -> None:
    from types import SimpleNamespace

    from simmim.engine import broadcast_buffers

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(rank)) * (rank + 1)
    ddp(x).sum().backward()  # DDP broadcasts rank 0's buffers first, then each rank updates its own
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, [b.clone() for b in model.buffers()])
    before = gathered
    broadcast_buffers(model, SimpleNamespace(num_processes=2))
    after = [None, None]
    torch.distributed.all_gather_object(after, [b.clone() for b in model.buffers()])
    if rank == 0:
        torch.save({"before": before, "after": after}, out)
    torch.distributed.destroy_process_group()


def test_batchnorm_buffers_are_equal_across_ranks_before_evaluation(tmp_path):
    out = tmp_path / "buffers.pt"
    torch.multiprocessing.spawn(_batchnorm_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    buffers = torch.load(out, weights_only=True)
    mean_before = [b[0] for b in buffers["before"]]
    assert not torch.equal(*mean_before)  # each rank's own running mean after a step under DDP
    for a, b, rank0 in zip(*buffers["after"], buffers["before"][0]):
        assert torch.equal(a, b) and torch.equal(a, rank0)  # rank 0's, which is what the export holds


def test_examples_without_a_label_are_skipped_by_fine_tuning_only(tmp_path, examples):
    shards = tmp_path / "shards"
    write_tar_shards(shards, examples[:40], 20)
    with tarfile.open(shards / "train-00001.tar") as tar:  # the second shard loses its labels
        members = [
            (m.name, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.endswith(".cls")
        ]
    with tarfile.open(shards / "train-00001.tar", "w") as tar:
        for name, data in members:
            _member(tar, name, data)
    common = [f"data.path={shards}", "data.num_workers=0", *STREAM_RUN, "train.max_steps=2"]
    pretrained = run_script("pretrain.py", [f"output_dir={tmp_path / 'pt'}", *common, "mask.patch_size=16"])
    assert pretrained.returncode == 0, pretrained.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "pt" / "log.jsonl").read_text().splitlines()]
    assert [r for r in records if r["kind"] == "train"][-1]["images_skipped"] == 0
    tuned = run_script(
        "finetune.py",
        [f"output_dir={tmp_path / 'ft'}", *common, "model.head=cls", "aug.rand_augment=false",
         "data.max_bad_fraction=0.9"],
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "has no label" in tuned.stderr
    records = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert [r for r in records if r["kind"] == "train"][-1]["images_skipped"] > 0
