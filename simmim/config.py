"""Typed run configs: dataclass defaults, then a recipe YAML that lists only what differs, then
``key.sub=value`` overrides from the command line (big_vision / torchtune style).

The configs are pydantic dataclasses: each field carries its type, range and help text, and pydantic checks
them, so unknown keys, wrong types and impossible values fail with a one-line ValueError naming the dotted key
before anything runs. Rules that tie fields together sit in ``__post_init__`` beside the class they concern.
Configs are frozen: derived values (scaled lr, global batch, steps per epoch) are computed beside them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass

from simmim.config_fields import names_or_file

# reading and writing configs live in config_io; re-exported here, where callers look for them
from simmim.config_io import config_from_dict, config_to_dict, load_config, save_config  # noqa: F401
from simmim.models import DeiTConfig
from simmim.models.configuration import VARIANTS

# PyYAML follows YAML 1.1, which reads "1e-4" (no dot) as a string; float fields accept such numbers.
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _float_from_text(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _FLOAT_RE.fullmatch(value) else value


# A field takes only values of its own kind (pydantic's strict mode): no 1 for true, no 3.5 or "3" for 3, no
# number for a string. Two exceptions: an int is a fine float (strict mode allows it), and so is a number
# written as text, for the YAML 1.1 reason above. Tuples stay lax, so that YAML's lists fill them.
# (Field(strict=True) rather than Strict(): pydantic 2.6 cannot put Strict() after a BeforeValidator.)
Bool = Annotated[bool, Field(strict=True)]
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True), BeforeValidator(_float_from_text)]
Str = Annotated[str, Field(strict=True)]

# Unknown keys are errors, not ignored (pydantic's default for dataclasses).
_STRICT_KEYS = ConfigDict(extra="forbid")


def _check(ok: bool, key: str, value: Any, must: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: must {must}")


# A tuple field's range sits in its element type (pydantic checks the elements one by one).
Scale = Annotated[Float, Field(gt=0)]  # a channel's std
ClassNames = Annotated[tuple[Str, ...], BeforeValidator(names_or_file)]  # data.class_names


@dataclass(frozen=True, config=_STRICT_KEYS)
class DataConfig:
    """Where images come from and how they are batched."""

    path: Str = Field("synthetic", description='image folder, HF dataset name or saved dataset, "synthetic", '
                      "or an http(s) URL of a folder of shards with its index.json (streams)")  # fmt: skip
    train_split: Str = "train"
    val_split: Str = "validation"
    val_fraction: Float = Field(
        0.05, ge=0, lt=1, description="carved from train when the source has no validation split"
    )
    image_column: Str | None = Field(None, description="None = detect")
    label_column: Str | None = None
    streaming: Bool = Field(
        False,
        description="read the data as a stream, shard by shard (a Hub dataset, a folder or glob of tar or "
        "parquet shards, an image folder): for data too large to index; the run's length is then "
        "train.max_steps",
    )
    shuffle_buffer: Int = Field(
        1000, ge=0, description="streams: examples each loader worker shuffles among (0 = the shards' order)"
    )
    batch_size: Int = Field(64, gt=0, description="per device")
    num_workers: Int | None = Field(
        None,
        ge=0,
        description="loader worker processes; None = the CPUs this process may use, shared among the "
        "node's processes, at most 4",
    )
    pin_memory: Bool = True
    normalize: Literal["imagenet", "dataset", "explicit"] | None = Field(
        None,
        description="pixel statistics: ImageNet's (3 channels only), the dataset's own (data.stats, else "
        "computed from data.stats_samples train images at the start and kept in the run) or data.mean and "
        "data.std as given; None = explicit when data.mean is set, else imagenet for 3 channels, dataset "
        "for any other count",
    )
    mean: tuple[Float, ...] | None = Field(None, description="one per channel, of pixels scaled to [0, 1]")
    std: tuple[Scale, ...] | None = None
    max_value: Float | None = Field(
        None, gt=0, description="integer pixels are divided by this (4095: 12-bit values stored in 16 bits); "
        "None = their type's largest value (255, 65535); float pixels are taken as they are",
    )  # fmt: skip
    stats: Str | None = Field(None, description="data.normalize=dataset: a file of scripts/dataset_stats.py")
    stats_samples: Int = Field(1000, gt=0, description="images drawn to compute data.normalize=dataset")
    display_bands: tuple[Annotated[Int, Field(ge=0)], ...] | None = Field(
        None, description="channels shown as red, green, blue in images (reconstruction grids, TensorBoard); "
        "None = the first three, or grey for one channel",
    )  # fmt: skip
    max_bad_fraction: Float = Field(
        0.01, ge=0, lt=1, description="stop when more than this fraction of samples failed to decode"
    )
    remote_retries: Int = Field(5, ge=0, description="streams: tries again after a network error (a reset, "
        "a timeout, HTTP 5xx) in a row, waiting data.remote_backoff_s, then twice as long each time")  # fmt: skip
    remote_backoff_s: Float = Field(1.0, ge=0, description="streams: the wait before the first retry")
    synthetic_size: Int = Field(1024, gt=0)
    label_fraction: Float = Field(
        1.0,
        gt=0,
        le=1,
        description="fine-tuning: train on a class-balanced subset, this fraction of each class's labelled "
        "images, drawn by `seed` (1.0 = all); evaluation keeps the whole validation split",
    )
    holdout_from_train: Bool = Field(
        False,
        description="evaluate on data.val_fraction of the train split (carved with data.holdout_seed, left "
        "out of training) even when the source has a validation split: for choosing settings without ever "
        "reading that split",
    )
    holdout_seed: Int = 0
    num_classes: Int | None = Field(
        None, gt=0, description='integer labels with no names of their own (`.cls` shards): classes named "0" '
        'to "N-1"; data that names its classes must have N'
    )  # fmt: skip
    class_names: ClassNames = Field(
        (), description="integer labels' class names, label i naming class i: a list or a text file of one name "
        "per line (read once: the saved config lists them); data that names its classes must name these"
    )  # fmt: skip

    def __post_init__(self) -> None:
        n, names = self.num_classes, self.class_names
        _check(n is None or not names or len(names) == n, "class_names", list(names),
               f"name data.num_classes={n} classes")  # fmt: skip
        v = self.val_fraction
        _check(not self.holdout_from_train or 0 < v < 1, "val_fraction", v,
               "be in (0, 1) with data.holdout_from_train=true (the share of train held out)")  # fmt: skip
        if self.num_workers is None:  # resolved once, so that the saved config.yaml says what ran
            object.__setattr__(self, "num_workers", default_num_workers())
        _check((self.mean is None) == (self.std is None), "std", self.std, "be given with data.mean")
        if self.mean is not None:
            _check(len(self.std) == len(self.mean), "std", self.std, f"have {len(self.mean)} values, "
                   "one per channel as data.mean")  # fmt: skip

    def resolve_normalize(self, num_channels: int) -> DataConfig:
        """data.normalize and, where known before the data is read, data.mean and data.std resolved for a
        model of `num_channels` channels (dataset statistics are filled in when the run starts)."""
        default = "imagenet" if num_channels == 3 and self.stats is None else "dataset"
        mode = self.normalize or ("explicit" if self.mean is not None else default)
        _check(self.stats is None or mode == "dataset", "data.stats", self.stats,
               f"be unset with data.normalize={mode}: a statistics file is read by data.normalize=dataset")  # fmt: skip
        if mode == "imagenet":
            _check(num_channels == 3, "data.normalize", mode, f"be dataset or explicit for "
                   f"model.num_channels={num_channels}: ImageNet's statistics are for RGB")  # fmt: skip
            imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
            _check((self.mean, self.std) in ((None, None), imagenet), "data.mean", self.mean,
                   "be unset with data.normalize=imagenet (or use data.normalize=explicit)")  # fmt: skip
            return dataclasses.replace(self, normalize=mode, mean=imagenet[0], std=imagenet[1])
        if mode == "explicit":
            _check(self.mean is not None, "data.mean", None, "be set with data.normalize=explicit")
        if self.mean is not None:  # explicit, or dataset statistics already computed (a saved run's config)
            _check(len(self.mean) == num_channels, "data.mean", self.mean,
                   f"have one value per channel: model.num_channels={num_channels}")  # fmt: skip
        return dataclasses.replace(self, normalize=mode)


MAX_DEFAULT_WORKERS = 4


def default_num_workers() -> int:
    """Loader workers for `data.num_workers=None`: the CPUs this process may use, divided among the node's
    processes (LOCAL_WORLD_SIZE, or an MPI launcher's local size), at most 4. On a 2-core machine that
    is 2, which torch's DataLoader accepts without its warning about more workers than CPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    # torchrun and accelerate launch set LOCAL_WORLD_SIZE; an MPI launch (accelerate's multi-CPU) its own.
    names = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")
    local_processes = max(1, next((int(os.environ[n]) for n in names if os.environ.get(n)), 1))
    return min(MAX_DEFAULT_WORKERS, max(1, cpus // local_processes))


@dataclass(frozen=True, config=_STRICT_KEYS)
class ModelConfig:
    """DeiT size and head; architecture fields left at None take the variant's (or DeiTConfig's) value."""

    variant: Literal["tiny", "small", "base", "large", "huge"] = "tiny"
    hidden_size: Int | None = Field(None, gt=0)
    num_hidden_layers: Int | None = Field(None, gt=0)
    num_attention_heads: Int | None = Field(None, gt=0)
    intermediate_size: Int | None = Field(None, gt=0)
    hidden_act: Str | None = None
    hidden_dropout_prob: Float | None = Field(None, ge=0, lt=1)
    attention_probs_dropout_prob: Float | None = Field(None, ge=0, lt=1)
    initializer_range: Float | None = None
    layer_norm_eps: Float | None = Field(
        None,
        description="timm's DeiT uses 1e-6, Transformers' DeiTConfig 1e-12; the variants keep DeiTConfig's "
        "unless set here",
    )
    image_size: Int = Field(224, gt=0)
    patch_size: Int = Field(16, gt=0)
    num_channels: Int = Field(
        3, gt=0, description="the images' channels (1 grey, 3 RGB, N bands); a run checks its first image "
        "against it, and skips (and counts) images of another count; a 3-channel model reads grey as RGB",
    )  # fmt: skip
    qkv_bias: Bool = True
    encoder_stride: Int | None = Field(None, gt=0, description="None = patch_size")
    pooler_output_size: Int | None = Field(None, gt=0)
    pooler_act: Str = "tanh"
    drop_path_rate: Float = Field(0.0, ge=0, lt=1)
    init: Str = Field(
        "scratch",
        description='"scratch", or the model to start from: a SimMIM run or export, a Transformers DeiT/ViT '
        "directory or a timm file; its architecture is used (fine-tuning: the encoder and a head that fits; "
        "pretraining: continued SimMIM, the encoder and its decoder and mask token if it has them)",
    )
    position_embedding_init: Literal["random", "sincos"] = Field(
        "random",
        description="a model built from scratch: position embeddings random (Transformers' and timm's init) "
        "or MAE's 2-D sine-cosine table (trainable), which lets short runs use where patches are; a "
        "checkpoint's own are used when model.init loads one (so a study can share the setting between "
        "scratch and SimMIM arms)",
    )
    head: Literal["mim", "cls", "distill", "cnn"] = "mim"
    arch: Str | None = Field(
        None, description='head == "cnn": a torchvision classification model name, e.g. "resnet18"'
    )

    def __post_init__(self) -> None:
        arch = deit_config_kwargs(self)
        heads, width = arch["num_attention_heads"], arch["hidden_size"]
        _check(width % heads == 0, "num_attention_heads", heads, f"divide model.hidden_size={width}")
        pe = self.position_embedding_init
        _check(pe != "sincos" or width % 4 == 0, "position_embedding_init", pe,
               f"be 'random' for model.hidden_size={width}: a 2-D sine-cosine table needs a multiple of 4")  # fmt: skip
        size, p = self.image_size, self.patch_size
        _check(size % p == 0, "patch_size", p, f"divide model.image_size={size}")


@dataclass(frozen=True, config=_STRICT_KEYS)
class MaskConfig:
    """SimMIM's block-wise random mask: square blocks of mask patch_size pixels, ratio of them masked."""

    patch_size: Int = Field(32, gt=0)
    ratio: Float = Field(0.6, gt=0, lt=1)


@dataclass(frozen=True, config=_STRICT_KEYS)
class LossConfig:
    """SimMIM's target: the masked pixels as they are, or normalised by their neighbourhood (NORM_TARGET)."""

    norm_target: Bool = Field(
        False,
        description="predict each masked pixel normalised by the mean and std of the window around it "
        "(microsoft/SimMIM's NORM_TARGET); evaluations still report the masked L1 in pixels",
    )
    norm_target_window: Int = Field(
        47, gt=1, description="the window's side in pixels, odd (SimMIM: 47 at 192 px)"
    )

    def __post_init__(self) -> None:
        w = self.norm_target_window
        _check(w % 2 == 1, "norm_target_window", w, "be odd: the window is centred on its pixel")


Beta = Annotated[Float, Field(ge=0, lt=1)]  # an AdamW beta, as a tuple element


@dataclass(frozen=True, config=_STRICT_KEYS)
class OptimConfig:
    """AdamW with linear warmup from 0 and cosine decay; base_lr and min_lr are for a global batch of 512."""

    base_lr: Float = Field(1e-4, gt=0)
    min_lr: Float = Field(1e-6, ge=0)
    weight_decay: Float = Field(0.05, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: Float = Field(1e-8, gt=0)
    warmup_epochs: Float | None = Field(
        None,
        ge=0,
        description="linear warmup; None = optim.warmup_steps if set, else 10 epochs (0 on a stream)",
    )
    warmup_steps: Int | None = Field(None, ge=0, description="warmup in optimizer steps, instead of epochs")
    clip_grad: Float | None = Field(5.0, gt=0, description="max global grad norm; None = no clipping")
    layer_decay: Float = Field(1.0, gt=0, le=1, description="BEiT-style layer-wise lr decay; 1.0 = off")
    grad_accum_steps: Int = Field(1, gt=0)

    def __post_init__(self) -> None:
        _check(self.min_lr <= self.base_lr, "min_lr", self.min_lr, f"be <= optim.base_lr={self.base_lr}")
        _check(self.warmup_epochs is None or self.warmup_steps is None, "warmup_steps", self.warmup_steps,
               f"not be set with optim.warmup_epochs={self.warmup_epochs}: give one of the two "
               "(optim.warmup_epochs=null unsets a recipe's)")  # fmt: skip


# accelerate's experiment trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS), and "none" for log.jsonl only;
# one may be given alone, as a string (train.report_to=mlflow).
Tracker = Literal[
    "tensorboard", "mlflow", "wandb", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio", "none"
]
Trackers = Annotated[tuple[Tracker, ...], BeforeValidator(lambda v: (v,) if isinstance(v, str) else v)]


@dataclass(frozen=True, config=_STRICT_KEYS)
class TrainConfig:
    """Duration, checkpointing, logging and evaluation cadence (in optimizer steps)."""

    epochs: Int = Field(100, gt=0)
    max_steps: Int | None = Field(
        None,
        gt=0,
        description="stop early after this many optimizer steps (the schedule keeps epochs); with "
        "data.streaming=true, the run's length and the schedule's",
    )
    save_every_steps: Int = Field(1000, gt=0)
    keep_last: Int = Field(2, gt=0)
    log_every_steps: Int = Field(50, gt=0)
    # The names are checked here; whether a tracker's package is installed, where the run starts (RunLog in
    # simmim/run_log.py): a run's saved config.yaml must stay readable where that package is not installed.
    report_to: Trackers = Field(
        ("tensorboard",),
        description="experiment trackers that get the logged scalars and images (main process), through "
        "accelerate; tensorboard writes output_dir/tb, mlflow output_dir/mlruns unless MLFLOW_TRACKING_URI is "
        'set, wandb output_dir/wandb (WANDB_MODE=offline: no account); "none" or [] = output_dir/log.jsonl '
        "only, which every run writes",
    )
    eval_every_steps: Int | None = Field(
        None,
        gt=0,
        description="evaluate every this many steps (and after the last); None = 1000 for pretraining and "
        "streams, train.eval_every_epochs for fine-tuning",
    )
    eval_every_epochs: Int | None = Field(
        None, gt=0, description="fine-tuning without train.eval_every_steps: None = every epoch"
    )
    compile: Bool | Literal["auto"] = Field(
        "auto",
        description='torch.compile the model; "auto" = where it was measured to win and the run repays it '
        "(bf16 on a CPU, 3,000 steps or more; see simmim/compilation.py)",
    )
    fsdp: Bool = Field(
        False,
        description="shard parameters, gradients and AdamW state across processes (FSDP2, one unit per "
        "encoder block); launch with accelerate launch --multi_gpu, or with an FSDP config "
        "(recipes/accelerate/fsdp.yaml), which sets it; a resume needs the same processes",
    )
    fsdp_reshard_after_forward: Bool = Field(
        True,
        description="train.fsdp: free each block's gathered parameters after its forward (gathered again "
        "for its backward); false keeps them: one gather less per block and step, for more memory",
    )
    activation_checkpointing: Bool = Field(
        False,
        description="recompute each transformer block in the backward pass: less activation memory for "
        "about one more forward pass (DeiT models)",
    )
    ema: Float | None = Field(None, gt=0, lt=1, description="EMA decay of the weights; None = no EMA")
    eval_batches: Int | None = Field(
        8, gt=0, description="held-out batches per periodic evaluation; None = all"
    )
    precision: Literal["auto", "launcher", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description='autocast dtype of the forward pass; "auto" = bf16 where the hardware does it fast (CUDA '
        "with bf16, a CPU with AMX or avx512_bf16) or accelerate launch's --mixed_precision bf16|fp16, fp32 "
        'elsewhere; "launcher" = accelerate launch\'s --mixed_precision (fp32 without)',
    )
    on_nonfinite: Literal["auto", "stop", "rollback"] = Field(
        "auto",
        description="a non-finite loss (or a spike): stop naming the intact checkpoint, or roll back to it, "
        'skip the batches that led there and go on; "auto" = rollback for runs of 1,000 steps or more',
    )
    spike_factor: Float | None = Field(
        None, gt=1, description="a logged loss above this many times its running mean counts as a failure"
    )
    rollback_skip_batches: Int = Field(
        200, ge=0, description="optimizer steps of batches skipped after a rollback, at least (PaLM: 200-500)"
    )
    max_rollbacks: Int = Field(3, ge=0, description="rollbacks allowed before the run stops")
    collective_timeout_s: Float = Field(300, gt=0, description="processes: the longest wait for another "
        "process (a checkpoint write, rank 0's export or probe) before the run stops, naming its checkpoint")  # fmt: skip
    snapshot_epochs: tuple[Annotated[Int, Field(gt=0)], ...] = Field(
        (),
        description="pretraining: also export the model after these epochs to "
        "output_dir/snapshots/epoch_<N> (kept)",
    )
    probe_every_steps: Int | None = Field(
        None,
        gt=0,
        description="pretraining: a kNN probe of the encoder every this many steps (and at the end), see "
        "probe.*",
    )

    def __post_init__(self) -> None:
        _check(all(e <= self.epochs for e in self.snapshot_epochs), "snapshot_epochs", self.snapshot_epochs,
               f"be epochs of the run (<= train.epochs={self.epochs})")  # fmt: skip
        _check("none" not in self.report_to or len(self.report_to) == 1, "report_to", list(self.report_to),
               'be "none" alone, or trackers without "none"')  # fmt: skip
        _check(not (self.fsdp and self.precision == "fp16"), "precision", self.precision,
               "not be used with train.fsdp=true: fp16's gradient scaler does not reach the sharded "
               "optimizer; use bf16")  # fmt: skip


@dataclass(frozen=True, config=_STRICT_KEYS)
class ProbeConfig:
    """Pretraining's online kNN probe (train.probe_every_steps): labels SimMIM never trains on."""

    data: Str | None = Field(None, description="a labelled dataset; None = data.path")
    bank_images: Int = Field(
        2000, gt=0, description="labelled features to vote: a seeded subset of its train split"
    )
    query_images: Int = Field(
        1000, gt=0, description="images classified: a seeded subset of its validation split"
    )
    layer: Int | None = Field(None, gt=0, description="the encoder block probed (1-based); None = the last")


@dataclass(frozen=True, config=_STRICT_KEYS)
class DistillConfig:
    """DeiT distillation through the distillation token."""

    kind: Literal["hard", "soft"] = "hard"
    alpha: Float = Field(0.5, ge=0, le=1, description="weight of the distillation term")
    tau: Float = Field(1.0, gt=0, description="soft distillation temperature")


@dataclass(frozen=True, config=_STRICT_KEYS)
class TeacherConfig:
    """The frozen teacher for head == "distill"."""

    arch: Str | None = Field(None, description='a torchvision classification model name, or "deit"')
    path: Str | None = Field(None, description="its weights")


AreaFraction = Annotated[Float, Field(gt=0, le=1)]  # a crop's share of the image area, as a tuple element


@dataclass(frozen=True, config=_STRICT_KEYS)
class AugConfig:
    """DeiT fine-tuning augmentation."""

    rand_augment: Bool = True
    random_erasing: Float = Field(0.25, ge=0, le=1)
    mixup: Float = Field(0.8, ge=0, description="Beta(alpha, alpha); 0 = off")
    cutmix: Float = Field(1.0, ge=0)
    label_smoothing: Float = Field(0.1, ge=0, lt=1)
    crop_scale: tuple[AreaFraction, AreaFraction] = Field(
        (0.08, 1.0), description="RandomResizedCrop's area range; DeiT's default"
    )

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        _check(lo <= hi, "crop_scale", self.crop_scale, "be (min, max) with min <= max")


@dataclass(frozen=True, config=_STRICT_KEYS)
class PretrainConfig:
    """SimMIM pretraining of a DeiT encoder."""

    output_dir: Str
    seed: Int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", self.data.resolve_normalize(self.model.num_channels))
        d, m, p = self.data, self.model, self.model.patch_size
        bands = d.display_bands
        _check(bands is None or (len(bands) in (1, 3) and max(bands) < m.num_channels), "data.display_bands",
               bands, f"be 1 or 3 channel indices in [0, {m.num_channels - 1}] (model.num_channels)")  # fmt: skip
        _check(d.label_fraction == 1.0, "data.label_fraction", d.label_fraction,
               "be 1.0: pretraining uses no labels")  # fmt: skip
        _check(m.head == "mim", "model.head", m.head, 'be "mim" for pretraining')
        # SimMIM's mask generator works on a grid of mask patches, each a whole number of model patches.
        mp = self.mask.patch_size
        _check(mp % p == 0, "mask.patch_size", mp, f"be a multiple of model.patch_size={p}")
        _check(m.image_size % mp == 0, "mask.patch_size", mp, f"divide model.image_size={m.image_size}")
        _check_stream_durations(self)
        t = self.train
        _check(not (d.streaming and t.snapshot_epochs), "train.snapshot_epochs", t.snapshot_epochs,
               "be empty with data.streaming=true: a stream has no epochs")  # fmt: skip
        _check(not (d.streaming and t.probe_every_steps and self.probe.data is None), "probe.data", None,
               "name a labelled map-style dataset for train.probe_every_steps with data.streaming=true: the "
               "probe draws seeded subsets, which a stream cannot")  # fmt: skip
        depth, layer = deit_config_kwargs(m)["num_hidden_layers"], self.probe.layer
        # With model.init the depth is the checkpoint's, known when it is opened (PretrainTask checks it then).
        _check(layer is None or layer <= depth or m.init != "scratch", "probe.layer", layer,
               f"be a block of the encoder (1..{depth})")  # fmt: skip


@dataclass(frozen=True, config=_STRICT_KEYS)
class FinetuneConfig:
    """DeiT fine-tuning with a classification or distillation head (or a torchvision CNN baseline)."""

    output_dir: Str
    seed: Int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(head="cls"))
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    aug: AugConfig = Field(default_factory=AugConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", self.data.resolve_normalize(self.model.num_channels))
        m, t = self.model, self.train
        _check(m.head != "mim", "model.head", m.head, 'be "cls", "distill" or "cnn" for fine-tuning')
        _check_stream_durations(self)
        d = self.data
        _check(not d.streaming or d.label_fraction == 1.0, "data.label_fraction", d.label_fraction,
               "be 1.0 with data.streaming=true: a class-balanced subset needs every label up front")  # fmt: skip
        _check(not t.snapshot_epochs, "train.snapshot_epochs", t.snapshot_epochs,
               "be empty: snapshots are for pretraining")  # fmt: skip
        _check(t.probe_every_steps is None, "train.probe_every_steps", t.probe_every_steps,
               "be unset: the online probe is for pretraining")  # fmt: skip
        _check(m.head != "cnn" or bool(m.arch), "model.arch", m.arch, 'be set when model.head is "cnn"')
        _check(m.head != "cnn" or not t.activation_checkpointing, "train.activation_checkpointing",
               t.activation_checkpointing, 'be false for model.head "cnn": it recomputes DeiT blocks')  # fmt: skip
        for key in ("arch", "path"):
            value = getattr(self.teacher, key)
            _check(
                m.head != "distill" or bool(value), f"teacher.{key}", value, 'be set for model.head "distill"'
            )


def _check_stream_durations(cfg: PretrainConfig | FinetuneConfig) -> None:
    """A stream has no length: its run is measured in steps, and nothing may be given in epochs."""
    if not cfg.data.streaming:
        return
    t, o = cfg.train, cfg.optim
    _check(t.max_steps is not None, "train.max_steps", t.max_steps,
           "be set with data.streaming=true: a stream has no length, so the run's length is in steps")  # fmt: skip
    _check(o.warmup_epochs is None, "optim.warmup_epochs", o.warmup_epochs,
           "be unset with data.streaming=true (a stream has no epochs): set optim.warmup_epochs=null and give "
           "optim.warmup_steps")  # fmt: skip
    _check(t.eval_every_epochs is None, "train.eval_every_epochs", t.eval_every_epochs,
           "be unset with data.streaming=true (a stream has no epochs): set train.eval_every_epochs=null and "
           "give train.eval_every_steps")  # fmt: skip
    _check(not cfg.data.holdout_from_train, "data.holdout_from_train", True,
           "be false with data.streaming=true: the holdout carve needs a map-style source")  # fmt: skip


# ModelConfig fields that are not DeiTConfig arguments.
_NOT_DEIT = ("variant", "init", "head", "arch", "position_embedding_init")


def deit_config_kwargs(model: ModelConfig) -> dict[str, Any]:
    """Variant defaults merged with the fields set in ``model``: keyword arguments for DeiTConfig."""
    kwargs: dict[str, Any] = dict(VARIANTS[model.variant])
    for f in dataclasses.fields(model):
        value = getattr(model, f.name)
        if f.name not in _NOT_DEIT and (value is not None or f.name == "pooler_output_size"):
            kwargs[f.name] = value
    if model.encoder_stride is None:
        kwargs["encoder_stride"] = model.patch_size
    return kwargs


def deit_config(model: ModelConfig, **config_kwargs: Any) -> DeiTConfig:
    """The DeiTConfig of a `model` section; `config_kwargs` (labels, say) are added to it."""
    return DeiTConfig(**deit_config_kwargs(model), **config_kwargs)


# ----------------------------------------------------------------------------------- building configs
