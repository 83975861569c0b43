"""Carry a study that spans several sessions between machines that keep nothing but the repository.

The long CPU study (recipes/study/imagenette_cpu_long.yaml) needs more hours than a session has, and this
project's machines keep no folder outside git from one session to the next. `save` copies into the
repository what the study needs to go on; `restore` puts it back where the study runs; then the study's own
command resumes (the pretraining from its newest checkpoint, exactly; finished stages are skipped).

    python recipes/study/carry_study.py save    /work/studies/imagenette_cpu_long studies/imagenette_cpu_long
    python recipes/study/carry_study.py restore studies/imagenette_cpu_long /work/studies/imagenette_cpu_long

What is carried, per stage directory:
- an unfinished training run: everything but its compile cache, with only its newest checkpoint
  (checkpoints/index.json rewritten to name it alone: about 32 MB for the study's model and AdamW state);
- a finished pretraining: everything but its checkpoints and compile cache (its export and snapshots are the
  inits of the fine-tunes and the probes);
- a finished fine-tune: its records and metrics (what the study's report reads), not its weights;
- everything else (probes, reconstructions, study.json): whole.
`save` replaces the destination, so that the repository holds one state of the study, not a history of
them (git's history still does).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

STAGE_RECORD = "study_stage.json"  # simmim.study.spec.STAGE_RECORD, read without importing torch
NEVER = {"compile_cache"}


def _stage_done(stage: Path) -> bool:
    record = stage / STAGE_RECORD
    return record.is_file() and json.loads(record.read_text()).get("done", False)


def _copy_checkpoints(src: Path, dst: Path) -> None:
    """The newest checkpoint alone, and an index that names only it."""
    index = json.loads((src / "index.json").read_text())
    latest = index["latest"]
    dst.mkdir(parents=True)
    shutil.copytree(src / latest, dst / latest)
    (dst / "index.json").write_text(json.dumps({"latest": latest, "checkpoints": [latest]}, indent=2) + "\n")


def save_stage(src: Path, dst: Path) -> None:
    done, training = _stage_done(src), (src / "config.yaml").is_file()
    fine_tune = training and src.name != "pretrain"
    skip = set(NEVER)
    if training:
        skip.add("checkpoints")
    if done and fine_tune:
        skip.add("export")
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d) == src and n in skip])
    if training and not done and (src / "checkpoints" / "index.json").is_file():
        _copy_checkpoints(src / "checkpoints", dst / "checkpoints")


def save(study: Path, carried: Path) -> None:
    if not study.is_dir():
        raise SystemExit(f"{study}: no such study output directory")
    if carried.exists():
        shutil.rmtree(carried)
    carried.mkdir(parents=True)
    for entry in sorted(study.iterdir()):
        if entry.is_dir():
            save_stage(entry, carried / entry.name)
        else:
            shutil.copy2(entry, carried / entry.name)
    size = sum(f.stat().st_size for f in carried.rglob("*") if f.is_file())
    print(f"saved {study} into {carried}: {size / 2**20:.1f} MiB")


def restore(carried: Path, study: Path) -> None:
    if not carried.is_dir():
        raise SystemExit(f"{carried}: nothing carried there")
    if study.exists():
        raise SystemExit(f"{study} exists: restore only into a new folder (move it away first)")
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
