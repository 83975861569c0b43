"""What a run writes for people to read: a JSON-lines log, and its scalars and images in the experiment
trackers of train.report_to (TensorBoard by default), through accelerate's tracker classes (rank 0 only)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.tracking import (
    LOGGER_TYPE_TO_CLASS,
    GeneralTracker,
    MLflowTracker,
    TensorBoardTracker,
    WandBTracker,
    get_available_trackers,
)

from simmim.config import config_to_dict
from simmim.rundir import LOG_FILE, MLFLOW_DIR, TENSORBOARD_DIR, TRACKER_RUNS

# What to install for each of accelerate's trackers (its own names), for the error that asks for it.
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "mlflow": "mlflow-skinny",
    "wandb": "wandb",
    "aim": "'aim<4'",
    "comet_ml": "comet-ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def check_trackers(report_to: Sequence[str]) -> tuple[str, ...]:
    """The trackers to start (without "none", each once); a one-line ValueError naming the first that
    accelerate does not know or whose package is not installed, with the command that installs it."""
    names = tuple(dict.fromkeys(name for name in report_to if name != "none"))
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            known = ", ".join(sorted(LOGGER_TYPE_TO_CLASS))
            raise ValueError(
                f"train.report_to: {name!r} is not a tracker of the installed accelerate ({known})"
            )
        if name not in available:
            raise ValueError(
                f"train.report_to: {name!r} needs its package, which is not installed: pip install "
                f"{TRACKER_PACKAGES.get(name, name)} (or pip install 'simmim[trackers]'), or drop {name!r}"
            )
    return names


def flat_hyperparameters(config: Any) -> dict[str, Any]:
    """A config (dataclass or nested dict) as {"train.epochs": 100, ...}: values a tracker takes as
    hyperparameters (bool, int, float, str, None; lists as their JSON text)."""
    if dataclasses.is_dataclass(config):
        config = config_to_dict(config)
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= {f"{key}.{k}": v for k, v in flat_hyperparameters(value).items()}
        else:
            flat[key] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


class RunLog:
    """`log.jsonl` plus the trackers of `report_to`, written by the main process only.

    log.jsonl holds every record (numbers and text); the trackers get the numbers, as `<kind>/<key>`, and the
    images. TensorBoard writes `output_dir/tb`; MLflow a file store in `output_dir/mlruns` (experiment and
    run named after output_dir) unless MLFLOW_TRACKING_URI is set; W&B `output_dir/wandb` (project and run
    named after output_dir; WANDB_PROJECT, WANDB_NAME, WANDB_DIR and WANDB_MODE are respected). The resolved
    `config` goes to each tracker's hyperparameters when its run starts (not TensorBoard's: its hparams
    would add a timestamped run under tb/ at every start; config.yaml beside it holds the config).

    On resume at `step`, records after that step (written by a killed run) are dropped from the JSON log
    and TensorBoard is told to purge them, so the logs read as one uninterrupted run. MLflow and W&B
    continue the killed run's tracker run (ids in output_dir/trackers.json); they cannot drop what it logged
    after the checkpoint: MLflow keeps those points beside the redone ones, W&B keeps the first and ignores
    the redone steps (with a warning), the same values where the resume is exact.

    The trackers' packages are checked here, on every process, when the run starts (the config checks only
    the names, so that a saved config stays readable without them): a missing one stops every process
    before the first step with a one-line ValueError, rather than the main process alone mid-run.
    """

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        resume_step: int = 0,
        report_to: Sequence[str] = ("tensorboard",),
        config: Any = None,
    ) -> None:
        names = check_trackers(report_to)
        self.enabled = enabled
        out = Path(output_dir)
        self.path = out / LOG_FILE
        self.trackers: list[GeneralTracker] = []
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():  # a previous attempt: keep what the resumed state has seen
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        runs_path = out / TRACKER_RUNS
        # A run that restarts from step 0 (killed before its first checkpoint) starts new tracker runs.
        runs = json.loads(runs_path.read_text()) if resume_step > 0 and runs_path.is_file() else {}
        hyperparameters = flat_hyperparameters(config) if config is not None else None
        if names:
            PartialState()  # accelerate's trackers log through its state: the Accelerator's, or one process's
        for name in names:
            tracker = _new_tracker(name, out, resume_step, runs.get(name))
            tracker.start()
            run_id = _run_id(tracker)
            continued = run_id is not None and run_id == runs.get(name, {}).get("id")
            if hyperparameters is not None and name != "tensorboard" and not continued:
                tracker.store_init_configuration(hyperparameters)
            if run_id is not None:
                runs[name] = {"id": run_id, **_store(name)}
            self.trackers.append(tracker)
        if runs:
            runs_path.write_text(json.dumps(runs, indent=1) + "\n")

    def write(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            f"{kind}/{key}": value
            for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if scalars:
            for tracker in self.trackers:
                tracker.log(scalars, step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """image: (3, H, W) float in [0, 1]; to the trackers that take images."""
        if not self.enabled or not self.trackers:
            return
        pixels = (
            (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        )
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: image[None]}, step=step)  # as (1, 3, H, W) floats
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_image(pixels, key=tag, step=step)  # under the run's artifacts, images/
            elif tracker.name == "aim":
                tracker.log_images({tag: pixels}, step=step)
            elif hasattr(tracker, "log_images"):  # W&B and the others: a list of images per tag
                tracker.log_images({tag: [pixels]}, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            if tracker.name == "mlflow":  # log_image uploads in the background, and end_run does not wait
                import mlflow

                getattr(mlflow, "flush_artifact_async_logging", lambda: None)()
            tracker.finish()
        self.trackers = []


def _new_tracker(name: str, out: Path, resume_step: int, previous: dict | None) -> GeneralTracker:
    """accelerate's tracker `name` for the run in `out`; `previous`: the tracker run to continue."""
    if name == "tensorboard":
        # output_dir/tb, as ever (the "run name" is the directory under output_dir). Events logged after
        # the checkpoint (by a killed run) are replaced by the resumed run's.
        return TensorBoardTracker(TENSORBOARD_DIR, out, purge_step=resume_step + 1)
    if name == "mlflow":
        import mlflow

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or _mlruns(out))
        same_store = previous is not None and previous.get("store") == mlflow.get_tracking_uri()
        return MLflowTracker(out.name, run_name=out.name, run_id=previous["id"] if same_store else None)
    if name == "wandb":
        kwargs: dict[str, Any] = {}
        if "WANDB_NAME" not in os.environ:
            kwargs["name"] = out.name
        if "WANDB_DIR" not in os.environ:
            kwargs["dir"] = str(out)
        if previous is not None:
            kwargs |= dict(id=previous["id"], resume="allow")
        return WandBTracker(os.environ.get("WANDB_PROJECT", out.name), **kwargs)
    tracker_class = LOGGER_TYPE_TO_CLASS[name]  # the others as accelerate starts them, named after the run
    return (
        tracker_class(out.name, out) if tracker_class.requires_logging_directory else tracker_class(out.name)
    )


def _mlruns(out: Path) -> str:
    """The default MLflow store, a file store in output_dir/mlruns. MLflow 3.7+ keeps file stores in
    maintenance mode behind MLFLOW_ALLOW_FILE_STORE (a database needs SQLAlchemy, which mlflow-skinny
    lacks); MLFLOW_TRACKING_URI=sqlite:///... chooses a database instead."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (out / MLFLOW_DIR).resolve().as_uri()


def _store(name: str) -> dict[str, str]:
    """Where the tracker `name` keeps its runs, when a run id means something only there (MLflow)."""
    if name != "mlflow":
        return {}
    import mlflow

    return {"store": mlflow.get_tracking_uri()}


def _run_id(tracker: GeneralTracker) -> str | None:
    """The id by which a resumed run continues the tracker's run (MLflow's and W&B's), else None."""
    if tracker.name == "mlflow":
        return tracker.active_run.info.run_id
    if tracker.name == "wandb":
        return tracker.run.id
    return None
