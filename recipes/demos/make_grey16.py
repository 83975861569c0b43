"""A 12-bit grey sensor's version of Imagenette's train split, as 16-bit PNGs (the demonstration of
recipes/demos/grey16_imagenette.sh; never written into the repository).

    python recipes/demos/make_grey16.py ../shared/data/imagenette runs/demos/grey16_data

Each JPEG becomes grey (PIL's ITU-R 601 luma), is resized to 80 x 80 (bicubic) and widened to 12 bits as a
sensor would record it: value * 16 plus read noise (normal, 2 counts) and a uniform dither over the 4 new
low bits, rounded and clipped to [0, 4095], stored in a 16-bit PNG the way 12-bit X-ray and microscopy
cameras store theirs. Its pixels then fill only 1/16 of the 16-bit range: what ImageNet's statistics get
wrong. Seeded per image (its index in sorted order), so the folder is the same on every machine.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

SIZE = 80


def sensor_image(path: Path, seed: int) -> np.ndarray:
    grey = Image.open(path).convert("L").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    values = np.asarray(grey, dtype=np.float64) * 16 + rng.uniform(0, 16, (SIZE, SIZE)) + rng.normal(0, 2, (SIZE, SIZE))
    return np.clip(np.rint(values), 0, 4095).astype(np.uint16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("imagenette", help="the ImageFolder root holding train/<class>/*.JPEG")
    parser.add_argument("out", help="folder to write (train/<class>/*.png)")
    args = parser.parse_args()
    files = sorted((Path(args.imagenette) / "train").glob("*/*.JPEG"))
    if not files:
        parser.error(f"{args.imagenette}/train holds no */*.JPEG")
    for seed, path in enumerate(tqdm(files, desc="12-bit grey")):
        target = Path(args.out) / "train" / path.parent.name / (path.stem + ".png")
        if target.is_file():
            continue  # a second run completes an interrupted one
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sensor_image(path, seed)).save(target)
    print(f"{len(files)} images in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
