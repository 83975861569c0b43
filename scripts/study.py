"""Run a whole study (pretraining, its reconstruction and probe evaluations, the sweep, every arm at every
label fraction and seed, a CNN teacher when an arm distils) and write its table and plots.

    python scripts/study.py recipes/study/imagenette_cpu.yaml
    python scripts/study.py recipes/study/imagenette_gpu.yaml --launcher "accelerate launch"

Run the same command again after an interruption: finished stages are skipped and the interrupted one
resumes from its newest checkpoint. `--report` rewrites results.md and the plots from finished stages
(marked partial while stages are missing); `--only pretrain` runs just the named stages.
"""

import argparse
import shlex
import sys

from simmim.cli import run_main
from simmim.study import describe_comparisons, load_spec, plan, run_study, write_report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="a study file, e.g. recipes/study/imagenette_cpu.yaml")
    parser.add_argument("--out", help="output directory (default: the study file's output_dir)")
    parser.add_argument("--launcher", default=None, help="how to start each script (default: this python)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages' commands and exit")
    parser.add_argument("--report", action="store_true", help="only write the report of finished stages")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (no report)")
    args = parser.parse_args()

    spec = load_spec(args.spec, args.out)  # a bad spec: one line, exit code 2 (simmim.cli)
    if args.dry_run:
        for stage in plan(spec):
            state = "done" if stage.record["done"] else "to run"
            if stage.pending:
                state += ", with the setting its sweep chooses; shown with the first candidate"
            print(f"{stage.name} ({state}): scripts/{stage.script} {shlex.join(stage.args)}")
        for line in describe_comparisons(spec):
            print(f"comparison: {line}")
        return 0
    if args.report:
        print(write_report(spec))
        return 0
    names = {stage.name for stage in plan(spec)}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        raise ValueError(f"--only {unknown}: no such stage (stages: {sorted(names)})")
    try:  # a failed stage: one line, exit code 1 (simmim.errors.StageFailed)
        report = run_study(spec, shlex.split(args.launcher) if args.launcher else None, args.only)
    except KeyboardInterrupt:
        print("stopped: run the same command again to resume", file=sys.stderr)
        return 130
    print(f"\nwrote {report}" if report else f"\nran {', '.join(args.only)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
