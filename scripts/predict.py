"""Classify images with an exported classifier (simmim's or any Transformers-format DeiT classifier).

    python scripts/predict.py --model runs/finetune/export --top-k 3 photo.jpg folder_of_photos/

Prints one JSON line per image, like Transformers' image-classification pipeline:
    {"image": "photo.jpg", "predictions": [{"label": "tench", "score": 0.93}, ...]}
Images that cannot be decoded, or have another channel count than the model's, are reported on stderr and
skipped. Images of any bit depth and channel count are read as training read them (the model's
num_channels; integers scaled by their type's range or the run's data.max_value), then preprocessed by the
export's preprocessor_config.json (its size and per-channel statistics).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from simmim.cli import run_main
from simmim.data import decode_image
from simmim.data.decoding import IMAGE_EXTENSIONS
from simmim.data.pixels import to_model_pixels
from simmim.exports import logits_of, open_classifier


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an exported classifier directory")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    args = parser.parse_args()
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    files = []
    for item in map(Path, args.images):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            files.append(item)
        else:
            parser.error(f"{item} does not exist")
    opened = open_classifier(args.model)
    model, processor, id2label = opened.model, opened.processor, opened.id2label
    k = min(args.top_k, len(id2label))
    for start in range(0, len(files), args.batch_size):
        chunk = []
        for f in files[start : start + args.batch_size]:
            image = decode_image(f, str(f))
            if image is None:
                print(f"skipped {f}: not a readable image", file=sys.stderr)
                continue
            try:
                chunk.append((f, to_model_pixels(image, opened.num_channels, opened.max_value, str(f))))
            except ValueError as error:  # another channel count, or non-finite pixels
                print(f"skipped {f}: {error}", file=sys.stderr)
        if not chunk:
            continue
        # 8-bit images come as PIL images or uint8 tensors (rescaled by the processor), the others as [0, 1]
        # float tensors
        eight_bit = [isinstance(image, Image.Image) or image.dtype == torch.uint8 for _, image in chunk]
        pixel_values = torch.cat(
            [processor(image, do_rescale=rescale)["pixel_values"] for (_, image), rescale in zip(chunk, eight_bit)]
        )
        with torch.no_grad():
            probs = logits_of(model(pixel_values)).softmax(-1)
        scores, indices = probs.topk(k, dim=-1)
        for (f, _), s, i in zip(chunk, scores.tolist(), indices.tolist()):
            predictions = [{"label": id2label[j], "score": round(p, 6)} for p, j in zip(s, i)]
            print(json.dumps({"image": str(f), "predictions": predictions}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
