"""Running a study: every stage not yet done, in order, each a subprocess; then the report."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from simmim.config import load_config
from simmim.errors import StageFailed
from simmim.rundir import ABSENT, config_changes
from simmim.study.fairness import describe_comparisons
from simmim.study.plan import Stage, plan
from simmim.study.report import write_report
from simmim.study.spec import SCRIPTS, STAGE_RECORD, StudySpec


def run_stage(stage: Stage, launcher: list[str]) -> float:
    """Run one stage to completion (resuming it if it was interrupted); returns its total wall time."""
    record = stage.record
    command = [*launcher, str(SCRIPTS / stage.script), *stage.args]
    print(f"\n== {stage.name}: {shlex.join(command)}", flush=True)
    start = time.time()
    proc = subprocess.Popen(command)
    returncode = None
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the run too; a SIGTERM sent to the study alone is passed on. Training runs save a
        # checkpoint and exit; wait for that, so that no orphan keeps writing the stage's directory.
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    finally:  # the time of an interrupted attempt counts too: the stage's wall time is what it cost
        record.update(
            seconds=record["seconds"] + time.time() - start,
            command=shlex.join(command),
            args=stage.args,
            done=returncode == 0,
        )
        stage.directory.mkdir(parents=True, exist_ok=True)
        (stage.directory / STAGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if returncode != 0:
        raise StageFailed(f"stage {stage.name} failed (exit {returncode}); run the same command to resume")
    return record["seconds"]


# Settings a run resolves from the machine or the launch, not from the study: they may differ between the
# sessions of one study (the loader's workers follow the CPUs; FSDP's settings follow an accelerate launch
# config, simmim.launch.follow_launcher).
_RESOLVED_AT_RUN = (
    "data.num_workers", "train.fsdp", "train.fsdp_reshard_after_forward", "train.activation_checkpointing"
)  # fmt: skip


def _changed_settings(stage: Stage) -> list[str]:
    """The settings in which the study's config for `stage` differs from the one its run started with, as
    "key: saved -> now"; keys that only one version of simmim knows are not settings of this study."""
    if stage.config is None:
        return []
    cfg = load_config(*stage.config)
    resolved = list(_RESOLVED_AT_RUN)
    if cfg.data.normalize == "dataset" and cfg.data.mean is None:
        resolved += ["data.mean", "data.std"]  # filled from the data when the run starts
    changes = config_changes(stage.directory, cfg)
    return [
        f"{key}: {old!r} -> {new!r}"
        for key, (old, new) in changes.items()
        if key not in resolved and old is not ABSENT and new is not ABSENT
    ]


def _check_reuse(stages: list[Stage]) -> None:
    """A stage, finished or interrupted, is reused (or resumed) only if the study would run it the same way:
    the same arguments, and the same resolved config as its run saved (an edited recipe shows there)."""
    for stage in stages:
        if stage.pending:
            continue
        ran = stage.record.get("args")
        if stage.record["done"] and ran is not None and ran != stage.args:
            raise ValueError(
                f"{stage.directory} was made by `{shlex.join(ran)}`, this study runs `{shlex.join(stage.args)}`: "
                "use another output directory (--out) or delete that stage"
            )
        changed = _changed_settings(stage)
        if changed:
            shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise ValueError(
                f"{stage.directory} ran with other settings than this study gives it ({shown}): restore the "
                "recipe, or use another output directory (--out) or delete that stage"
            )


def run_study(
    spec: StudySpec, launcher: list[str] | None = None, only: list[str] | None = None
) -> Path | None:
    """Run every stage not yet done, then write the report; returns the path of results.md.

    With `only` (stage names), run just those stages and write no report (e.g. start the long pretraining
    first); the study's later run skips them as done."""
    if not SCRIPTS.is_dir():
        raise FileNotFoundError(
            f"{SCRIPTS} not found: a study runs the scripts of a source checkout of simmim"
        )
    launcher = launcher or [sys.executable]
    _check_reuse(plan(spec))
    for line in describe_comparisons(spec):
        print(f"comparison: {line}", flush=True)
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    # A SIGTERM (a job scheduler's stop) ends the study as Ctrl-C does: the running stage saves and stops.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:  # plan again after every stage: a finished sweep settles the runs that wait for it
            stages = plan(spec)
            _check_reuse(stages)
            todo = [s for s in stages if not s.record["done"] and (only is None or s.name in only)]
            if not todo:
                break
            stage = todo[0]
            if stage.pending:
                raise RuntimeError(f"stage {stage.name} waits for a sweep that has not run")  # plan's order
            print(f"== stage {stages.index(stage) + 1}/{len(stages)} ({len(todo)} to run)", flush=True)
            run_stage(stage, launcher)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return write_report(spec) if only is None else None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
