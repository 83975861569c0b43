"""Data for SimMIM pretraining and DeiT fine-tuning: sources (folders, Hugging Face, synthetic), robust
decoding, torchvision-v2 transforms, and seeded, resumable batching.

    source = open_source("synthetic", "train")
    dataset = MaskedImageDataset(source, pretrain_transform(192), MaskGenerator(192))
    loader = build_loader(dataset, batch_size=64, shuffle=True, drop_last=True, num_workers=8, seed=0,
                          collate_fn=collate_pretrain)
"""

from simmim.data.decoding import BadImageError, check_bad_fraction, decode_image
from simmim.data.loader import (
    EpochBatchSampler,
    LabeledImageDataset,
    MaskedImageDataset,
    build_loader,
    collate_classification,
    collate_pretrain,
    derive_seed,
)
from simmim.data.sources import ImageSource, open_source
from simmim.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MixUpCutMix,
    NoisyRandAugment,
    eval_transform,
    finetune_transform,
    pretrain_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageError",
    "EpochBatchSampler",
    "ImageSource",
    "LabeledImageDataset",
    "MaskedImageDataset",
    "MixUpCutMix",
    "NoisyRandAugment",
    "build_loader",
    "check_bad_fraction",
    "collate_classification",
    "collate_pretrain",
    "decode_image",
    "derive_seed",
    "eval_transform",
    "finetune_transform",
    "open_source",
    "pretrain_transform",
]
