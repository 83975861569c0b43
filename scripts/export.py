"""Export a training checkpoint of a pretraining or fine-tuning run as a Transformers-format directory.

    python scripts/export.py runs/smoke --out runs/smoke/export_step40 [--checkpoint runs/smoke/checkpoints/step_00000040]

Without --checkpoint, the newest checkpoint of the run is exported. The result holds config.json,
model.safetensors and preprocessor_config.json (a CNN run: cnn_config.json instead of config.json).
"""

import argparse
import sys

from simmim.cli import run_main
from simmim.exports import export_run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="the run's output_dir")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--checkpoint", help="a checkpoint directory of the run (default: the newest)")
    args = parser.parse_args()
    sys.exit(run_main(lambda: print(export_run(args.run_dir, args.out, args.checkpoint))))
