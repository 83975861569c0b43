"""Fine-tune a DeiT with a classification head or DeiT's distillation head, or train a CNN teacher.

    python scripts/finetune.py --recipe recipes/finetune/imagenette_teacher_cpu.yaml output_dir=runs/teacher
    accelerate launch scripts/finetune.py --recipe recipes/finetune/imagenette_distill_simmim_cpu.yaml \
        model.init=runs/pretrain teacher.path=runs/teacher/export output_dir=runs/distill

Settings: dataclass defaults (`simmim/config.py`), then the recipe, then `key.sub=value` overrides;
`--help` lists every key. Re-running the same command resumes from the newest checkpoint in output_dir.
"""

import sys

from simmim.cli import parse_cli, run_main
from simmim.config import FinetuneConfig
from simmim.finetune import run


def main() -> None:
    run(parse_cli(FinetuneConfig, sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(run_main(main))
