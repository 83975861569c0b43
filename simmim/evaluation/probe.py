"""Probes of a frozen encoder: what its features know about labels SimMIM never saw.

Two probes on features of chosen blocks (average-pooled patch tokens, or the class token):
- kNN: cosine similarity, k nearest training features vote with weight exp(sim / T) (DINO's weighted kNN,
  Caron et al. 2021, T = 0.07);
- linear: a linear classifier behind BatchNorm without affine parameters (MAE's linear probe, He et al.
  2022), trained on the cached features with SGD.
and a third that trains a little of the encoder:
- partial: MAE's partial fine-tuning with one block (He et al. 2022, Fig. 9): the last block and the final
  LayerNorm trained from the encoder's weights, with a new linear head on their average-pooled patch tokens;
  the earlier blocks frozen, so the tokens entering the last block are computed once and cached.

The protocol is the one the SimMIM authors describe (microsoft/SimMIM#14): average-pooled patch tokens, no
class token, intermediate blocks as well as the last. An intermediate block's features are its output, the
residual stream before any LayerNorm (the next block normalises its own input); the last block's are taken
after the encoder's final LayerNorm, which SimMIM trains (the decoder reads its output), so it is no random
normalisation that could hide the features (MAE's probe meets that problem with an untrained fc_norm,
facebookresearch/mae#186). Pooling comes after that LayerNorm, as in fine-tuning. The linear probe's
BatchNorm then standardises every feature, so that the scale of the residual stream does not matter.
Features are computed once per (encoder, split) and cached; each probe then costs seconds.
`scripts/eval_probe.py` is the command line; pretraining's online probe (`train.probe_every_steps`) uses
`knn_classify` on a labelled split.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from simmim.data import LabeledImageDataset, build_loader, collate_classification, eval_transform, open_source
from simmim.data.sources import holdout_split, random_subset
from simmim.exports import open_model
from simmim.models import DeiTModel
from simmim.rundir import METRICS_FILE

KNN_K = 20
KNN_TEMPERATURE = 0.07  # DINO's
POOLS = ("avg", "cls")
PROBES = ("knn", "linear", "partial")
PLOT_FILE = "probe.png"  # top-1 by block, beside metrics.json


# ---------------------------------------------------------------------------------------------- encoders
@dataclass
class Encoder:
    model: DeiTModel
    mean: list[float]
    std: list[float]
    source: str  # what was loaded, for metrics.json
    num_channels: int = 3
    max_value: float | None = None  # what integer pixels were divided by in training (None: their range)


def load_encoder(checkpoint: str | Path, num_heads: int | None = None) -> Encoder:
    """The DeiT encoder of any model `simmim.exports.open_model` opens (a SimMIM run or export, a fine-tuned
    classifier, a Transformers DeiT directory, a timm file with `num_heads` heads), its heads dropped."""
    opened = open_model(checkpoint, DeiTModel, what="--checkpoint", num_heads=num_heads)
    # Only the pooler (unused by the probes) and a distillation token made from the class token may be new.
    lacking = [
        k
        for k in opened.info.get("missing_keys", [])
        if not k.startswith("pooler.") and k != "embeddings.distillation_token"
    ]
    if lacking:
        raise ValueError(
            f"--checkpoint {str(opened.path)!r} lacks encoder weights {lacking[:4]}: not a DeiT/ViT encoder"
        )
    channels = opened.model.config.num_channels
    return Encoder(opened.model.eval(), opened.mean, opened.std, str(opened.path), channels, opened.max_value)


def default_layers(depth: int) -> list[int]:
    """Four evenly spaced blocks ending with the last, e.g. 12 -> [3, 6, 9, 12], 6 -> [2, 3, 5, 6]."""
    return sorted({max(1, math.floor(depth * k / 4 + 0.5)) for k in range(1, 5)})  # half rounds up


# ---------------------------------------------------------------------------------------------- features
def _check_layers(model: DeiTModel, layers: Sequence[int]) -> None:
    depth = model.config.num_hidden_layers
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad:
        raise ValueError(f"layers {bad} are outside 1..{depth}, the encoder's blocks")


@torch.no_grad()
def features_of(
    model: DeiTModel, pixel_values: torch.Tensor, layers: Sequence[int], pool: str = "avg", bf16: bool = False
) -> dict[int, torch.Tensor]:
    """{layer: (B, D) float32} for one batch of (B, C, H, W) images.

    Layer l is the output of block l (1-based); the last block's is taken after the encoder's final
    LayerNorm, as the encoder outputs it. `avg` averages the patch tokens, `cls` takes the class token;
    `tokens` keeps every token of block l's output, before any LayerNorm ((B, prefix + N, D); layer 0 is
    the embeddings), the input of block l + 1 for the partial fine-tuning probe.
    """
    depth = model.config.num_hidden_layers
    with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True)
    prefix = model.num_prefix_tokens
    feats = {}
    for layer in layers:
        if pool == "tokens":
            feats[layer] = out.hidden_states[layer].float()
            continue
        h = out.last_hidden_state if layer == depth else out.hidden_states[layer]  # (B, prefix + N, D)
        feats[layer] = (h[:, prefix:].mean(1) if pool == "avg" else h[:, 0]).float()  # (B, D)
    return feats


@torch.no_grad()
def extract_features(
    model: DeiTModel,
    dataset: LabeledImageDataset,
    layers: Sequence[int],
    pool: str = "avg",
    batch_size: int = 128,
    num_workers: int = 2,
    bf16: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Features of every readable image of `dataset` (see `features_of`): ({layer: (N, D)}, (N,) labels)."""
    if pool not in (*POOLS, "tokens"):
        raise ValueError(f"pool={pool!r}, expected one of {POOLS}")
    if pool != "tokens":
        _check_layers(model, layers)
    model = model.to(device).eval()
    loader = build_loader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers, seed=0,
        collate_fn=collate_classification,
    )  # fmt: skip
    feats: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    labels = []
    for batch in loader:
        if len(batch["index"]) == 0:
            continue
        for layer, f in features_of(model, batch["pixel_values"].to(device), layers, pool, bf16).items():
            feats[layer].append(f.cpu())
        labels.append(batch["labels"])
    return {layer: torch.cat(f) for layer, f in feats.items()}, torch.cat(labels)


class OnlineProbe:
    """Pretraining's kNN probe: a labelled bank and query set, decoded once and kept in memory as
    preprocessed tensors (2,000 images at 64 px: 98 MB), so that each probe costs a forward pass of both
    and a similarity search."""

    def __init__(
        self,
        bank: LabeledImageDataset,
        queries: LabeledImageDataset,
        num_classes: int,
        layer: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        self.sets = {"bank": bank, "queries": queries}
        self.num_classes, self.layer, self.batch_size, self.num_workers = (
            num_classes,
            layer,
            batch_size,
            num_workers,
        )
        self.batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def _load(self) -> None:
        self.batches = {}
        for name, dataset in self.sets.items():
            loader = build_loader(
                dataset, batch_size=self.batch_size, shuffle=False, drop_last=False,
                num_workers=self.num_workers, seed=0, collate_fn=collate_classification,
            )  # fmt: skip
            self.batches[name] = [(b["pixel_values"], b["labels"]) for b in loader if len(b["index"])]

    @torch.no_grad()
    def __call__(self, encoder: DeiTModel, bf16: bool = False) -> dict[str, float]:
        """{"probe_knn_top1", "probe_knn_top5", "probe_seconds"} of `encoder` (left in eval mode)."""
        start = time.perf_counter()
        if self.batches is None:
            self._load()
        layer = self.layer or encoder.config.num_hidden_layers
        device = next(encoder.parameters()).device
        encoder.eval()
        feats = {}
        for name, batches in self.batches.items():
            f = [features_of(encoder, x.to(device), [layer], "avg", bf16)[layer].cpu() for x, _ in batches]
            feats[name] = (torch.cat(f), torch.cat([y for _, y in batches]))
        (bank, bank_labels), (queries, labels) = feats["bank"], feats["queries"]
        r = knn_probe(bank, bank_labels, queries, labels, self.num_classes)
        return {"probe_knn_top1": r["top1"], "probe_knn_top5": r["top5"],
                "probe_seconds": time.perf_counter() - start}  # fmt: skip


def cached_features(
    cache_dir: Path, key: dict[str, Any], compute
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """`compute()`'s features, read back from `cache_dir` when the same `key` computed them before."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    file = cache_dir / f"features_{digest}.safetensors"
    if file.is_file():
        tensors = load_file(str(file))
        labels = tensors.pop("labels")
        return {int(k.removeprefix("layer_")): v for k, v in tensors.items()}, labels
    feats, labels = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer_{k}": v.contiguous() for k, v in feats.items()} | {"labels": labels}
    tmp = file.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})
    tmp.rename(file)
    return feats, labels


# ---------------------------------------------------------------------------------------------- probes
def _topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[float, float]:
    """(top-1, top-k) accuracy in % of (N, C) class scores."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # (N, k)
    return (
        100.0 * (top[:, 0] == labels).float().mean().item(),
        100.0 * (top == labels[:, None]).any(1).float().mean().item(),
    )


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """(Q, C) class votes of DINO's weighted kNN: the k most cosine-similar training features each vote
    for their class with weight exp(similarity / temperature)."""
    bank = F.normalize(train_feats.float(), dim=1)  # (N, D)
    k = min(k, bank.shape[0])
    votes = []
    for q in F.normalize(query_feats.float(), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k)
        weights = (sim / temperature).exp()
        v = torch.zeros(q.shape[0], num_classes)
        v.scatter_add_(1, train_labels[idx], weights)  # (q, C)
        votes.append(v)
    return torch.cat(votes)


def knn_probe(train_feats, train_labels, val_feats, val_labels, num_classes: int, k: int = KNN_K) -> dict:
    votes = knn_classify(train_feats, train_labels, val_feats, num_classes, k=k)
    top1, top5 = _topk_hits(votes, val_labels, 5)
    return {"top1": top1, "top5": top5}


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    seed: int = 0,
) -> dict:
    """MAE's linear probe on cached features: BatchNorm1d(affine=False) then Linear (weights init with std
    0.01, bias 0), SGD with momentum 0.9, no weight decay, cosine lr, `epochs` passes. MAE uses LARS at
    batch 16,384; on thousands of cached features plain SGD at batch 256 does the same job."""
    threads = torch.get_num_threads()
    # Steps this small are dominated by thread hand-offs: one thread is 100x faster on a busy 2-core CPU.
    torch.set_num_threads(1)
    try:
        return _train_linear(
            train_feats, train_labels, val_feats, val_labels, num_classes, epochs, batch_size, lr, seed
        )
    finally:
        torch.set_num_threads(threads)


def train_cosine(optimizer, loss_of, n: int, epochs: int, batch_size: int, lr: float, generator) -> None:
    """`epochs` passes over `n` samples in batches of `batch_size` (shuffled by `generator`), the lr on a
    cosine from `lr` to 0; `loss_of(indices)` is the batch's loss, or None to skip the batch."""
    total, step = epochs * math.ceil(n / batch_size), 0
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            for g in optimizer.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = loss_of(idx)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1


def _train_linear(
    train_feats, train_labels, val_feats, val_labels, num_classes, epochs, batch_size, lr, seed
):
    generator = torch.Generator().manual_seed(seed)
    dim = train_feats.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    with torch.no_grad():
        head[1].weight.normal_(0, 0.01, generator=generator)
        head[1].bias.zero_()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    head.train()
    # BatchNorm needs two samples: a last batch of one is skipped.
    loss_of = lambda idx: F.cross_entropy(head(train_feats[idx]), train_labels[idx]) if len(idx) > 1 else None  # noqa: E731
    train_cosine(optimizer, loss_of, train_feats.shape[0], epochs, batch_size, lr, generator)
    head.eval()
    with torch.no_grad():
        top1, top5 = _topk_hits(head(val_feats), val_labels, 5)
        train_top1, _ = _topk_hits(head(train_feats), train_labels, 5)
    return {"top1": top1, "top5": top5, "train_top1": train_top1}


def partial_finetune_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    val_tokens: torch.Tensor,
    val_labels: torch.Tensor,
    encoder: DeiTModel,
    num_classes: int,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
) -> dict:
    """MAE's partial fine-tuning with one block (He et al. 2022, Fig. 9), on cached tokens.

    `train_tokens`/`val_tokens`: (N, prefix + P, D), the tokens entering the encoder's last block. A copy
    of that block and of the final LayerNorm, from the encoder's weights, and a new linear head on the
    average of the patch tokens (weights std 0.01, bias 0) are trained with AdamW (weight decay on matrices
    only, as MAE), cosine lr, `epochs` passes of `batch_size`; drop path as the encoder's config says. There
    is no augmentation: the cached tokens are of the evaluation transform, so this measures how far one
    trainable block takes the frozen features, not a fine-tuning recipe. The encoder is left unchanged."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # drop path
    block, norm = copy.deepcopy(encoder.layers[-1]), copy.deepcopy(encoder.layernorm)
    head = nn.Linear(train_tokens.shape[-1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    device = next(encoder.parameters()).device  # the tokens are cached on the CPU, the encoder may not be
    modules = nn.ModuleList([block, norm, head]).to(device).float().train()
    decay = [p for p in modules.parameters() if p.ndim >= 2]
    no_decay = [p for p in modules.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    prefix = encoder.num_prefix_tokens

    def logits_of(tokens: torch.Tensor) -> torch.Tensor:
        x, _ = block(tokens.to(device), False)  # (B, prefix + P, D)
        return head(norm(x)[:, prefix:].mean(1))  # (B, classes)

    loss_of = lambda idx: F.cross_entropy(logits_of(train_tokens[idx]), train_labels[idx].to(device))  # noqa: E731
    train_cosine(optimizer, loss_of, train_tokens.shape[0], epochs, batch_size, lr, generator)
    modules.eval()
    with torch.no_grad():
        val_scores = torch.cat([logits_of(t).cpu() for t in val_tokens.split(batch_size)])
        train_scores = torch.cat([logits_of(t).cpu() for t in train_tokens.split(batch_size)])
    top1, top5 = _topk_hits(val_scores, val_labels, 5)
    return {"top1": top1, "top5": top5, "train_top1": _topk_hits(train_scores, train_labels, 5)[0]}


def probe_all(
    train: tuple[dict[int, torch.Tensor], torch.Tensor],
    val: tuple[dict[int, torch.Tensor], torch.Tensor],
    num_classes: int,
    probes: Sequence[str] = ("knn", "linear"),
    linear_epochs: int = 100,
) -> dict[str, dict[str, dict[str, float]]]:
    """{probe: {layer: {top1, top5, ...}}} for every cached layer ("knn" and "linear"; the partial
    fine-tuning probe needs tokens, see `partial_finetune_probe`)."""
    (tf, tl), (vf, vl) = train, val
    results: dict[str, dict[str, dict[str, float]]] = {}
    for probe in probes:
        if probe == "partial":
            continue
        results[probe] = {}
        for layer in sorted(tf):
            if probe == "knn":
                r = knn_probe(tf[layer], tl, vf[layer], vl, num_classes)
            else:
                r = linear_probe(tf[layer], tl, vf[layer], vl, num_classes, epochs=linear_epochs)
            results[probe][str(layer)] = r
    return results


def plot_probe(metrics: dict[str, Any], path: Path) -> None:
    """Top-1 by layer: each probe for the encoder (solid) and for random init (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for probe, colour in (("knn", "C0"), ("linear", "C1"), ("partial", "C2")):
        for which, style in (("encoder", "-"), ("random_init", "--")):
            r = metrics.get(which, {}).get(probe)
            if not r:
                continue
            layers = sorted(r, key=int)
            ax.plot(
                [int(x) for x in layers], [r[x]["top1"] for x in layers], style, color=colour, marker="o",
                label=f"{probe}, {'encoder' if which == 'encoder' else 'random init'}",
            )  # fmt: skip
    ax.set(xlabel="block", ylabel="top-1 (%)", title=f"probes of {Path(metrics['checkpoint']).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probe_checkpoint(args: Any) -> dict[str, Any]:
    """scripts/eval_probe.py's run: `args` are its parsed arguments; writes `args.out` (metrics.json,
    probe.png, features/) and prints a summary; returns the metrics."""
    start = time.time()
    encoder = load_encoder(args.checkpoint, args.num_heads)
    config = encoder.model.config
    layers = args.layers or default_layers(config.num_hidden_layers)
    bad = [layer for layer in layers if not 1 <= layer <= config.num_hidden_layers]
    if bad:
        raise ValueError(f"--layers {bad}: the encoder has blocks 1..{config.num_hidden_layers}")
    image_size = args.image_size or config.image_hw[0]
    if image_size % config.patch_size:
        raise ValueError(
            f"--image-size {image_size}: must be divisible by the patch size {config.patch_size}"
        )

    if args.holdout is not None:
        full = open_source(args.data, "train", val_fraction=0.0)
        train_source = holdout_split(full, "train", args.holdout, args.seed)
        val_source = holdout_split(full, "validation", args.holdout, args.seed)
    else:
        train_source = open_source(args.data, "train", seed=args.seed)
        val_source = open_source(args.data, "validation", seed=args.seed)
    if not train_source.has_labels:
        raise ValueError(f"--data {args.data!r} has no labels: a probe needs class folders or a label column")
    num_classes = len(train_source.class_names)
    train_source = random_subset(train_source, args.train_images, args.seed)
    val_source = random_subset(val_source, args.val_images, args.seed + 1)
    transform = eval_transform(
        image_size, mean=encoder.mean, std=encoder.std, num_channels=encoder.num_channels,
        max_value=encoder.max_value,
    )  # fmt: skip
    out = Path(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def features(model, name: str, source, split: str, layers=layers, pool=args.pool):
        key = {
            "model": name, "data": str(Path(args.data).resolve()) if Path(args.data).exists() else args.data,
            "split": split, "holdout": args.holdout, "seed": args.seed, "mean": encoder.mean, "std": encoder.std,
            "count": len(source), "layers": sorted(layers), "pool": pool, "image_size": image_size,
            "bf16": args.bf16,
        }  # fmt: skip
        dataset = LabeledImageDataset(source, transform)
        if pool == "tokens":  # every token of every image (N x 65 x 192 floats at 64 px): not kept on disk
            return extract_features(
                model, dataset, layers, pool, args.batch_size, args.num_workers, args.bf16, device
            )
        return cached_features(
            out / "features",
            key,
            lambda: extract_features(
                model, dataset, layers, pool, args.batch_size, args.num_workers, args.bf16, device
            ),
        )

    checkpoint = Path(encoder.source)
    stamp = max(
        f.stat().st_mtime_ns for f in ([checkpoint] if checkpoint.is_file() else checkpoint.iterdir())
    )
    models = {
        "encoder": (encoder.model, f"{checkpoint.resolve()}@{stamp}:heads={config.num_attention_heads}")
    }
    if not args.no_random_init:
        torch.manual_seed(args.seed)
        models["random_init"] = (
            DeiTModel(config).eval(),
            "random_init:" + json.dumps(config.to_dict(), sort_keys=True) + f":{args.seed}",
        )
    metrics = {
        "checkpoint": args.checkpoint, "data": args.data, "pool": args.pool, "layers": sorted(layers),
        "image_size": image_size, "holdout": args.holdout, "seed": args.seed,
        "train_images": len(train_source), "val_images": len(val_source), "num_classes": num_classes,
        "knn": {"k": 20, "temperature": 0.07}, "linear": {"epochs": args.linear_epochs},
        "partial": {"epochs": args.partial_epochs, "block": config.num_hidden_layers},
    }  # fmt: skip
    for which, (model, name) in models.items():
        metrics[which] = {}
        if {"knn", "linear"} & set(args.probes):
            train = features(model, name, train_source, "train")
            val = features(model, name, val_source, "validation")
            metrics[which] = probe_all(train, val, num_classes, args.probes, args.linear_epochs)
        if "partial" in args.probes:
            # The tokens entering the last block (the output of the one before it), every token kept.
            before_last = [config.num_hidden_layers - 1]
            train_tokens, train_labels = features(model, name, train_source, "train", before_last, "tokens")
            val_tokens, val_labels = features(model, name, val_source, "validation", before_last, "tokens")
            last = before_last[0]
            metrics[which]["partial"] = {
                str(config.num_hidden_layers): partial_finetune_probe(
                    train_tokens[last],
                    train_labels,
                    val_tokens[last],
                    val_labels,
                    model,
                    num_classes,
                    epochs=args.partial_epochs,
                    seed=args.seed,
                )  # fmt: skip
            }
    metrics["seconds"] = round(time.time() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    try:
        plot_probe(metrics, out / PLOT_FILE)
    except ImportError:
        print(f"{PLOT_FILE} not drawn: matplotlib is missing (pip install 'simmim[study]')")
    for which in models:
        for probe in args.probes:
            row = ", ".join(f"block {k} {v['top1']:.2f}" for k, v in metrics[which][probe].items())
            print(f"{which:12s} {probe:6s} top-1: {row}")
    print(f"{len(train_source)} train / {len(val_source)} eval images, {metrics['seconds']} s; wrote {out}")
    return metrics
