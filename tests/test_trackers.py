"""train.report_to: RunLog's trackers (through accelerate's tracker classes) in process, each read back from
what it wrote: TensorBoard's events, MLflow's file store, W&B's offline run. log.jsonl stays the run's own
record. MLflow and W&B are optional (`simmim[trackers]`): their tests skip where they are not installed."""

from __future__ import annotations

import glob
import json
import struct
import time
import typing

import pytest
import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from simmim import run_log
from simmim.config import PretrainConfig, Tracker, load_config
from simmim.run_log import TRACKER_PACKAGES, RunLog, flat_hyperparameters


def _config(out, *overrides):
    return load_config(PretrainConfig, overrides=[f"output_dir={out}", "train.epochs=3", *overrides])


def _log_a_little(log: RunLog) -> None:
    """The records a run writes: text and numbers at its start, train losses, an evaluation and its grid."""
    log.write(0, {"total_steps": 4, "why": "a reason"}, kind="schedule")
    for step in (1, 2, 3):
        log.write(step, {"loss": 1.0 / step, "lr": 0.01, "epoch": step / 4})
    log.write(3, {"masked_l1": 0.25}, kind="eval")
    log.image("eval/reconstructions", torch.rand(3, 8, 12), 3)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_default_is_tensorboard_in_tb_beside_log_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert _config(out).train.report_to == ("tensorboard",)
    log = RunLog(out, True, config=_config(out))
    _log_a_little(log)
    log.close()
    assert [(r["kind"], r["step"]) for r in _records(out)] == [
        ("schedule", 0),
        *[("train", s) for s in (1, 2, 3)],
        ("eval", 3),
    ]
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "tb"]  # no hparams run under tb/
    events = EventAccumulator(str(out / "tb")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 0.5),
        (3, pytest.approx(1 / 3)),
    ]
    assert "schedule/why" not in events.Tags()["scalars"] and events.Tags()["images"] == [
        "eval/reconstructions"
    ]

    # a resume at step 2: log.jsonl and TensorBoard drop what the killed run logged after it
    log = RunLog(out, True, resume_step=2)
    log.write(3, {"loss": 0.3})
    log.close()
    assert [r.get("loss") for r in _records(out)] == [None, 1.0, 0.5, 0.3]
    events = EventAccumulator(str(out / "tb")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 0.5),
        (3, pytest.approx(0.3)),
    ]


@pytest.mark.parametrize("report_to", ["none", "[]"])
def test_none_writes_only_log_jsonl(tmp_path, report_to):
    out = tmp_path / "run"
    cfg = _config(out, f"train.report_to={report_to}")
    log = RunLog(out, True, report_to=cfg.train.report_to, config=cfg)
    _log_a_little(log)
    log.close()
    assert [p.name for p in out.iterdir()] == ["log.jsonl"] and len(_records(out)) == 5


def test_other_processes_write_nothing(tmp_path):
    log = RunLog(tmp_path / "run", False, config=_config(tmp_path / "run"))
    _log_a_little(log)
    log.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["train.report_to=[tensorboard, wanb]", "train.report_to=wanb"])
def test_an_unknown_tracker_is_one_line_naming_it_and_the_accepted_names(override):
    with pytest.raises(ValueError) as e:
        _config("x", override)
    message = str(e.value)
    assert "\n" not in message and "'wanb'" in message
    assert all(f'"{name}"' in message for name in ("tensorboard", "mlflow", "wandb", "none"))
    with pytest.raises(ValueError, match='must be "none" alone'):
        _config("x", "train.report_to=[none, mlflow]")


def test_the_config_offers_accelerates_trackers():
    names = set(typing.get_args(Tracker)) - {"none"}
    assert names <= set(LOGGER_TYPE_TO_CLASS) and names <= set(TRACKER_PACKAGES)
    assert _config("x", "train.report_to=[tensorboard, mlflow]").train.report_to == ("tensorboard", "mlflow")


def test_a_missing_package_is_one_line_with_the_pip_command_before_anything_is_written(tmp_path, monkeypatch):
    without_wandb = [t for t in get_available_trackers() if str(t) != "wandb"]
    monkeypatch.setattr(run_log, "get_available_trackers", lambda: without_wandb)
    for main_process in (True, False):  # every process refuses, so that none waits for the others
        with pytest.raises(ValueError) as e:
            RunLog(tmp_path / "run", main_process, report_to=("tensorboard", "wandb"))
        message = str(e.value)
        assert "\n" not in message and "'wandb'" in message and "pip install wandb" in message
    assert not (tmp_path / "run").exists()


def test_hyperparameters_are_the_flattened_config():
    flat = flat_hyperparameters(_config("x", "train.report_to=[tensorboard, mlflow]"))
    assert flat["train.epochs"] == 3 and flat["train.report_to"] == '["tensorboard", "mlflow"]'
    assert flat["data.mean"] == "[0.485, 0.456, 0.406]" and flat["train.max_steps"] is None
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_mlflow_file_store_under_output_dir(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)  # and restored: RunLog allows the file store it chooses
    out = tmp_path / "run"
    log = RunLog(out, True, report_to=("mlflow",), config=_config(out))
    _log_a_little(log)
    log.close()
    assert not (out / "tb").exists() and len(_records(out)) == 5
    client = mlflow.MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["id"]
    run = client.get_run(run_id)
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "run"
    assert run.data.params["train.epochs"] == "3" and run.data.params["train.report_to"] == '["tensorboard"]'
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert run.data.metrics["eval/masked_l1"] == 0.25 and "schedule/why" not in run.data.metrics
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any(p.endswith(".png") and "step+3" in p for p in images), images

    # a resume continues the run, without logging the hyperparameters again
    log = RunLog(out, True, resume_step=2, report_to=("mlflow",), config={"extra": 1})
    log.write(4, {"loss": 0.2})
    log.close()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert "extra" not in client.get_run(run_id).data.params
    assert len(client.search_runs([run.info.experiment_id])) == 1


def _wandb_records(run_dir):
    """The records of an offline W&B run's .wandb file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "run-*.wandb"))
    data, pos, block, chunk = open(path, "rb").read(), 7, 32768, b""  # after the 7-byte file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a record whole, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _finished_wandb_records(run_dir, timeout_s: float = 30.0) -> list:
    """The records once the run's exit is among them: wandb-core writes the file a moment after finish()
    returns (the run's process would wait for it at exit)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(_wandb_records(run_dir))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_wandb_offline_run_under_output_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    log = RunLog(out, True, report_to=("wandb",), config=_config(out))
    _log_a_little(log)
    log.close()
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["id"]
    (run_dir,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    history, config = {}, {}
    for record in _finished_wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = items
        elif record.WhichOneof("record_type") == "run":
            assert record.run.project == "run" and record.run.display_name == "run"
        elif record.WhichOneof("record_type") == "config":  # the hyperparameters
            config |= {i.key: json.loads(i.value_json) for i in record.config.update}
    assert [history[s]["train/loss"] for s in (1, 2, 3)] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert (
        history[3]["eval/masked_l1"] == 0.25
        and history[3]["eval/reconstructions/_type"] == "images/separated"
    )
    assert config["train.epochs"] == 3 and config["train.report_to"] == '["tensorboard"]'
    assert list(run_dir.glob("files/media/images/eval/reconstructions_3_*.png"))

    # a resume continues the run (offline: a second directory of the same id, which `wandb sync` joins)
    log = RunLog(out, True, resume_step=2, report_to=("wandb",), config={"extra": 1})
    log.write(4, {"loss": 0.2})
    log.close()
    assert json.loads((out / "trackers.json").read_text())["wandb"]["id"] == run_id
    (_, resumed) = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    records = _finished_wandb_records(resumed)
    assert not any(
        r.WhichOneof("record_type") == "config" and r.config.update[0].key == "extra" for r in records
    )
    assert any(r.WhichOneof("record_type") == "history" and r.history.step.num == 4 for r in records)
