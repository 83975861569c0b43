"""SimMIM pretraining of a DeiT encoder.

    accelerate launch scripts/pretrain.py --recipe recipes/smoke/pretrain_synthetic.yaml output_dir=runs/smoke
    python scripts/pretrain.py --recipe recipes/pretrain/imagenette_cpu.yaml output_dir=runs/pt data.num_workers=2

Settings: dataclass defaults (`simmim/config.py`), then the recipe, then `key.sub=value` overrides;
`--help` lists every key. Re-running the same command resumes from the newest checkpoint in output_dir.
"""

import sys

from simmim.cli import parse_cli, run_main
from simmim.config import PretrainConfig
from simmim.pretrain import run


def main() -> None:
    run(parse_cli(PretrainConfig, sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(run_main(main))
