"""A study: does SimMIM pretraining pay off, and by how much, compared fairly, from one spec file.

Every stage is a run of our own scripts, so the study measures exactly what users run. Stages, in order,
each a directory under the study's output_dir:
  pretrain              scripts/pretrain.py on the train split (labels unused); with train.snapshot_epochs
                        it also keeps the encoder after those epochs (the pretraining-length curve)
  reconstruction        scripts/eval_reconstruction.py of the pretrained model on the validation split
  probe, probe_e<N>     scripts/eval_probe.py (kNN, linear, partial fine-tune) of the final encoder, with the random-init
                        baseline, and of every snapshot
  teacher               (only with a distilled arm) the CNN teacher, then teacher/final, its last weights
  <arm>_sweep<i>        each candidate setting of the sweep, for every tuned arm, trained on the train split
                        minus a held-out carve and judged on that carve: never on the validation split
  <arm>_p<pct>_s<seed>  each arm at each label fraction (class-balanced, drawn by the seed) and seed
Then results.md, the plots and study.json in output_dir.

Fairness: arms of a comparison may differ only in what it is about (the init, the head, the label
fraction) and in the values the same sweep chose for each; anything else is refused unless the comparison
lists it under `allow`. `describe_comparisons` prints, for each comparison, where its arms differ.

A finished stage is skipped; an interrupted one resumes from its newest checkpoint when the same command
runs again (the scripts resume from their output_dir). `scripts/study.py` is the command line.
"""

from simmim.errors import StageFailed
from simmim.study.fairness import describe_comparisons
from simmim.study.plan import load_spec, plan
from simmim.study.report import write_report
from simmim.study.runner import run_study
from simmim.study.spec import StudySpec

__all__ = [
    "StageFailed",
    "StudySpec",
    "describe_comparisons",
    "load_spec",
    "plan",
    "run_study",
    "write_report",
]
