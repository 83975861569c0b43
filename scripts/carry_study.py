"""Carry a study that spans several sessions to a machine that shares nothing with this one but what you copy
(a git repository, a disk): `save` copies what the study needs to go on, `restore` puts it back.

    python scripts/carry_study.py save    /work/studies/imagenette_cpu_long studies/imagenette_cpu_long
    python scripts/carry_study.py restore studies/imagenette_cpu_long /work/studies/imagenette_cpu_long

Stop or pause the study before `save`. Restore to the path it was saved from: the stage records and run
configs name it. Then the study's own command goes on: an unfinished run resumes exactly from its newest
checkpoint, finished stages are skipped.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from simmim.rundir import (
    CHECKPOINT_INDEX,
    CHECKPOINTS_DIR,
    COMPILE_CACHE_DIR,
    EXPORT_DIR,
    RUN_CONFIG,
    read_index,
)
from simmim.study.spec import STAGE_RECORD

# The training stages whose weights later stages read (simmim.study.plan): the SimMIM run (its newest
# checkpoint for the reconstruction, its export and snapshots for the probes and fine-tunes) and the teacher.
SOURCES = ("pretrain", "teacher")


def _done(stage: Path) -> bool:
    record = stage / STAGE_RECORD
    return record.is_file() and json.loads(record.read_text()).get("done", False)


def save_stage(src: Path, dst: Path) -> None:
    """One stage directory: a finished student keeps its records and metrics (what the report reads), not its
    weights; any other training run keeps its newest checkpoint alone; nothing keeps a compile cache."""
    training = (src / RUN_CONFIG).is_file()
    skip = {COMPILE_CACHE_DIR}
    if training:
        skip.add(CHECKPOINTS_DIR)
    student_done = training and src.name not in SOURCES and _done(src)
    if student_done:
        skip.add(EXPORT_DIR)
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d) == src and n in skip])
    latest = read_index(src)["latest"] if training and not student_done else None
    if latest is not None:
        if not (src / CHECKPOINTS_DIR / latest).is_dir():
            raise SystemExit(f"{src / CHECKPOINTS_DIR / latest} is gone: stop or pause the study, then save")
        shutil.copytree(src / CHECKPOINTS_DIR / latest, dst / CHECKPOINTS_DIR / latest)
        index = {"latest": latest, "checkpoints": [latest]}
        (dst / CHECKPOINTS_DIR / CHECKPOINT_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save(study: Path, carried: Path) -> None:
    """Copy the study into `carried`, replacing what was there only once the copy is whole."""
    if not study.is_dir():
        raise SystemExit(f"{study}: no such study output directory")
    partial = carried.with_name(carried.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for entry in sorted(study.iterdir()):
        if entry.is_dir():
            save_stage(entry, partial / entry.name)
        else:
            shutil.copy2(entry, partial / entry.name)
    shutil.rmtree(carried, ignore_errors=True)
    partial.rename(carried)
    size = sum(f.stat().st_size for f in carried.rglob("*") if f.is_file())
    print(f"saved {study} into {carried}: {size / 2**20:.1f} MiB")


def restore(carried: Path, study: Path) -> None:
    """Copy `carried` back to `study`, the path it was saved from, which must not exist yet."""
    if not carried.is_dir():
        raise SystemExit(f"{carried}: nothing carried there")
    if study.exists():
        raise SystemExit(f"{study} exists: restore only into a new folder (move that one away first)")
    for config in carried.glob(f"*/{RUN_CONFIG}"):
        saved_at = Path(yaml.safe_load(config.read_text())["output_dir"]).parent
        if saved_at.resolve() != study.resolve():
            raise SystemExit(f"{carried} was saved from {saved_at}: restore it there, not to {study}")
    shutil.copytree(carried, study)
    print(f"restored {carried} into {study}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["save", "restore"])
    parser.add_argument("source", type=Path)
    parser.add_argument("destination", type=Path)
    args = parser.parse_args()
    (save if args.action == "save" else restore)(args.source, args.destination)


if __name__ == "__main__":
    main()
