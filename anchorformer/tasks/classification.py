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
from anchorformer.config import ConfigError, ModelConfig, RootConfig
from anchorformer.data.transforms import eval_transform_config, mixup_config, train_transform_config
from anchorformer.dist import in_lockstep, sum_across_ranks
from anchorformer.tasks.base import Runtime
from anchorformer.tasks.losses import ClassificationLoss, load_teacher

__all__ = ["ClassificationTask", "create_classifier", "load_pretrained"]

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
        model = timm.create_model(m.name, num_classes=m.num_classes, img_size=m.img_size,
                                  drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate, **m.kwargs)
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


class ClassificationTask:
    """Classification on webdataset shards (or the embedded digits).

    Args:
        cfg: the run's configuration.
        runtime: device, dtype and distributed environment.
    """

    main_metric = "top1"

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
        (train, train_index), _ = self._shards()
        train_stream = shards.build_train_stream(
            train, index=train_index, seed=self.cfg.train.seed,
            mixup=mixup_config(d, self.cfg.loss.label_smoothing), shuffle_buffer=d.shuffle_buffer,
            repeated_aug=d.repeated_aug, transform=train_transform_config(d),
            global_batch_size=self.cfg.train.global_batch_size, pipeline=d.pipeline, augment_on=d.augment_on,
            **self._stream_args())
        self.device_augment = train_stream.device_augment
        return {"train": train_stream, "val": self.build_val_data()}

    def build_val_data(self, transform: Optional[shards.EvalTransformConfig] = None) -> shards.ValStream:
        """This rank's validation stream alone (``launch/eval.py`` evaluates checkpoints on it).

        Args:
            transform: preprocessing replacing the recipe's (a test resolution or crop); the
                images stay the recipe's.
        """
        _, (val, val_index) = self._shards()
        transform = transform if transform is not None else eval_transform_config(self.cfg.data)
        return shards.build_val_stream(val, index=val_index, transform=transform, **self._stream_args())

    def _shards(self) -> tuple[tuple[Optional[str], Optional[str]], tuple[Optional[str], Optional[str]]]:
        """``((train shards, index), (val shards, index))`` of the recipe; the embedded digits are
        built on first use."""
        d = self.cfg.data
        if d.source == "embedded":
            embedded = shards.prepare_embedded_dataset(d.cache_dir, image_size=d.image_size)
            return (embedded.train_shards, embedded.train_index), (embedded.val_shards, embedded.val_index)
        return (d.train_shards, d.train_index), (d.val_shards, d.val_index)

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
