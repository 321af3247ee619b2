"""The training input pipelines a train stream can run (``data.pipeline`` x ``data.augment_on``).

- ``pil`` (default): timm's transform on Pillow images, exactly as timm's own training scripts
  run it; the reference the others are tested against.
- ``fast``: the same random choices and ops with less work (``fast_transforms``): uint8 tensors
  from libjpeg-turbo, the crop on the tensor, one normalisation per batch.
- ``fast`` with ``augment_on: gpu``: the workers only decode, crop and flip; the augmentation
  ops, normalisation, erasing and Mixup/CutMix run in batches on the training device
  (``batch_augment.DeviceAugment``, which the task applies to each batch).

A pipeline says what runs in a worker between reading a sample and yielding a batch: the
decoder, the per-sample transform, how samples stack into a batch, and the batch stages."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from anchorformer.data.batch_augment import DeviceAugment
from anchorformer.data.fast_transforms import (FastTrainTransform, augment_in_worker, collate_planned, decode_rgb,
                                               seed_planned_batches)
from anchorformer.data.stages import decode_pil, mix_batches
from anchorformer.config import AugmentConfig, MixupSection
from anchorformer.data.transforms import build_mixup, build_train_transform

__all__ = ["PIPELINES", "AUGMENT_ON", "TrainPipeline", "build_train_pipeline"]

PIPELINES = ("pil", "fast")
AUGMENT_ON = ("cpu", "gpu")


@dataclass(frozen=True)
class TrainPipeline:
    """The per-worker pieces of one training pipeline, and what the training process applies."""
    decode: Callable[[bytes], object]
    """image bytes -> what ``transform`` takes"""
    transform: Callable
    """per-sample transform, run under the sample's seed"""
    stack: Callable[[list], object]
    """transformed samples -> the batch's images"""
    worker_mixup: Callable | None
    """timm Mixup applied to each batch in the worker (None: no mixing there)"""
    device_augment: DeviceAugment | None
    """``augment_on: gpu``: turns each batch's plan into training images on the device"""

    def batch_stages(self, seed_parts: tuple) -> list[Callable]:
        """The worker stages after batching, seeded from ``seed_parts`` and each batch's number."""
        if self.device_augment is not None:
            return [functools.partial(seed_planned_batches, seed_parts=seed_parts)]
        if self.worker_mixup is not None:
            return [functools.partial(mix_batches, mixup=self.worker_mixup, seed_parts=seed_parts)]
        return []


def build_train_pipeline(augment: AugmentConfig, image_size: int, mixup: MixupSection | None, num_classes: int,
                         label_smoothing: float = 0.0, pipeline: str = "pil", augment_on: str = "cpu") -> TrainPipeline:
    """The training pipeline ``pipeline`` with its augmentation on ``augment_on``.

    Args:
        augment: augmentation options (``data.augment``).
        image_size: side of the training crop, pixels (``data.image_size``).
        mixup: Mixup/CutMix options (``data.mixup``); None, or a section that mixes nothing, disables.
        num_classes: classes of the soft Mixup targets.
        label_smoothing: smoothing of the soft Mixup targets (``loss.label_smoothing``).
        pipeline: ``pil`` or ``fast``.
        augment_on: ``cpu`` (in the loader workers) or ``gpu`` (on the training device; needs ``fast``).

    Raises:
        ValueError: for an unknown name, ``gpu`` with ``pil``, or options the chosen path does not implement.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"data.pipeline={pipeline!r}; choose from {PIPELINES}")
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"data.augment_on={augment_on!r}; choose from {AUGMENT_ON}")
    if augment_on == "gpu" and pipeline != "fast":
        raise ValueError("data.augment_on=gpu runs the fast pipeline's ops on the device; set data.pipeline=fast")
    mix = build_mixup(mixup, num_classes, label_smoothing) if mixup is not None and mixup.enabled else None
    if pipeline == "pil":
        return TrainPipeline(decode_pil, build_train_transform(augment, image_size), torch.stack, mix, None)
    fast = FastTrainTransform(augment, image_size, on_device=augment_on == "gpu")
    if augment_on == "cpu":
        return TrainPipeline(decode_rgb, fast, functools.partial(augment_in_worker, transform=fast), mix, None)
    device_augment = DeviceAugment(fast.fill, fast.mean, fast.std, fast.erase_mode, mix)
    return TrainPipeline(decode_rgb, fast, collate_planned, None, device_augment)
