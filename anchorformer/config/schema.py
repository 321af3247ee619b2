"""Typed configuration: the single source of truth for every training option.

Each section is a frozen dataclass; the string literal under each field is its help text
(``launch/train.py --help-config`` prints it). ``__post_init__`` checks the values a section can
check on its own; checks that need the launch (world size) live in ``load.check_world_size``.
A failed check raises :class:`ConfigError` naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

__all__ = [
    "ConfigError", "ModelConfig", "AugmentConfig", "MixupSection", "DataConfig", "OptimConfig",
    "ScheduleConfig", "LossConfig", "EmaConfig", "TrainConfig", "DeepSpeedConfig",
    "CheckpointConfig", "LoggingConfig", "SlurmConfig", "HealthConfig", "DetectionConfig",
    "SegmentationConfig", "RootConfig",
]


ARCHITECTURE_ARGUMENTS = ("num_anchors", "depth", "embed_dim", "num_heads", "patch_size", "block_init")
"""ModelConfig fields that override the variant's architecture (null keeps it), given to timm by name."""
_CLASSIFIER_ARGUMENTS = ("num_classes", "img_size", "drop_rate")
"""ModelConfig fields a classifier gets from timm.create_model (a dense backbone sets its own)."""

_AUTO_AUGMENT_PREFIXES = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")
"""How timm's auto-augment policy strings begin (rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, ...)."""


_CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
"""train.compile modes in which torch.compile captures CUDA graphs (refused on the CPU)."""


class ConfigError(ValueError):
    """A configuration value that cannot be used; ``key`` is its dotted path (``optim.lr``)."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"config key '{key}': {message}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` prepended to its key (used while descending sections)."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.detail)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "anchorformer_tiny_patch16_224"
    """timm model name (any registered name, e.g. anchorformer_base_patch16_224)."""
    num_classes: int = 1000
    """Number of output classes of the classification head."""
    img_size: int = 224
    """Input resolution in pixels the model is built for (pos_embed is sized for it)."""
    drop_path_rate: float = 0.1
    """Stochastic depth rate of the last block (linearly increasing from 0), in [0, 1)."""
    drop_rate: float = 0.0
    """Dropout rate before the classifier, in [0, 1)."""
    num_anchors: Optional[int] = None
    """Anchors m per layer of an AnchorFormer (30 in the paper); null keeps the variant's."""
    depth: Optional[int] = None
    """Transformer blocks; null keeps the variant's (12 for tiny, small and base)."""
    embed_dim: Optional[int] = None
    """Token width D (a multiple of num_heads); null keeps the variant's (192 / 384 / 768)."""
    num_heads: Optional[int] = None
    """Attention heads; null keeps the variant's (3 / 6 / 12)."""
    patch_size: Optional[int] = None
    """Patch side in pixels (img_size must be a multiple); null keeps the variant's (16)."""
    block_init: Optional[Literal["reference", "timm"]] = None
    """AnchorFormer block initialisation: reference (PyTorch defaults, as the authors' code) or timm
    (trunc-normal 0.02); null keeps the model's (reference)."""
    pretrained_checkpoint: Optional[str] = None
    """Initial weights loaded through the model's checkpoint_filter_fn (pos_embed resized, head
    dropped on class-count mismatch): a safetensors / .pt / .pth file; for an AnchorFormer also a
    timm ViT/DeiT (file, timm folder or a run of this framework), converted once into the run
    folder (docs/training.md); null trains from scratch."""
    init_images: int = 2000
    """ViT/DeiT start: training images the anchors are clustered from (and the attention fitted on)."""
    init_fit_steps: int = 100
    """ViT/DeiT start: Adam steps per layer fitting qk and the anchors to the ViT's attention
    (0: k-means only; the fit is what recovers accuracy, and the slow part on a CPU)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for timm.create_model, for options without a key of their own
    (e.g. {in_chans: 1, global_pool: avg}); the model's constructor judges them."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "name", "must name a timm model, e.g. anchorformer_tiny_patch16_224")
        _require(self.num_classes > 0, "num_classes", f"must be > 0, got {self.num_classes}")
        _require(self.img_size > 0, "img_size", f"must be > 0 pixels, got {self.img_size}")
        _require(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate",
                 f"must be in [0, 1), got {self.drop_path_rate}")
        _require(0.0 <= self.drop_rate < 1.0, "drop_rate", f"must be in [0, 1), got {self.drop_rate}")
        _require(self.init_images >= 1, "init_images", f"must be >= 1, got {self.init_images}")
        _require(self.init_fit_steps >= 0, "init_fit_steps", f"must be >= 0 (0: k-means only), got {self.init_fit_steps}")
        for name in (*_CLASSIFIER_ARGUMENTS, *ARCHITECTURE_ARGUMENTS, "drop_path_rate"):
            _require(name not in self.kwargs, f"kwargs.{name}",
                     f"duplicates model.{name}, which is passed to the model already; remove it from "
                     f"model.kwargs and set model.{name}")

    def timm_kwargs(self, classifier: bool = True) -> dict[str, Any]:
        """The keyword arguments ``timm.create_model(self.name, ...)`` gets: the architecture options
        that are set, the stochastic depth rate and ``kwargs``; with ``classifier`` also the head's
        class count, the input size and the head dropout (a dense backbone sets its own)."""
        head = {name: getattr(self, name) for name in _CLASSIFIER_ARGUMENTS} if classifier else {}
        architecture = {name: getattr(self, name) for name in ARCHITECTURE_ARGUMENTS if getattr(self, name) is not None}
        return {**head, **architecture, "drop_path_rate": self.drop_path_rate, **self.kwargs}


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area fraction range (min, max), each in (0, 1]."""
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    """RandomResizedCrop aspect ratio range (min, max)."""
    hflip: float = 0.5
    """Probability of a horizontal flip, in [0, 1]."""
    color_jitter: float = 0.3
    """Colour jitter strength; 0 disables (ignored when auto_augment is set)."""
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy string (e.g. rand-m9-mstd0.5-inc1); null disables."""
    interpolation: str = "bicubic"
    """Resize interpolation: bilinear, bicubic, nearest or random."""
    re_prob: float = 0.25
    """Random erasing probability, in [0, 1]; 0 disables."""
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    """Random erasing fill mode."""
    re_count: int = 1
    """Number of random erasing regions per image (>= 1)."""
    three_augment: bool = False
    """DeiT III three-augment (grayscale / solarize / blur) instead of RandAugment."""
    crop_pct: float = 0.875
    """Evaluation centre-crop fraction: resize to image_size / crop_pct, then crop, in (0, 1]."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel normalisation mean (RGB, in [0, 1] units)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel normalisation standard deviation (RGB, > 0)."""

    def __post_init__(self) -> None:
        _require(0.0 < self.scale[0] <= self.scale[1] <= 1.0, "scale",
                 f"must satisfy 0 < min <= max <= 1, got {self.scale}")
        _require(0.0 < self.ratio[0] <= self.ratio[1], "ratio",
                 f"must satisfy 0 < min <= max, got {self.ratio}")
        for name in ("hflip", "re_prob"):
            value = getattr(self, name)
            _require(0.0 <= value <= 1.0, name, f"is a probability in [0, 1], got {value}")
        _require(self.color_jitter >= 0.0, "color_jitter", f"must be >= 0, got {self.color_jitter}")
        _require(self.interpolation in ("bilinear", "bicubic", "nearest", "random"), "interpolation",
                 f"must be one of bilinear, bicubic, nearest, random; got {self.interpolation!r}")
        _require(self.re_count >= 1, "re_count", f"must be >= 1, got {self.re_count}")
        _require(0.0 < self.crop_pct <= 1.0, "crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        _require(all(s > 0 for s in self.std), "std", f"every entry must be > 0, got {self.std}")
        if self.auto_augment is not None:
            _require(self.auto_augment.startswith(_AUTO_AUGMENT_PREFIXES), "auto_augment",
                     f"{self.auto_augment!r} is not a timm policy; use one starting with "
                     f"{', '.join(_AUTO_AUGMENT_PREFIXES)} (e.g. rand-m9-mstd0.5-inc1), or null")
        _require(not (self.three_augment and self.auto_augment), "three_augment",
                 f"three-augment replaces auto_augment={self.auto_augment!r}; set "
                 f"data.augment.auto_augment=null to use it")


@dataclass(frozen=True)
class MixupSection:
    mixup_alpha: float = 0.8
    """Mixup beta-distribution alpha; 0 disables mixup."""
    cutmix_alpha: float = 1.0
    """CutMix beta-distribution alpha; 0 disables cutmix."""
    prob: float = 1.0
    """Probability of applying mixup or cutmix to a batch, in [0, 1]."""
    switch_prob: float = 0.5
    """Probability of cutmix instead of mixup when both are enabled, in [0, 1]."""
    mode: Literal["batch", "pair", "elem"] = "batch"
    """How mixing parameters are drawn: per batch, per pair or per element."""

    @property
    def enabled(self) -> bool:
        """Whether any mixing happens (an alpha above 0 and a non-zero probability)."""
        return self.prob > 0.0 and (self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0)

    def __post_init__(self) -> None:
        _require(self.mixup_alpha >= 0.0, "mixup_alpha", f"must be >= 0, got {self.mixup_alpha}")
        _require(self.cutmix_alpha >= 0.0, "cutmix_alpha", f"must be >= 0, got {self.cutmix_alpha}")
        for name in ("prob", "switch_prob"):
            value = getattr(self, name)
            _require(0.0 <= value <= 1.0, name, f"is a probability in [0, 1], got {value}")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["embedded", "shards"] = "shards"
    """Where samples come from: 'embedded' (built-in digits, built into cache_dir on first use)
    or 'shards' (webdataset tar shards named by train_shards / val_shards)."""
    train_shards: Optional[str] = None
    """Training shards: brace pattern or path (e.g. /data/in1k/train-{000000..001023}.tar)."""
    val_shards: Optional[str] = None
    """Validation shards: brace pattern or path."""
    train_index: Optional[str] = None
    """Index JSON written with the training shards (sample counts); null looks next to them."""
    val_index: Optional[str] = None
    """Index JSON written with the validation shards; null looks next to them."""
    cache_dir: str = ".cache/anchorformer"
    """Folder where the embedded dataset's shards are built and cached."""
    image_size: int = 224
    """Training and evaluation crop size in pixels."""
    num_workers: int = 8
    """DataLoader worker processes per rank (0 loads in the training process)."""
    shuffle_buffer: int = 1000
    """Samples held in the in-memory shuffle buffer of each worker (0 disables)."""
    repeated_aug: int = 1
    """Repeated augmentation: each image appears this many times per epoch on different ranks
    (3 in DeiT); 1 disables."""
    pipeline: Literal["pil", "fast"] = "pil"
    """Training input pipeline: 'pil' (timm's transforms on Pillow images, the reference) or 'fast'
    (the same random draws and ops with JPEGs decoded to uint8 tensors and one normalisation per
    batch: about twice the images per loader worker; docs/data.md)."""
    augment_on: Literal["cpu", "gpu"] = "cpu"
    """Where training augmentation runs: 'cpu' (loader workers) or 'gpu' (needs pipeline 'fast':
    workers decode, crop and flip; RandAugment, erasing, normalisation and mixup run in batches on
    the training device)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-time augmentation and evaluation preprocessing."""
    mixup: MixupSection = field(default_factory=MixupSection)
    """Mixup / CutMix of training batches (targets become soft)."""

    def __post_init__(self) -> None:
        _require(self.image_size > 0, "image_size", f"must be > 0 pixels, got {self.image_size}")
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _require(self.repeated_aug >= 1, "repeated_aug", f"must be >= 1, got {self.repeated_aug}")
        if self.source == "embedded":
            _require(self.image_size >= 8, "image_size",
                     f"{self.image_size} px is smaller than the embedded 8x8 digits; use at least 8")
        _require(self.augment_on == "cpu" or self.pipeline == "fast", "augment_on",
                 "gpu runs the fast pipeline's batched ops on the device; set data.pipeline=fast too")
        if self.augment_on == "gpu":
            _require(not self.augment.three_augment and not (self.augment.auto_augment or "").startswith("augmix"),
                     "augment_on", "gpu implements RandAugment, AutoAugment and colour jitter, not three-augment "
                     "or AugMix; set data.augment_on=cpu for those")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = 5e-4
    """Peak learning rate at lr_reference_batch images per step (scaled linearly to the
    global batch; see lr_reference_batch)."""
    lr_reference_batch: int = 512
    """Global batch the lr refers to: peak lr = lr * global_batch / lr_reference_batch; 0 uses lr
    unscaled."""
    weight_decay: float = 0.05
    """Decoupled weight decay (not applied to norms, biases, tokens, pos_embed)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    eps: float = 1e-8
    """AdamW epsilon (> 0)."""
    momentum: float = 0.9
    """SGD momentum, in [0, 1)."""
    layer_decay: float = 1.0
    """Layer-wise lr decay for fine-tuning: block i of L gets lr * layer_decay**(L - i); 1.0 disables."""

    def __post_init__(self) -> None:
        _require(self.lr > 0.0, "lr", f"must be > 0, got {self.lr}")
        _require(self.lr_reference_batch >= 0, "lr_reference_batch",
                 f"must be >= 0 (0 disables scaling), got {self.lr_reference_batch}")
        _require(self.weight_decay >= 0.0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(all(0.0 <= b < 1.0 for b in self.betas), "betas",
                 f"each beta must be in [0, 1), got {self.betas}")
        _require(self.eps > 0.0, "eps", f"must be > 0, got {self.eps}")
        _require(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        _require(0.0 < self.layer_decay <= 1.0, "layer_decay",
                 f"must be in (0, 1] (1 disables), got {self.layer_decay}")


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 300
    """Training epochs (passes over the training stream)."""
    warmup_epochs: float = 5.0
    """Linear warm-up length in epochs (fractions allowed; converted to optimizer steps)."""
    warmup_lr: float = 1e-6
    """Learning rate at step 0 of the warm-up."""
    min_lr: float = 1e-5
    """Learning rate the cosine decay ends at."""
    decay: Literal["cosine", "constant"] = "cosine"
    """Shape after warm-up: cosine to min_lr, or constant at the peak lr."""

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        _require(0.0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
                 f"must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        _require(self.warmup_lr >= 0.0, "warmup_lr", f"must be >= 0, got {self.warmup_lr}")
        _require(self.min_lr >= 0.0, "min_lr", f"must be >= 0, got {self.min_lr}")


@dataclass(frozen=True)
class LossConfig:
    label_smoothing: float = 0.1
    """Label smoothing for hard targets (with mixup it goes into the mixed soft targets), in [0, 1)."""
    distillation: Literal["none", "soft", "hard"] = "none"
    """DeiT distillation from a teacher: soft (KL at temperature tau) or hard (teacher argmax)."""
    teacher_model: Optional[str] = None
    """timm name of the teacher (e.g. regnety_160); required when distillation is not none."""
    teacher_checkpoint: Optional[str] = None
    """Local checkpoint file of the teacher's weights; required when distillation is not none."""
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for timm.create_model of the teacher (e.g. {img_size: 384})."""
    distillation_alpha: float = 0.5
    """Weight of the distillation term: loss = (1 - alpha) * base + alpha * distill, in [0, 1]."""
    distillation_tau: float = 1.0
    """Soft distillation temperature (> 0)."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.label_smoothing < 1.0, "label_smoothing",
                 f"must be in [0, 1), got {self.label_smoothing}")
        if self.distillation != "none":
            _require(bool(self.teacher_model), "teacher_model",
                     f"is required with loss.distillation={self.distillation} (a timm model name)")
            _require(bool(self.teacher_checkpoint), "teacher_checkpoint",
                     f"is required with loss.distillation={self.distillation} (a local weights file)")
        _require(0.0 <= self.distillation_alpha <= 1.0, "distillation_alpha",
                 f"must be in [0, 1], got {self.distillation_alpha}")
        _require(self.distillation_tau > 0.0, "distillation_tau",
                 f"must be > 0, got {self.distillation_tau}")


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights (sharded under ZeRO-3) and evaluate it."""
    decay: float = 0.99996
    """EMA decay per update, in (0, 1)."""
    every_steps: int = 1
    """Update the EMA every this many optimizer steps (decay is applied per update)."""

    def __post_init__(self) -> None:
        _require(0.0 < self.decay < 1.0, "decay", f"must be in (0, 1), got {self.decay}")
        _require(self.every_steps >= 1, "every_steps", f"must be >= 1, got {self.every_steps}")


@dataclass(frozen=True)
class TrainConfig:
    global_batch_size: int = 1024
    """Images per optimizer step over all ranks (= micro_batch_size x world size x accumulation)."""
    micro_batch_size: int = 128
    """Images per forward/backward on one rank; accumulation steps are derived from the world size."""
    precision: Literal["fp32", "bf16", "bf16-mixed", "fp16"] = "bf16"
    """Training precision. bf16 / fp16: DeepSpeed's modes (16-bit weights and gradients, fp32
    master weights in its optimizer). bf16-mixed: fp32 weights, gradients and optimizer with the
    forward under torch.autocast(bf16) (DeepSpeed's torch_autocast), as a plain PyTorch loop;
    faster on GPUs (docs/training.md)."""
    grad_clip: float = 0.0
    """Global gradient-norm clip; 0 disables."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
    seed: int = 0
    """Seed of weights, data order and augmentation (per-rank streams derive from it)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (a checkpoint is written); 0 runs all epochs."""
    eval_every_epochs: int = 1
    """Evaluate on the validation stream every this many epochs (and after the last)."""
    nonfinite_patience: int = 10
    """Stop the run after this many consecutive optimizer steps with a NaN/inf loss (each such
    step is skipped and counted)."""
    spike_threshold: float = 0.0
    """Loss-spike guard: skip (and count, train/spike_steps) a step whose loss exceeds this multiple
    of the median loss of the last spike_window applied steps (3 matches Lightning's SpikeDetection
    rtol=2); 0 disables, else > 1."""
    spike_window: int = 10
    """Applied steps whose median loss the spike guard compares with; it judges once it has seen that many."""
    spike_patience: int = 10
    """Stop the run after this many consecutive loss-spike steps (each such step is skipped and counted)."""
    tf32: bool = True
    """On CUDA, let fp32 matmuls and convolutions run on TF32 tensor cores (10-bit mantissa inputs,
    fp32 accumulation); no effect on the CPU or on bf16 work."""
    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "off"
    """torch.compile of the model through DeepSpeed's engine.compile() (inductor): default,
    reduce-overhead (CUDA graphs), max-autotune (autotuned kernels + CUDA graphs) or
    max-autotune-no-cudagraphs; the first steps pay the compilation (docs/training.md)."""
    anchor_mix: Literal["auto", "triton", "compile", "sdpa", "torch"] = "auto"
    """Backend of anchor attention's mixing op: auto (each shape timed once on the device, the fastest
    kept; rank 0's choice on every rank, recorded in checkpoints and summary.json) or one forced
    (refused before any work where it cannot run; docs/training.md)."""
    resume: str = "auto"
    """'auto' resumes from the run folder's latest checkpoint if there is one, 'none' starts
    fresh, anything else is a checkpoint folder (or one tag inside it) to resume from."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device: auto picks cuda when available."""
    ema: EmaConfig = field(default_factory=EmaConfig)
    """Exponential moving average of the weights."""

    def __post_init__(self) -> None:
        _require(self.global_batch_size > 0, "global_batch_size",
                 f"must be > 0, got {self.global_batch_size}")
        _require(self.micro_batch_size > 0, "micro_batch_size",
                 f"must be > 0, got {self.micro_batch_size}")
        _require(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
                 f"{self.global_batch_size} is not divisible by train.micro_batch_size="
                 f"{self.micro_batch_size}")
        _require(self.grad_clip >= 0.0, "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        _require(self.max_steps >= 0, "max_steps", f"must be >= 0 (0 disables), got {self.max_steps}")
        _require(self.eval_every_epochs >= 1, "eval_every_epochs",
                 f"must be >= 1, got {self.eval_every_epochs}")
        _require(self.nonfinite_patience >= 1, "nonfinite_patience",
                 f"must be >= 1, got {self.nonfinite_patience}")
        _require(self.spike_threshold == 0.0 or self.spike_threshold > 1.0, "spike_threshold",
                 f"must be 0 (off) or > 1 (a multiple of the median loss), got {self.spike_threshold}")
        _require(self.spike_window >= 1, "spike_window", f"must be >= 1, got {self.spike_window}")
        _require(self.spike_patience >= 1, "spike_patience", f"must be >= 1, got {self.spike_patience}")
        _require(bool(self.resume), "resume", "must be 'auto', 'none' or a checkpoint path")


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ weights)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states (and the update) on the CPU; needs zero_stage >= 1."""
    offload_param: Literal["none", "cpu"] = "none"
    """Keep partitioned weights on the CPU between uses; needs zero_stage 3."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass (stages 1-3)."""
    contiguous_gradients: bool = True
    """Copy gradients into one contiguous buffer as they are produced (less fragmentation)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    allgather_bucket_size: int = 50_000_000
    """Elements per all-gather bucket (stages 1-2)."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """Elements of weights prefetched ahead of use (stage 3)."""
    stage3_param_persistence_threshold: int = 100_000
    """Weights smaller than this many elements stay unpartitioned (stage 3)."""
    stage3_max_live_parameters: int = 1_000_000_000
    """Upper bound of gathered weight elements alive at once (stage 3)."""
    fp16_initial_scale_power: int = 16
    """fp16 only: initial dynamic loss scale is 2**this."""
    fp16_loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the loss scale is raised."""
    communication_data_type: Optional[Literal["fp32", "bf16", "fp16"]] = None
    """Dtype of gradient all-reduce; null uses the training precision."""
    wall_clock_breakdown: bool = False
    """Let DeepSpeed time forward/backward/step and print the breakdown."""

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage",
                 f"must be one of 0, 1, 2, 3; got {self.zero_stage}")
        if self.offload_optimizer != "none":
            _require(self.zero_stage >= 1, "offload_optimizer",
                     "needs deepspeed.zero_stage >= 1 (optimizer states must be partitioned)")
        if self.offload_param != "none":
            _require(self.zero_stage == 3, "offload_param", "needs deepspeed.zero_stage=3")
        for name in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                     "stage3_max_live_parameters"):
            _require(getattr(self, name) > 0, name, f"must be > 0 elements, got {getattr(self, name)}")
        _require(self.stage3_param_persistence_threshold >= 0, "stage3_param_persistence_threshold",
                 f"must be >= 0, got {self.stage3_param_persistence_threshold}")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    """Write a checkpoint every this many optimizer steps; 0 disables (epoch-end ones remain)."""
    at_epoch_end: bool = True
    """Write a checkpoint at the end of every epoch."""
    keep_last: int = 3
    """Keep this many most recent checkpoints (older tag folders are deleted); 0 keeps all."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "every_steps", f"must be >= 0 (0 disables), got {self.every_steps}")
        _require(self.keep_last >= 0, "keep_last", f"must be >= 0 (0 keeps all), got {self.keep_last}")


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str = "runs"
    """Folder holding one sub-folder per run."""
    run_name: Optional[str] = None
    """Run folder name under output_dir; null uses the recipe file's name."""
    every_steps: int = 50
    """Log scalars and a log line every this many optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to {run folder}/tensorboard."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device at the training precision, for MFU (e.g. 989 for an H100
    SXM in bf16); 0 omits MFU."""
    anchor_every_steps: int = 100
    """Anchor diagnostics (degrees, dead anchors, entropy, anchor norms and cosines: scalars and
    histograms) from a fixed probe batch every this many optimizer steps, and at each evaluation;
    0 disables (AnchorFormer classifiers; docs/tensorboard.md)."""
    anchor_probe_images: int = 16
    """Validation images in the fixed probe batch (the first of rank 0's validation stream)."""
    images_every_evals: int = 1
    """Anchor maps (strongest anchor per patch, cls row of S; first, middle and last layer) of the
    probe images at every this many evaluations; 0 disables."""
    input_images: int = 32
    """Training images logged once at the start, exactly as the model receives them
    (denormalised); 0 disables."""

    def __post_init__(self) -> None:
        _require(bool(self.output_dir), "output_dir", "must be a folder path")
        if self.run_name is not None:
            _require(bool(self.run_name) and "/" not in self.run_name, "run_name",
                     f"must be a plain folder name without '/', got {self.run_name!r}")
        _require(self.every_steps >= 1, "every_steps", f"must be >= 1, got {self.every_steps}")
        _require(self.peak_tflops >= 0.0, "peak_tflops", f"must be >= 0 (0 omits MFU), got {self.peak_tflops}")
        for name in ("anchor_every_steps", "images_every_evals", "input_images"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0 (0 disables), got {getattr(self, name)}")
        _require(self.anchor_probe_images >= 1, "anchor_probe_images", f"must be >= 1, got {self.anchor_probe_images}")


@dataclass(frozen=True)
class SlurmConfig:
    nodes: int = 1
    """Number of nodes to allocate (the recipe's batch assumes nodes x gpus_per_node GPUs)."""
    gpus_per_node: int = 8
    """GPUs (= tasks) per node; one training process per GPU."""
    cpus_per_task: int = 10
    """CPU cores per task (data loader workers + the training process)."""
    mem_gb: int = 0
    """Memory per node in GB; 0 requests the node's default."""
    partition: Optional[str] = None
    """SLURM partition (--partition); null uses the cluster default."""
    account: Optional[str] = None
    """SLURM account to charge (--account)."""
    qos: Optional[str] = None
    """SLURM quality of service (--qos)."""
    constraint: Optional[str] = None
    """Node feature constraint (--constraint, e.g. h100)."""
    time_min: int = 4320
    """Wall-clock limit of one job in minutes; the job requeues itself when it runs out."""
    exclusive: bool = True
    """Request whole nodes (--exclusive)."""
    job_name: Optional[str] = None
    """Job name shown by squeue; null uses the run name."""
    comment: Optional[str] = None
    """Free-text job comment (--comment)."""
    mail: Optional[str] = None
    """Address for SLURM mail (--mail-user); null sends none."""
    mail_type: str = "END,FAIL"
    """Events that send mail (--mail-type) when mail is set."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM sends USR1 so a checkpoint can be written."""
    max_requeues: int = 20
    """How many times a preempted or timed-out job is requeued before giving up."""
    folder: Optional[str] = None
    """Folder for submitit logs and pickles; null uses {run folder}/slurm."""
    setup: tuple[str, ...] = ()
    """Shell lines run before training in the job (e.g. 'module load cuda/12.4')."""

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "cpus_per_task", "time_min"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.mem_gb >= 0, "mem_gb", f"must be >= 0 (0 uses the default), got {self.mem_gb}")
        _require(self.signal_delay_s >= 0, "signal_delay_s", f"must be >= 0, got {self.signal_delay_s}")
        _require(self.max_requeues >= 0, "max_requeues", f"must be >= 0, got {self.max_requeues}")


@dataclass(frozen=True)
class HealthConfig:
    collective_timeout_s: float = 1800.0
    """Seconds one collective (all-reduce, broadcast, barrier) waits for the other ranks before it
    raises; the only bound on evaluations and checkpoint writes, which the hang watchdog does not time."""
    hang_timeout_s: float = 0.0
    """Seconds without a new optimizer step after which every rank writes its Python stacks under
    {run}/hang/ and exits (a SLURM job requeues itself); timed from the first completed step on.
    0 = derived: max(hang_floor_s, hang_steps x the measured step time); -1 turns the watchdog off."""
    hang_floor_s: float = 300.0
    """Least derived hang timeout in seconds (with hang_timeout_s=0)."""
    hang_steps: float = 50.0
    """The derived hang timeout in measured step times (with hang_timeout_s=0)."""
    straggler_ratio: float = 1.5
    """Warn about a rank whose busy time per step (data wait + forward passes) exceeds this multiple
    of the ranks' median for straggler_patience log intervals in a row; 0 disables the warning."""
    straggler_patience: int = 3
    """Log intervals (logging.every_steps) in a row a rank must be slow before the straggler warning."""

    def __post_init__(self) -> None:
        _require(self.collective_timeout_s > 0, "collective_timeout_s",
                 f"must be > 0 seconds, got {self.collective_timeout_s}")
        _require(self.hang_timeout_s == -1 or self.hang_timeout_s >= 0, "hang_timeout_s",
                 f"must be seconds > 0, 0 (derived from the step time) or -1 (off), got {self.hang_timeout_s}")
        _require(self.hang_floor_s > 0, "hang_floor_s", f"must be > 0 seconds, got {self.hang_floor_s}")
        _require(self.hang_steps >= 1, "hang_steps", f"must be >= 1 step times, got {self.hang_steps}")
        _require(self.straggler_ratio == 0 or self.straggler_ratio > 1, "straggler_ratio",
                 f"must be 0 (off) or > 1 (a multiple of the median), got {self.straggler_ratio}")
        _require(self.straggler_patience >= 1, "straggler_patience",
                 f"must be >= 1 log intervals, got {self.straggler_patience}")


@dataclass(frozen=True)
class DetectionConfig:
    train_annotations: Optional[str] = None
    """COCO instances JSON of the training split (required with task=detection)."""
    train_images: Optional[str] = None
    """Folder of the training images (required with task=detection)."""
    val_annotations: Optional[str] = None
    """COCO instances JSON of the validation split (required with task=detection)."""
    val_images: Optional[str] = None
    """Folder of the validation images (required with task=detection)."""
    image_size: int = 1024
    """Longest image side in pixels (training cap and evaluation size)."""
    train_scales: tuple[int, ...] = tuple(range(640, 1025, 32))
    """Shorter-side sizes in pixels drawn per training image (multi-scale), each <= image_size."""
    pyramid_channels: int = 256
    """Channels of the simple feature pyramid built on the backbone."""
    mask_head_channels: int = 256
    """Channels of the Mask R-CNN mask head convolutions."""
    rois_per_image: int = 512
    """Proposals sampled per image for the box head in training."""
    detections_per_image: int = 100
    """Detections kept per image at evaluation."""

    def __post_init__(self) -> None:
        _require(self.image_size >= 32, "image_size", f"must be >= 32 pixels, got {self.image_size}")
        _require(bool(self.train_scales) and all(32 <= s <= self.image_size for s in self.train_scales),
                 "train_scales", f"must be sizes in [32, image_size={self.image_size}], got {list(self.train_scales)}")
        for name in ("pyramid_channels", "mask_head_channels", "rois_per_image", "detections_per_image"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SegmentationConfig:
    root: Optional[str] = None
    """ADE20K root folder (ADEChallengeData2016, with images/ and annotations/); required with
    task=segmentation."""
    train_split: str = "training"
    """Sub-folder name of the training split."""
    val_split: str = "validation"
    """Sub-folder name of the validation split."""
    crop_size: int = 512
    """Square training crop (and sliding-window) size in pixels."""
    base_size: int = 512
    """Shorter side in pixels that scale_range multiplies in training and evaluation resizes to."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random rescale range (min, max) relative to base_size in training."""
    inference: Literal["whole", "slide"] = "slide"
    """Evaluation: the whole image at once, or crop_size windows every slide_stride pixels."""
    slide_stride: int = 341
    """Stride of the sliding windows in pixels (<= crop_size)."""
    pyramid_channels: int = 256
    """Channels of the simple feature pyramid built on the backbone."""
    head_channels: int = 512
    """Channels of the UperNet decode head."""
    aux_channels: int = 256
    """Channels of the auxiliary FCN head."""
    aux_weight: float = 0.4
    """Weight of the auxiliary head's loss; 0 disables it."""

    def __post_init__(self) -> None:
        for name in ("crop_size", "base_size", "pyramid_channels", "head_channels", "aux_channels"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(0.0 < self.scale_range[0] <= self.scale_range[1], "scale_range",
                 f"must satisfy 0 < min <= max, got {self.scale_range}")
        _require(1 <= self.slide_stride <= self.crop_size, "slide_stride",
                 f"must be in [1, crop_size={self.crop_size}], got {self.slide_stride}")
        _require(self.aux_weight >= 0.0, "aux_weight", f"must be >= 0, got {self.aux_weight}")


@dataclass(frozen=True)
class RootConfig:
    task: Literal["classification", "detection", "segmentation"] = "classification"
    """What is trained: classification (pre-training), detection or segmentation fine-tuning."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and parameter groups."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Epochs and learning-rate schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Training loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch, precision and loop options."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO and DeepSpeed engine options."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When checkpoints are written and how many are kept."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Run folder, TensorBoard and console output."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Resources requested by launch/submit.py."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Hang watchdog, collective timeout and straggler warnings."""
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    """COCO detection fine-tuning (task=detection)."""
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    """ADE20K segmentation fine-tuning (task=segmentation)."""

    def validate(self) -> None:
        """Checks across sections, run on every loaded config (the schema defaults alone name no
        data, so they are not checked at construction)."""
        if self.task == "detection":
            for name in ("train_annotations", "train_images", "val_annotations", "val_images"):
                _require(bool(getattr(self.detection, name)), f"detection.{name}",
                         "is required with task=detection (a COCO annotations JSON / image folder)")
        if self.task == "segmentation":
            _require(bool(self.segmentation.root), "segmentation.root",
                     "is required with task=segmentation (the ADEChallengeData2016 folder)")
        if self.task == "classification" and self.data.source == "shards":
            _require(bool(self.data.train_shards), "data.train_shards",
                     "is required with data.source=shards (a shard path or brace pattern); "
                     "or set data.source=embedded")
            _require(bool(self.data.val_shards), "data.val_shards",
                     "is required with data.source=shards (a shard path or brace pattern)")
        if self.data.source == "embedded":
            _require(self.model.num_classes == 10, "model.num_classes",
                     f"must be 10 with data.source=embedded (ten digit classes), got {self.model.num_classes}")
        if self.task == "classification":
            _require(self.model.img_size == self.data.image_size, "model.img_size",
                     f"{self.model.img_size} differs from data.image_size={self.data.image_size}, the crop "
                     f"the model is fed; set both to the same size")
        if self.data.mixup.enabled:
            _require(self.task == "classification", "data.mixup.prob",
                     f"mixup applies to classification only; set data.mixup.prob=0 for task={self.task}")
            _require(self.train.micro_batch_size % 2 == 0, "train.micro_batch_size",
                     f"Mixup/CutMix pairs the images of a batch: {self.train.micro_batch_size} must be even; "
                     f"change it or set data.mixup.prob=0")
        if self.train.precision == "fp16" and self.deepspeed.communication_data_type == "bf16":
            raise ConfigError("deepspeed.communication_data_type",
                              "bf16 communication needs train.precision=bf16, bf16-mixed or fp32")
        if self.train.device == "cpu":
            self.check_compile_device("cpu")

    def check_compile_device(self, device_type: str) -> None:
        """Refuse a ``train.compile`` mode that captures CUDA graphs on a device without them (the
        trainer checks the device ``train.device=auto`` resolved to).

        Raises:
            ConfigError: naming train.compile.
        """
        if device_type != "cuda" and self.train.compile in _CUDA_GRAPH_COMPILE_MODES:
            raise ConfigError("train.compile", f"{self.train.compile} captures CUDA graphs, which a {device_type} "
                                               f"run has none of; use default or max-autotune-no-cudagraphs, or off")
