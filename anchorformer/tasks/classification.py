"""Image classification (ImageNet-style pre-training and fine-tuning): a timm model, the shard
streams of ``anchorformer.data``, cross-entropy with mixup / label smoothing / distillation, and
top-1 / top-5 evaluation."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

import anchorformer.models  # noqa: F401  (registers the anchorformer_* models with timm)
from anchorformer import data as shards
from anchorformer.config import AugmentConfig, ConfigError, ModelConfig, RootConfig
from anchorformer.data.index import ShardSpec, resolve_shards
from anchorformer.dist import in_lockstep, sum_across_ranks
from anchorformer.tasks.base import Runtime
from anchorformer.tasks.losses import ClassificationLoss, load_teacher
from anchorformer.tasks.preflight import check_exists, check_registered, meta_network

__all__ = ["ClassificationTask", "create_classifier", "load_pretrained", "recipe_shards"]

logger = logging.getLogger(__name__)


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load weights from ``path`` (safetensors, .pt, .pth, DeepSpeed fp32 export) into ``model``
    through its family's ``checkpoint_filter_fn`` (pos_embed resized). A classifier of another
    shape (e.g. 21k -> 1k classes) is left at its fresh initialisation.

    Raises:
        ValueError: when the file is missing or holds another architecture.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"model.pretrained_checkpoint={path!r} does not exist")
    state = timm.models.load_state_dict(str(file))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    expected = model.state_dict()
    fresh = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    for key in fresh:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_classifier = [k for k in missing if k not in fresh]
    if not_classifier or unexpected:
        raise ValueError(f"model.pretrained_checkpoint={path!r} does not fit {type(model).__name__}: "
                         f"missing {not_classifier}, unexpected {unexpected}")
    logger.info("loaded %s (%d tensors; re-initialised: %s)", path, len(state), fresh or "none")


def create_classifier(m: ModelConfig, distillation: str = "none") -> nn.Module:
    """The network of a ``model`` config section at its initialisation (no weights loaded):
    ``timm.create_model(m.name, ...)``, trained with a distillation head unless ``distillation``
    (``loss.distillation``) is none. Builds on the current default device (meta for the pre-flight).

    Raises:
        ConfigError: when the model is not registered or has no distillation head to train.
    """
    try:
        model = timm.create_model(m.name, **m.timm_kwargs())
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise ConfigError("model.name", f"{m.name!r} is not a timm model; pick a registered one, e.g. "
                                        f"{timm.list_models('anchorformer*')[:4]}") from err
    if distillation != "none":
        if not hasattr(model, "set_distilled_training"):
            raise ConfigError("loss.distillation",
                              f"{distillation} needs a model with a distillation token, not {m.name}; set "
                              f"model.name to a distilled one (e.g. anchorformer_tiny_distilled_patch16_224)")
        model.set_distilled_training(True)
    return model


def _check_teacher(cfg: RootConfig) -> None:
    """The distillation teacher: registered, its kwargs accepted, its weights file present."""
    loss = cfg.loss
    check_registered(str(loss.teacher_model), "loss.teacher_model")
    check_exists(str(loss.teacher_checkpoint), "loss.teacher_checkpoint", "file")
    try:
        with torch.device("meta"):
            timm.create_model(loss.teacher_model, num_classes=cfg.model.num_classes, **loss.teacher_kwargs)
    except Exception as err:  # the teacher constructor's own refusal
        raise ConfigError("loss.teacher_kwargs", f"{loss.teacher_model} refuses them: "
                                                 f"{' '.join(str(err).split())}; change loss.teacher_kwargs") from None


def _check_shards(cfg: RootConfig, world_size: int) -> None:
    """Both splits' shards exist (and their index files), and the training shards feed every
    loader reader of the launch."""
    d = cfg.data
    train = _resolve_shards(str(d.train_shards), d.train_index, "data.train_shards", "data.train_index", cfg)
    _resolve_shards(str(d.val_shards), d.val_index, "data.val_shards", "data.val_index", cfg)
    workers = max(1, d.num_workers)
    if len(train) < world_size * workers:
        raise ConfigError("data.num_workers", (
            f"{world_size} process(es) x {workers} loader worker(s) = {world_size * workers} readers, but "
            f"data.train_shards has {len(train)} shard(s) and each reader needs one; lower "
            f"data.num_workers or write more, smaller shards (tools/make_shards.py --max-samples)"))


def _resolve_shards(shards: str, index: Optional[str], key: str, index_key: str, cfg: RootConfig) -> list[ShardSpec]:
    """The shards of one split (every local one must exist), checked against model.num_classes."""
    if index is not None:
        check_exists(index, index_key, "file")
    try:
        specs, loaded = resolve_shards(shards, index)
    except ValueError as err:
        raise ConfigError(key, " ".join(str(err).split())) from None
    if loaded is not None and loaded.num_classes > cfg.model.num_classes:
        raise ConfigError("model.num_classes", (
            f"{cfg.model.num_classes} is fewer than the {loaded.num_classes} classes of the shards of {key}; "
            f"set model.num_classes={loaded.num_classes}"))
    return specs


def recipe_shards(cfg: RootConfig) -> tuple[tuple[Optional[str], Optional[str]], tuple[Optional[str], Optional[str]]]:
    """``((train shards, index), (val shards, index))`` of a classification recipe; the embedded
    digits are built on first use."""
    d = cfg.data
    if d.source == "embedded":
        embedded = shards.prepare_embedded_dataset(d.cache_dir, image_size=d.image_size)
        return (embedded.train_shards, embedded.train_index), (embedded.val_shards, embedded.val_index)
    return (d.train_shards, d.train_index), (d.val_shards, d.val_index)


class ClassificationTask:
    """Classification on webdataset shards (or the embedded digits).

    Args:
        cfg: the run's configuration.
        runtime: device, dtype and distributed environment.
    """

    main_metric = "top1"

    @classmethod
    def preflight(cls, cfg: RootConfig, world_size: int) -> nn.Module:
        """The classifier on the meta device (:func:`tasks.preflight.meta_network`); the teacher
        builds and its weights exist; the shards exist, hold at most ``model.num_classes`` classes and
        feed every loader reader of ``world_size`` processes.

        Raises:
            ConfigError: naming the key.
        """
        network = meta_network(cfg.model, lambda: create_classifier(cfg.model, cfg.loss.distillation), "model.img_size")
        if cfg.loss.distillation != "none":
            _check_teacher(cfg)
        if cfg.data.source == "shards":
            _check_shards(cfg, world_size)
        return network

    def __init__(self, cfg: RootConfig, runtime: Runtime):
        self.cfg = cfg
        self.runtime = runtime
        teacher = load_teacher(cfg.loss, cfg.model.num_classes, runtime.device, runtime.dtype)
        self.loss = ClassificationLoss(cfg.loss, teacher)
        self.device_augment = None  # data.augment_on=gpu: the train stream's batch augmentation (build_data)

    def build_model(self) -> nn.Module:
        """``timm.create_model(model.name, ...)`` with the config's overrides and initial weights."""
        model = create_classifier(self.cfg.model, self.cfg.loss.distillation)
        if self.cfg.model.pretrained_checkpoint:
            load_pretrained(model, self.cfg.model.pretrained_checkpoint)
        return model

    def example_input(self) -> torch.Tensor:
        size = self.cfg.model.img_size
        channels = self.cfg.model.kwargs.get("in_chans", 3)
        return torch.zeros(1, channels, size, size, device=self.runtime.device, dtype=self.runtime.dtype)

    def build_data(self) -> dict[str, Any]:
        """Train and validation streams of this rank (the embedded digits are built on first use)."""
        d = self.cfg.data
        (train, train_index), _ = recipe_shards(self.cfg)
        train_stream = shards.build_train_stream(
            train, index=train_index, seed=self.cfg.train.seed,
            image_size=d.image_size, augment=d.augment, mixup=d.mixup, label_smoothing=self.cfg.loss.label_smoothing,
            shuffle_buffer=d.shuffle_buffer, repeated_aug=d.repeated_aug,
            global_batch_size=self.cfg.train.global_batch_size, pipeline=d.pipeline, augment_on=d.augment_on,
            **self._stream_args())
        self.device_augment = train_stream.device_augment
        return {"train": train_stream, "val": self.build_val_data()}

    def build_val_data(self, image_size: Optional[int] = None,
                       augment: Optional[AugmentConfig] = None) -> shards.ValStream:
        """This rank's validation stream alone (``launch/eval.py`` evaluates checkpoints on it).

        Args:
            image_size: test resolution replacing ``data.image_size``; the images stay the recipe's.
            augment: preprocessing (crop, interpolation, normalisation) replacing ``data.augment``.
        """
        _, (val, val_index) = recipe_shards(self.cfg)
        d = self.cfg.data
        return shards.build_val_stream(val, index=val_index,
                                       image_size=d.image_size if image_size is None else image_size,
                                       augment=d.augment if augment is None else augment, **self._stream_args())

    def _stream_args(self) -> dict[str, Any]:
        env = self.runtime.env
        return dict(num_classes=self.cfg.model.num_classes, rank=env.rank, world_size=env.world_size,
                    micro_batch_size=self.cfg.train.micro_batch_size, num_workers=self.cfg.data.num_workers,
                    pin_memory=self.runtime.device.type == "cuda")

    def _to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.runtime.device
        return (images.to(device, dtype=self.runtime.dtype, non_blocking=True),
                targets.to(device, non_blocking=True))

    def training_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = batch[:2]
        if self.device_augment is not None:  # uint8 crops and their plan -> augmented images on the device
            images, targets = self.device_augment(images, targets, self.runtime.device)
        images, targets = self._to_device(images, targets)
        return self.loss(model(images), targets, images), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, val: Iterable[Any]) -> dict[str, float]:
        """Top-1 / top-5 accuracy (%) and mean cross-entropy over all ranks' validation samples."""
        model.eval()
        device = self.runtime.device
        k = min(5, self.cfg.model.num_classes)
        totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1, topk, count
        filler = (self.example_input().cpu().float(), torch.zeros(1, dtype=torch.long))
        for batch, real in in_lockstep(val, filler, device):
            images, targets = self._to_device(*batch[:2])
            logits = model(images).float()
            if not real:
                continue  # forward run only to keep ZeRO-3's weight gathers in step with other ranks
            top = logits.topk(k, dim=-1).indices
            hits = top.eq(targets[:, None])
            totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                                   hits[:, 0].sum().double(), hits.any(dim=-1).sum().double(),
                                   torch.tensor(float(len(targets)), device=device, dtype=torch.float64)])
        loss_sum, top1, topk, count = sum_across_ranks(totals).tolist()
        model.train()
        if count == 0:
            raise ValueError("the validation stream yielded no samples on any rank; check data.val_shards")
        return {"top1": 100.0 * top1 / count, f"top{k}": 100.0 * topk / count,
                "loss": loss_sum / count, "samples": count}
